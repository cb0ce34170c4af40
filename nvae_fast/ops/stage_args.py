"""What the stages of the fused generative cell hand each other: one BatchNorm's tensors, its
running-statistics update, its backward sums, and how a backward stage rebuilds a gradient.

Every per-channel or per-sample computation between two heavy stages (BatchNorm scale and shift,
the backward coefficients, running-statistics updates, squeeze-excitation) happens inside a stage
kernel from these tensors: stages never receive precomputed scale/shift vectors, so no small
kernel runs between them. Vectors are (C,) and contiguous; statistics and sums are fp32 (fp64 when
the torch backend runs float64); parameters keep their own dtype.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class BatchNormArgs(NamedTuple):
    """One BatchNorm as a stage applies it: ``y = (x - mean) / sqrt(var + eps) * weight + bias``,
    i.e. ``x * scale + shift`` with ``scale = weight / sqrt(var + eps)``, ``shift = bias - mean * scale``."""

    weight: Tensor    # (C,) the affine parameters
    bias: Tensor
    mean: Tensor      # (C,) batch mean in training (written by the stage before), running mean in eval
    var: Tensor       # (C,) biased batch variance in training, running variance in eval
    eps: float


class RunningUpdate(NamedTuple):
    """The running statistics a stage updates in place once it has a BatchNorm's batch statistics,
    as ``torch.nn.BatchNorm2d`` does: ``running += momentum * (batch - running)``, the variance
    unbiased (``var * unbias``, ``unbias = count / (count - 1)``), ``num_batches_tracked += 1``."""

    mean: Tensor
    var: Tensor
    num_batches_tracked: Tensor | None
    momentum: float
    unbias: float


class BatchNormGrad(NamedTuple):
    """One BatchNorm's backward as a later stage applies it. With g the gradient of the output:
    ``dx = scale * g + kx * (x - mean) + kc``, ``kx = -scale / (var + eps) * sums[1] / count``,
    ``kc = -scale * sums[0] / count`` in training; kx = kc = 0 in eval (constant statistics)."""

    sums: Tensor      # (2, C): sum of g, sum of g * (x - mean) over the batch (of every rank)
    count: int        # values per channel the statistics were taken over (every rank)
    training: bool


class BatchNormInputGrad(NamedTuple):
    """The gradient at a BatchNorm's input, rebuilt inside a backward stage from the saved input
    ``x`` and an output gradient ``g`` (never stored): ``dx = scale * g' + kx * (x - mean) + kc``
    (see :class:`BatchNormGrad`) with ``g' = g_scale * g``, or, when ``gate`` is given (BN3,
    whose output feeds squeeze-excitation and the residual sum ``skip + g_scale * f * gate``),
    ``g' = g_scale * gate[n, c] * g + d_pool[n, c] / (H * W)``."""

    g: Tensor         # (N, C, H, W)
    x: Tensor         # (N, C, H, W)
    bn: BatchNormArgs
    grad: BatchNormGrad
    g_scale: float = 1.0
    gate: Tensor | None = None      # (N, C) fp32
    d_pool: Tensor | None = None    # (N, C) fp32: the gradient of the pooled BN output


# ---------------------------------------------------------------------------------------------
# Their meaning in torch: the reference every stage kernel is compared against
# ---------------------------------------------------------------------------------------------

def fold(bn: BatchNormArgs) -> tuple[Tensor, Tensor, Tensor]:
    """(scale, shift, invstd) of ``bn`` in its statistics' dtype."""
    invstd = (bn.var + bn.eps).rsqrt()
    scale = bn.weight.to(invstd.dtype) * invstd
    return scale, bn.bias.to(invstd.dtype) - bn.mean * scale, invstd


def backward_coefs(bn: BatchNormArgs, grad: BatchNormGrad) -> tuple[Tensor, Tensor, Tensor]:
    """(scale, kx, kc) of ``dx = scale * g + kx * (x - mean) + kc``."""
    scale, _, invstd = fold(bn)
    if not grad.training:
        return scale, torch.zeros_like(scale), torch.zeros_like(scale)
    return scale, -scale * invstd * invstd * grad.sums[1] / grad.count, -scale * grad.sums[0] / grad.count


def update_running(running: RunningUpdate, mean: Tensor, var: Tensor) -> None:
    """The in-place update :class:`RunningUpdate` describes."""
    running.mean.lerp_(mean.to(running.mean.dtype), running.momentum)
    running.var.lerp_((var * running.unbias).to(running.var.dtype), running.momentum)
    if running.num_batches_tracked is not None:
        running.num_batches_tracked.add_(1)


def write_param_grads(bn: BatchNormArgs, sums: Tensor, grads: tuple[Tensor, Tensor]) -> None:
    """dL/dweight = sum g * (x - mean) / sqrt(var + eps) and dL/dbias = sum g into ``grads``,
    from this rank's ``sums`` (2, C)."""
    _, _, invstd = fold(bn)
    grads[0].copy_(sums[1] * invstd)
    grads[1].copy_(sums[0])
