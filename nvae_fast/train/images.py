"""Image grids: for TensorBoard and PNG files."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor


def tile(images: Tensor, nrow: int | None = None, pad: int = 1) -> Tensor:
    """(N, C, H, W) images in [0, 1] as one (C, rows·(H+pad)+pad, nrow·(W+pad)+pad) grid, row-major,
    with ``pad`` pixels of white between tiles. ``nrow`` defaults to ceil(sqrt(N))."""
    if images.dim() != 4:
        raise ValueError(f"images must be (N, C, H, W), got shape {tuple(images.shape)}")
    n, c, h, w = images.shape
    nrow = nrow or max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / nrow)
    grid = images.new_ones(c, rows * (h + pad) + pad, nrow * (w + pad) + pad)
    for i in range(n):
        r, col = divmod(i, nrow)
        top, left = pad + r * (h + pad), pad + col * (w + pad)
        grid[:, top:top + h, left:left + w] = images[i]
    return grid


def save_png(grid: Tensor, path: str | os.PathLike, scale: int = 1) -> None:
    """Writes a (C, H, W) image in [0, 1] (C = 1 or 3) as a PNG, each pixel ``scale``x``scale``."""
    from PIL import Image

    arr = (grid.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    arr = arr[0] if arr.shape[0] == 1 else np.transpose(arr, (1, 2, 0))
    img = Image.fromarray(arr)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
