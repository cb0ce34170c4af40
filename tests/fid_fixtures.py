"""A stand-in for pytorch-fid (the ``[fid]`` extra) with its interface: ``pytorch_fid.inception``
(``InceptionV3``, ``FID_WEIGHTS_URL``) and ``pytorch_fid.fid_score.calculate_frechet_distance``.

Its network maps images to 16 random features (the other 2032 of the 2048 are zero) and records
every input, so tests see exactly what nvae_fast hands the library; its Fréchet distance is the
textbook formula on those 16 features. The weights file it stands for is fake too, with a
SHA-256 prefix in its name as torch.hub's files have.
"""

import hashlib
import sys
import types
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

FEATURES = 16
WEIGHTS = b"stand-in for the FID Inception weights"
PREFIX = hashlib.sha256(WEIGHTS).hexdigest()[:8]
WEIGHTS_NAME = f"fake_inception-{PREFIX}.pth"
URL = f"https://weights.invalid/{WEIGHTS_NAME}"
_PROJ = torch.randn(12, FEATURES, generator=torch.Generator().manual_seed(0))


def _features(x: torch.Tensor, proj: torch.Tensor) -> torch.Tensor:
    pooled = F.adaptive_avg_pool2d(2 * x - 1, 2).flatten(1)
    return F.pad(torch.tanh(pooled @ proj), (0, 2048 - FEATURES))


class FakeInceptionV3(nn.Module):
    BLOCK_INDEX_BY_DIM = {64: 0, 192: 1, 768: 2, 2048: 3}
    inputs: list = []

    def __init__(self, output_blocks=(3,), resize_input=True, normalize_input=True, requires_grad=False,
                 use_fid_inception=True):
        super().__init__()
        assert list(output_blocks) == [3]
        cached = Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS_NAME
        assert cached.read_bytes() == WEIGHTS, "the real InceptionV3 loads the weights from torch.hub's cache"
        self.proj = nn.Parameter(_PROJ.clone())

    def forward(self, inp):
        type(self).inputs.append(inp.detach().clone())
        return [_features(inp, self.proj)[:, :, None, None]]


def features_of(images: torch.Tensor) -> np.ndarray:
    """The stand-in's features (N, 2048) float64 of images (N, C, H, W) in [0, 1], grey repeated to RGB."""
    x = images.float().expand(-1, 3, -1, -1) if images.shape[1] == 1 else images.float()
    with torch.no_grad():
        return _features(x, _PROJ).double().numpy()


distances: list = []


def calculate_frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    distances.append((mu1, sigma1, mu2, sigma2))
    for v in (mu1, mu2):
        assert not v[FEATURES:].any()
    a, b = sigma1[:FEATURES, :FEATURES], sigma2[:FEATURES, :FEATURES]
    cross = np.sqrt(np.clip(np.linalg.eigvals(a @ b).real, 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(a) + np.trace(b) - 2 * cross)


def install(monkeypatch, hub_dir: Path) -> list:
    """Puts the stand-in into ``sys.modules`` and torch.hub's cache at ``hub_dir``; returns the
    list of downloads (url, destination, hash prefix) the weights needed."""
    package = types.ModuleType("pytorch_fid")
    inception = types.ModuleType("pytorch_fid.inception")
    inception.InceptionV3, inception.FID_WEIGHTS_URL = FakeInceptionV3, URL
    score = types.ModuleType("pytorch_fid.fid_score")
    score.calculate_frechet_distance = calculate_frechet_distance
    package.inception, package.fid_score = inception, score
    for name, module in (("pytorch_fid", package), ("pytorch_fid.inception", inception),
                         ("pytorch_fid.fid_score", score)):
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(torch.hub, "_hub_dir", str(hub_dir))
    downloads = []

    def download(url, dst, hash_prefix=None, progress=True):
        downloads.append((url, dst, hash_prefix))
        Path(dst).write_bytes(WEIGHTS)

    monkeypatch.setattr(torch.hub, "download_url_to_file", download)
    FakeInceptionV3.inputs = []
    distances.clear()
    return downloads
