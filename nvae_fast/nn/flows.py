"""Normalizing flows of NVAE's posteriors: paired autoregressive cells (``num_nf`` per group).

Each cell shifts z by a function of the already-visited latent variables: a masked 3x3 conv and a
masked depthwise 5x5 conv (with ELU) compute features, a masked 1x1 conv turns them into ``mu``,
and ``z' = z - mu``. The masks make ``mu`` at a position depend only on z at positions earlier in
raster order (and, at the same position, on earlier channels), so the Jacobian is triangular with
unit diagonal and the log-determinant is zero. The second cell of a pair uses the mirrored order.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nvae_fast.nn.conv import ConvWeightBank, bank_weight, initial_weight_norm, normalize_weight

FLOW_EXPANSION = 6
MU_INIT_SCALE = 0.1  # the shift starts small: flows begin close to the identity


def channel_mask(c_in: int, c_out: int, groups: int, zero_diag: bool) -> Tensor:
    """(c_out, c_in / groups) 0/1 mask of which input channels each output channel may see.

    Channels are ordered; with c_out = r c_in, outputs r i .. r i + r - 1 belong to input i (with
    c_in = r c_out, inputs r i .. r i + r - 1 belong to output i). An output sees the inputs of
    earlier positions in that order, and its own unless ``zero_diag``. A depthwise conv
    (``groups == c_in``) sees only its own channel: all ones, or all zeros with ``zero_diag``.
    """
    if groups == c_in:
        return torch.full((c_out, 1), 0.0 if zero_diag else 1.0)
    if groups != 1:
        raise ValueError(f"masked convs are dense (groups=1) or depthwise (groups=c_in), got groups={groups}")
    if c_out % c_in and c_in % c_out:
        raise ValueError(f"masked conv channels must divide one another, got c_in={c_in}, c_out={c_out}")
    out_order = torch.arange(c_out)
    in_order = torch.arange(c_in)
    if c_out >= c_in:
        out_order = out_order // (c_out // c_in)
    else:
        in_order = in_order // (c_in // c_out)
    visible = in_order[None, :] < out_order[:, None] if zero_diag else in_order[None, :] <= out_order[:, None]
    return visible.float()


def conv_mask(kernel_size: int, c_in: int, c_out: int, groups: int, zero_diag: bool, mirror: bool) -> Tensor:
    """(c_out, c_in / groups, k, k) mask: rows above the centre and pixels left of it are visible,
    the centre pixel by :func:`channel_mask`, the rest hidden; ``mirror`` flips it in both axes."""
    centre = (kernel_size - 1) // 2
    mask = torch.zeros(c_out, c_in // groups, kernel_size, kernel_size)
    mask[:, :, :centre, :] = 1
    mask[:, :, centre, :centre] = 1
    mask[:, :, centre, centre] = channel_mask(c_in, c_out, groups, zero_diag)
    return torch.flip(mask, dims=(2, 3)) if mirror else mask


class ARConv2d(nn.Conv2d):
    """Weight-normalised conv whose weight is masked to be autoregressive (see :func:`conv_mask`).

    Parameters: ``weight``, optional ``bias``, ``log_weight_norm`` (C_out, 1, 1, 1), initialised
    from the masked initial weight's norm. The mask is a non-persistent buffer (not in the
    state_dict, as in the official model) that follows the module across devices and dtypes.
    """

    def __init__(self, c_in: int, c_out: int, kernel_size: int, padding: int = 0, dilation: int = 1,
                 groups: int = 1, bias: bool = False, zero_diag: bool = False, mirror: bool = False) -> None:
        super().__init__(c_in, c_out, kernel_size, 1, padding, dilation, groups, bias)
        if kernel_size % 2 != 1:
            raise ValueError(f"masked convs need an odd kernel size, got {kernel_size}")
        self.register_buffer("mask", conv_mask(kernel_size, c_in, c_out, groups, zero_diag, mirror),
                             persistent=False)
        with torch.no_grad():
            init = initial_weight_norm(self.weight * self.mask)
        self.log_weight_norm = nn.Parameter(torch.log(init + 1e-2))
        self.bank_slot: tuple[ConvWeightBank, int] | None = None

    def normalized_weight(self) -> Tensor:
        """The masked, weight-normalised weight the convolution applies (from its
        :class:`~nvae_fast.nn.conv.ConvWeightBank` while the bank holds weights)."""
        banked = bank_weight(self)
        if banked is not None:
            return banked
        return normalize_weight(self.weight * self.mask, self.log_weight_norm)

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.normalized_weight(), self.bias, self.stride, self.padding, self.dilation,
                        self.groups)


class AREluConv(nn.Module):
    """ELU -> masked conv with bias; the initial weight norm is scaled by ``init_scale``."""

    def __init__(self, c_in: int, c_out: int, kernel_size: int, padding: int, zero_diag: bool, mirror: bool,
                 init_scale: float = 1.0) -> None:
        super().__init__()
        self.conv_0 = ARConv2d(c_in, c_out, kernel_size, padding=padding, bias=True, zero_diag=zero_diag,
                               mirror=mirror)
        with torch.no_grad():
            self.conv_0.log_weight_norm.add_(math.log(init_scale))

    def forward(self, x: Tensor) -> Tensor:
        return self.conv_0(F.elu(x))


class ARInvertedResidual(nn.Module):
    """Masked 3x3 conv z -> 6z channels (own position hidden), ELU, masked depthwise 5x5, ELU."""

    def __init__(self, num_z: int, expansion: int = FLOW_EXPANSION, kernel_size: int = 5, mirror: bool = False
                 ) -> None:
        super().__init__()
        self.hidden_dim = hidden = int(round(num_z * expansion))
        self.convz = nn.Sequential(
            ARConv2d(num_z, hidden, 3, padding=1, zero_diag=True, mirror=mirror),
            nn.ELU(),
            ARConv2d(hidden, hidden, kernel_size, padding=(kernel_size - 1) // 2, groups=hidden, zero_diag=False,
                     mirror=mirror),
            nn.ELU(),
        )

    def forward(self, z: Tensor) -> Tensor:
        return self.convz(z)


class ARFlowCell(nn.Module):
    """One autoregressive shift: ``z' = z - mu(z)``, log-determinant 0."""

    def __init__(self, num_z: int, mirror: bool) -> None:
        super().__init__()
        self.conv = ARInvertedResidual(num_z, mirror=mirror)
        self.mu = AREluConv(self.conv.hidden_dim, num_z, 1, padding=0, zero_diag=False, mirror=mirror,
                            init_scale=MU_INIT_SCALE)

    def forward(self, z: Tensor) -> Tensor:
        return z - self.mu(self.conv(z))


class PairedARFlow(nn.Module):
    """Two :class:`ARFlowCell` with opposite orders (``cell1``, then the mirrored ``cell2``).

    ``forward(z, ftr)`` returns ``(z', log_det)``; the official signature passes the encoder
    features ``ftr``, which these cells do not use, and ``log_det`` is zeros shaped like z.
    """

    def __init__(self, num_z: int) -> None:
        super().__init__()
        self.cell1 = ARFlowCell(num_z, mirror=False)
        self.cell2 = ARFlowCell(num_z, mirror=True)

    def forward(self, z: Tensor, ftr: Tensor | None = None) -> tuple[Tensor, Tensor]:
        z = self.cell2(self.cell1(z))
        return z, torch.zeros_like(z)
