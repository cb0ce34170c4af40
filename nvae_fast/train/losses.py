"""The NVAE training objective: balanced KL and the importance-weighted bound (the reconstruction
term is ``nvae_fast.distributions.reconstruction_loss``).

Shapes: ``kl_all`` is a list of G per-group tensors of shape (N,) (decoder order: the coarsest
scale first), as the model's forward returns it; ``x`` is the (N, C, H, W) batch in [0, 1].
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from nvae_fast.distributions import reconstruction_loss

# MNIST-like models see 28x28 digits padded to 32x32; their likelihood counts only the 28x28 centre
# (as reconstruction_loss with crop=True).
_CROP = slice(2, 30)


def kl_balance_alphas(groups_per_scale: Sequence[int]) -> Tensor:
    """The official 'square' KL-balancing weights α, one per group, in decoder order.

    ``groups_per_scale[s]`` is the number of latent groups at scale s, s = 0 the finest (as
    the model's ``groups_per_scale``). The decoder visits the coarsest scale first; a group at
    the i-th visited scale gets α ∝ 4^i / (groups at that scale), so a scale's total α grows with
    its spatial area. Normalised so that min α = 1. Returns (G,) float32.
    """
    if not groups_per_scale or min(groups_per_scale) < 1:
        raise ValueError(f"groups_per_scale must be a non-empty list of positive counts, got {list(groups_per_scale)}")
    parts = []
    for i, groups in enumerate(reversed(list(groups_per_scale))):
        parts.append(torch.full((groups,), 4.0 ** i / groups))
    alphas = torch.cat(parts)
    return alphas / alphas.min()


def balanced_kl(kl_all: Sequence[Tensor], kl_coeff: float | Tensor, alphas: Tensor | None,
                mean_over_batch: Callable[[Tensor], Tensor] | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """KL term of the loss, per sample, with KL balancing during warm-up.

    While ``kl_coeff < 1`` and ``alphas`` is given, group g's KL is weighted by
    γ_g ∝ (E_n|KL_g| + 0.01) / α_g, normalised to mean 1 (no gradient flows through γ): groups
    that already carry much information are pushed less, so fewer latent units collapse. After
    warm-up, and in evaluation (``alphas=None``), the KL is the plain sum over groups.

    Args:
        kl_all: G tensors (N,), the per-sample KL of each group.
        kl_coeff: the warm-up coefficient multiplying the whole KL: a float, or a 0-d tensor
            (compiled and CUDA-graph steps), for which the choice between balanced and plain
            weights is made on the device.
        alphas: (G,) from ``kl_balance_alphas``, or None for no balancing.
        mean_over_batch: maps a local (G,) batch mean to the mean over the global batch; pass a
            cross-rank average in distributed training so that every rank uses the same γ.
    Returns:
        (kl (N,) = kl_coeff · Σ_g γ_g KL_g, γ (G,), mean KL per group (G,)).
    """
    kl = torch.stack(list(kl_all), dim=1)  # (N, G)
    kl_per_group = kl.detach().mean(dim=0)
    if alphas is not None and alphas.numel() != kl.shape[1]:
        raise ValueError(f"alphas has {alphas.numel()} entries but the model has {kl.shape[1]} latent groups")
    if alphas is None or (not isinstance(kl_coeff, Tensor) and kl_coeff >= 1.0):
        gamma = torch.ones_like(kl_per_group)
    else:
        magnitude = kl.detach().abs().mean(dim=0)
        if mean_over_batch is not None:
            magnitude = mean_over_batch(magnitude)
        gamma = (magnitude + 0.01) / alphas.to(kl.device, kl.dtype)
        gamma = gamma / gamma.mean()
        if isinstance(kl_coeff, Tensor):
            gamma = torch.where(kl_coeff < 1.0, gamma, 1.0)
    return kl_coeff * (kl * gamma).sum(dim=1), gamma, kl_per_group


def log_importance_weight(decoder, x: Tensor, log_q: Tensor, log_p: Tensor, crop: bool) -> Tensor:
    """log p(x, z) − log q(z | x) per sample, (N,): one term of the importance-weighted bound.
    ``decoder`` is ``model.decoder_output(logits)``; ``crop`` is the model's ``crop_output``."""
    return -reconstruction_loss(decoder, x, crop) - log_q + log_p


def dims_per_sample(x: Tensor, crop: bool) -> int:
    """Number of data dimensions the likelihood covers per sample (for bits/dim)."""
    C, H, W = x.shape[1:]
    if crop:
        H, W = len(range(H)[_CROP]), len(range(W)[_CROP])
    return C * H * W
