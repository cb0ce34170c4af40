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

Entry points: :func:`dwconv_stage_forward` and :func:`dwconv_stage_backward` check their inputs and
run the custom ops ``torch.ops.nvae_fast.dwconv_stage_forward/backward`` on the backend chosen by
nvae_fast.backend (triton, then cuda when its kernels are present, else torch = the references).
"""

from __future__ import annotations

from types import ModuleType, SimpleNamespace

import torch
import torch.nn.functional as F
from torch import Tensor

from nvae_fast import backend


def _acc(t: Tensor) -> Tensor:
    """t in the math dtype: fp32, or fp64 for fp64 input (the torch backend runs float64 checks)."""
    return t.double() if t.dtype == torch.float64 else t.float()


def _b(a: Tensor, scale: Tensor, shift: Tensor, upsample: bool) -> Tensor:
    z = _acc(a) * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)
    b = z * torch.sigmoid(z)
    return F.interpolate(b, scale_factor=2, mode="nearest") if upsample else b


def dwconv_stage_forward_ref(a: Tensor, scale: Tensor, shift: Tensor, weight: Tensor, stride: int = 1,
                             upsample: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """Reference forward: (c, mean_c, var_c); fp32 math (fp64 for fp64 a), c rounded to a's dtype at the end."""
    k = weight.shape[-1]
    b = _b(a, scale, shift, upsample)
    c = F.conv2d(b, weight.to(b.dtype), stride=stride, padding=k // 2, groups=a.shape[1])
    var, mean = torch.var_mean(c, dim=(0, 2, 3), unbiased=False)
    return c.to(a.dtype).contiguous(memory_format=torch.channels_last), mean, var


def dwconv_stage_backward_ref(dc: Tensor, a: Tensor, scale: Tensor, shift: Tensor, mean_a: Tensor, weight: Tensor,
                              stride: int = 1, upsample: bool = False
                              ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Reference backward: (g, sum_g, sum_gxmu, dweight), by autograd through the recomputed forward."""
    k = weight.shape[-1]
    with torch.enable_grad():
        z = (_acc(a) * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)).requires_grad_()
        w = weight.detach().to(z.dtype).requires_grad_()
        b = z * torch.sigmoid(z)
        if upsample:
            b = F.interpolate(b, scale_factor=2, mode="nearest")
        c = F.conv2d(b, w, stride=stride, padding=k // 2, groups=a.shape[1])
        g, dweight = torch.autograd.grad(c, (z, w), dc.to(z.dtype))
    sum_g = g.sum(dim=(0, 2, 3))
    sum_gxmu = (g * (_acc(a) - mean_a.view(1, -1, 1, 1))).sum(dim=(0, 2, 3))
    return g.to(a.dtype).contiguous(memory_format=torch.channels_last), sum_g, sum_gxmu, dweight


# ---------------------------------------------------------------------------------------------
# Dispatch, custom ops (opaque to torch.compile, with fake implementations) and checked entry points
# ---------------------------------------------------------------------------------------------

KERNEL_SIZES = (3, 5, 7, 11)
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
def _torch_backward(dc: Tensor, a: Tensor, scale: Tensor, shift: Tensor, mean_a: Tensor, weight: Tensor,
                    stride: int = 1, upsample: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The torch backend's backward: the reference's formulas with explicit convolution gradients
    (custom-op implementations run without autograd, so the reference's autograd cannot serve)."""
    k, C = weight.shape[-1], a.shape[1]
    b = _b(a, scale, shift, upsample)
    w = weight.to(b.dtype)
    dcf = dc.to(b.dtype)
    db = torch.nn.grad.conv2d_input(b.shape, w, dcf, stride=stride, padding=k // 2, groups=C)
    dweight = torch.nn.grad.conv2d_weight(b, w.shape, dcf, stride=stride, padding=k // 2, groups=C)
    if upsample:
        N, _, H, W = a.shape
        db = db.view(N, C, H, 2, W, 2).sum(dim=(3, 5))
    z = _acc(a) * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)
    s = torch.sigmoid(z)
    g = db * s * (1 + z * (1 - s))
    sum_g = g.sum(dim=(0, 2, 3))
    sum_gxmu = (g * (_acc(a) - mean_a.view(1, -1, 1, 1))).sum(dim=(0, 2, 3))
    return g.to(a.dtype).contiguous(memory_format=torch.channels_last), sum_g, sum_gxmu, dweight


_TORCH_KERNELS = SimpleNamespace(dwconv_stage_forward=dwconv_stage_forward_ref, dwconv_stage_backward=_torch_backward)


def kernels_for(a: Tensor) -> ModuleType | SimpleNamespace:
    """The kernel namespace of the backend chosen for a (see nvae_fast.backend); float64 runs on torch."""
    implemented = ("torch",)
    if a.dtype in _KERNEL_DTYPES:
        # Triton first: checked against the reference on every CI run; csrc/ awaits a GPU run.
        implemented = tuple(n for n in ("triton", "cuda") if backend.has_kernels("dwconv_stage", n)) + implemented
    name = backend.select("dwconv_stage", a.device, implemented)
    return _TORCH_KERNELS if name == "torch" else backend.kernels("dwconv_stage", name)


def output_size(H: int, W: int, k: int, stride: int, upsample: bool) -> tuple[int, int]:
    """(Ho, Wo): 'same' padding k // 2 on the (2x-upsampled if ``upsample``) input, then the stride."""
    Hc, Wc = (2 * H, 2 * W) if upsample else (H, W)
    return (Hc + 2 * (k // 2) - k) // stride + 1, (Wc + 2 * (k // 2) - k) // stride + 1


@torch.library.custom_op("nvae_fast::dwconv_stage_forward", mutates_args=())
def _forward_op(a: Tensor, scale: Tensor, shift: Tensor, weight: Tensor, stride: int,
                upsample: bool) -> tuple[Tensor, Tensor, Tensor]:
    c, mean, var = kernels_for(a).dwconv_stage_forward(a, scale, shift, weight, stride, upsample)
    return c, mean, var


@_forward_op.register_fake
def _(a, scale, shift, weight, stride, upsample):
    N, C, H, W = a.shape
    Ho, Wo = output_size(H, W, weight.shape[-1], stride, upsample)
    stat = a.new_empty(C, dtype=torch.float32)
    return (a.new_empty((N, C, Ho, Wo)).contiguous(memory_format=torch.channels_last), stat,
            torch.empty_like(stat))


@torch.library.custom_op("nvae_fast::dwconv_stage_backward", mutates_args=())
def _backward_op(dc: Tensor, a: Tensor, scale: Tensor, shift: Tensor, mean_a: Tensor, weight: Tensor, stride: int,
                 upsample: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    g, sum_g, sum_gxmu, dweight = kernels_for(a).dwconv_stage_backward(dc, a, scale, shift, mean_a, weight, stride,
                                                                        upsample)
    return g, sum_g, sum_gxmu, dweight


@_backward_op.register_fake
def _(dc, a, scale, shift, mean_a, weight, stride, upsample):
    stat = a.new_empty(a.shape[1], dtype=torch.float32)
    return (torch.empty_like(a, memory_format=torch.channels_last), stat, torch.empty_like(stat),
            weight.new_empty(weight.shape, dtype=torch.float32))


def check_stage_inputs(a: Tensor, scale: Tensor, shift: Tensor, weight: Tensor, stride: int, upsample: bool,
                       **others: Tensor) -> None:
    """Raises ValueError/TypeError naming the argument unless the stage's inputs are consistent."""
    if not isinstance(a, Tensor) or a.dim() != 4:
        raise ValueError(f"a must be a 4-D tensor (N, C, H, W), got {getattr(a, 'shape', type(a))}")
    if not a.is_floating_point():
        raise TypeError(f"a must be a floating-point tensor, got {a.dtype}")
    C = a.shape[1]
    if weight.dim() != 4 or weight.shape[:2] != (C, 1) or weight.shape[2] != weight.shape[3] \
            or weight.shape[-1] not in KERNEL_SIZES:
        raise ValueError(f"weight must have shape ({C}, 1, k, k) with k in {KERNEL_SIZES}, got {tuple(weight.shape)}")
    if stride not in (1, 2):
        raise ValueError(f"stride must be 1 or 2, got {stride}")
    if upsample and stride != 1:
        raise ValueError("upsample needs stride 1 (no NVAE cell upsamples and strides)")
    stat_dtype = torch.float64 if a.dtype == torch.float64 else torch.float32
    for name, t in dict(scale=scale, shift=shift, **others).items():
        if t.device != a.device:
            raise ValueError(f"{name} is on {t.device} but a is on {a.device}")
        if name == "dc":
            continue
        if t.shape != (C,) or t.dtype != stat_dtype or not t.is_contiguous():
            raise ValueError(f"{name} must be a contiguous {str(stat_dtype)[6:]} tensor of shape ({C},), got "
                             f"{t.dtype} {tuple(t.shape)}")
    if weight.device != a.device:
        raise ValueError(f"weight is on {weight.device} but a is on {a.device}")


def dwconv_stage_forward(a: Tensor, scale: Tensor, shift: Tensor, weight: Tensor, stride: int = 1,
                         upsample: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """The stage's forward on the backend chosen for a: (c, mean_c, var_c), see the module docstring."""
    check_stage_inputs(a, scale, shift, weight, stride, upsample)
    return torch.ops.nvae_fast.dwconv_stage_forward(a, scale, shift, weight, stride, upsample)


def dwconv_stage_backward(dc: Tensor, a: Tensor, scale: Tensor, shift: Tensor, mean_a: Tensor, weight: Tensor,
                          stride: int = 1, upsample: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The stage's backward on the backend chosen for a: (g, sum_g, sum_gxmu, dweight)."""
    check_stage_inputs(a, scale, shift, weight, stride, upsample, mean_a=mean_a, dc=dc)
    expected = (a.shape[0], a.shape[1], *output_size(a.shape[2], a.shape[3], weight.shape[-1], stride, upsample))
    if dc.shape != expected or dc.dtype != a.dtype:
        raise ValueError(f"dc must have shape {expected} and dtype {a.dtype}, got {tuple(dc.shape)} {dc.dtype}")
    return torch.ops.nvae_fast.dwconv_stage_backward(dc, a, scale, shift, mean_a, weight, stride, upsample)
