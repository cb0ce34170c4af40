"""The fused generative cell: NVAE's decoder inverted-residual cell, forward and backward, in stages.

The cell (official ``Cell`` holding one ``InvertedResidual``, types normal_dec / up_dec /
normal_post / up_post, ops mconv_e6k5g0, mconv_e3k5g0, mconv_e6k11g0), with x (N, Cin, H, W)::

    x0  = nearest_upsample_2x(x) if upsample else x
    a   = conv1x1(BN0(x0), W1)               W1 (EC, Cin, 1, 1), EC = E * Cin, no bias
    c   = dwconv_k(swish(BN1(a)), Wdw)       Wdw (EC, 1, k, k), padding k // 2, no bias
    e   = conv1x1(swish(BN2(c)), W2)         W2 (Cout, EC, 1, 1), no bias
    f   = BN3(e)
    se  = sigmoid(fc2(relu(fc1(mean_hw(f)))))    squeeze-excitation (optional), hidden max(Cout // 16, 4)
    out = skip + 0.1 * f * se                skip = x for a normal cell (Cin == Cout), given for the up-cell

Every BN has momentum 0.05 (the caller's) and eps 1e-5 and uses batch statistics in training
(synchronised across ranks when a process group has more than one rank).

Pipeline (``_forward`` / ``_backward``): each step is one stage of the chosen backend, and on the
triton backend one kernel launch. Nothing runs between the stages: each stage reads the BatchNorm
parameters and the statistics or backward sums the stages before it wrote and applies them in its
prologue, and merges its own partial results in the kernel (the last program to finish merges,
see nvae_fast/kernels/triton/common.py), including the running-statistics update and the
squeeze-excitation MLP. Single process, training: 5 launches forward, 6 backward; eval: 4 (a
backward through an eval forward packs the running statistics then).

Forward::

    bn_stats        x                        -> BN0 statistics (+ running update)
    conv1_forward   BN0(x) @ W1^T            -> a; BN1 statistics (+ running update)
    dwconv stage    dw(swish(BN1(a)))        -> c; BN2 statistics (+ running update)  (ops/dwconv_stage.py)
    conv2_forward   swish(BN2(c)) @ W2^T     -> e; BN3 statistics (+ running update), sum_e (N, Cout)
    output_forward  skip + 0.1 BN3(e) se     -> out; se's MLP from sum_e in the prologue

Backward (dout given)::

    output_backward     per-sample sums of dout, dout (e - mean3); SE backward; BN3's backward sums
                        and parameter gradients; se gate and d_pool (N, Cout) for the next stages
    conv2_backward_data g2 = (de @ W2) * swish'(BN2(c)), de rebuilt from (dout, e) in the prologue;
                        BN2's backward sums and parameter gradients
    conv2_weight_grad   dW2 = de^T @ swish(BN2(c))
    dwconv stage        dc = BN2 backward (g2, c) in the prologue; g1 = dL/dBN1(a), dWdw; BN1's sums
    conv1_weight_grad   dW1 = da^T @ BN0(x) with da rebuilt from (g1, a); BN0's backward sums
                        (sum du = sum da @ W1, sum du xhat0 = sum W1 * (da^T xhat0)) and gradients
    conv1_backward_data dx = (da @ W1) * scale0 + BN0 backward (+ dout for the identity skip)

Saved for backward: x, a, c, e, the packed batch statistics and sum_e (plus the parameters and
the weights as the kernels read them); b, d, f and every gradient in between are recomputed or
never stored. With ``upsample`` BN0, GEMM1 and BN1 run at low resolution (nearest upsampling
commutes with them and keeps their statistics) and the depthwise stage reads the upsampled b
from low-resolution a.

Stage contract: each backend provides ``nvae_fast/kernels/<backend>/gen_cell.py`` (or a namespace)
with the functions of :data:`_TORCH_KERNELS` below, which define it (signatures; argument types in
nvae_fast/ops/stage_args.py). Stages write their statistics, sums and parameter gradients into
tensors the pipeline allocates and return the activation they produce.

Entry points: :func:`gen_cell` (functional, training and eval, optional process group) and
:func:`gen_cell_ref` (plain-autograd reference, float64-capable). The custom ops
``torch.ops.nvae_fast.gen_cell`` / ``gen_cell_backward`` carry fake implementations and autograd.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from types import ModuleType, SimpleNamespace
from typing import NamedTuple, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor

from nvae_fast import backend, distributed
from nvae_fast.ops import dwconv_stage
from nvae_fast.ops.stage_args import (BatchNormArgs, BatchNormGrad, BatchNormInputGrad, RunningUpdate,
                                      backward_coefs, fold, update_running, write_param_grads)

_T = TypeVar("_T")

_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_FLOAT_DTYPES = _KERNEL_DTYPES + (torch.float64,)
OUTPUT_SCALE = 0.1


class GenCellParams(NamedTuple):
    """The cell's parameters, named after the official modules (state_dict suffixes in brackets,
    relative to the cell's ``_ops.0.conv`` / ``se.se``; +1 on the index for the up-cell)."""

    bn0_weight: Tensor        # (Cin,)            [0.weight]
    bn0_bias: Tensor          # (Cin,)            [0.bias]
    conv1_weight: Tensor      # (EC, Cin, 1, 1)   [1.conv.0.weight]
    bn1_weight: Tensor        # (EC,)             [1.conv.1.weight]
    bn1_bias: Tensor          # (EC,)             [1.conv.1.bias]
    dw_weight: Tensor         # (EC, 1, k, k)     [2.conv.0.weight]
    bn2_weight: Tensor        # (EC,)             [2.conv.1.weight]
    bn2_bias: Tensor          # (EC,)             [2.conv.1.bias]
    conv2_weight: Tensor      # (Cout, EC, 1, 1)  [3.weight]
    bn3_weight: Tensor        # (Cout,)           [4.weight]
    bn3_bias: Tensor          # (Cout,)           [4.bias]
    se_fc1_weight: Tensor | None = None   # (hidden, Cout)  [se.se.0.weight]
    se_fc1_bias: Tensor | None = None     # (hidden,)
    se_fc2_weight: Tensor | None = None   # (Cout, hidden)  [se.se.2.weight]
    se_fc2_bias: Tensor | None = None     # (Cout,)

    @property
    def has_se(self) -> bool:
        return self.se_fc1_weight is not None

    def tensors(self) -> list[Tensor]:
        """The present parameters in field order (the SE ones only with SE)."""
        return [t for t in self if t is not None]


class GenCellRunningStats(NamedTuple):
    """Running statistics of BN0..BN3, updated in place in training, used in eval; optionally
    the BatchNorms' ``num_batches_tracked`` counters, incremented in training."""

    mean0: Tensor
    var0: Tensor
    mean1: Tensor
    var1: Tensor
    mean2: Tensor
    var2: Tensor
    mean3: Tensor
    var3: Tensor
    num_batches_tracked0: Tensor | None = None
    num_batches_tracked1: Tensor | None = None
    num_batches_tracked2: Tensor | None = None
    num_batches_tracked3: Tensor | None = None

    def counters(self) -> list[Tensor | None]:
        return [self.num_batches_tracked0, self.num_batches_tracked1, self.num_batches_tracked2,
                self.num_batches_tracked3]


class GenCellWeights(NamedTuple):
    """The 1x1 convolutions' weights as the stage kernels read them: matrices in the activations'
    dtype (views of the parameters when the dtypes agree). A module prepares them once and keeps
    them while the parameters are unchanged (nvae_fast.nn.cells.InvertedResidualCell)."""

    w1: Tensor   # (EC, Cin)
    w2: Tensor   # (Cout, EC)


def prepare_weights(conv1_weight: Tensor, conv2_weight: Tensor, dtype: torch.dtype) -> GenCellWeights:
    """:class:`GenCellWeights` from the (EC, Cin, 1, 1) and (Cout, EC, 1, 1) conv weights (no
    gradient flows through them: the cell's backward returns the parameters' gradients)."""
    return GenCellWeights(conv1_weight.detach().reshape(conv1_weight.shape[:2]).to(dtype).contiguous(),
                          conv2_weight.detach().reshape(conv2_weight.shape[:2]).to(dtype).contiguous())


# ---------------------------------------------------------------------------------------------
# Reference
# ---------------------------------------------------------------------------------------------

def gen_cell_ref(x: Tensor, params: GenCellParams, running: GenCellRunningStats | None = None,
                 skip: Tensor | None = None, upsample: bool = False, training: bool = True, momentum: float = 0.05,
                 eps: float = 1e-5) -> Tensor:
    """Plain-autograd reference: the official cell's layers composed from torch functions.

    Updates ``running`` in place in training (as ``torch.nn.BatchNorm2d``), uses it in eval.
    """
    p = params
    rs = running if running is not None else GenCellRunningStats(*([None] * 8))

    def bn(t, i, weight, bias):
        counter = rs.counters()[i]
        if training and counter is not None:
            counter.add_(1)
        return F.batch_norm(t, rs[2 * i], rs[2 * i + 1], weight, bias, training, momentum, eps)

    h = F.interpolate(x, scale_factor=2, mode="nearest") if upsample else x
    h = F.conv2d(bn(h, 0, p.bn0_weight, p.bn0_bias), p.conv1_weight)
    h = F.silu(bn(h, 1, p.bn1_weight, p.bn1_bias))
    h = F.conv2d(h, p.dw_weight, padding=p.dw_weight.shape[-1] // 2, groups=h.shape[1])
    h = F.silu(bn(h, 2, p.bn2_weight, p.bn2_bias))
    h = bn(F.conv2d(h, p.conv2_weight), 3, p.bn3_weight, p.bn3_bias)
    if p.has_se:
        s = F.relu(F.linear(h.mean(dim=(2, 3)), p.se_fc1_weight, p.se_fc1_bias))
        h = h * torch.sigmoid(F.linear(s, p.se_fc2_weight, p.se_fc2_bias))[:, :, None, None]
    return (x if skip is None else skip) + OUTPUT_SCALE * h


# ---------------------------------------------------------------------------------------------
# The stage contract, defined by its torch backend: explicit formulas, no autograd (float64-capable)
# ---------------------------------------------------------------------------------------------

class SEParams(NamedTuple):
    """Squeeze-excitation's MLP: gate = sigmoid(fc2(relu(fc1(pool)))), pool (N, C) the mean of BN3(e)."""

    fc1_weight: Tensor   # (hidden, C)
    fc1_bias: Tensor     # (hidden,)
    fc2_weight: Tensor   # (C, hidden)
    fc2_bias: Tensor     # (C,)


def _acc_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _rows(t: Tensor) -> Tensor:
    """(N, C, H, W) -> (N*H*W, C) in the math dtype."""
    return t.to(_acc_dtype(t)).permute(0, 2, 3, 1).reshape(-1, t.shape[1])


def _unrows(rows: Tensor, like: Tensor) -> Tensor:
    """(N*H*W, C) rows -> a new channels-last (N, C, H, W) tensor in like's dtype."""
    N, _, H, W = like.shape
    out = torch.empty((N, rows.shape[1], H, W), device=like.device, dtype=like.dtype,
                      memory_format=torch.channels_last)
    return out.copy_(rows.view(N, H, W, -1).permute(0, 3, 1, 2))


def _swish(z: Tensor) -> Tensor:
    return z * torch.sigmoid(z)


def _swish_grad(z: Tensor) -> Tensor:
    s = torch.sigmoid(z)
    return s * (1 + z * (1 - s))


def _write_stats(rows: Tensor, out: Tensor | None, running: RunningUpdate | None) -> None:
    if out is None:
        return
    var, mean = torch.var_mean(rows, dim=0, unbiased=False)
    out[0].copy_(mean)
    out[1].copy_(var)
    if running is not None:
        update_running(running, mean, var)


def _se_forward(se: SEParams, pool: Tensor) -> tuple[Tensor, Tensor]:
    """(gate (N, C), pre-ReLU hidden activation (N, hidden)) in pool's dtype."""
    acc = pool.dtype
    hidden = pool @ se.fc1_weight.to(acc).t() + se.fc1_bias.to(acc)
    return torch.sigmoid(torch.relu(hidden) @ se.fc2_weight.to(acc).t() + se.fc2_bias.to(acc)), hidden


def _pool(bn3: BatchNormArgs, sum_e: Tensor, hw: int) -> Tensor:
    scale, shift, _ = fold(bn3)
    return scale * sum_e / hw + shift


def _torch_bn_stats(x: Tensor, out: Tensor, running: RunningUpdate | None = None) -> None:
    """out (2, C) = mean and biased variance of x per channel; the running update when given."""
    _write_stats(_rows(x), out, running)


def _torch_conv1_forward(x: Tensor, bn0: BatchNormArgs, w1: Tensor, stats: Tensor | None = None,
                         running: RunningUpdate | None = None) -> Tensor:
    """a = BN0(x) @ w1^T (w1 (EC, Cin) in x's dtype), channels-last in x's dtype; stats (2, EC) =
    a's batch statistics when given (BN1's), with BN1's running update."""
    scale, shift, _ = fold(bn0)
    a = (_rows(x) * scale + shift) @ w1.to(scale.dtype).t()
    _write_stats(a, stats, running)
    return _unrows(a, x)


def _torch_conv2_forward(c: Tensor, bn2: BatchNormArgs, w2: Tensor, stats: Tensor | None = None,
                         running: RunningUpdate | None = None, sum_e: Tensor | None = None) -> Tensor:
    """e = swish(BN2(c)) @ w2^T (w2 (Cout, EC)), channels-last in c's dtype; stats (2, Cout) = BN3's
    batch statistics when given (+ running update); sum_e (N, Cout) = sum of e over H, W when given."""
    scale, shift, _ = fold(bn2)
    e = _swish(_rows(c) * scale + shift) @ w2.to(scale.dtype).t()
    _write_stats(e, stats, running)
    if sum_e is not None:
        N, _, H, W = c.shape
        sum_e.copy_(e.view(N, H * W, -1).sum(dim=1))
    return _unrows(e, c)


def _torch_output_forward(e: Tensor, bn3: BatchNormArgs, se: SEParams | None, sum_e: Tensor,
                          skip: Tensor) -> Tensor:
    """out = skip + 0.1 * BN3(e) * gate[n, c], gate = SE's MLP on the pooled BN3(e) (from sum_e),
    1 without SE; in skip's dtype and layout."""
    scale, shift, _ = fold(bn3)
    f = e.to(scale.dtype) * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)
    if se is not None:
        f = f * _se_forward(se, _pool(bn3, sum_e, e.shape[2] * e.shape[3]))[0][:, :, None, None]
    return torch.empty_like(skip).copy_(skip + OUTPUT_SCALE * f)


def _torch_output_backward(dout: Tensor, e: Tensor, bn3: BatchNormArgs, se: SEParams | None, sum_e: Tensor,
                           sums: Tensor, gate: Tensor | None, d_pool: Tensor | None,
                           grads: tuple[Tensor, ...]) -> None:
    """The output stage's and squeeze-excitation's backward, BN3's backward sums.

    Writes sums (2, Cout) = (sum dL/df, sum dL/df * (e - mean3)) with f = BN3(e) (this rank's);
    with SE gate (N, Cout) = the se gate and d_pool (N, Cout) = dL/d(pooled f) for the stages that
    rebuild dL/de; grads = (bn3 weight, bn3 bias[, fc1 weight, fc1 bias, fc2 weight, fc2 bias]).
    """
    acc = bn3.mean.dtype
    hw = e.shape[2] * e.shape[3]
    d = dout.to(acc)
    sum_dout = d.sum(dim=(2, 3))
    sum_dout_e = (d * (e.to(acc) - bn3.mean.view(1, -1, 1, 1))).sum(dim=(2, 3))
    if se is not None:
        scale, _, _ = fold(bn3)
        pool = _pool(bn3, sum_e, hw)
        g, hidden = _se_forward(se, pool)
        d_se = OUTPUT_SCALE * (scale * sum_dout_e + bn3.bias.to(acc) * sum_dout)   # sum over H, W of dout * f
        d_logit = d_se * g * (1 - g)
        d_hidden = (d_logit @ se.fc2_weight.to(acc)) * (hidden > 0)
        dp = d_hidden @ se.fc1_weight.to(acc)
        gate.copy_(g)
        d_pool.copy_(dp)
        se_grads = (d_hidden.t() @ pool, d_hidden.sum(dim=0), d_logit.t() @ torch.relu(hidden), d_logit.sum(dim=0))
        for out, value in zip(grads[2:], se_grads):
            out.copy_(value)
        # dL/df = 0.1 * gate * dout + d_pool / HW per element
        sums[0].copy_((OUTPUT_SCALE * g * sum_dout + dp).sum(dim=0))
        sums[1].copy_((OUTPUT_SCALE * g * sum_dout_e + dp / hw * (sum_e - hw * bn3.mean)).sum(dim=0))
    else:
        sums[0].copy_(OUTPUT_SCALE * sum_dout.sum(dim=0))
        sums[1].copy_(OUTPUT_SCALE * sum_dout_e.sum(dim=0))
    write_param_grads(bn3, sums, grads[:2])


def _input_grad_rows(spec: BatchNormInputGrad) -> Tensor:
    """dL/dx (N*H*W, C) of a :class:`BatchNormInputGrad`."""
    scale, kx, kc = backward_coefs(spec.bn, spec.grad)
    acc = scale.dtype
    g = spec.g.to(acc) * spec.g_scale
    if spec.gate is not None:
        hw = g.shape[2] * g.shape[3]
        g = g * spec.gate[:, :, None, None] + spec.d_pool[:, :, None, None] / hw
    view = (1, -1, 1, 1)
    return _rows(scale.view(view) * g + kx.view(view) * (spec.x.to(acc) - spec.bn.mean.view(view)) + kc.view(view))


def _torch_conv2_backward_data(de: BatchNormInputGrad, c: Tensor, bn2: BatchNormArgs, w2: Tensor, sums: Tensor,
                               grads: tuple[Tensor, Tensor]) -> Tensor:
    """g2 = (de @ w2) * swish'(BN2(c)) = dL/d(BN2 output), channels-last in c's dtype, de = dL/de
    rebuilt from ``de`` (BN3's input gradient); sums (2, EC) = BN2's backward sums (this rank's),
    grads = BN2's parameter gradients."""
    scale, shift, _ = fold(bn2)
    c_rows = _rows(c)
    g = (_input_grad_rows(de) @ w2.to(scale.dtype)) * _swish_grad(c_rows * scale + shift)
    sums[0].copy_(g.sum(dim=0))
    sums[1].copy_((g * (c_rows - bn2.mean)).sum(dim=0))
    write_param_grads(bn2, sums, grads)
    return _unrows(g, c)


def _torch_conv2_weight_grad(de: BatchNormInputGrad, c: Tensor, bn2: BatchNormArgs, out: Tensor) -> None:
    """out (Cout, EC) = de^T @ swish(BN2(c)), written in out's dtype."""
    scale, shift, _ = fold(bn2)
    out.copy_(_input_grad_rows(de).t() @ _swish(_rows(c) * scale + shift))


def _torch_conv1_weight_grad(da: BatchNormInputGrad, x: Tensor, bn0: BatchNormArgs, w1: Tensor, out: Tensor,
                             sums: Tensor, grads: tuple[Tensor, Tensor]) -> None:
    """out (EC, Cin) = dW1 = da^T @ BN0(x) with da = dL/da rebuilt from ``da``; sums (2, Cin) =
    BN0's backward sums for du = da @ w1 (w1 the conv weight (EC, Cin), any float dtype), from
    G = da^T @ xhat0: sum du = (sum da) @ w1, sum du * xhat0 = sum over EC of w1 * G; grads = BN0's
    parameter gradients."""
    d = _input_grad_rows(da)
    _, _, invstd = fold(bn0)
    G = d.t() @ ((_rows(x) - bn0.mean) * invstd)
    sum_da = d.sum(dim=0)
    acc = G.dtype
    out.copy_(G * bn0.weight.to(acc) + sum_da[:, None] * bn0.bias.to(acc))
    w = w1.to(acc)
    sums[0].copy_(sum_da @ w)
    sums[1].copy_((w * G).sum(dim=0) / invstd)
    write_param_grads(bn0, sums, grads)


def _torch_conv1_backward_data(da: BatchNormInputGrad, w1: Tensor, x: Tensor, bn0: BatchNormArgs,
                               grad0: BatchNormGrad, residual: Tensor | None = None) -> Tensor:
    """dx = BN0's backward of du = da @ w1 (+ residual), in x's dtype and layout."""
    scale, kx, kc = backward_coefs(bn0, grad0)
    dx = (_input_grad_rows(da) @ w1.to(scale.dtype)) * scale + kx * (_rows(x) - bn0.mean) + kc
    if residual is not None:
        dx = dx + _rows(residual)
    return torch.empty_like(x).copy_(_unrows(dx, x))


_TORCH_KERNELS = SimpleNamespace(
    bn_stats=_torch_bn_stats,
    conv1_forward=_torch_conv1_forward,
    conv2_forward=_torch_conv2_forward,
    output_forward=_torch_output_forward,
    output_backward=_torch_output_backward,
    conv2_backward_data=_torch_conv2_backward_data,
    conv2_weight_grad=_torch_conv2_weight_grad,
    conv1_weight_grad=_torch_conv1_weight_grad,
    conv1_backward_data=_torch_conv1_backward_data,
)


def kernels_for(x: Tensor) -> ModuleType | SimpleNamespace:
    """The stage kernels of the backend chosen for x (see nvae_fast.backend); float64 runs on torch."""
    implemented = ("triton", "torch") if x.dtype in _KERNEL_DTYPES else ("torch",)
    name = backend.select(f"gen_cell[{str(x.dtype).removeprefix('torch.')}]", x.device, implemented)
    return _TORCH_KERNELS if name == "torch" else backend.kernels("gen_cell", name)


# ---------------------------------------------------------------------------------------------
# The pipeline, shared by the single-process custom op and the multi-rank autograd Function
# ---------------------------------------------------------------------------------------------

Sync = Callable[[Tensor, Tensor, int], tuple[Tensor, Tensor, int]]
AllReduce = Callable[[list[Tensor]], list[Tensor]]


class _Dims(NamedTuple):
    N: int
    Cin: int
    EC: int
    Cout: int
    H: int
    W: int
    Ho: int
    Wo: int

    @staticmethod
    def of(x: Tensor, params: GenCellParams, upsample: bool) -> _Dims:
        N, Cin, H, W = x.shape
        Ho, Wo = (2 * H, 2 * W) if upsample else (H, W)
        return _Dims(N, Cin, params.conv1_weight.shape[0], params.conv2_weight.shape[0], H, W, Ho, Wo)

    def stat_sizes(self) -> list[int]:
        """Channels of BN0..BN3: the packed statistics hold mean and variance of each, in order."""
        return [self.Cin, self.EC, self.EC, self.Cout]


class _Pair(NamedTuple):
    """(mean, var) of one BatchNorm when they are separate tensors (the running statistics)."""

    mean: Tensor
    var: Tensor


def _stat_views(stats: Tensor, dims: _Dims) -> list[Tensor]:
    """The (2, C) [mean; var] views of BN0..BN3 in the packed statistics."""
    return [t.view(2, -1) for t in stats.split([2 * c for c in dims.stat_sizes()])]


def _batchnorms(p: GenCellParams, stats: list[Tensor], eps: float) -> list[BatchNormArgs]:
    return [BatchNormArgs(w, b, s[0], s[1], eps) for w, b, s in
            zip((p.bn0_weight, p.bn1_weight, p.bn2_weight, p.bn3_weight),
                (p.bn0_bias, p.bn1_bias, p.bn2_bias, p.bn3_bias), stats)]


def _se_params(p: GenCellParams) -> SEParams | None:
    return SEParams(p.se_fc1_weight, p.se_fc1_bias, p.se_fc2_weight, p.se_fc2_bias) if p.has_se else None


def _unbias(count: int) -> float:
    return count / max(count - 1, 1)


def _without_autocast(fn: Callable[..., _T]) -> Callable[..., _T]:
    """Runs a pipeline function with autocast off on its first argument's device: autocast stays
    on inside custom ops and would round the torch backend's fp32 math to half precision."""
    @functools.wraps(fn)
    def wrapper(first: Tensor, *args, **kwargs) -> _T:
        with torch.autocast(first.device.type, enabled=False):
            return fn(first, *args, **kwargs)
    return wrapper


@_without_autocast
def _forward(x: Tensor, skip: Tensor | None, p: GenCellParams, w: GenCellWeights,
             running: GenCellRunningStats | None, upsample: bool, training: bool, momentum: float, eps: float,
             sync: Sync | None) -> tuple[list[Tensor], tuple[int, int]]:
    """([out, a, c, e, stats, sum_e], (count at x's resolution, count at out's)), counts global.

    Training: batch statistics, returned packed in ``stats``; single process (``sync`` None) the
    stages update ``running`` in place; with ``sync`` (several ranks) each stage's statistics are
    combined across ranks before the next stage uses them and the caller updates ``running``.
    Eval: ``running`` is used and ``stats`` is empty (a backward through eval mode packs
    ``running`` itself).
    """
    k = kernels_for(x)
    stage = dwconv_stage.fused_kernels_for(x)
    dims = _Dims.of(x, p, upsample)
    acc = _acc_dtype(x)
    local_counts = (dims.N * dims.H * dims.W, dims.N * dims.Ho * dims.Wo)
    counts = list(local_counts)   # over every rank once synchronised
    if training:
        stats = x.new_empty(2 * sum(dims.stat_sizes()), dtype=acc)
        views = _stat_views(stats, dims)
    else:
        stats = x.new_empty(0, dtype=acc)
        views = [torch.stack(running[2 * i:2 * i + 2]).to(acc) if running[2 * i].dtype != acc
                 else _Pair(running[2 * i], running[2 * i + 1]) for i in range(4)]
    bns = _batchnorms(p, views, eps)
    in_kernel_update = training and sync is None and running is not None

    def statistics(i: int) -> Tensor | None:
        return views[i] if training else None

    def update(i: int) -> RunningUpdate | None:
        if not in_kernel_update:
            return None
        # BN0 and BN1 officially see the upsampled tensor: four times the values per channel
        count = counts[0] * (4 if upsample else 1) if i < 2 else counts[1]
        return RunningUpdate(running[2 * i], running[2 * i + 1], running.counters()[i], momentum, _unbias(count))

    def synchronised(i: int, resolution: int) -> None:
        if training and sync is not None:
            mean, var, counts[resolution] = sync(views[i][0], views[i][1], local_counts[resolution])
            views[i][0].copy_(mean)
            views[i][1].copy_(var)

    if training:
        k.bn_stats(x, views[0], update(0))
        synchronised(0, 0)
    a = k.conv1_forward(x, bns[0], w.w1, statistics(1), update(1))
    synchronised(1, 0)
    c = stage.dwconv_stage_forward_fused(a, bns[1], p.dw_weight, 1, upsample, statistics(2), update(2))
    synchronised(2, 1)
    sum_e = x.new_empty((dims.N, dims.Cout if p.has_se else 0), dtype=acc)
    e = k.conv2_forward(c, bns[2], w.w2, statistics(3), update(3), sum_e if p.has_se else None)
    synchronised(3, 1)
    out = k.output_forward(e, bns[3], _se_params(p), sum_e, x if skip is None else skip)
    return [out, a, c, e, stats, sum_e], (counts[0], counts[1])


@_without_autocast
def _backward(dout: Tensor, x: Tensor, a: Tensor, c: Tensor, e: Tensor, stats: Tensor, sum_e: Tensor,
              p: GenCellParams, w: GenCellWeights, upsample: bool, training: bool, eps: float, has_skip: bool,
              counts: tuple[int, int], all_reduce: AllReduce | None) -> tuple[Tensor, list[Tensor]]:
    """(dx, gradients of p.tensors() in order). Parameter gradients are this rank's; the input
    gradient uses the backward sums all-reduced over the ranks (SyncBatchNorm semantics)."""
    k = kernels_for(x)
    stage = dwconv_stage.fused_kernels_for(x)
    dims = _Dims.of(x, p, upsample)
    acc = stats.dtype
    bn0, bn1, bn2, bn3 = _batchnorms(p, _stat_views(stats, dims), eps)
    grads = GenCellParams(*(None if t is None else torch.empty_like(t, memory_format=torch.contiguous_format)
                            for t in p))

    def backward_sums(channels: int) -> Tensor:
        return x.new_empty((2, channels), dtype=acc)

    def global_grad(sums: Tensor, count: int) -> BatchNormGrad:
        if training and all_reduce is not None:
            sums = all_reduce([sums])[0].view(2, -1)
        return BatchNormGrad(sums, count, training)

    # Output stage, squeeze-excitation and BN3.
    sums3 = backward_sums(dims.Cout)
    gate, d_pool = ((x.new_empty((dims.N, dims.Cout), dtype=acc) for _ in range(2)) if p.has_se
                    else (None, None))
    se_grads = (grads.se_fc1_weight, grads.se_fc1_bias, grads.se_fc2_weight, grads.se_fc2_bias) if p.has_se else ()
    k.output_backward(dout, e, bn3, _se_params(p), sum_e, sums3, gate, d_pool,
                      (grads.bn3_weight, grads.bn3_bias, *se_grads))
    de = BatchNormInputGrad(dout, e, bn3, global_grad(sums3, counts[1]), OUTPUT_SCALE, gate, d_pool)

    # GEMM2 and BN2 + Swish: one pass for g2 = dL/d(BN2 output) and BN2's sums, one for dW2.
    sums2 = backward_sums(dims.EC)
    g2 = k.conv2_backward_data(de, c, bn2, w.w2, sums2, (grads.bn2_weight, grads.bn2_bias))
    k.conv2_weight_grad(de, c, bn2, grads.conv2_weight.view(dims.Cout, dims.EC))

    # Depthwise stage: BN2's backward applied in its prologue, BN1 + Swish.
    sums1 = backward_sums(dims.EC)
    g1 = stage.dwconv_stage_backward_fused(g2, c, bn2, global_grad(sums2, counts[1]), a, bn1, p.dw_weight, 1,
                                           upsample, sums1, (grads.bn1_weight, grads.bn1_bias), grads.dw_weight)
    da = BatchNormInputGrad(g1, a, bn1, global_grad(sums1, counts[0]))

    # GEMM1 and BN0: G = da^T xhat0 gives dW1 and BN0's sums (du = da @ W1, u = BN0(x)).
    sums0 = backward_sums(dims.Cin)
    k.conv1_weight_grad(da, x, bn0, p.conv1_weight.view(dims.EC, dims.Cin),
                        grads.conv1_weight.view(dims.EC, dims.Cin), sums0, (grads.bn0_weight, grads.bn0_bias))
    dx = k.conv1_backward_data(da, w.w1, x, bn0, global_grad(sums0, counts[0]), None if has_skip else dout)
    return dx, grads.tensors()


# ---------------------------------------------------------------------------------------------
# Custom ops (torch.compile sees opaque nodes with fake implementations) and their autograd
# ---------------------------------------------------------------------------------------------

def _params_from(tensors: list[Tensor]) -> GenCellParams:
    return GenCellParams(*tensors)


def _running_from(tensors: list[Tensor]) -> GenCellRunningStats | None:
    return GenCellRunningStats(*tensors) if tensors else None


def _weights_from(tensors: list[Tensor], p: GenCellParams, dtype: torch.dtype) -> GenCellWeights:
    return GenCellWeights(*tensors) if tensors else prepare_weights(p.conv1_weight, p.conv2_weight, dtype)


@torch.library.custom_op("nvae_fast::gen_cell", mutates_args=("running",))
def _gen_cell_op(x: Tensor, skip: Tensor | None, params: list[Tensor], weights: list[Tensor], running: list[Tensor],
                 upsample: bool, training: bool, momentum: float, eps: float
                 ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(out, a, c, e, stats, sum_e): the cell's output and what its backward needs. ``weights``:
    the :class:`GenCellWeights` (empty: prepared here); ``running``: the
    :class:`GenCellRunningStats` (8 or 12 tensors; may be empty in training), updated in training."""
    p = _params_from(params)
    outputs, _ = _forward(x, skip, p, _weights_from(weights, p, x.dtype), _running_from(running), upsample,
                          training, momentum, eps, None)
    return tuple(outputs)


@_gen_cell_op.register_fake
def _(x, skip, params, weights, running, upsample, training, momentum, eps):
    p = _params_from(params)
    dims = _Dims.of(x, p, upsample)
    acc = _acc_dtype(x)

    def cl(C: int, H: int, W: int) -> Tensor:
        return x.new_empty((dims.N, C, H, W)).contiguous(memory_format=torch.channels_last)

    out = torch.empty_like(x if skip is None else skip)
    return (out, cl(dims.EC, dims.H, dims.W), cl(dims.EC, dims.Ho, dims.Wo), cl(dims.Cout, dims.Ho, dims.Wo),
            x.new_empty(2 * sum(dims.stat_sizes()) if training else 0, dtype=acc),
            x.new_empty((dims.N, dims.Cout if p.has_se else 0), dtype=acc))


@torch.library.custom_op("nvae_fast::gen_cell_backward", mutates_args=())
def _gen_cell_backward_op(dout: Tensor, x: Tensor, a: Tensor, c: Tensor, e: Tensor, stats: Tensor, sum_e: Tensor,
                          params: list[Tensor], weights: list[Tensor], upsample: bool, training: bool, eps: float,
                          has_skip: bool) -> list[Tensor]:
    """[dx, gradients of params in order]."""
    p = _params_from(params)
    dims = _Dims.of(x, p, upsample)
    counts = (dims.N * dims.H * dims.W, dims.N * dims.Ho * dims.Wo)
    dx, grads = _backward(dout, x, a, c, e, stats, sum_e, p, _weights_from(weights, p, x.dtype), upsample, training,
                          eps, has_skip, counts, None)
    return [dx, *grads]


@_gen_cell_backward_op.register_fake
def _(dout, x, a, c, e, stats, sum_e, params, weights, upsample, training, eps, has_skip):
    return [torch.empty_like(x)] + [torch.empty_like(t, memory_format=torch.contiguous_format) for t in params]


class _GenCell(torch.autograd.Function):
    """Single process: the two custom ops as forward and backward. (The forward op mutates the
    running statistics, so its autograd is this Function rather than a registered formula.)"""

    @staticmethod
    def forward(ctx, x, skip, upsample, momentum, eps, training, running, weights, *params):
        out, a, c, e, stats, sum_e = torch.ops.nvae_fast.gen_cell(x, skip, list(params), weights, running, upsample,
                                                                  training, momentum, eps)
        # in eval the statistics are the running ones: saved (a later update in place would be
        # reported by autograd's version check) and packed only if a backward runs
        ctx.save_for_backward(x, a, c, e, stats, sum_e, *weights, *(running[:8] if not training else ()), *params)
        ctx.upsample, ctx.training, ctx.eps, ctx.has_skip = upsample, training, eps, skip is not None
        ctx.num_weights = len(weights) + (0 if training else 8)
        return out

    @staticmethod
    def backward(ctx, dout):
        x, a, c, e, stats, sum_e, *rest = ctx.saved_tensors
        weights, params = rest[:ctx.num_weights], rest[ctx.num_weights:]
        if not ctx.training:
            weights, running = weights[:-8], weights[-8:]
            stats = torch.cat([t.to(stats.dtype) for t in running])
        dx, *grads = torch.ops.nvae_fast.gen_cell_backward(dout, x, a, c, e, stats, sum_e, params, weights,
                                                           ctx.upsample, ctx.training, ctx.eps, ctx.has_skip)
        return dx, (dout if ctx.has_skip else None), None, None, None, None, None, None, *grads


class _SyncGenCell(torch.autograd.Function):
    """Training with more than one rank: BatchNorm statistics and backward sums are combined
    across the process group between the stages (SyncBatchNorm semantics)."""

    @staticmethod
    def forward(ctx, x, skip, upsample, momentum, eps, process_group, running, weights, *params):
        p = _params_from(list(params))
        w = weights if weights is not None else prepare_weights(p.conv1_weight, p.conv2_weight, x.dtype)

        def sync(mean: Tensor, var: Tensor, count: int) -> tuple[Tensor, Tensor, int]:
            return distributed.all_gather_moments(mean, var, count, process_group)

        (out, a, c, e, stats, sum_e), counts = _forward(x, skip, p, w, None, upsample, True, momentum, eps, sync)
        _update_running(running, stats, _Dims.of(x, p, upsample), counts, upsample, momentum)
        ctx.save_for_backward(x, a, c, e, stats, sum_e, *w, *params)
        ctx.upsample, ctx.eps, ctx.has_skip, ctx.counts, ctx.group = upsample, eps, skip is not None, counts, \
            process_group
        return out

    @staticmethod
    def backward(ctx, dout):
        x, a, c, e, stats, sum_e, w1, w2, *params = ctx.saved_tensors
        dx, grads = _backward(dout, x, a, c, e, stats, sum_e, _params_from(params), GenCellWeights(w1, w2),
                              ctx.upsample, True, ctx.eps, ctx.has_skip, ctx.counts,
                              lambda tensors: distributed.all_reduce_sum(tensors, ctx.group))
        return dx, (dout if ctx.has_skip else None), None, None, None, None, None, None, *grads


def _update_running(running: GenCellRunningStats | None, stats: Tensor, dims: _Dims, counts: tuple[int, int],
                    upsample: bool, momentum: float) -> None:
    """Running statistics as torch.nn.BatchNorm2d updates them, from the global batch statistics
    (the multi-rank path; single process the stages do it). BN0 and BN1 officially see the
    upsampled tensor: their count is four times the low-resolution one."""
    if running is None:
        return
    count_lo = counts[0] * (4 if upsample else 1)
    with torch.no_grad():
        for i, (view, count) in enumerate(zip(_stat_views(stats.detach(), dims),
                                              (count_lo, count_lo, counts[1], counts[1]))):
            update_running(RunningUpdate(running[2 * i], running[2 * i + 1], running.counters()[i], momentum,
                                         _unbias(count)), view[0], view[1])


# ---------------------------------------------------------------------------------------------
# Public functional API
# ---------------------------------------------------------------------------------------------

def _check_vector(name: str, t: Tensor, size: int) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.shape != (size,):
        raise ValueError(f"{name} must have shape ({size},), got {tuple(t.shape)}")


def check_gen_cell_inputs(x: Tensor, params: GenCellParams, running: GenCellRunningStats | None,
                          skip: Tensor | None, upsample: bool, training: bool,
                          weights: GenCellWeights | None = None) -> None:
    """Raises ValueError/TypeError naming the argument unless the cell's inputs are consistent."""
    if not isinstance(x, Tensor) or x.dim() != 4:
        raise ValueError(f"x must be a 4-D tensor (N, C, H, W), got {getattr(x, 'shape', type(x))}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"x must be float32, float16, bfloat16 or float64, got {x.dtype}")
    if not isinstance(params, GenCellParams):
        raise TypeError(f"params must be a GenCellParams, got {type(params).__name__}")
    N, Cin, H, W = x.shape
    w1, wdw, w2 = params.conv1_weight, params.dw_weight, params.conv2_weight
    if w1.dim() != 4 or w1.shape[1:] != (Cin, 1, 1):
        raise ValueError(f"conv1_weight must have shape (EC, {Cin}, 1, 1) for x's {Cin} channels, "
                         f"got {tuple(w1.shape)}")
    EC = w1.shape[0]
    if wdw.dim() != 4 or wdw.shape[:2] != (EC, 1) or wdw.shape[2] != wdw.shape[3] \
            or wdw.shape[-1] not in dwconv_stage.KERNEL_SIZES:
        raise ValueError(f"dw_weight must have shape ({EC}, 1, k, k) with k in {dwconv_stage.KERNEL_SIZES}, "
                         f"got {tuple(wdw.shape)}")
    if w2.dim() != 4 or w2.shape[1:] != (EC, 1, 1):
        raise ValueError(f"conv2_weight must have shape (Cout, {EC}, 1, 1), got {tuple(w2.shape)}")
    Cout = w2.shape[0]
    sizes = dict(bn0_weight=Cin, bn0_bias=Cin, bn1_weight=EC, bn1_bias=EC, bn2_weight=EC, bn2_bias=EC,
                 bn3_weight=Cout, bn3_bias=Cout)
    for name, size in sizes.items():
        _check_vector(name, getattr(params, name), size)
    se = [params.se_fc1_weight, params.se_fc1_bias, params.se_fc2_weight, params.se_fc2_bias]
    if any(t is None for t in se) and not all(t is None for t in se):
        raise ValueError("the four se_* parameters must all be tensors (with SE) or all be None")
    if params.has_se:
        hidden = params.se_fc1_weight.shape[0]
        if params.se_fc1_weight.shape != (hidden, Cout) or params.se_fc2_weight.shape != (Cout, hidden):
            raise ValueError(f"se_fc1_weight must be (hidden, {Cout}) and se_fc2_weight ({Cout}, hidden), got "
                             f"{tuple(params.se_fc1_weight.shape)} and {tuple(params.se_fc2_weight.shape)}")
        _check_vector("se_fc1_bias", params.se_fc1_bias, hidden)
        _check_vector("se_fc2_bias", params.se_fc2_bias, Cout)
    for name, t in zip(GenCellParams._fields, params):
        if t is None:
            continue
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}; move them to one device")
    out_shape = (N, Cout, 2 * H if upsample else H, 2 * W if upsample else W)
    if skip is None:
        if upsample or Cin != Cout:
            raise ValueError("skip is needed when the cell upsamples or changes the channel count "
                             f"(Cin={Cin}, Cout={Cout}, upsample={upsample}); only a normal cell adds x itself")
    else:
        if not isinstance(skip, Tensor) or skip.shape != out_shape:
            raise ValueError(f"skip must have shape {out_shape}, got {tuple(getattr(skip, 'shape', ()))}")
        if skip.dtype not in _FLOAT_DTYPES or skip.device != x.device:
            raise ValueError(f"skip must be a float tensor on x's device ({x.device}), got {skip.dtype} on "
                             f"{skip.device}")
    if running is not None:
        if not isinstance(running, GenCellRunningStats):
            raise TypeError(f"running must be a GenCellRunningStats, got {type(running).__name__}")
        for i, (name, t) in enumerate(zip(GenCellRunningStats._fields[:8], running)):
            _check_vector(f"running.{name}", t, (Cin, EC, EC, Cout)[i // 2])
            if t.device != x.device:
                raise ValueError(f"running.{name} is on {t.device} but x is on {x.device}")
        counters = running.counters()
        if any(t is None for t in counters) and not all(t is None for t in counters):
            raise ValueError("the four running.num_batches_tracked* must all be tensors or all be None")
        for i, t in enumerate(counters):
            if t is not None and (t.shape != () or t.dtype != torch.long or t.device != x.device):
                raise ValueError(f"running.num_batches_tracked{i} must be a 0-d int64 tensor on {x.device}, got "
                                 f"{t.dtype} {tuple(t.shape)} on {t.device}")
    if weights is not None:
        if not isinstance(weights, GenCellWeights):
            raise TypeError(f"weights must be a GenCellWeights, got {type(weights).__name__}")
        for name, t, shape in (("w1", weights.w1, (EC, Cin)), ("w2", weights.w2, (Cout, EC))):
            if t.shape != shape or t.dtype != x.dtype or t.device != x.device or not t.is_contiguous():
                raise ValueError(f"weights.{name} must be a contiguous {x.dtype} tensor of shape {shape} on "
                                 f"{x.device} (see prepare_weights), got {t.dtype} {tuple(t.shape)} on {t.device}")
    if not training and running is None:
        raise ValueError("eval mode (training=False) needs the running statistics (running=...)")
    if training and N * H * W <= 1 and not upsample:
        raise ValueError(f"training needs more than 1 value per channel, got x of shape {tuple(x.shape)}")


def gen_cell(
    x: Tensor,
    params: GenCellParams,
    running: GenCellRunningStats | None = None,
    skip: Tensor | None = None,
    upsample: bool = False,
    training: bool = True,
    momentum: float = 0.05,
    eps: float = 1e-5,
    process_group: distributed.ProcessGroup | None = None,
    weights: GenCellWeights | None = None,
) -> Tensor:
    """The whole decoder cell in fused stages on the backend chosen for x (see the module docstring).

    Args:
        x: (N, Cin, H, W) float32/float16/bfloat16 (float64 runs on the torch backend), any memory
            format; channels-last avoids a copy-free but strided read. Activations a, c, e are
            channels-last in x's dtype; statistics and per-channel math are fp32.
        params: :class:`GenCellParams`; EC, Cout, k and SE follow from their shapes.
        running: BN0..BN3 running statistics, updated in place in training
            (``(1 - momentum) * old + momentum * batch``, unbiased variance, and the
            ``num_batches_tracked`` counters when given), used in eval.
        skip: (N, Cout, Ho, Wo) tensor added to the branch (the up-cell's upsampled skip; under
            autocast a normal cell's fp32 input while x is its half-precision copy), or None for a
            normal cell's identity skip (x itself, whose gradient the last kernel then adds).
        upsample: the up-cell: the branch starts with a nearest 2x upsample; the output is (2H, 2W).
        training: batch statistics (synchronised over ``process_group`` when it has more than one
            rank) instead of the running ones.
        weights: the 1x1 convolution weights in x's dtype (:func:`prepare_weights`), kept by the
            caller while the parameters are unchanged; None prepares them in this call.
    Returns:
        (N, Cout, Ho, Wo) in skip's (or x's) dtype and memory format.
    """
    check_gen_cell_inputs(x, params, running, skip, upsample, training, weights)
    if training and distributed.group_size(process_group) > 1:
        return _SyncGenCell.apply(x, skip, upsample, momentum, eps, process_group, running, weights,
                                  *params.tensors())
    running_list = [] if running is None else [t for t in running if t is not None]
    return _GenCell.apply(x, skip, upsample, momentum, eps, training, running_list,
                          [] if weights is None else list(weights), *params.tensors())
