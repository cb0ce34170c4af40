"""Reconstructions and latent interpolations of dataset images (``nvae-fast reconstruct`` and
``nvae-fast interpolate``), built on ``NVAE.encode``/``decode``."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from nvae_fast.train.errors import InputError
from nvae_fast.train.loaders import quantize
from nvae_fast.train.trainer import autocast


def pick_images(dataset, count: int, indices: Sequence[int] | None = None) -> Tensor:
    """Images (n, C, H, W) of ``dataset`` in [0, 1] (its test-time pre-processing): the ones at
    ``indices``, else the first ``count``."""
    size = len(dataset)
    chosen = list(indices) if indices else list(range(min(count, size)))
    bad = [i for i in chosen if not 0 <= i < size]
    if bad:
        raise InputError(f"--indices {bad[0]} is out of range: the split has {size} images")
    if not chosen:
        raise InputError("the split holds no images")
    return torch.stack([dataset[i] for i in chosen])


def _prepare(model: nn.Module, images: Tensor) -> Tensor:
    """Images as the model saw them in training: on its device, quantised to its num_x_bits."""
    param = next(model.parameters())
    return quantize(images.to(param.device), model.config.num_x_bits).to(param.dtype)


@torch.no_grad()
def reconstruction_pairs(model: nn.Module, images: Tensor, amp: torch.dtype | None = None, batch_size: int = 64
                         ) -> tuple[Tensor, float]:
    """(2n, C, H, W) fp32 images on the CPU, each input followed by its reconstruction (the mean of
    p(x|z) at the posterior means), and the mean squared error per pixel."""
    x = _prepare(model, images)
    recon = []
    for chunk in x.split(batch_size):
        with autocast(chunk.device, amp):
            recon.append(model.reconstruct(chunk).float())
    recon = torch.cat(recon)
    x = x.float()
    mse = float(((recon - x) ** 2).mean())
    return torch.stack([x, recon], dim=1).flatten(0, 1).cpu(), mse


@torch.no_grad()
def interpolation_rows(model: nn.Module, starts: Tensor, ends: Tensor, steps: int,
                       groups: int | Sequence[int] | None = None, amp: torch.dtype | None = None) -> Tensor:
    """(pairs * (steps + 2), C, H, W) fp32 images on the CPU: per pair, the start image, ``steps``
    images along the line between the posterior means (``NVAE.interpolate``), the end image."""
    x1, x2 = _prepare(model, starts), _prepare(model, ends)
    with autocast(x1.device, amp):
        strip = model.interpolate(x1, x2, steps=steps, groups=groups).float()
    rows = torch.cat([x1.float().unsqueeze(1), strip, x2.float().unsqueeze(1)], dim=1)
    return rows.flatten(0, 1).cpu()
