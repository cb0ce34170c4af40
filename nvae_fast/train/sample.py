"""Sampling from a trained NVAE: images, optional BatchNorm re-adjustment, PNG grid and .npz."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from torch.distributions import Bernoulli
from tqdm import tqdm

from nvae_fast.train.images import save_png, tile
from nvae_fast.train.trainer import autocast


def decoded_images(decoder, t: float = 1.0) -> Tensor:
    """Images in [0, 1] from an output distribution: the pixel probabilities of a Bernoulli
    (binary data, as the official code shows them), a sample at temperature ``t`` otherwise."""
    if isinstance(decoder, Bernoulli):
        return decoder.mean
    return decoder.sample(t)


@torch.no_grad()
def generate(model: nn.Module, num_samples: int, temp: float, batch_size: int = 64,
             amp: torch.dtype | None = None, device: torch.device | None = None, progress: bool = False,
             decoder_temp: float | None = None) -> Tensor:
    """``num_samples`` images (N, C, H, W) float32 in [0, 1] from the prior at temperature ``temp``
    (0: the prior means), the output distribution sampled at ``decoder_temp`` (default ``temp``, as
    the official train.py's sample grids; the official evaluate.py samples it at 1), with a tqdm
    bar if ``progress``."""
    if num_samples < 1 or batch_size < 1:
        raise ValueError(f"num_samples and batch_size must be >= 1, got {num_samples} and {batch_size}")
    if decoder_temp is None:
        decoder_temp = temp
    if not 0 < decoder_temp < float("inf"):
        raise ValueError(f"decoder_temp must be a finite number > 0, got {decoder_temp}")
    device = device or next(model.parameters()).device
    out = []
    for start in tqdm(range(0, num_samples, batch_size), desc="sample", disable=not progress, leave=False):
        n = min(batch_size, num_samples - start)
        with autocast(device, amp):
            logits = model.sample(n, temp)
        out.append(decoded_images(model.decoder_output(logits.float()), decoder_temp).float().cpu())
    return torch.cat(out)


def write_samples(images: Tensor, directory: str | os.PathLike, name: str = "samples", scale: int = 1) -> list[Path]:
    """Writes ``name``.png (a grid) and ``name``.npz (``samples``: uint8 (N, H, W, C)) in
    ``directory``; returns both paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    png, npz = directory / f"{name}.png", directory / f"{name}.npz"
    save_png(tile(images), png, scale=scale)
    as_uint8 = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    np.savez_compressed(npz, samples=as_uint8)
    return [png, npz]
