"""The real shapes of a preset: every cell and latent group of the model, with its batch size.

Shapes are read off the model that ``nvae_fast.NVAE`` builds for the preset (on the meta device,
so nothing is allocated): the cell lists in forward order, each cell's type and operations, and the
resolution and channels it runs at. Channels and resolution follow the model's rule (a down cell
doubles the channels and halves the resolution, an up cell the reverse); latent groups are the
decoder's combiner cells. Nothing is re-typed from the configuration by hand.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nvae_fast import NVAE, NVAEConfig
from nvae_fast.config import CHANNEL_MULT
from nvae_fast.nn.cells import DecCombinerCell, EncCombinerCell

# Batch size per GPU of each official README training command (train.py --batch_size); the tiny
# presets use the small batch of their test recipes.
PRESET_BATCH = {"mnist": 200, "cifar10": 32, "celeba_64": 16, "imagenet_32": 24, "celeba_256": 4, "ffhq": 4,
                "tiny_mnist": 8, "tiny_cifar10": 8}


@dataclass(frozen=True)
class CellShape:
    """One distinct cell configuration of a model and how many cells of the model have it.

    ``ops`` are the official operation names (``mconv_e6k5g0``, ``res_bnswish``, ...); ``c_in``,
    ``height``, ``width`` describe the input, ``c_out`` the output channels.
    """

    cell_type: str
    ops: tuple[str, ...]
    batch: int
    c_in: int
    c_out: int
    height: int
    width: int
    use_se: bool
    count: int

    @property
    def input_shape(self) -> tuple[int, int, int, int]:
        return (self.batch, self.c_in, self.height, self.width)


@dataclass(frozen=True)
class LatentShape:
    """The (N, C, H, W) of one latent group's parameters, and how many groups of the model have it."""

    batch: int
    channels: int
    height: int
    width: int
    count: int

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (self.batch, self.channels, self.height, self.width)


def model_shapes(config: NVAEConfig, batch: int) -> tuple[list[CellShape], list[LatentShape]]:
    """The distinct cell and latent-group shapes of ``config``'s model at ``batch``, in forward order."""
    with torch.device("meta"):
        model = NVAE(config)
    cells: dict[tuple, int] = {}
    latents: dict[tuple, int] = {}

    def walk(tower: torch.nn.ModuleList, channels: int, size: int) -> tuple[int, int]:
        for cell in tower:
            if isinstance(cell, EncCombinerCell):  # adds decoder features; the encoder's shape stays
                continue
            if isinstance(cell, DecCombinerCell):  # one latent group enters the decoder here
                key = (batch, config.num_latent_per_group, size, size)
                latents[key] = latents.get(key, 0) + 1
                continue
            c_out = {"same": channels, "down": CHANNEL_MULT * channels, "up": channels // CHANNEL_MULT}[cell.resample]
            key = (cell.cell_type, tuple(config.arch_cells[cell.cell_type]), batch, channels, c_out, size, size,
                   config.use_se)
            cells[key] = cells.get(key, 0) + 1
            channels, size = c_out, {"same": size, "down": size // 2, "up": size * 2}[cell.resample]
        return channels, size

    channels, size = walk(model.pre_process, config.num_channels_enc, config.image_size)
    walk(model.enc_tower, channels, size)
    # the decoder starts from the learned prior input at the coarsest scale
    channels, size = walk(model.dec_tower, model.prior_ftr0.shape[0], model.prior_ftr0.shape[-1])
    walk(model.post_process, channels, size)
    return ([CellShape(*key, count=n) for key, n in cells.items()],
            [LatentShape(*key, count=n) for key, n in latents.items()])
