"""Fused BatchNorm + Swish: ``y = swish(BN(x))``, the official ``SyncBatchNormSwish``.

Contract (every backend implements these four kernels with the same signatures; x is a 4-D
(N, C, H, W) float tensor of any strides, per-channel vectors are contiguous (C,) fp32 tensors -
fp64 for fp64 input on the torch backend - and ``out`` tensors keep x's memory format):

* ``bn_stats(x) -> (mean, var)``                                   batch mean, biased variance
* ``bn_swish_forward(x, scale, shift, out)``                       out = swish(x * scale + shift)
* ``bn_swish_backward_reduce(dy, x, scale, shift, mean)``          (sum g, sum g * (x - mean)),
  with ``g = dy * swish'(x * scale + shift)``
* ``bn_swish_backward_apply(dy, x, scale, shift, mean, coef_xmu, coef_const, out)``
  out = scale * g + coef_xmu * (x - mean) + coef_const

BatchNorm folds into ``scale = weight * invstd``, ``shift = bias - mean * scale``. Backward recomputes
the normalised value from the saved input: the output is never saved (the official memory trick).

Fused entry points, which keep the per-channel work inside the kernels (for a backend without them
this module composes them from the four above):

* ``bn_stats_update(x, running_mean, running_var, momentum, eps) -> (mean, invstd)``: running
  statistics (or None) updated in place as ``torch.nn.BatchNorm2d`` updates them
* ``bn_swish_affine_forward(x, weight, bias, mean, invstd, out)``:
  out = swish((x - mean) * invstd * weight + bias)
* ``bn_swish_affine_backward(dy, x, weight, bias, mean, invstd, training) -> (dx, dweight, dbias)``

Public entry points: :func:`bn_swish` (functional, training and eval, optional process group),
:func:`bn_swish_ref` (plain-autograd reference, float64-capable). The custom ops
``torch.ops.nvae_fast.bn_stats`` and ``torch.ops.nvae_fast.bn_swish`` (with autograd) let
``torch.compile`` trace through without graph breaks. On the torch backend :func:`bn_swish` is
``F.silu(F.batch_norm(...))``: PyTorch's own kernels, no custom-op dispatch (under
``torch.compile`` inductor fuses them).
"""

from __future__ import annotations

from types import ModuleType, SimpleNamespace

import torch
import torch.nn.functional as F
from torch import Tensor

from nvae_fast import backend, distributed

_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_FLOAT_DTYPES = _KERNEL_DTYPES + (torch.float64,)


# ---------------------------------------------------------------------------------------------
# Reference
# ---------------------------------------------------------------------------------------------

def bn_swish_ref(
    x: Tensor,
    weight: Tensor,
    bias: Tensor,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    training: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    """Plain-autograd reference of BatchNorm + Swish, written from the definitions.

    Computes in fp32 (fp64 for fp64 input) and returns x's dtype. In training, normalises with the
    batch statistics over (N, H, W) and updates the running statistics in place like
    ``torch.nn.BatchNorm2d`` (unbiased variance); in eval, normalises with the running statistics.
    """
    acc = _acc_dtype(x)
    xf = x.to(acc)
    if training:
        mean = xf.mean(dim=(0, 2, 3))
        var = xf.var(dim=(0, 2, 3), unbiased=False)
        if running_mean is not None and running_var is not None:
            n = x.numel() // x.shape[1]
            with torch.no_grad():
                running_mean.lerp_(mean.detach().to(running_mean.dtype), momentum)
                running_var.lerp_((var.detach() * n / max(n - 1, 1)).to(running_var.dtype), momentum)
    else:
        mean, var = running_mean.to(acc), running_var.to(acc)
    xhat = (xf - mean.view(1, -1, 1, 1)) * torch.rsqrt(var.view(1, -1, 1, 1) + eps)
    z = xhat * weight.to(acc).view(1, -1, 1, 1) + bias.to(acc).view(1, -1, 1, 1)
    return (z * torch.sigmoid(z)).to(x.dtype)


def _acc_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _per_channel(v: Tensor) -> Tensor:
    return v.view(1, -1, 1, 1)


def _torch_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    xf = x.to(_acc_dtype(x))
    var, mean = torch.var_mean(xf, dim=(0, 2, 3), unbiased=False)
    return mean, var


def _torch_forward(x: Tensor, scale: Tensor, shift: Tensor, out: Tensor) -> Tensor:
    z = torch.addcmul(_per_channel(shift), x.to(scale.dtype), _per_channel(scale))
    return out.copy_(z * torch.sigmoid(z))


def _torch_grad_z(dy: Tensor, x: Tensor, scale: Tensor, shift: Tensor) -> tuple[Tensor, Tensor]:
    xf = x.to(scale.dtype)
    z = torch.addcmul(_per_channel(shift), xf, _per_channel(scale))
    s = torch.sigmoid(z)
    return dy.to(scale.dtype) * s * (1 + z * (1 - s)), xf


def _torch_backward_reduce(dy: Tensor, x: Tensor, scale: Tensor, shift: Tensor, mean: Tensor) -> tuple[Tensor, Tensor]:
    g, xf = _torch_grad_z(dy, x, scale, shift)
    return g.sum(dim=(0, 2, 3)), (g * (xf - _per_channel(mean))).sum(dim=(0, 2, 3))


def _torch_backward_apply(dy: Tensor, x: Tensor, scale: Tensor, shift: Tensor, mean: Tensor, coef_xmu: Tensor,
                          coef_const: Tensor, out: Tensor) -> Tensor:
    g, xf = _torch_grad_z(dy, x, scale, shift)
    dx = _per_channel(scale) * g + _per_channel(coef_xmu) * (xf - _per_channel(mean)) + _per_channel(coef_const)
    return out.copy_(dx)


_TORCH_KERNELS = SimpleNamespace(
    bn_stats=_torch_stats,
    bn_swish_forward=_torch_forward,
    bn_swish_backward_reduce=_torch_backward_reduce,
    bn_swish_backward_apply=_torch_backward_apply,
)


# ---------------------------------------------------------------------------------------------
# Dispatch
# ---------------------------------------------------------------------------------------------

def backend_for(x: Tensor) -> str:
    """The backend chosen for x (see nvae_fast.backend)."""
    # Triton first: its kernels are checked against the reference on every CI run (interpreter);
    # the csrc/ kernels only compile on CI and await a GPU run of their tests before they lead.
    implemented = ("triton", "cuda", "torch") if x.dtype in _KERNEL_DTYPES else ("torch",)
    return backend.select(f"bn_swish[{str(x.dtype).removeprefix('torch.')}]", x.device, implemented)


def kernels_for(x: Tensor) -> ModuleType | SimpleNamespace:
    """The kernel namespace of the backend chosen for x (see nvae_fast.backend)."""
    name = backend_for(x)
    return _TORCH_KERNELS if name == "torch" else backend.kernels("bn_swish", name)


def _fold(weight: Tensor, bias: Tensor, mean: Tensor, invstd: Tensor) -> tuple[Tensor, Tensor]:
    scale = weight.to(invstd.dtype) * invstd
    shift = bias.to(invstd.dtype) - mean * scale
    return scale.contiguous(), shift.contiguous()


def _input_grad_coefs(scale: Tensor, invstd: Tensor, sum_g: Tensor, sum_gxmu: Tensor, count: int,
                      training: bool) -> tuple[Tensor, Tensor]:
    """(coef_xmu, coef_const) of dx = scale*g + coef_xmu*(x - mean) + coef_const.

    In training the batch statistics depend on x: dx = scale * (g - mean(g) - xhat * mean(g * xhat)).
    In eval they are constants: dx = scale * g.
    """
    if not training:
        zeros = torch.zeros_like(scale)
        return zeros, zeros
    coef_xmu = -scale * invstd * invstd * (sum_gxmu / count)
    coef_const = -scale * (sum_g / count)
    return coef_xmu.contiguous(), coef_const.contiguous()


def _stats_update(kernels, x: Tensor, running_mean: Tensor | None, running_var: Tensor | None, momentum: float,
                  eps: float) -> tuple[Tensor, Tensor]:
    fused = getattr(kernels, "bn_stats_update", None)
    if fused is not None:
        return fused(x, running_mean, running_var, momentum, eps)
    mean, var = kernels.bn_stats(x)
    _update_running(running_mean, running_var, mean, var, x.numel() // x.shape[1], momentum)
    return mean, torch.rsqrt(var + eps)


def _affine_forward(kernels, x: Tensor, weight: Tensor, bias: Tensor, mean: Tensor, invstd: Tensor) -> Tensor:
    fused = getattr(kernels, "bn_swish_affine_forward", None)
    if fused is not None:
        return fused(x, weight, bias, mean, invstd, torch.empty_like(x))
    scale, shift = _fold(weight, bias, mean, invstd)
    return kernels.bn_swish_forward(x, scale, shift, torch.empty_like(x))


def _affine_backward(kernels, dy: Tensor, x: Tensor, weight: Tensor, bias: Tensor, mean: Tensor, invstd: Tensor,
                     training: bool) -> tuple[Tensor, Tensor, Tensor]:
    fused = getattr(kernels, "bn_swish_affine_backward", None)
    if fused is not None:
        return fused(dy, x, weight, bias, mean, invstd, training)
    scale, shift = _fold(weight, bias, mean, invstd)
    sum_g, sum_gxmu = kernels.bn_swish_backward_reduce(dy, x, scale, shift, mean)
    coef_xmu, coef_const = _input_grad_coefs(scale, invstd, sum_g, sum_gxmu, x.numel() // x.shape[1], training)
    dx = kernels.bn_swish_backward_apply(dy, x, scale, shift, mean, coef_xmu, coef_const, torch.empty_like(x))
    return dx, (sum_gxmu * invstd).to(weight.dtype), sum_g.to(bias.dtype)


# ---------------------------------------------------------------------------------------------
# Custom ops (torch.compile sees these as opaque nodes with a fake implementation)
# ---------------------------------------------------------------------------------------------

@torch.library.custom_op("nvae_fast::bn_stats", mutates_args=("running_mean", "running_var"))
def _bn_stats_op(x: Tensor, running_mean: Tensor | None, running_var: Tensor | None, momentum: float,
                 eps: float) -> tuple[Tensor, Tensor]:
    mean, invstd = _stats_update(kernels_for(x), x, running_mean, running_var, momentum, eps)
    return mean, invstd


@_bn_stats_op.register_fake
def _(x, running_mean, running_var, momentum, eps):
    stat = x.new_empty(x.shape[1], dtype=_acc_dtype(x))
    return stat, torch.empty_like(stat)


@torch.library.custom_op("nvae_fast::bn_swish", mutates_args=())
def _bn_swish_op(x: Tensor, weight: Tensor, bias: Tensor, mean: Tensor, invstd: Tensor, training: bool) -> Tensor:
    return _affine_forward(kernels_for(x), x, weight, bias, mean, invstd)


@_bn_swish_op.register_fake
def _(x: Tensor, weight: Tensor, bias: Tensor, mean: Tensor, invstd: Tensor, training: bool) -> Tensor:
    return torch.empty_like(x)


@torch.library.custom_op("nvae_fast::bn_swish_backward", mutates_args=())
def _bn_swish_backward_op(dy: Tensor, x: Tensor, weight: Tensor, bias: Tensor, mean: Tensor, invstd: Tensor,
                          training: bool) -> tuple[Tensor, Tensor, Tensor]:
    dx, dweight, dbias = _affine_backward(kernels_for(x), dy, x, weight, bias, mean, invstd, training)
    return dx, dweight, dbias


@_bn_swish_backward_op.register_fake
def _(dy: Tensor, x: Tensor, weight: Tensor, bias: Tensor, mean: Tensor, invstd: Tensor,
      training: bool) -> tuple[Tensor, Tensor, Tensor]:
    return torch.empty_like(x), torch.empty_like(weight), torch.empty_like(bias)


def _bn_swish_setup_context(ctx, inputs, output) -> None:
    x, weight, bias, mean, invstd, training = inputs
    ctx.save_for_backward(x, weight, bias, mean, invstd)
    ctx.training = training


def _bn_swish_backward(ctx, dy: Tensor):
    x, weight, bias, mean, invstd = ctx.saved_tensors
    dx, dweight, dbias = torch.ops.nvae_fast.bn_swish_backward(dy, x, weight, bias, mean, invstd, ctx.training)
    # mean and invstd are the batch statistics of x (training) or constants (eval): their
    # dependence on x is already inside dx, so they get no gradient of their own.
    return dx, dweight, dbias, None, None, None


_bn_swish_op.register_autograd(_bn_swish_backward, setup_context=_bn_swish_setup_context)


# ---------------------------------------------------------------------------------------------
# Multi-rank training: statistics and backward sums are combined across the process group.
# ---------------------------------------------------------------------------------------------

class _SyncBnSwish(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momentum, eps, process_group):
        kernels = kernels_for(x)
        local_mean, local_var = kernels.bn_stats(x)
        mean, var, count = distributed.all_gather_moments(local_mean, local_var, x.numel() // x.shape[1],
                                                          process_group)
        _update_running(running_mean, running_var, mean, var, count, momentum)
        invstd = torch.rsqrt(var + eps)
        scale, shift = _fold(weight, bias, mean, invstd)
        ctx.save_for_backward(x, weight, bias, mean, invstd)
        ctx.count, ctx.process_group = count, process_group
        return kernels.bn_swish_forward(x, scale, shift, torch.empty_like(x))

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, mean, invstd = ctx.saved_tensors
        kernels = kernels_for(x)
        scale, shift = _fold(weight, bias, mean, invstd)
        sum_g, sum_gxmu = kernels.bn_swish_backward_reduce(dy, x, scale, shift, mean)
        # Parameter gradients stay local (DDP averages them); the input gradient needs global sums.
        dweight, dbias = (sum_gxmu * invstd).to(weight.dtype), sum_g.to(bias.dtype)
        sum_g, sum_gxmu = distributed.all_reduce_sum([sum_g, sum_gxmu], ctx.process_group)
        coef_xmu, coef_const = _input_grad_coefs(scale, invstd, sum_g, sum_gxmu, ctx.count, True)
        dx = kernels.bn_swish_backward_apply(dy, x, scale, shift, mean, coef_xmu, coef_const, torch.empty_like(x))
        return dx, dweight, dbias, None, None, None, None, None


def _update_running(running_mean: Tensor | None, running_var: Tensor | None, mean: Tensor, var: Tensor,
                    count: int, momentum: float) -> None:
    if running_mean is None or running_var is None:
        return
    with torch.no_grad():
        running_mean.lerp_(mean.to(running_mean.dtype), momentum)
        running_var.lerp_((var * (count / max(count - 1, 1))).to(running_var.dtype), momentum)


# ---------------------------------------------------------------------------------------------
# Public functional API
# ---------------------------------------------------------------------------------------------

def check_bn_inputs(x: Tensor, weight: Tensor | None, bias: Tensor | None, running_mean: Tensor | None,
                    running_var: Tensor | None, training: bool) -> None:
    """Raises ValueError/TypeError naming the argument unless the BatchNorm inputs are consistent."""
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"x must be 4-D (N, C, H, W), got {x.dim()}-D with shape {tuple(x.shape)}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"x must be float32, float16, bfloat16 or float64, got {x.dtype}")
    C = x.shape[1]
    for name, t in (("weight", weight), ("bias", bias), ("running_mean", running_mean),
                    ("running_var", running_var)):
        if t is None:
            continue
        if t.shape != (C,):
            raise ValueError(f"{name} must have shape ({C},) to match x's {C} channels, got {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}; move them to one device")
    if not training and (running_mean is None or running_var is None):
        raise ValueError("eval mode (training=False) needs running_mean and running_var")
    if training and x.numel() // max(C, 1) <= 1:
        raise ValueError(f"training needs more than 1 value per channel, got x of shape {tuple(x.shape)}")


def bn_swish(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    training: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
    process_group: distributed.ProcessGroup | None = None,
) -> Tensor:
    """``swish(batch_norm(x))`` with the fused kernels of the backend chosen for x.

    Args:
        x: (N, C, H, W), float32/float16/bfloat16 (or float64 on the torch backend), NCHW or
            channels-last or any strided view. The output has x's shape, dtype and memory format.
        weight, bias: (C,) affine parameters, or None for 1 and 0.
        running_mean, running_var: (C,) running statistics, updated in place in training
            (``(1 - momentum) * old + momentum * batch``, unbiased variance); used in eval.
        training: normalise with batch statistics (fp32 accumulation) instead of running ones.
        momentum, eps: as in ``torch.nn.BatchNorm2d``.
        process_group: in training with more than one rank in the group (default: WORLD when
            torch.distributed is initialised), statistics are combined across ranks
            (SyncBatchNorm semantics).
    """
    check_bn_inputs(x, weight, bias, running_mean, running_var, training)
    synced = training and distributed.group_size(process_group) > 1
    if not synced and backend_for(x) == "torch":
        return F.silu(F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps))
    acc = _acc_dtype(x)
    if weight is None:
        weight = torch.ones(x.shape[1], device=x.device, dtype=acc)
    if bias is None:
        bias = torch.zeros(x.shape[1], device=x.device, dtype=acc)
    if synced:
        return _SyncBnSwish.apply(x, weight, bias, running_mean, running_var, momentum, eps, process_group)
    if training:
        mean, invstd = torch.ops.nvae_fast.bn_stats(x.detach(), running_mean, running_var, momentum, eps)
    else:
        mean, invstd = running_mean.to(acc), torch.rsqrt(running_var.to(acc) + eps)
    return torch.ops.nvae_fast.bn_swish(x, weight, bias, mean, invstd, training)
