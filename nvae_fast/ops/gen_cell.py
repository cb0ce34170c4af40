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

Pipeline (``_forward`` / ``_backward`` below; each step is one kernel of the chosen backend):

Forward: stats of x (BN0) -> GEMM1 with BN0 in its prologue, epilogue BN1 stats -> depthwise stage
(nvae_fast/ops/dwconv_stage.py: BN1+Swish prologue with halo, BN2 stats epilogue) -> GEMM2 with
BN2+Swish prologue, epilogue BN3 stats and per-(n, c) sums of e (SE pools BN3(e), affine in them)
-> tiny SE MLP in torch -> output stage. With ``upsample`` GEMM1 and BN0/BN1 run at low resolution
(nearest upsampling commutes with them and keeps their statistics) and the depthwise stage reads
the upsampled b from low-resolution a.

Backward: per-(n, c) sums of dout and dout * e -> SE and BN3 backward on (N, C) in torch ->
GEMM2^T whose prologue rebuilds de from (dout, e) and whose epilogue gathers BN2's backward sums
-> the same GEMM again, now applying BN2+Swish backward: dc -> GEMM for dW2 -> depthwise stage
backward (g1 and BN1's sums, dWdw) -> GEMM da^T xhat0, which gives dW1 and BN0's backward sums at
once -> GEMM1^T with the BN1 backward in its prologue and BN0 backward (+ dout of the identity skip)
in its epilogue: dx. Saved for backward: x, a, c, e and per-channel statistics (plus the (N, Cout)
sums of e); b, d, f and every gradient in between are recomputed or never stored.

Stage contract: each backend provides ``nvae_fast/kernels/<backend>/gen_cell.py`` (or a namespace)
with the functions of :data:`_TORCH_KERNELS` below (signatures and docstrings in
nvae_fast/kernels/triton/gen_cell.py); the depthwise stage goes through its own dispatch.

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
    """Running statistics of BN0..BN3, updated in place in training, used in eval."""

    mean0: Tensor
    var0: Tensor
    mean1: Tensor
    var1: Tensor
    mean2: Tensor
    var2: Tensor
    mean3: Tensor
    var3: Tensor


class LinComb(NamedTuple):
    """How a backward stage rebuilds a gradient from two saved (N, K, H, W) tensors x, y:
    ``p[s, k] * x + q[k] * (y - center[k]) + r[s, k]`` with s the sample when p and r have N rows
    (one row: per channel). All contiguous, fp32 (fp64 on the torch backend in float64)."""

    p: Tensor
    q: Tensor
    center: Tensor
    r: Tensor


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
# torch backend of the stage contract: explicit formulas, no autograd (float64-capable)
# ---------------------------------------------------------------------------------------------

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


def _moments(rows: Tensor) -> tuple[Tensor, Tensor]:
    var, mean = torch.var_mean(rows, dim=0, unbiased=False)
    return mean, var


def _lincomb_rows(x: Tensor, y: Tensor, coefs: LinComb) -> Tensor:
    view = (-1, x.shape[1], 1, 1)
    value = (coefs.p.view(view) * x.to(coefs.p.dtype) + coefs.q.view(view) * (y.to(coefs.p.dtype)
             - coefs.center.view(view)) + coefs.r.view(view))
    return _rows(value)


def _torch_bn_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    return _moments(_rows(x))


def _torch_conv1_forward(x, scale, shift, weight, stats=True):
    a = (_rows(x) * scale + shift) @ weight.t()
    mean, var = _moments(a) if stats else (None, None)
    return _unrows(a, x), mean, var


def _torch_conv2_forward(c, scale, shift, weight):
    e = _swish(_rows(c) * scale + shift) @ weight.t()
    mean, var = _moments(e)
    N, _, H, W = c.shape
    return _unrows(e, c), mean, var, e.view(N, H * W, -1).sum(dim=1)


def _torch_output_forward(e, scale, shift, se, skip):
    f = e.to(scale.dtype) * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)
    return torch.empty_like(skip).copy_(skip + OUTPUT_SCALE * f * se[:, :, None, None])


def _torch_output_backward_sums(dout, e, mean_e):
    d = dout.to(mean_e.dtype)
    return d.sum(dim=(2, 3)), (d * (e.to(mean_e.dtype) - mean_e.view(1, -1, 1, 1))).sum(dim=(2, 3))


def _torch_conv2_g(dout, e, coefs, c, scale, shift, weight):
    dd = _lincomb_rows(dout, e, coefs) @ weight
    return dd * _swish_grad(_rows(c) * scale + shift)


def _torch_conv2_backward_reduce(dout, e, coefs, c, scale, shift, mean_c, weight):
    g = _torch_conv2_g(dout, e, coefs, c, scale, shift, weight)
    return g.sum(dim=0), (g * (_rows(c) - mean_c)).sum(dim=0)


def _torch_conv2_backward_apply(dout, e, coefs, c, scale, shift, mean_c, weight, coef_xmu, coef_const):
    g = _torch_conv2_g(dout, e, coefs, c, scale, shift, weight)
    return _unrows(scale * g + coef_xmu * (_rows(c) - mean_c) + coef_const, c)


def _torch_conv2_weight_grad(dout, e, coefs, c, scale, shift):
    return _lincomb_rows(dout, e, coefs).t() @ _swish(_rows(c) * scale + shift)


def _torch_conv1_weight_grad(g, a, coefs, x, mean_x, invstd_x):
    da = _lincomb_rows(g, a, coefs)
    return da.t() @ ((_rows(x) - mean_x) * invstd_x), da.sum(dim=0)


def _torch_conv1_backward_data(g, a, coefs, weight, x, coef_xmu, mean_x, coef_const, residual=None):
    dx = _lincomb_rows(g, a, coefs) @ weight + coef_xmu * (_rows(x) - mean_x) + coef_const
    if residual is not None:
        dx = dx + _rows(residual)
    return torch.empty_like(x).copy_(_unrows(dx, x))


_TORCH_KERNELS = SimpleNamespace(
    bn_stats=_torch_bn_stats,
    conv1_forward=_torch_conv1_forward,
    conv2_forward=_torch_conv2_forward,
    output_forward=_torch_output_forward,
    output_backward_sums=_torch_output_backward_sums,
    conv2_backward_reduce=_torch_conv2_backward_reduce,
    conv2_backward_apply=_torch_conv2_backward_apply,
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


def _local_sync(mean: Tensor, var: Tensor, count: int) -> tuple[Tensor, Tensor, int]:
    return mean, var, count


def _local_all_reduce(tensors: list[Tensor]) -> list[Tensor]:
    return tensors


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
        """Sizes of the packed statistics vector: mean0, var0, mean1, var1, mean2, var2, mean3, var3."""
        return [self.Cin] * 2 + [self.EC] * 4 + [self.Cout] * 2


def _fold(weight: Tensor, bias: Tensor, mean: Tensor, var: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """(scale, shift, invstd) of BatchNorm as a per-channel affine."""
    invstd = torch.rsqrt(var + eps)
    scale = weight.to(invstd.dtype) * invstd
    return scale.contiguous(), (bias.to(invstd.dtype) - mean * scale).contiguous(), invstd


def _se_forward(p: GenCellParams, pool: Tensor) -> tuple[Tensor, Tensor | None]:
    """(se gate (N, Cout), pre-ReLU hidden activation or None); ones without SE."""
    if not p.has_se:
        return torch.ones_like(pool), None
    acc = pool.dtype
    hidden = pool @ p.se_fc1_weight.to(acc).t() + p.se_fc1_bias.to(acc)
    return torch.sigmoid(torch.relu(hidden) @ p.se_fc2_weight.to(acc).t() + p.se_fc2_bias.to(acc)), hidden


def _without_autocast(fn: Callable[..., _T]) -> Callable[..., _T]:
    """Runs a pipeline function with autocast off on its first argument's device: autocast stays
    on inside custom ops and would round the fp32 folds and SE MLP to half precision."""
    @functools.wraps(fn)
    def wrapper(first: Tensor, *args, **kwargs) -> _T:
        with torch.autocast(first.device.type, enabled=False):
            return fn(first, *args, **kwargs)
    return wrapper


@_without_autocast
def _forward(x: Tensor, skip: Tensor | None, p: GenCellParams, eval_stats: list[Tensor], upsample: bool,
             training: bool, eps: float, sync: Sync) -> tuple[list[Tensor], tuple[int, int]]:
    """([out, a, c, e, stats, sum_e], (count at x's resolution, count at out's)), counts global.

    In eval ``eval_stats`` holds the 8 running statistics; in training the batch statistics
    (synchronised by ``sync``) are returned packed in ``stats``.
    """
    k = kernels_for(x)
    dims = _Dims.of(x, p, upsample)
    acc = _acc_dtype(x)
    count_lo, count_hi = dims.N * dims.H * dims.W, dims.N * dims.Ho * dims.Wo
    if training:
        mean0, var0, count_lo_g = sync(*k.bn_stats(x), count_lo)
    else:
        mean0, var0, mean1, var1, mean2, var2, mean3, var3 = (t.to(acc) for t in eval_stats)
        count_lo_g = count_lo
    s0, t0, _ = _fold(p.bn0_weight, p.bn0_bias, mean0, var0, eps)
    w1 = p.conv1_weight.reshape(dims.EC, dims.Cin).to(acc)
    a, mean_a, var_a = k.conv1_forward(x, s0, t0, w1.contiguous(), training)
    if training:
        mean1, var1, _ = sync(mean_a, var_a, count_lo)
    s1, t1, _ = _fold(p.bn1_weight, p.bn1_bias, mean1, var1, eps)
    c, mean_c, var_c = dwconv_stage.kernels_for(a).dwconv_stage_forward(a, s1, t1, p.dw_weight, 1, upsample)
    if training:
        mean2, var2, count_hi_g = sync(mean_c, var_c, count_hi)
    else:
        count_hi_g = count_hi
    s2, t2, _ = _fold(p.bn2_weight, p.bn2_bias, mean2, var2, eps)
    w2 = p.conv2_weight.reshape(dims.Cout, dims.EC).to(acc).contiguous()
    e, mean_e, var_e, sum_e = k.conv2_forward(c, s2, t2, w2)
    if training:
        mean3, var3, _ = sync(mean_e, var_e, count_hi)
    s3, t3, _ = _fold(p.bn3_weight, p.bn3_bias, mean3, var3, eps)
    se, _ = _se_forward(p, s3 * sum_e / (dims.Ho * dims.Wo) + t3)
    out = k.output_forward(e, s3, t3, se.contiguous(), x if skip is None else skip)
    stats = torch.cat([mean0, var0, mean1, var1, mean2, var2, mean3, var3])
    return [out, a, c, e, stats, sum_e], (count_lo_g, count_hi_g)


def _bn_backward_coefs(scale: Tensor, invstd: Tensor, sum_g: Tensor, sum_gxmu: Tensor, count: int,
                       training: bool) -> tuple[Tensor, Tensor]:
    """(coef_xmu, coef_const) of dx = scale * g + coef_xmu * (x - mean) + coef_const: in training
    the batch statistics depend on x; in eval they are constants and both are zero."""
    if not training:
        return torch.zeros_like(scale), torch.zeros_like(scale)
    return (-scale * invstd * invstd * sum_gxmu / count).contiguous(), (-scale * sum_g / count).contiguous()


@_without_autocast
def _backward(dout: Tensor, x: Tensor, a: Tensor, c: Tensor, e: Tensor, stats: Tensor, sum_e: Tensor,
              p: GenCellParams, upsample: bool, training: bool, eps: float, has_skip: bool, counts: tuple[int, int],
              all_reduce: AllReduce) -> tuple[Tensor, list[Tensor]]:
    """(dx, gradients of p.tensors() in order). Parameter gradients are this rank's; the input
    gradient uses the backward sums all-reduced over the ranks (SyncBatchNorm semantics)."""
    k = kernels_for(x)
    dims = _Dims.of(x, p, upsample)
    count_lo, count_hi = counts
    hw_out = dims.Ho * dims.Wo
    mean0, var0, mean1, var1, mean2, var2, mean3, var3 = stats.split(dims.stat_sizes())
    acc = stats.dtype
    s0, _, invstd0 = _fold(p.bn0_weight, p.bn0_bias, mean0, var0, eps)
    s1, t1, invstd1 = _fold(p.bn1_weight, p.bn1_bias, mean1, var1, eps)
    s2, t2, invstd2 = _fold(p.bn2_weight, p.bn2_bias, mean2, var2, eps)
    s3, t3, invstd3 = _fold(p.bn3_weight, p.bn3_bias, mean3, var3, eps)

    # Output stage, squeeze-excitation and BN3 on (N, Cout) sums.
    sum_dout, sum_dout_e = k.output_backward_sums(dout, e, mean3)
    pool = s3 * sum_e / hw_out + t3
    se, hidden = _se_forward(p, pool)
    se_grads: list[Tensor] = []
    d_pool = torch.zeros_like(pool)
    if p.has_se:
        d_se = OUTPUT_SCALE * (s3 * sum_dout_e + p.bn3_bias.to(acc) * sum_dout)   # sum_hw dout * f
        d_logit = d_se * se * (1 - se)
        h = torch.relu(hidden)
        d_hidden = (d_logit @ p.se_fc2_weight.to(acc)) * (hidden > 0)
        d_pool = d_hidden @ p.se_fc1_weight.to(acc)
        se_grads = [d_hidden.t() @ pool, d_hidden.sum(dim=0), d_logit.t() @ h, d_logit.sum(dim=0)]
    # dL/df = 0.1 * se * dout + d_pool / HW per element
    sum_g3 = (OUTPUT_SCALE * se * sum_dout + d_pool).sum(dim=0)
    sum_g3x = (OUTPUT_SCALE * se * sum_dout_e + d_pool / hw_out * (sum_e - hw_out * mean3)).sum(dim=0)
    d_bn3 = [sum_g3x * invstd3, sum_g3]
    if training:
        sum_g3, sum_g3x = all_reduce([sum_g3, sum_g3x])
    kx3, kc3 = _bn_backward_coefs(s3, invstd3, sum_g3, sum_g3x, count_hi, training)
    de = LinComb((OUTPUT_SCALE * s3 * se).contiguous(), kx3, mean3.contiguous(),
                 (s3 * d_pool / hw_out + kc3).contiguous())

    # GEMM2 and BN2 + Swish.
    w2 = p.conv2_weight.reshape(dims.Cout, dims.EC).to(acc).contiguous()
    sum_g2, sum_g2x = k.conv2_backward_reduce(dout, e, de, c, s2, t2, mean2.contiguous(), w2)
    d_bn2 = [sum_g2x * invstd2, sum_g2]
    if training:
        sum_g2, sum_g2x = all_reduce([sum_g2, sum_g2x])
    kx2, kc2 = _bn_backward_coefs(s2, invstd2, sum_g2, sum_g2x, count_hi, training)
    dc = k.conv2_backward_apply(dout, e, de, c, s2, t2, mean2.contiguous(), w2, kx2, kc2)
    d_w2 = k.conv2_weight_grad(dout, e, de, c, s2, t2)

    # Depthwise stage and BN1 + Swish.
    stage = dwconv_stage.kernels_for(a)
    g1, sum_g1, sum_g1x, d_dw = stage.dwconv_stage_backward(dc, a, s1, t1, mean1.contiguous(), p.dw_weight, 1,
                                                           upsample)
    del dc
    d_bn1 = [sum_g1x * invstd1, sum_g1]
    if training:
        sum_g1, sum_g1x = all_reduce([sum_g1, sum_g1x])
    kx1, kc1 = _bn_backward_coefs(s1, invstd1, sum_g1, sum_g1x, count_lo, training)
    da = LinComb(s1.view(1, -1), kx1, mean1.contiguous(), kc1.view(1, -1))

    # GEMM1 and BN0: G = da^T xhat0 gives dW1 and BN0's sums (du = da @ W1, u = BN0(x)).
    w1 = p.conv1_weight.reshape(dims.EC, dims.Cin).to(acc)
    G, sum_da = k.conv1_weight_grad(g1, a, da, x, mean0.contiguous(), invstd0)
    d_w1 = G * p.bn0_weight.to(acc) + sum_da[:, None] * p.bn0_bias.to(acc)
    sum_du_xhat, sum_du = (w1 * G).sum(dim=0), sum_da @ w1
    d_bn0 = [sum_du_xhat, sum_du]
    if training:
        sum_du_xhat, sum_du = all_reduce([sum_du_xhat, sum_du])
    kx0, kc0 = _bn_backward_coefs(s0, invstd0, sum_du, sum_du_xhat / invstd0, count_lo, training)
    dx = k.conv1_backward_data(g1, a, da, (w1 * s0).contiguous(), x, kx0, mean0.contiguous(), kc0,
                               None if has_skip else dout)

    grads = [*d_bn0, d_w1.view_as(p.conv1_weight), *d_bn1, d_dw.view_as(p.dw_weight), *d_bn2,
             d_w2.view_as(p.conv2_weight), *d_bn3, *se_grads]
    return dx, [g.to(t.dtype) for g, t in zip(grads, p.tensors())]


# ---------------------------------------------------------------------------------------------
# Custom ops (torch.compile sees opaque nodes with fake implementations) and their autograd
# ---------------------------------------------------------------------------------------------

def _params_from(tensors: list[Tensor]) -> GenCellParams:
    return GenCellParams(*tensors)


@torch.library.custom_op("nvae_fast::gen_cell", mutates_args=())
def _gen_cell_op(x: Tensor, skip: Tensor | None, params: list[Tensor], eval_stats: list[Tensor], upsample: bool,
                 training: bool, eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(out, a, c, e, stats, sum_e): the cell's output and what its backward needs."""
    outputs, _ = _forward(x, skip, _params_from(params), eval_stats, upsample, training, eps, _local_sync)
    return tuple(outputs)


@_gen_cell_op.register_fake
def _(x, skip, params, eval_stats, upsample, training, eps):
    p = _params_from(params)
    dims = _Dims.of(x, p, upsample)
    acc = _acc_dtype(x)

    def cl(C: int, H: int, W: int) -> Tensor:
        return x.new_empty((dims.N, C, H, W)).contiguous(memory_format=torch.channels_last)

    out = torch.empty_like(x if skip is None else skip)
    return (out, cl(dims.EC, dims.H, dims.W), cl(dims.EC, dims.Ho, dims.Wo), cl(dims.Cout, dims.Ho, dims.Wo),
            x.new_empty(sum(dims.stat_sizes()), dtype=acc), x.new_empty((dims.N, dims.Cout), dtype=acc))


@torch.library.custom_op("nvae_fast::gen_cell_backward", mutates_args=())
def _gen_cell_backward_op(dout: Tensor, x: Tensor, a: Tensor, c: Tensor, e: Tensor, stats: Tensor, sum_e: Tensor,
                          params: list[Tensor], upsample: bool, training: bool, eps: float,
                          has_skip: bool) -> list[Tensor]:
    """[dx, gradients of params in order]."""
    p = _params_from(params)
    dims = _Dims.of(x, p, upsample)
    counts = (dims.N * dims.H * dims.W, dims.N * dims.Ho * dims.Wo)
    dx, grads = _backward(dout, x, a, c, e, stats, sum_e, p, upsample, training, eps, has_skip, counts,
                          _local_all_reduce)
    return [dx, *grads]


@_gen_cell_backward_op.register_fake
def _(dout, x, a, c, e, stats, sum_e, params, upsample, training, eps, has_skip):
    return [torch.empty_like(x)] + [torch.empty_like(t) for t in params]


def _setup_context(ctx, inputs, output) -> None:
    x, skip, params, eval_stats, upsample, training, eps = inputs
    _, a, c, e, stats, sum_e = output
    ctx.save_for_backward(x, a, c, e, stats, sum_e, *params)
    ctx.upsample, ctx.training, ctx.eps, ctx.has_skip = upsample, training, eps, skip is not None
    ctx.num_eval_stats = len(eval_stats)


def _gen_cell_backward(ctx, dout, *unused_grads):
    x, a, c, e, stats, sum_e, *params = ctx.saved_tensors
    dx, *grads = torch.ops.nvae_fast.gen_cell_backward(dout, x, a, c, e, stats, sum_e, params, ctx.upsample,
                                                       ctx.training, ctx.eps, ctx.has_skip)
    return dx, (dout if ctx.has_skip else None), grads, [None] * ctx.num_eval_stats, None, None, None


_gen_cell_op.register_autograd(_gen_cell_backward, setup_context=_setup_context)


class _SyncGenCell(torch.autograd.Function):
    """Training with more than one rank: BatchNorm statistics and backward sums are combined
    across the process group between the stages (SyncBatchNorm semantics)."""

    @staticmethod
    def forward(ctx, x, skip, upsample, eps, process_group, running, momentum, *params):
        p = _params_from(list(params))

        def sync(mean: Tensor, var: Tensor, count: int) -> tuple[Tensor, Tensor, int]:
            return distributed.all_gather_moments(mean, var, count, process_group)

        (out, a, c, e, stats, sum_e), counts = _forward(x, skip, p, [], upsample, True, eps, sync)
        _update_running(running, stats, _Dims.of(x, p, upsample), counts, upsample, momentum)
        ctx.save_for_backward(x, a, c, e, stats, sum_e, *params)
        ctx.upsample, ctx.eps, ctx.has_skip, ctx.counts, ctx.group = upsample, eps, skip is not None, counts, \
            process_group
        return out

    @staticmethod
    def backward(ctx, dout):
        x, a, c, e, stats, sum_e, *params = ctx.saved_tensors
        dx, grads = _backward(dout, x, a, c, e, stats, sum_e, _params_from(params), ctx.upsample, True, ctx.eps,
                              ctx.has_skip, ctx.counts,
                              lambda tensors: distributed.all_reduce_sum(tensors, ctx.group))
        return dx, (dout if ctx.has_skip else None), None, None, None, None, None, *grads


def _update_running(running: GenCellRunningStats | None, stats: Tensor, dims: _Dims, counts: tuple[int, int],
                    upsample: bool, momentum: float) -> None:
    """Running statistics as torch.nn.BatchNorm2d updates them (unbiased variance). BN0 and BN1
    officially see the upsampled tensor: their count is four times the low-resolution one."""
    if running is None:
        return
    batch = stats.detach().split(dims.stat_sizes())
    count_lo = counts[0] * (4 if upsample else 1)
    with torch.no_grad():
        for i, count in enumerate((count_lo, count_lo, counts[1], counts[1])):
            running[2 * i].lerp_(batch[2 * i].to(running[2 * i].dtype), momentum)
            unbiased = batch[2 * i + 1] * (count / max(count - 1, 1))
            running[2 * i + 1].lerp_(unbiased.to(running[2 * i + 1].dtype), momentum)


# ---------------------------------------------------------------------------------------------
# Public functional API
# ---------------------------------------------------------------------------------------------

def _check_vector(name: str, t: Tensor, size: int) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.shape != (size,):
        raise ValueError(f"{name} must have shape ({size},), got {tuple(t.shape)}")


def check_gen_cell_inputs(x: Tensor, params: GenCellParams, running: GenCellRunningStats | None,
                          skip: Tensor | None, upsample: bool, training: bool) -> None:
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
        for i, (name, t) in enumerate(zip(GenCellRunningStats._fields, running)):
            _check_vector(f"running.{name}", t, (Cin, EC, EC, Cout)[i // 2])
            if t.device != x.device:
                raise ValueError(f"running.{name} is on {t.device} but x is on {x.device}")
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
) -> Tensor:
    """The whole decoder cell in fused stages on the backend chosen for x (see the module docstring).

    Args:
        x: (N, Cin, H, W) float32/float16/bfloat16 (float64 runs on the torch backend), any memory
            format; channels-last avoids a copy-free but strided read. Activations a, c, e are
            channels-last in x's dtype; statistics and per-channel math are fp32.
        params: :class:`GenCellParams`; EC, Cout, k and SE follow from their shapes.
        running: BN0..BN3 running statistics, updated in place in training
            (``(1 - momentum) * old + momentum * batch``, unbiased variance), used in eval.
        skip: (N, Cout, Ho, Wo) tensor added to the branch (the up-cell's upsampled skip; under
            autocast a normal cell's fp32 input while x is its half-precision copy), or None for a
            normal cell's identity skip (x itself, whose gradient the last kernel then adds).
        upsample: the up-cell: the branch starts with a nearest 2x upsample; the output is (2H, 2W).
        training: batch statistics (synchronised over ``process_group`` when it has more than one
            rank) instead of the running ones.
    Returns:
        (N, Cout, Ho, Wo) in skip's (or x's) dtype and memory format.
    """
    check_gen_cell_inputs(x, params, running, skip, upsample, training)
    if training and distributed.group_size(process_group) > 1:
        return _SyncGenCell.apply(x, skip, upsample, eps, process_group, running, momentum, *params.tensors())
    eval_stats = [] if training else list(running)
    out, _, _, _, stats, _ = torch.ops.nvae_fast.gen_cell(x, skip, params.tensors(), eval_stats, upsample, training,
                                                          eps)
    if training:
        dims = _Dims.of(x, params, upsample)
        _update_running(running, stats, dims, (dims.N * dims.H * dims.W, dims.N * dims.Ho * dims.Wo), upsample,
                        momentum)
    return out
