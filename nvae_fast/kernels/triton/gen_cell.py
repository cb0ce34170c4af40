"""Triton kernels of the fused generative cell (contract and math: nvae_fast/ops/gen_cell.py).

A 4-D activation (N, C, H, W) is a matrix [M = N*H*W, C]; the 1x1 convolutions are GEMMs over it
with ``tl.dot`` (operands in the activation dtype, fp32 accumulation) whose prologues apply the
previous BatchNorm (+ Swish, or the backward's linear combination) to each loaded tile and whose
epilogues gather the next BatchNorm's statistics or backward sums. Every cross-program reduction
writes fp32 partials merged in a fixed order afterwards: results are deterministic.

Kernels:

* ``_forward_gemm_kernel``   y = prologue(x) @ w^T, prologue the previous BatchNorm (+ Swish) in
  fp32 before the operand is cast for ``tl.dot``; Welford partials of y per row tile.
  Row tiles may be aligned to images (``seg_len = H*W``) so that the same partials also give the
  per-(n, channel) sums that squeeze-excitation pools.
* ``_backward_data_kernel``  out = lincomb(x, y) @ w with an epilogue that is either the
  BatchNorm(+Swish) backward sums or the BatchNorm(+Swish) backward apply (+ a residual).
* ``_weight_grad_kernel``    G = lincomb(x, y)^T @ f(z * s + t) split over row chunks, plus the
  column sums of the lincomb.
* ``_output_kernel``, ``_output_sums_kernel``: the elementwise output stage and its backward sums.

The depthwise stage between the GEMMs is its own op (nvae_fast/kernels/triton/dwconv_stage.py).

``lincomb(x, y) = p[n, k] * x + q[k] * (y - center[k]) + r[n, k]`` (p, r per sample or per channel)
is how every backward stage rebuilds the gradient of the previous stage's output from saved
tensors instead of storing it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nvae_fast.kernels.triton.bn_swish import bn_stats
from nvae_fast.kernels.triton.common import (
    dot_dtype, dot_precision, finalize_stats, finalize_sums, gemm_stages, reduction_programs, row_offsets,
    store_welford, strides4, swish, swish_grad, welford_tile,
)

__all__ = [
    "bn_stats", "conv1_backward_data", "conv1_forward", "conv1_weight_grad", "conv2_backward_apply",
    "conv2_backward_reduce", "conv2_forward", "conv2_weight_grad", "output_backward_sums", "output_forward",
]


@triton.jit
def _load_tile(ptr, rows, row_ok, cols, col_ok, HW, W, s_n, s_c, s_h, s_w):
    """fp32 [rows, cols] tile of a 4-D tensor seen as [N*H*W, C]; zeros outside the masks."""
    offs = row_offsets(rows, HW, W, s_n, s_h, s_w)[:, None] + cols[None, :].to(tl.int64) * s_c
    return tl.load(ptr + offs, mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)


@triton.jit
def _store_tile(ptr, value, rows, row_ok, cols, col_ok, HW, W, s_n, s_c, s_h, s_w):
    offs = row_offsets(rows, HW, W, s_n, s_h, s_w)[:, None] + cols[None, :].to(tl.int64) * s_c
    tl.store(ptr + offs, value.to(ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _vector(ptr, cols, col_ok):
    return tl.load(ptr + cols, mask=col_ok, other=0.0)[None, :]


@triton.jit
def _lincomb_tile(x_ptr, y_ptr, p_ptr, q_ptr, ctr_ptr, r_ptr, rows, row_ok, ks, k_ok, K, HW, W,
                  sx_n, sx_c, sx_h, sx_w, sy_n, sy_c, sy_h, sy_w, PER_SAMPLE: tl.constexpr):
    """p * x + q * (y - center) + r on a [rows, ks] tile, zero outside the masks (fp32)."""
    x = _load_tile(x_ptr, rows, row_ok, ks, k_ok, HW, W, sx_n, sx_c, sx_h, sx_w)
    y = _load_tile(y_ptr, rows, row_ok, ks, k_ok, HW, W, sy_n, sy_c, sy_h, sy_w)
    mask = row_ok[:, None] & k_ok[None, :]
    if PER_SAMPLE:
        pr_offs = (rows.to(tl.int64) // HW)[:, None] * K + ks[None, :]
        p = tl.load(p_ptr + pr_offs, mask=mask, other=0.0)
        r = tl.load(r_ptr + pr_offs, mask=mask, other=0.0)
    else:
        p = _vector(p_ptr, ks, k_ok)
        r = _vector(r_ptr, ks, k_ok)
    value = p * x + _vector(q_ptr, ks, k_ok) * (y - _vector(ctr_ptr, ks, k_ok)) + r
    return tl.where(mask, value, 0.0)


@triton.jit
def _forward_gemm_kernel(
    x_ptr, w_ptr, pscale_ptr, pshift_ptr, y_ptr, ws_ptr,
    sx_n, sx_c, sx_h, sx_w, sy_n, sy_c, sy_h, sy_w,
    K, NOUT, HW, W, seg_len, tiles_per_seg, num_slots,
    SWISH: tl.constexpr, STATS: tl.constexpr,
    DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """y[M, NOUT] = act(x * pscale + pshift) @ w^T, act = swish or identity; w is (NOUT, K)
    row-major, fp32. The BatchNorm is applied to x in fp32, not folded into w: folded, the bias
    w @ shift would cancel against x @ (w * scale) in the dot's precision when |mean| >> std."""
    pid_m = tl.program_id(0)
    seg = pid_m // tiles_per_seg
    local = (pid_m - seg * tiles_per_seg) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = local < seg_len
    rows = seg.to(tl.int64) * seg_len + local
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < NOUT
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        a = _load_tile(x_ptr, rows, row_ok, ks, k_ok, HW, W, sx_n, sx_c, sx_h, sx_w)
        a = a * _vector(pscale_ptr, ks, k_ok) + _vector(pshift_ptr, ks, k_ok)
        if SWISH:
            a = swish(a)
        a = tl.where(row_ok[:, None] & k_ok[None, :], a, 0.0)
        w = tl.load(w_ptr + cols[None, :] * K + ks[:, None], mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc += tl.dot(a.to(DOT_DTYPE), w.to(DOT_DTYPE), input_precision=DOT_PRECISION)
    _store_tile(y_ptr, acc, rows, row_ok, cols, col_ok, HW, W, sy_n, sy_c, sy_h, sy_w)
    if STATS:
        count, mean, m2 = welford_tile(acc, row_ok[:, None] & col_ok[None, :])
        store_welford(ws_ptr, pid_m, num_slots, cols, NOUT, count, mean, m2)


@triton.jit
def _backward_data_kernel(
    x_ptr, y_ptr, p_ptr, q_ptr, ctr_ptr, r_ptr, w_ptr,
    z_ptr, zscale_ptr, zshift_ptr, zmean_ptr, oscale_ptr, kx_ptr, kc_ptr, res_ptr, out_ptr, ws_ptr,
    sx_n, sx_c, sx_h, sx_w, sy_n, sy_c, sy_h, sy_w, sz_n, sz_c, sz_h, sz_w,
    sr_n, sr_c, sr_h, sr_w, so_n, so_c, so_h, so_w,
    M, K, NOUT, HW, W, num_slots,
    PER_SAMPLE: tl.constexpr, SWISH_GRAD: tl.constexpr, APPLY: tl.constexpr, HAS_RES: tl.constexpr,
    DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """acc = lincomb(x, y) @ w (w (K, NOUT) row-major, fp32), then with z the BatchNorm input of
    this stage's output and g = acc * swish'(z * zscale + zshift) (or acc without SWISH_GRAD):
    APPLY: out = oscale * g + kx * (z - zmean) + kc (+ res); else ws = partial sums g, g * (z - zmean)."""
    pid_m = tl.program_id(0)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < NOUT
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        a = _lincomb_tile(x_ptr, y_ptr, p_ptr, q_ptr, ctr_ptr, r_ptr, rows, row_ok, ks, k_ok, K, HW, W,
                          sx_n, sx_c, sx_h, sx_w, sy_n, sy_c, sy_h, sy_w, PER_SAMPLE)
        w = tl.load(w_ptr + ks[:, None] * NOUT + cols[None, :], mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc += tl.dot(a.to(DOT_DTYPE), w.to(DOT_DTYPE), input_precision=DOT_PRECISION)
    mask = row_ok[:, None] & col_ok[None, :]
    z = _load_tile(z_ptr, rows, row_ok, cols, col_ok, HW, W, sz_n, sz_c, sz_h, sz_w)
    if SWISH_GRAD:
        g = acc * swish_grad(z * _vector(zscale_ptr, cols, col_ok) + _vector(zshift_ptr, cols, col_ok))
    else:
        g = acc
    g = tl.where(mask, g, 0.0)
    z_dev = z - _vector(zmean_ptr, cols, col_ok)
    if APPLY:
        out = _vector(oscale_ptr, cols, col_ok) * g + _vector(kx_ptr, cols, col_ok) * z_dev \
            + _vector(kc_ptr, cols, col_ok)
        if HAS_RES:
            out += _load_tile(res_ptr, rows, row_ok, cols, col_ok, HW, W, sr_n, sr_c, sr_h, sr_w)
        _store_tile(out_ptr, out, rows, row_ok, cols, col_ok, HW, W, so_n, so_c, so_h, so_w)
    else:
        base = ws_ptr + pid_m.to(tl.int64) * NOUT + cols
        tl.store(base, tl.sum(g, axis=0), mask=col_ok)
        tl.store(base + num_slots * NOUT, tl.sum(g * z_dev, axis=0), mask=col_ok)


@triton.jit
def _weight_grad_kernel(
    x_ptr, y_ptr, p_ptr, q_ptr, ctr_ptr, r_ptr, z_ptr, zscale_ptr, zshift_ptr, ws_ptr, wsum_ptr,
    sx_n, sx_c, sx_h, sx_w, sy_n, sy_c, sy_h, sy_w, sz_n, sz_c, sz_h, sz_w,
    M, K1, K2, HW, W, rows_per_prog,
    PER_SAMPLE: tl.constexpr, B_SWISH: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K1: tl.constexpr, BLOCK_K2: tl.constexpr,
):
    """ws[chunk, k1, k2] = sum over the chunk's rows of A[m, k1] * B[m, k2] with A = lincomb(x, y),
    B = f(z * zscale + zshift) (f = swish or identity); wsum[chunk, k1] = sum of A over the rows."""
    k1 = tl.program_id(0) * BLOCK_K1 + tl.arange(0, BLOCK_K1)
    k1_ok = k1 < K1
    k2 = tl.program_id(1) * BLOCK_K2 + tl.arange(0, BLOCK_K2)
    k2_ok = k2 < K2
    chunk = tl.program_id(2)
    zscale = _vector(zscale_ptr, k2, k2_ok)
    zshift = _vector(zshift_ptr, k2, k2_ok)
    row_start = chunk.to(tl.int64) * rows_per_prog
    row_end = tl.minimum(row_start + rows_per_prog, M)
    acc = tl.zeros([BLOCK_K1, BLOCK_K2], dtype=tl.float32)
    a_sum = tl.zeros([BLOCK_K1], dtype=tl.float32)
    for r0 in range(row_start, row_end, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        row_ok = rows < row_end
        a = _lincomb_tile(x_ptr, y_ptr, p_ptr, q_ptr, ctr_ptr, r_ptr, rows, row_ok, k1, k1_ok, K1, HW, W,
                          sx_n, sx_c, sx_h, sx_w, sy_n, sy_c, sy_h, sy_w, PER_SAMPLE)
        b = _load_tile(z_ptr, rows, row_ok, k2, k2_ok, HW, W, sz_n, sz_c, sz_h, sz_w) * zscale + zshift
        if B_SWISH:
            b = swish(b)
        b = tl.where(row_ok[:, None] & k2_ok[None, :], b, 0.0)
        acc += tl.dot(tl.trans(a.to(DOT_DTYPE)), b.to(DOT_DTYPE), input_precision=DOT_PRECISION)
        a_sum += tl.sum(a, axis=0)
    offs = (chunk.to(tl.int64) * K1 + k1[:, None]) * K2 + k2[None, :]
    tl.store(ws_ptr + offs, acc, mask=k1_ok[:, None] & k2_ok[None, :])
    k1_written = tl.where(tl.program_id(1) == 0, K1, 0)    # the first K2 block writes the sums
    tl.store(wsum_ptr + chunk.to(tl.int64) * K1 + k1, a_sum, mask=k1 < k1_written)


@triton.jit
def _output_kernel(
    e_ptr, skip_ptr, out_ptr, scale_ptr, shift_ptr, se_ptr,
    se_n, se_c, se_h, se_w, sk_n, sk_c, sk_h, sk_w, so_n, so_c, so_h, so_w,
    M, C, HW, W, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """out = skip + 0.1 * (e * scale + shift) * se[n, c]."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    e = _load_tile(e_ptr, rows, row_ok, cols, col_ok, HW, W, se_n, se_c, se_h, se_w)
    skip = _load_tile(skip_ptr, rows, row_ok, cols, col_ok, HW, W, sk_n, sk_c, sk_h, sk_w)
    se = tl.load(se_ptr + (rows.to(tl.int64) // HW)[:, None] * C + cols[None, :],
                 mask=row_ok[:, None] & col_ok[None, :], other=0.0)
    f = e * _vector(scale_ptr, cols, col_ok) + _vector(shift_ptr, cols, col_ok)
    _store_tile(out_ptr, skip + 0.1 * f * se, rows, row_ok, cols, col_ok, HW, W, so_n, so_c, so_h, so_w)


@triton.jit
def _output_sums_kernel(
    dout_ptr, e_ptr, mean_ptr, ws_ptr,
    sd_n, sd_c, sd_h, sd_w, se_n, se_c, se_h, se_w,
    C, HW, W, tiles_per_img, num_slots, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """ws[0|1, tile, c] = sums of dout and dout * (e - mean) over one image's tile of pixels."""
    pid = tl.program_id(0)
    n = pid // tiles_per_img
    local = (pid - n * tiles_per_img) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = local < HW
    rows = n.to(tl.int64) * HW + local
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    dout = _load_tile(dout_ptr, rows, row_ok, cols, col_ok, HW, W, sd_n, sd_c, sd_h, sd_w)
    e = _load_tile(e_ptr, rows, row_ok, cols, col_ok, HW, W, se_n, se_c, se_h, se_w)
    e_dev = tl.where(row_ok[:, None] & col_ok[None, :], e - _vector(mean_ptr, cols, col_ok), 0.0)
    base = ws_ptr + pid.to(tl.int64) * C + cols
    tl.store(base, tl.sum(dout, axis=0), mask=col_ok)
    tl.store(base + num_slots * C, tl.sum(dout * e_dev, axis=0), mask=col_ok)


# ---------------------------------------------------------------------------------------------
# Launchers (the op layer has validated shapes, devices and dtypes; vectors are contiguous fp32)
# ---------------------------------------------------------------------------------------------

def _gemm_blocks(device: torch.device, K: int, NOUT: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K); tl.dot needs every block dimension >= 16. The interpreter runs
    programs one after another, so there tiles are larger."""
    cap_m, cap_n, cap_k = (64, 64, 32) if device.type == "cuda" else (128, 128, 128)
    block_n = min(max(16, triton.next_power_of_2(NOUT)), cap_n)
    block_k = min(max(16, triton.next_power_of_2(K)), cap_k)
    return cap_m, block_n, block_k


def _elementwise_blocks(device: torch.device, C: int, rows: int) -> tuple[int, int]:
    elements = 4096 if device.type == "cuda" else 65536
    block_c = min(triton.next_power_of_2(C), 64 if device.type == "cuda" else 256)
    return max(1, min(triton.next_power_of_2(rows), elements // block_c)), block_c


def _geometry(t: torch.Tensor) -> tuple[int, int, int]:
    """(M, H*W, W) of a 4-D activation."""
    N, _, H, W = t.shape
    return N * H * W, H * W, W


def _channels_last(N: int, C: int, H: int, W: int, like: torch.Tensor) -> torch.Tensor:
    return torch.empty((N, C, H, W), device=like.device, dtype=like.dtype, memory_format=torch.channels_last)


def _forward_gemm(x, pscale, pshift, weight, swish, stats, per_image):
    """Launches _forward_gemm_kernel; returns (y, Welford workspace (3, slots, NOUT), tiles per image)."""
    N, K, H, W = x.shape
    NOUT = weight.shape[0]
    M, HW, _ = _geometry(x)
    block_m, block_n, block_k = _gemm_blocks(x.device, K, NOUT)
    if per_image:
        block_m = min(block_m, max(16, triton.next_power_of_2(HW)))
        seg_len, segments = HW, N
    else:
        seg_len, segments = M, 1
    tiles = triton.cdiv(seg_len, block_m)
    slots = segments * tiles
    y = _channels_last(N, NOUT, H, W, x)
    ws = torch.empty((3, slots, NOUT), device=x.device, dtype=torch.float32)
    _forward_gemm_kernel[(slots, triton.cdiv(NOUT, block_n))](
        x, weight, pscale, pshift, y, ws, *strides4(x), *strides4(y),
        K, NOUT, HW, W, seg_len, tiles, slots,
        SWISH=swish, STATS=stats,
        DOT_DTYPE=dot_dtype(x), DOT_PRECISION=dot_precision(x), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        num_stages=gemm_stages(x, (block_m + block_n) * block_k * x.element_size()),
    )
    return y, ws, tiles


def conv1_forward(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, weight: torch.Tensor,
                  stats: bool = True):
    """(a, mean_a, var_a): a = (x * scale + shift) @ weight^T (BN0 as a per-channel affine, weight
    (EC, Cin) fp32), a channels-last in x's dtype; fp32 batch statistics of a (None when ``stats``
    is False)."""
    a, ws, _ = _forward_gemm(x, scale, shift, weight, False, stats, per_image=False)
    mean, var = finalize_stats(ws) if stats else (None, None)
    return a, mean, var


def conv2_forward(c: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, weight: torch.Tensor):
    """(e, mean_e, var_e, sum_e): e = swish(c * scale + shift) @ weight^T (weight (Cout, EC) fp32),
    channels-last in c's dtype; fp32 batch statistics of e and sum_e (N, Cout) = sum over H, W of e."""
    e, ws, tiles = _forward_gemm(c, scale, shift, weight, True, True, per_image=True)
    mean, var = finalize_stats(ws)
    N, Cout = e.shape[:2]
    sum_e = (ws[0] * ws[1]).view(N, tiles, Cout).sum(dim=1)   # count * mean of each tile
    return e, mean, var, sum_e


def output_forward(e: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, se: torch.Tensor,
                   skip: torch.Tensor) -> torch.Tensor:
    """out = skip + 0.1 * (e * scale + shift) * se[n, c], in skip's dtype and layout."""
    out = torch.empty_like(skip)
    M, HW, W = _geometry(e)
    C = e.shape[1]
    block_m, block_c = _elementwise_blocks(e.device, C, M)
    _output_kernel[(triton.cdiv(M, block_m), triton.cdiv(C, block_c))](
        e, skip, out, scale, shift, se, *strides4(e), *strides4(skip), *strides4(out),
        M, C, HW, W, BLOCK_M=block_m, BLOCK_C=block_c,
    )
    return out


def output_backward_sums(dout: torch.Tensor, e: torch.Tensor, mean_e: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum over H, W of dout, of dout * (e - mean_e)), both fp32 (N, C)."""
    N, C, H, W = e.shape
    HW = H * W
    block_m, block_c = _elementwise_blocks(e.device, C, HW)
    tiles = triton.cdiv(HW, block_m)
    ws = torch.empty((2, N * tiles, C), device=e.device, dtype=torch.float32)
    _output_sums_kernel[(N * tiles, triton.cdiv(C, block_c))](
        dout, e, mean_e, ws, *strides4(dout), *strides4(e), C, HW, W, tiles, N * tiles,
        BLOCK_M=block_m, BLOCK_C=block_c,
    )
    sums = ws.view(2, N, tiles, C).sum(dim=2)
    return sums[0], sums[1]


def _backward_data(x, y, coefs, weight, z, zscale, zshift, zmean, oscale, kx, kc, residual, apply):
    """Launches _backward_data_kernel: out (apply) or the (sum g, sum g * (z - zmean)) partials."""
    N, _, H, W = z.shape
    K, NOUT = weight.shape
    M, HW, _ = _geometry(z)
    block_m, block_n, block_k = _gemm_blocks(z.device, K, NOUT)
    slots = triton.cdiv(M, block_m)
    out = torch.empty_like(z) if apply else None
    ws = None if apply else torch.empty((2, slots, NOUT), device=z.device, dtype=torch.float32)
    dummy = zmean
    res = residual if residual is not None else z
    _backward_data_kernel[(slots, triton.cdiv(NOUT, block_n))](
        x, y, coefs.p, coefs.q, coefs.center, coefs.r, weight, z,
        dummy if zscale is None else zscale, dummy if zshift is None else zshift, zmean,
        dummy if oscale is None else oscale, dummy if kx is None else kx, dummy if kc is None else kc,
        res, z if out is None else out, dummy if ws is None else ws,
        *strides4(x), *strides4(y), *strides4(z), *strides4(res), *strides4(z if out is None else out),
        M, K, NOUT, HW, W, slots,
        PER_SAMPLE=coefs.p.shape[0] > 1 or coefs.r.shape[0] > 1, SWISH_GRAD=zscale is not None, APPLY=apply,
        HAS_RES=residual is not None, DOT_DTYPE=dot_dtype(z), DOT_PRECISION=dot_precision(z),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        num_stages=gemm_stages(z, (block_m + block_n) * block_k * z.element_size()),
    )
    return out if apply else ws


def conv2_backward_reduce(dout, e, coefs, c, scale, shift, mean_c, weight):
    """(sum g2, sum g2 * (c - mean_c)), fp32 (EC,), with g2 = (de @ weight) * swish'(c * scale + shift)
    and de = lincomb(dout, e) (``coefs``); weight (Cout, EC) fp32."""
    ws = _backward_data(dout, e, coefs, weight, c, scale, shift, mean_c, None, None, None, None, apply=False)
    sum_g, sum_gxmu = (s.clone() for s in finalize_sums(ws))
    return sum_g, sum_gxmu


def conv2_backward_apply(dout, e, coefs, c, scale, shift, mean_c, weight, coef_xmu, coef_const):
    """dc = scale * g2 + coef_xmu * (c - mean_c) + coef_const (BN2 + Swish backward), c's dtype and layout."""
    return _backward_data(dout, e, coefs, weight, c, scale, shift, mean_c, scale, coef_xmu, coef_const, None,
                          apply=True)


def conv1_backward_data(g, a, coefs, weight, x, coef_xmu, mean_x, coef_const, residual=None):
    """dx = (da @ weight) + coef_xmu * (x - mean_x) + coef_const (+ residual), da = lincomb(g, a);
    weight (EC, Cin) fp32 with BN0's scale folded in; x's dtype and layout."""
    return _backward_data(g, a, coefs, weight, x, None, None, mean_x, torch.ones_like(mean_x), coef_xmu,
                          coef_const, residual, apply=True)


def _weight_grad(x, y, coefs, z, zscale, zshift, swish_b):
    N, K1, H, W = x.shape
    K2 = z.shape[1]
    M, HW, _ = _geometry(x)
    block_m, block_k2, block_k1 = _gemm_blocks(x.device, K1, K2)
    block_k1 = min(block_k1, 64)
    grid_k = (triton.cdiv(K1, block_k1), triton.cdiv(K2, block_k2))
    chunks = max(1, min(triton.cdiv(M, block_m), reduction_programs(x.device, grid_k[0] * grid_k[1])))
    rows_per_prog = triton.cdiv(triton.cdiv(M, chunks), block_m) * block_m
    chunks = triton.cdiv(M, rows_per_prog)
    ws = torch.empty((1, chunks, K1 * K2), device=x.device, dtype=torch.float32)
    wsum = torch.empty((1, chunks, K1), device=x.device, dtype=torch.float32)
    _weight_grad_kernel[(*grid_k, chunks)](
        x, y, coefs.p, coefs.q, coefs.center, coefs.r, z, zscale, zshift, ws, wsum,
        *strides4(x), *strides4(y), *strides4(z), M, K1, K2, HW, W, rows_per_prog,
        PER_SAMPLE=coefs.p.shape[0] > 1 or coefs.r.shape[0] > 1, B_SWISH=swish_b,
        DOT_DTYPE=dot_dtype(z), DOT_PRECISION=dot_precision(z), BLOCK_M=block_m, BLOCK_K1=block_k1,
        BLOCK_K2=block_k2, num_stages=gemm_stages(z, block_m * (block_k1 + block_k2) * z.element_size()),
    )
    return finalize_sums(ws).view(K1, K2), finalize_sums(wsum).view(K1)


def conv2_weight_grad(dout, e, coefs, c, scale, shift):
    """dW2 (Cout, EC) fp32 = de^T @ swish(c * scale + shift), de = lincomb(dout, e)."""
    grad, _ = _weight_grad(dout, e, coefs, c, scale, shift, swish_b=True)
    return grad


def conv1_weight_grad(g, a, coefs, x, mean_x, invstd_x):
    """(da^T @ xhat (EC, Cin), sum of da over rows (EC,)), fp32; da = lincomb(g, a), xhat = (x - mean) * invstd."""
    return _weight_grad(g, a, coefs, x, invstd_x, -mean_x * invstd_x, swish_b=False)
