"""Tiny trained-model files for the sampling, latent and FID command tests."""

import dataclasses
from pathlib import Path

import torch

from nvae_fast import NVAE, NVAEConfig
from nvae_fast.train.recipe import TrainConfig
from nvae_fast.train.weights import export_safetensors

# The digits demo's model, shrunk: 8x8 grey images, two latent scales, a forward pass in milliseconds.
TINY_DIGITS = dict(dataset="digits", image_size=8, in_channels=1, crop_output=False,
                   output_distribution="logistic_mixture", num_mixture_dec=2, num_x_bits=4, num_channels_enc=8,
                   num_channels_dec=8, num_latent_scales=2, num_groups_per_scale=2, num_latent_per_group=4,
                   num_preprocess_blocks=1, num_preprocess_cells=1, num_postprocess_blocks=1,
                   num_postprocess_cells=1, num_cell_per_cond_enc=1, num_cell_per_cond_dec=1, use_se=True,
                   res_dist=True)


def tiny_digits_model(seed: int = 0, **overrides) -> NVAE:
    torch.manual_seed(seed)
    return NVAE(NVAEConfig(**{**TINY_DIGITS, **overrides})).eval()


def write_checkpoint(model: NVAE, path: Path, **train) -> Path:
    """``model`` as a ``model.safetensors`` export whose recorded training run read ``train``'s
    data (default: the embedded digits)."""
    run = TrainConfig(**{"data_format": "digits", "batch_size": 32, **train})
    return export_safetensors(model, path, {"model": dataclasses.asdict(model.config),
                                            "train": dataclasses.asdict(run)})
