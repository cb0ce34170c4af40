"""The depthwise stage of the fused generative cell: BN1 + Swish prologue, depthwise conv, BN2 stats.

Two contracts. Every backend implements the first; the fused cell (nvae_fast/ops/gen_cell.py) uses
the second where a backend has it and composes it from the first (with a few torch ops between)
where not. Tensors are (N, C, H, W) (kernels may require channels-last; the outputs are), per-channel
vectors contiguous (C,), statistics and sums fp32 (fp64 for the torch backend's float64).

Plain contract (``dwconv_stage_forward`` / ``dwconv_stage_backward``; triton, cuda, torch)
-------------------------------------------------------------------------------------------

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

``b`` is never stored: both passes recompute it from ``a``.

Fused contract (``dwconv_stage_{forward,backward}_fused``; triton, cuda, torch)
-------------------------------------------------------------------------------

The same stage with everything that would otherwise run as small torch ops between the cell's
kernels done inside the stage (types: nvae_fast/ops/stage_args.py)::

    dwconv_stage_forward_fused(a, bn1: BatchNormArgs, weight, stride, upsample,
                               stats: (2, C) fp32 out | None, running: RunningUpdate | None) -> c
        scale, shift from bn1 (its weight, bias, mean, var, eps), then the forward above;
        stats[0] = mean_c, stats[1] = var_c (biased), written in place (None in eval: no statistics);
        running: BN2's running statistics updated in place from (mean_c, var_c) (see RunningUpdate).

    dwconv_stage_backward_fused(dz, z, bn_z: BatchNormArgs, grad_z: BatchNormGrad, a,
                                bn1: BatchNormArgs, weight, stride, upsample,
                                sums: (2, C) fp32 out, bn1_grads: ((C,), (C,)) out,
                                dweight: (C, 1, k, k) out) -> g
        dc = scale_z * dz + kx_z * (z - mean_z) + kc_z        # BN2's backward applied on the fly:
                                                              # dz = dL/d(BN2 output), z = c, with
                                                              # (scale_z, kx_z, kc_z) from bn_z and
                                                              # grad_z as BatchNormGrad defines them
        then the backward above with scale, shift from bn1 and mean_a = bn1.mean;
        sums[0] = sum_g, sums[1] = sum_gxmu (this rank's), written in place;
        bn1_grads = (sums[1] / sqrt(bn1.var + bn1.eps), sums[0]) in the parameters' dtype;
        dweight written in its own dtype; g returned as in the plain backward.

So the cell's backward needs a single pass of the GEMM2^T stage before this one (it writes dz and
BN2's backward sums) and never materialises dc. Outputs must be written completely (they arrive
uninitialised) and deterministically (no floating-point atomics; merges in a fixed order). A backend
implements both fused functions or neither; :func:`fused_kernels_for` adapts the plain contract
otherwise (the adapter launches a few torch ops, so it misses the cell's launch budget). The
references :func:`dwconv_stage_forward_fused_ref` / :func:`dwconv_stage_backward_fused_ref` define
the results.

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
from nvae_fast.ops.stage_args import (BatchNormArgs, BatchNormGrad, RunningUpdate, backward_coefs, fold,
                                      update_running, write_param_grads)


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


# ---------------------------------------------------------------------------------------------
# The fused contract composed from the plain one (the references, and the adapter for backends
# that implement only the plain contract)
# ---------------------------------------------------------------------------------------------

def _forward_fused_via(forward, a: Tensor, bn: BatchNormArgs, weight: Tensor, stride: int, upsample: bool,
                       stats: Tensor | None, running: RunningUpdate | None) -> Tensor:
    scale, shift, _ = fold(bn)
    c, mean, var = forward(a, scale.contiguous(), shift.contiguous(), weight, stride, upsample)
    if stats is None:
        return c
    stats[0].copy_(mean)
    stats[1].copy_(var)
    if running is not None:
        update_running(running, mean, var)
    return c


def _backward_fused_via(backward, dz: Tensor, z: Tensor, bn_z: BatchNormArgs, grad_z: BatchNormGrad, a: Tensor,
                        bn: BatchNormArgs, weight: Tensor, stride: int, upsample: bool, sums: Tensor,
                        bn_grads: tuple[Tensor, Tensor], dweight: Tensor) -> Tensor:
    scale_z, kx, kc = (t.view(1, -1, 1, 1) for t in backward_coefs(bn_z, grad_z))
    dc = scale_z * dz.to(scale_z.dtype) + kx * (z.to(scale_z.dtype) - bn_z.mean.view(1, -1, 1, 1)) + kc
    dc = dc.to(a.dtype).contiguous(memory_format=torch.channels_last)
    scale, shift, _ = fold(bn)
    g, sum_g, sum_gxmu, dw = backward(dc, a, scale.contiguous(), shift.contiguous(), bn.mean.contiguous(), weight,
                                      stride, upsample)
    sums[0].copy_(sum_g)
    sums[1].copy_(sum_gxmu)
    write_param_grads(bn, sums, bn_grads)
    dweight.copy_(dw)
    return g


def dwconv_stage_forward_fused_ref(a: Tensor, bn: BatchNormArgs, weight: Tensor, stride: int, upsample: bool,
                                   stats: Tensor | None, running: RunningUpdate | None = None) -> Tensor:
    """Reference of the fused forward (module docstring): c; writes ``stats`` and ``running``."""
    return _forward_fused_via(dwconv_stage_forward_ref, a, bn, weight, stride, upsample, stats, running)


def dwconv_stage_backward_fused_ref(dz: Tensor, z: Tensor, bn_z: BatchNormArgs, grad_z: BatchNormGrad, a: Tensor,
                                    bn: BatchNormArgs, weight: Tensor, stride: int, upsample: bool, sums: Tensor,
                                    bn_grads: tuple[Tensor, Tensor], dweight: Tensor) -> Tensor:
    """Reference of the fused backward (module docstring): g; writes ``sums``, ``bn_grads``, ``dweight``."""
    return _backward_fused_via(dwconv_stage_backward_ref, dz, z, bn_z, grad_z, a, bn, weight, stride, upsample,
                               sums, bn_grads, dweight)


def kernels_for(a: Tensor) -> ModuleType | SimpleNamespace:
    """The kernel namespace of the backend chosen for a (see nvae_fast.backend); float64 runs on torch."""
    implemented = ("torch",)
    if a.dtype in _KERNEL_DTYPES:
        # Triton first: checked against the reference on every CI run; csrc/ awaits a GPU run.
        implemented = tuple(n for n in ("triton", "cuda") if backend.has_kernels("dwconv_stage", n)) + implemented
    name = backend.select("dwconv_stage", a.device, implemented)
    return _TORCH_KERNELS if name == "torch" else backend.kernels("dwconv_stage", name)


def fused_kernels_for(a: Tensor) -> SimpleNamespace:
    """``dwconv_stage_forward_fused`` / ``dwconv_stage_backward_fused`` of the backend chosen for a:
    its own kernels where it has them, else its plain contract composed with torch ops."""
    kernels = kernels_for(a)
    if hasattr(kernels, "dwconv_stage_forward_fused"):
        return SimpleNamespace(dwconv_stage_forward_fused=kernels.dwconv_stage_forward_fused,
                               dwconv_stage_backward_fused=kernels.dwconv_stage_backward_fused)
    forward, backward = kernels.dwconv_stage_forward, kernels.dwconv_stage_backward
    return SimpleNamespace(
        dwconv_stage_forward_fused=lambda *args: _forward_fused_via(forward, *args),
        dwconv_stage_backward_fused=lambda *args: _backward_fused_via(backward, *args))


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
