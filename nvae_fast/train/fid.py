"""Fréchet Inception Distance of a model's samples to its dataset, as the official ``evaluate.py
--eval_mode evaluate_fid`` computes it, through pytorch-fid (the optional extra ``[fid]``).

What the official code does, and so what this module does:

* **Features**: pytorch-fid's ``InceptionV3`` with the TensorFlow FID weights
  (``pt_inception-2015-12-05``), pool3 (2048 features); images float in [0, 1], grey ones
  repeated to RGB, resized bilinearly to 299x299 and scaled to [-1, 1] by the network itself
  (the official ``fid/`` folder is a copy of pytorch-fid). The weights come into torch.hub's
  cache on first use (``torch.hub.get_dir()/checkpoints``), checked against the SHA-256 prefix in
  their file name before they are loaded.
* **Samples**: 50,000 by default, drawn from the prior at temperature 1 (the official FID
  sampler's fixed temperature; ``temp`` changes it), each image the mean of p(x|z)
  (``NVAE.mean_image``), generated in batches on the model's device. A sample with NaN/Inf values
  stops the computation (``NonFiniteSamples``) rather than skewing the score.
* **Reference statistics**: the training split (with the test split for ``celeba_256`` and
  ``omniglot``, as the official ``precompute_fid_statistics.py``), at most 50,000 images (a fixed
  random subset of larger sets), with the training augmentation and without binarisation, not
  quantised. They are cached in ``fid_dir`` (``<dataset>-<key>.npz``: ``mu``, ``sigma`` and the
  JSON ``meta`` the key is made of: data path, format, size, images, weights), so the dataset is
  read once. A statistics file of the official script (``mu``, ``sigma``) can be given instead.
* **Distance**: pytorch-fid's ``calculate_frechet_distance`` of the two (mean, covariance) pairs;
  the covariances are unbiased (n - 1), accumulated in float64 as the batches stream by.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from nvae_fast.train.errors import InputError, MissingPathError, NonFiniteSamples
from nvae_fast.train.sample import nonfinite_message, sample_batches

DIMS = 2048
NUM_SAMPLES = 50_000
NUM_REFERENCE = 50_000
SAMPLE_TEMPERATURE = 1.0
STATS_FORMAT = 1
# Datasets whose official reference statistics include the test split.
WITH_TEST_SPLIT = frozenset({"celeba_256", "omniglot"})
EXTRA_HINT = "pip install 'nvae_fast[fid]' (pytorch-fid; it needs a torchvision that matches your torch)"


def default_fid_dir() -> Path:
    """``$XDG_CACHE_HOME/nvae_fast/fid`` (``~/.cache/nvae_fast/fid``)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "nvae_fast" / "fid"


def load_library() -> SimpleNamespace:
    """pytorch-fid's ``InceptionV3``, weights URL and ``calculate_frechet_distance``; an
    ``InputError`` naming the extra when it cannot be imported."""
    try:
        from pytorch_fid.fid_score import calculate_frechet_distance
        from pytorch_fid.inception import FID_WEIGHTS_URL, InceptionV3
    except Exception as e:  # ImportError, or torchvision failing to load beside this torch
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"FID needs pytorch-fid: {EXTRA_HINT} ({type(e).__name__}: {first})") from e
    return SimpleNamespace(InceptionV3=InceptionV3, weights_url=FID_WEIGHTS_URL,
                           frechet_distance=calculate_frechet_distance)


def inception_weights(url: str) -> Path:
    """The FID Inception weights file of ``url`` in torch.hub's cache, downloaded there if absent;
    its SHA-256 must start with the hash in its name (torch.hub's ``name-<hash>.pth``), so the
    file the library then unpickles is the published one."""
    name = url.rsplit("/", 1)[-1]
    match = re.search(r"-([0-9a-f]{8,})\.[^.]+$", name)
    if match is None:
        raise InputError(f"cannot tell the expected hash of the Inception weights {name}")
    path = Path(torch.hub.get_dir()) / "checkpoints" / name
    if not path.is_file():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(url, str(path), hash_prefix=match.group(1), progress=True)
        except Exception as e:  # URLError, OSError, the hash check's RuntimeError
            raise InputError(f"cannot download the FID Inception weights {url} ({type(e).__name__}: {e}); put "
                             f"{name} into {path.parent}") from e
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if not digest.startswith(match.group(1)):
        raise InputError(f"{path}: not the FID Inception weights (SHA-256 {digest[:12]}..., expected "
                         f"{match.group(1)}...); delete it to download them again")
    return path


class InceptionFeatures:
    """Pool3 features (N, 2048) of images (N, C, H, W) in [0, 1], C = 1 (repeated to RGB) or 3,
    through pytorch-fid's ``InceptionV3`` (fp32, no autocast) on ``device``."""

    def __init__(self, device: torch.device | str, library: SimpleNamespace | None = None) -> None:
        library = library or load_library()
        self.weights = inception_weights(library.weights_url)
        net_class = library.InceptionV3
        self.net: nn.Module = net_class([net_class.BLOCK_INDEX_BY_DIM[DIMS]]).to(device).eval()
        self.device = torch.device(device)

    def __call__(self, images: Tensor) -> Tensor:
        if images.dim() != 4 or images.shape[1] not in (1, 3) or not images.is_floating_point():
            raise ValueError(f"images must be float (N, 1 or 3, H, W), got {images.dtype} {tuple(images.shape)}")
        x = images.to(self.device, torch.float32)
        lo, hi = torch.aminmax(x)
        if lo < 0 or hi > 1:
            raise ValueError(f"images must lie in [0, 1], got [{lo.item():.4g}, {hi.item():.4g}]")
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        with torch.no_grad(), torch.autocast(self.device.type, enabled=False):
            features = self.net(x)[0]
        if features.shape[2:] != (1, 1):  # the pool3 block ends in global pooling; anything else is pooled
            features = torch.nn.functional.adaptive_avg_pool2d(features, 1)
        return features.flatten(1)


class FeatureStats:
    """Mean and covariance of feature vectors given in batches, accumulated in float64 around the
    first batch's mean (so that the sums do not cancel)."""

    def __init__(self) -> None:
        self.count = 0
        self.shift: Tensor | None = None
        self.sum: Tensor | None = None
        self.outer: Tensor | None = None

    def update(self, features: Tensor) -> None:
        f = features.detach().double()
        if self.shift is None:
            self.shift = f.mean(0)
            self.sum = torch.zeros_like(self.shift)
            self.outer = f.new_zeros(f.shape[1], f.shape[1])
        d = f - self.shift
        self.sum += d.sum(0)
        self.outer.addmm_(d.T, d)
        self.count += len(f)

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """(mu (D,), sigma (D, D)) float64, sigma with the n - 1 normalisation of ``np.cov``."""
        if self.count < 2:
            raise ValueError(f"a covariance needs at least 2 feature vectors, got {self.count}")
        mean = self.sum / self.count
        cov = (self.outer - self.count * torch.outer(mean, mean)) / (self.count - 1)
        return (self.shift + mean).cpu().numpy(), cov.cpu().numpy()


@dataclass(frozen=True)
class ReferenceSpec:
    """What reference statistics are computed from (their cache key)."""

    dataset: str
    data_format: str
    data: str | None
    image_size: int
    channels: int
    splits: tuple[str, ...]
    images: int
    inception: str

    def path(self, fid_dir: Path) -> Path:
        key = hashlib.sha256(json.dumps(dataclasses.asdict(self), sort_keys=True).encode()).hexdigest()[:16]
        return fid_dir / f"{self.dataset}-{key}.npz"


def reference_images(train_set, test_set, dataset: str, limit: int = NUM_REFERENCE) -> tuple[list, tuple[str, ...]]:
    """(the (dataset, index) pairs the reference statistics use, the split names): the training
    split (and the test split for ``WITH_TEST_SPLIT``), a fixed random subset of ``limit`` if larger."""
    splits = (("train", train_set), ("test", test_set)) if dataset in WITH_TEST_SPLIT else (("train", train_set),)
    items = [(ds, i) for _, ds in splits for i in range(len(ds))]
    if len(items) > limit:
        order = torch.randperm(len(items), generator=torch.Generator().manual_seed(0))[:limit].sort().values
        items = [items[i] for i in order.tolist()]
    return items, tuple(name for name, _ in splits)


def load_statistics(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, dict]:
    """(mu, sigma, meta) of a statistics file: ours, or the official script's (``mu``, ``sigma``)."""
    path = Path(path)
    if not path.is_file():
        raise MissingPathError(f"{path}: FID statistics file does not exist")
    try:
        with np.load(path, allow_pickle=False) as f:
            mu, sigma = np.asarray(f["mu"], np.float64), np.asarray(f["sigma"], np.float64)
            meta = json.loads(str(f["meta"])) if "meta" in f else {}
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: not an FID statistics file with 'mu' and 'sigma' ({e})") from e
    if mu.shape != (DIMS,) or sigma.shape != (DIMS, DIMS) or not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise InputError(f"{path}: FID statistics must be finite, mu ({DIMS},) and sigma ({DIMS}, {DIMS}); got "
                         f"{mu.shape} and {sigma.shape}")
    return mu, sigma, meta


def save_statistics(path: Path, mu: np.ndarray, sigma: np.ndarray, meta: dict) -> None:
    """Writes ``mu``, ``sigma`` and ``meta`` (JSON) atomically (what ``load_statistics`` reads)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        np.savez(f, mu=mu, sigma=sigma, meta=np.array(json.dumps(meta, sort_keys=True)))
    os.replace(tmp, path)


class _Items(torch.utils.data.Dataset):
    """The reference images as one dataset (epoch 0 of each, for a loader's workers)."""

    def __init__(self, items: list) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, k: int) -> Tensor:
        dataset, index = self.items[k]
        return dataset[(0, index)]


def reference_statistics(spec: ReferenceSpec, items: list, features: Callable[[Tensor], Tensor], fid_dir: Path,
                         batch_size: int = 100, num_workers: int = 0, progress: bool = True,
                         log: Callable[[str], None] = print) -> tuple[np.ndarray, np.ndarray, Path]:
    """(mu, sigma, file) of the reference images ``items`` ((dataset, index) pairs): from the
    cache in ``fid_dir`` if it holds them for ``spec``, else computed (read by ``num_workers``
    loader workers, tqdm bar) and cached there."""
    path = spec.path(fid_dir)
    meta = {"format": STATS_FORMAT, **dataclasses.asdict(spec)}
    if path.is_file():
        try:
            mu, sigma, stored = load_statistics(path)
        except InputError:  # an unreadable cache entry is computed again
            stored = None
        if stored == json.loads(json.dumps(meta)):
            return mu, sigma, path
    stats = FeatureStats()
    loader = torch.utils.data.DataLoader(_Items(items), batch_size=batch_size, num_workers=num_workers)
    for batch in tqdm(loader, leave=False, desc=f"FID reference statistics ({len(items)} images)",
                      disable=not progress, unit="batch"):
        stats.update(features(batch))
    mu, sigma = stats.result()
    try:
        save_statistics(path, mu, sigma, meta)
    except OSError as e:
        log(f"warning: cannot cache the FID reference statistics in {path} ({e.strerror or e}); they are used for "
            "this run only")
    return mu, sigma, path


def sample_statistics(model: nn.Module, features: Callable[[Tensor], Tensor], num_samples: int = NUM_SAMPLES,
                      temp: float = SAMPLE_TEMPERATURE, batch_size: int = 100, amp: torch.dtype | None = None,
                      progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of the features of ``num_samples`` images the model draws at ``temp`` (each the
    mean of p(x|z)); ``NonFiniteSamples`` at the first batch holding a NaN/Inf sample."""
    stats, drawn = FeatureStats(), 0
    for batch in sample_batches(model, num_samples, temp, batch_size, amp, decode=model.mean_image,
                                progress=progress, desc=f"FID samples (t={temp:g})"):
        drawn += len(batch.images) + batch.nonfinite
        if batch.nonfinite:
            raise NonFiniteSamples(f"{nonfinite_message(batch.nonfinite, drawn, temp)}; FID needs finite images, so "
                                   "it stopped at the first batch with any")
        stats.update(features(batch.images))
    return stats.result()


@dataclass(frozen=True)
class FIDResult:
    fid: float
    num_samples: int
    temperature: float
    reference: str
    reference_images: int | None

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def frechet_distance(library: SimpleNamespace, reference: tuple[np.ndarray, np.ndarray],
                     samples: tuple[np.ndarray, np.ndarray]) -> float:
    """The library's Fréchet distance between (mu, sigma) of the reference and of the samples."""
    return float(library.frechet_distance(reference[0], reference[1], samples[0], samples[1]))


def evaluate_fid(model: nn.Module, train_set, test_set, *, dataset: str, data_format: str, data: str | None,
                 features: InceptionFeatures, library: SimpleNamespace, fid_dir: Path,
                 num_samples: int = NUM_SAMPLES, temp: float = SAMPLE_TEMPERATURE,
                 num_reference: int = NUM_REFERENCE, batch_size: int = 100, amp: torch.dtype | None = None,
                 num_workers: int = 0, reference_file: str | os.PathLike | None = None, progress: bool = True,
                 log: Callable[[str], None] = print) -> FIDResult:
    """FID of ``num_samples`` samples of ``model`` at ``temp`` against the reference statistics of
    its dataset (``train_set``/``test_set``, cached in ``fid_dir``) or of ``reference_file``."""
    if num_samples < 2 or num_reference < 2:
        raise InputError(f"FID needs at least 2 samples and 2 reference images (a covariance), got {num_samples} "
                         f"and {num_reference}")
    if reference_file is not None:
        mu, sigma, _ = load_statistics(reference_file)
        reference, count = (mu, sigma), None
        source = str(reference_file)
    else:
        items, splits = reference_images(train_set, test_set, dataset, num_reference)
        if len(items) < 2:
            raise InputError(f"the {dataset} data holds {len(items)} reference image(s); FID needs at least 2")
        spec = ReferenceSpec(dataset, data_format, str(Path(data).resolve()) if data else None,
                             model.config.image_size, model.config.in_channels, splits, len(items),
                             features.weights.name)
        path = spec.path(fid_dir)
        cached = path.is_file()
        with torch.random.fork_rng(devices=[]):  # reading data draws no numbers from the samples' stream
            mu, sigma, path = reference_statistics(spec, items, features, fid_dir, batch_size, num_workers, progress,
                                                   log)
        reference, count, source = (mu, sigma), len(items), str(path)
        log(f"{'cached' if cached else 'computed'} FID reference statistics of {len(items)} {dataset} images "
            f"({'+'.join(splits)}): {path}")
    samples = sample_statistics(model, features, num_samples, temp, batch_size, amp, progress)
    return FIDResult(frechet_distance(library, reference, samples), num_samples, temp, source, count)
