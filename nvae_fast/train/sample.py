"""Sampling from a trained NVAE: batches of images on the model's device (NaN/Inf samples counted and
left out), PNG grid and .npz."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor, nn
from torch.distributions import Bernoulli
from tqdm import tqdm

from nvae_fast.train.errors import NonFiniteSamples
from nvae_fast.train.images import save_png, tile
from nvae_fast.train.trainer import autocast


def decoded_images(decoder, t: float = 1.0) -> Tensor:
    """Images in [0, 1] from an output distribution: the pixel probabilities of a Bernoulli
    (binary data, as the official code shows them), a sample at temperature ``t`` otherwise."""
    if isinstance(decoder, Bernoulli):
        return decoder.mean
    return decoder.sample(t)


class SampledBatch(NamedTuple):
    """One batch of :func:`sample_batches`: the finite images (n, C, H, W) fp32 in [0, 1] on the
    model's device, and how many of the batch's samples were left out for NaN/Inf values."""

    images: Tensor
    nonfinite: int


def sample_batches(model: nn.Module, num_samples: int, temp: float, batch_size: int = 64,
                   amp: torch.dtype | None = None, decode: Callable[[Tensor], Tensor] | None = None,
                   decoder_temp: float | None = None, progress: bool = False, desc: str = "sample"
                   ) -> Iterator[SampledBatch]:
    """Draws ``num_samples`` images from the prior at temperature ``temp`` (0: the prior means),
    ``batch_size`` at a time on the model's device (under autocast ``amp``; tqdm bar if
    ``progress``).

    ``decode(logits) -> images`` turns logits into images; by default :func:`decoded_images`
    samples the output distribution at ``decoder_temp`` (default ``temp``, as the official
    train.py's sample grids; the official evaluate.py samples it at 1). A sample whose logits or
    image hold a NaN/Inf is counted and left out, never handed on as a black or white image.
    """
    if num_samples < 1 or batch_size < 1:
        raise ValueError(f"num_samples and batch_size must be >= 1, got {num_samples} and {batch_size}")
    if decode is None:
        decoder_temp = temp if decoder_temp is None else decoder_temp
        if not 0 < decoder_temp < float("inf"):
            raise ValueError(f"decoder_temp must be a finite number > 0, got {decoder_temp}")
    device = next(model.parameters()).device
    starts = range(0, num_samples, batch_size)
    for start in tqdm(starts, desc=desc, disable=not progress, leave=False, unit="batch"):
        n = min(batch_size, num_samples - start)
        with torch.no_grad():  # not around the yield: the caller's grad mode stays its own
            with autocast(device, amp):
                logits = model.sample(n, temp)
            logits = logits.float()
            images = decode(logits) if decode else decoded_images(model.decoder_output(logits), decoder_temp)
            images = images.float()
            finite = torch.isfinite(logits).flatten(1).all(1) & torch.isfinite(images).flatten(1).all(1)
        good = int(finite.sum())
        yield SampledBatch(images if good == n else images[finite], n - good)


def nonfinite_message(count: int, total: int, temp: float) -> str:
    """How many samples at which temperature had NaN/Inf values, with what usually causes it."""
    return (f"{count} of {total} samples at t={temp:g} have NaN/Inf values (an activation beyond the range of the "
            "sampling precision, often after BatchNorm statistics re-estimated in fp16; try --amp off, or "
            "--readjust_bn to re-estimate them in fp32)")


def generate(model: nn.Module, num_samples: int, temp: float, batch_size: int = 64,
             amp: torch.dtype | None = None, progress: bool = False, decoder_temp: float | None = None,
             on_nonfinite: str = "drop") -> Tensor:
    """``num_samples`` images (N, C, H, W) float32 in [0, 1] on the CPU from the prior at
    temperature ``temp`` (0: the prior means), the output distribution sampled at
    ``decoder_temp`` (see :func:`sample_batches`), with a tqdm bar if ``progress``.

    Samples with NaN/Inf values are left out (``on_nonfinite='drop'``: fewer than
    ``num_samples`` images come back) or raise :class:`NonFiniteSamples` (``'raise'``) saying how
    many there were at which temperature.
    """
    if on_nonfinite not in ("drop", "raise"):
        raise ValueError(f"on_nonfinite must be 'drop' or 'raise', got {on_nonfinite!r}")
    out, bad = [], 0
    for batch in sample_batches(model, num_samples, temp, batch_size, amp, decoder_temp=decoder_temp,
                                progress=progress):
        out.append(batch.images.cpu())
        bad += batch.nonfinite
    if bad and on_nonfinite == "raise":
        raise NonFiniteSamples(nonfinite_message(bad, num_samples, temp))
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
