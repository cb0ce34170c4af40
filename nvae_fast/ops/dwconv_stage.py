"""The depthwise stage of the fused generative cell: BN1 + Swish prologue, depthwise conv, BN2 stats.

Stage contract (the fused cell, nvae_fast/ops/gen_cell.py, calls it between its two GEMMs; every
backend implements these two functions with these signatures; tensors are channels-last
(N, C, H, W), per-channel vectors contiguous fp32 (C,)):

Forward::

    b = swish(a * scale + shift)               # BN1 folded into scale/shift, then Swish (fp32)
    b = nearest_upsample_2x(b) if upsample     # the up-cell: conv runs at (2H, 2W)
    c = depthwise_conv(b, weight, stride, padding=k // 2)     # weight (C, 1, k, k), no bias
    returns c (a's dtype, channels-last), mean_c, var_c      # fp32 batch stats of c (biased var)

Backward, given dc = dL/dc::

    db = depthwise_conv_transpose(dc)                          # fp32
    g  = (sum of db over each 2x2 block if upsample, else db) * swish'(a * scale + shift)
    returns g (a's dtype, channels-last) = dL/d(a * scale + shift),
            sum_g = sum g, sum_gxmu = sum g * (a - mean_a)     # fp32 (C,): BN1's backward sums
            dweight (C, 1, k, k) fp32 = sum over N, H, W of dc * shifted b

``b`` is never stored: both passes recompute it from ``a``. The caller turns (g, sum_g, sum_gxmu)
into dL/da with the BatchNorm backward formula (see nvae_fast/ops/bn_swish.py) in the prologue of
the next backward stage. ``mean_c, var_c`` feed BN2 (after an all-reduce across ranks when
training distributed). In eval mode the statistics are not needed; kernels may skip them.

Kernel sizes 3, 5, 7, 11; stride 1 or 2 (stride 2 with ``upsample`` is not a cell of NVAE).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _b(a: Tensor, scale: Tensor, shift: Tensor, upsample: bool) -> Tensor:
    z = a.float() * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)
    b = z * torch.sigmoid(z)
    return F.interpolate(b, scale_factor=2, mode="nearest") if upsample else b


def dwconv_stage_forward_ref(a: Tensor, scale: Tensor, shift: Tensor, weight: Tensor, stride: int = 1,
                             upsample: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """Reference forward: (c, mean_c, var_c); fp32 math, c rounded to a's dtype at the end."""
    k = weight.shape[-1]
    c = F.conv2d(_b(a, scale, shift, upsample), weight.float(), stride=stride, padding=k // 2, groups=a.shape[1])
    var, mean = torch.var_mean(c, dim=(0, 2, 3), unbiased=False)
    return c.to(a.dtype).contiguous(memory_format=torch.channels_last), mean, var


def dwconv_stage_backward_ref(dc: Tensor, a: Tensor, scale: Tensor, shift: Tensor, mean_a: Tensor, weight: Tensor,
                              stride: int = 1, upsample: bool = False
                              ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Reference backward: (g, sum_g, sum_gxmu, dweight), by autograd through the recomputed forward."""
    k = weight.shape[-1]
    with torch.enable_grad():
        z = (a.float() * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)).requires_grad_()
        w = weight.detach().float().requires_grad_()
        b = z * torch.sigmoid(z)
        if upsample:
            b = F.interpolate(b, scale_factor=2, mode="nearest")
        c = F.conv2d(b, w, stride=stride, padding=k // 2, groups=a.shape[1])
        g, dweight = torch.autograd.grad(c, (z, w), dc.float())
    sum_g = g.sum(dim=(0, 2, 3))
    sum_gxmu = (g * (a.float() - mean_a.view(1, -1, 1, 1))).sum(dim=(0, 2, 3))
    return g.to(a.dtype).contiguous(memory_format=torch.channels_last), sum_g, sum_gxmu, dweight
