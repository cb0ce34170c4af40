"""Triton kernels of BatchNorm + Swish (contract: nvae_fast/ops/bn_swish.py).

A 4-D activation (N, C, H, W) with arbitrary strides is seen as a matrix [M = N*H*W, C]; each
program covers a [BLOCK_M, BLOCK_C] tile, so NCHW, channels-last and strided views need no copy.
Reductions write one fp32 partial per (row chunk, channel) and a finalize kernel merges them in a
fixed order: deterministic, no atomics. Launchers take and return torch tensors; they assume the
op layer already validated shapes, devices and dtypes.

Besides the four kernels of the basic contract, the fused entry points do a training step's
per-channel work inside the kernels (three launches forward, three backward): the statistics'
finalize kernel also computes invstd and updates the running statistics, the elementwise kernels
fold ``weight, bias, mean, invstd`` into the affine in their prologue, and the backward's finalize
kernel produces the parameter gradients and the input-gradient coefficients.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nvae_fast.kernels.triton.common import (finalize_stats, finalize_sums, merge_welford_slots, row_offsets,
                                             swish_grad)


@triton.jit
def _stats_partial_kernel(
    x_ptr, ws_ptr, M, C, HW, W, s_n, s_c, s_h, s_w, rows_per_prog, num_chunks,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """ws[0|1|2, chunk, c] = count, mean, M2 of x over this program's rows (Chan-merged tiles)."""
    chunk = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    row_start = chunk * rows_per_prog
    row_end = tl.minimum(row_start + rows_per_prog, M)
    count = tl.zeros([BLOCK_C], dtype=tl.float32)
    mean = tl.zeros([BLOCK_C], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_C], dtype=tl.float32)
    for r0 in range(row_start, row_end, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        row_ok = rows < row_end
        mask = row_ok[:, None] & col_ok[None, :]
        offs = row_offsets(rows, HW, W, s_n, s_h, s_w)[:, None] + cols[None, :].to(tl.int64) * s_c
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tile_n = tl.sum(row_ok.to(tl.float32), axis=0)
        tile_mean = tl.sum(x, axis=0) / tile_n
        dev = tl.where(mask, x - tile_mean[None, :], 0.0)
        tile_m2 = tl.sum(dev * dev, axis=0)
        total = count + tile_n
        delta = tile_mean - mean
        w_tile = tile_n / total
        mean += delta * w_tile
        m2 += tile_m2 + delta * delta * count * w_tile
        count = total
    base = ws_ptr + chunk * C + cols
    tl.store(base, count, mask=col_ok)
    tl.store(base + num_chunks * C, mean, mask=col_ok)
    tl.store(base + 2 * num_chunks * C, m2, mask=col_ok)


@triton.jit
def _stats_finalize_kernel(ws_ptr, mean_ptr, invstd_ptr, rmean_ptr, rvar_ptr, C, num_slots, momentum, eps,
                           HAS_RUNNING: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """Merges the Welford partials in slot order; writes mean and invstd and moves the running
    statistics towards the batch's (unbiased variance), as torch.nn.BatchNorm2d does."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    count, mean, m2 = merge_welford_slots(ws_ptr, num_slots, C, 0, num_slots, cols, col_ok, BLOCK_P)
    var = m2 / tl.maximum(count, 1.0)
    tl.store(mean_ptr + cols, mean, mask=col_ok)
    tl.store(invstd_ptr + cols, 1.0 / tl.sqrt(var + eps), mask=col_ok)
    if HAS_RUNNING:
        r_mean = tl.load(rmean_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        r_var = tl.load(rvar_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        unbiased = m2 / tl.maximum(count - 1.0, 1.0)
        tl.store(rmean_ptr + cols, (r_mean + momentum * (mean - r_mean)).to(rmean_ptr.dtype.element_ty), mask=col_ok)
        tl.store(rvar_ptr + cols, (r_var + momentum * (unbiased - r_var)).to(rvar_ptr.dtype.element_ty), mask=col_ok)


@triton.jit
def _affine(a_ptr, b_ptr, mean_ptr, invstd_ptr, cols, col_ok, FOLDED: tl.constexpr):
    """(scale, shift) per column: loaded as they are (FOLDED), or folded from BatchNorm's
    (weight a, bias b, mean, invstd): scale = a * invstd, shift = b - mean * scale."""
    a = tl.load(a_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    if FOLDED:
        return a, b
    mean = tl.load(mean_ptr + cols, mask=col_ok, other=0.0)
    scale = a * tl.load(invstd_ptr + cols, mask=col_ok, other=0.0)
    return scale, b - mean * scale


@triton.jit
def _forward_kernel(
    x_ptr, y_ptr, a_ptr, b_ptr, mean_ptr, invstd_ptr, M, C, HW, W,
    sx_n, sx_c, sx_h, sx_w, sy_n, sy_c, sy_h, sy_w,
    FOLDED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """y = swish(x * scale[c] + shift[c])."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    mask = (rows < M)[:, None] & col_ok[None, :]
    cols64 = cols[None, :].to(tl.int64)
    x_offs = row_offsets(rows, HW, W, sx_n, sx_h, sx_w)[:, None] + cols64 * sx_c
    y_offs = row_offsets(rows, HW, W, sy_n, sy_h, sy_w)[:, None] + cols64 * sy_c
    scale, shift = _affine(a_ptr, b_ptr, mean_ptr, invstd_ptr, cols, col_ok, FOLDED)
    x = tl.load(x_ptr + x_offs, mask=mask, other=0.0).to(tl.float32)
    z = x * scale[None, :] + shift[None, :]
    tl.store(y_ptr + y_offs, (z * tl.sigmoid(z)).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _backward_reduce_kernel(
    dy_ptr, x_ptr, a_ptr, b_ptr, mean_ptr, invstd_ptr, ws_ptr, M, C, HW, W,
    sx_n, sx_c, sx_h, sx_w, sd_n, sd_c, sd_h, sd_w, rows_per_prog, num_chunks,
    FOLDED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """ws[0|1, chunk, c] = sum g, sum g * (x - mean) with g = dy * swish'(x * scale + shift)."""
    chunk = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    cols64 = cols[None, :].to(tl.int64)
    scale, shift = _affine(a_ptr, b_ptr, mean_ptr, invstd_ptr, cols, col_ok, FOLDED)
    scale, shift = scale[None, :], shift[None, :]
    mean = tl.load(mean_ptr + cols, mask=col_ok, other=0.0)[None, :]
    row_start = chunk * rows_per_prog
    row_end = tl.minimum(row_start + rows_per_prog, M)
    sum_g = tl.zeros([BLOCK_C], dtype=tl.float32)
    sum_gxmu = tl.zeros([BLOCK_C], dtype=tl.float32)
    for r0 in range(row_start, row_end, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        mask = (rows < row_end)[:, None] & col_ok[None, :]
        x = tl.load(x_ptr + row_offsets(rows, HW, W, sx_n, sx_h, sx_w)[:, None] + cols64 * sx_c,
                    mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + row_offsets(rows, HW, W, sd_n, sd_h, sd_w)[:, None] + cols64 * sd_c,
                     mask=mask, other=0.0).to(tl.float32)
        g = dy * swish_grad(x * scale + shift)
        sum_g += tl.sum(g, axis=0)
        sum_gxmu += tl.sum(g * (x - mean), axis=0)
    base = ws_ptr + chunk * C + cols
    tl.store(base, sum_g, mask=col_ok)
    tl.store(base + num_chunks * C, sum_gxmu, mask=col_ok)


@triton.jit
def _backward_finalize_kernel(ws_ptr, weight_ptr, invstd_ptr, coef_ptr, dweight_ptr, dbias_ptr, C, num_slots, count,
                              TRAINING: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """Sums the partials in slot order; writes dweight = sum g (x - mean) * invstd, dbias = sum g
    and coef[0|1] = (coef_xmu, coef_const) of dx = scale g + coef_xmu (x - mean) + coef_const:
    in training -scale invstd^2 mean(g (x - mean)) and -scale mean(g), in eval zeros."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    sum_g = tl.zeros([BLOCK_C], dtype=tl.float32)
    sum_gxmu = tl.zeros([BLOCK_C], dtype=tl.float32)
    for p0 in range(0, num_slots, BLOCK_P):
        slots = p0 + tl.arange(0, BLOCK_P)
        mask = (slots < num_slots)[:, None] & col_ok[None, :]
        offs = slots[:, None].to(tl.int64) * C + cols[None, :]
        sum_g += tl.sum(tl.load(ws_ptr + offs, mask=mask, other=0.0), axis=0)
        sum_gxmu += tl.sum(tl.load(ws_ptr + num_slots * C + offs, mask=mask, other=0.0), axis=0)
    invstd = tl.load(invstd_ptr + cols, mask=col_ok, other=0.0)
    tl.store(dweight_ptr + cols, (sum_gxmu * invstd).to(dweight_ptr.dtype.element_ty), mask=col_ok)
    tl.store(dbias_ptr + cols, sum_g.to(dbias_ptr.dtype.element_ty), mask=col_ok)
    if TRAINING:
        scale = tl.load(weight_ptr + cols, mask=col_ok, other=0.0).to(tl.float32) * invstd
        coef_xmu = -scale * invstd * invstd * (sum_gxmu / count)
        coef_const = -scale * (sum_g / count)
    else:
        coef_xmu = tl.zeros([BLOCK_C], dtype=tl.float32)
        coef_const = tl.zeros([BLOCK_C], dtype=tl.float32)
    tl.store(coef_ptr + cols, coef_xmu, mask=col_ok)
    tl.store(coef_ptr + C + cols, coef_const, mask=col_ok)


@triton.jit
def _backward_apply_kernel(
    dy_ptr, x_ptr, dx_ptr, a_ptr, b_ptr, mean_ptr, invstd_ptr, kxmu_ptr, kconst_ptr, M, C, HW, W,
    sx_n, sx_c, sx_h, sx_w, sd_n, sd_c, sd_h, sd_w, so_n, so_c, so_h, so_w,
    FOLDED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """dx = scale * g + kxmu * (x - mean) + kconst with g = dy * swish'(x * scale + shift)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    mask = (rows < M)[:, None] & col_ok[None, :]
    cols64 = cols[None, :].to(tl.int64)
    scale, shift = _affine(a_ptr, b_ptr, mean_ptr, invstd_ptr, cols, col_ok, FOLDED)
    scale, shift = scale[None, :], shift[None, :]
    mean = tl.load(mean_ptr + cols, mask=col_ok, other=0.0)[None, :]
    kxmu = tl.load(kxmu_ptr + cols, mask=col_ok, other=0.0)[None, :]
    kconst = tl.load(kconst_ptr + cols, mask=col_ok, other=0.0)[None, :]
    x = tl.load(x_ptr + row_offsets(rows, HW, W, sx_n, sx_h, sx_w)[:, None] + cols64 * sx_c,
                mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + row_offsets(rows, HW, W, sd_n, sd_h, sd_w)[:, None] + cols64 * sd_c,
                 mask=mask, other=0.0).to(tl.float32)
    g = dy * swish_grad(x * scale + shift)
    dx = scale * g + kxmu * (x - mean) + kconst
    out_offs = row_offsets(rows, HW, W, so_n, so_h, so_w)[:, None] + cols64 * so_c
    tl.store(dx_ptr + out_offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


def _tile(x: torch.Tensor) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_C): wide along channels when they are contiguous, along rows otherwise."""
    C = x.shape[1]
    if x.stride(1) == 1 and C > 1:
        block_c = min(triton.next_power_of_2(C), 64)
        return max(16, 4096 // block_c), block_c
    return 256, min(triton.next_power_of_2(C), 8)


def _chunks(x: torch.Tensor, block_m: int, block_c: int) -> tuple[int, int]:
    """(rows per reduction program, number of row chunks): about four programs per SM in all."""
    N, C, H, W = x.shape
    M = N * H * W
    if x.is_cuda:
        target = 4 * torch.cuda.get_device_properties(x.device).multi_processor_count
    else:  # the interpreter runs programs one after another: few, large ones are fastest
        target = 4
    chunks = max(1, min(triton.cdiv(M, block_m), target // triton.cdiv(C, block_c)))
    rows_per_prog = triton.cdiv(triton.cdiv(M, chunks), block_m) * block_m
    return rows_per_prog, triton.cdiv(M, rows_per_prog)


def _geometry(x: torch.Tensor) -> tuple[int, int, int, int]:
    N, C, H, W = x.shape
    return N * H * W, C, H * W, W


def _strides(t: torch.Tensor) -> tuple[int, int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2), t.stride(3)


def _finalize_grid(C: int) -> tuple[tuple[int], int]:
    block_c = min(triton.next_power_of_2(C), 128)
    return (triton.cdiv(C, block_c),), block_c


def _stats_partials(x: torch.Tensor) -> torch.Tensor:
    M, C, HW, W = _geometry(x)
    block_m, block_c = _tile(x)
    rows_per_prog, chunks = _chunks(x, block_m, block_c)
    ws = torch.empty((3, chunks, C), device=x.device, dtype=torch.float32)
    _stats_partial_kernel[(chunks, triton.cdiv(C, block_c))](
        x, ws, M, C, HW, W, *_strides(x), rows_per_prog, chunks, BLOCK_M=block_m, BLOCK_C=block_c,
    )
    return ws


def _forward(x, a, b, mean, invstd, out, folded: bool) -> torch.Tensor:
    M, C, HW, W = _geometry(x)
    block_m, block_c = _tile(x)
    grid = (triton.cdiv(M, block_m), triton.cdiv(C, block_c))
    _forward_kernel[grid](x, out, a, b, mean, invstd, M, C, HW, W, *_strides(x), *_strides(out),
                          FOLDED=folded, BLOCK_M=block_m, BLOCK_C=block_c)
    return out


def _reduce_partials(dy, x, a, b, mean, invstd, folded: bool) -> torch.Tensor:
    M, C, HW, W = _geometry(x)
    block_m, block_c = _tile(x)
    rows_per_prog, chunks = _chunks(x, block_m, block_c)
    ws = torch.empty((2, chunks, C), device=x.device, dtype=torch.float32)
    _backward_reduce_kernel[(chunks, triton.cdiv(C, block_c))](
        dy, x, a, b, mean, invstd, ws, M, C, HW, W, *_strides(x), *_strides(dy), rows_per_prog, chunks,
        FOLDED=folded, BLOCK_M=block_m, BLOCK_C=block_c,
    )
    return ws


def _apply(dy, x, a, b, mean, invstd, coef_xmu, coef_const, out, folded: bool) -> torch.Tensor:
    M, C, HW, W = _geometry(x)
    block_m, block_c = _tile(x)
    grid = (triton.cdiv(M, block_m), triton.cdiv(C, block_c))
    _backward_apply_kernel[grid](
        dy, x, out, a, b, mean, invstd, coef_xmu, coef_const, M, C, HW, W,
        *_strides(x), *_strides(dy), *_strides(out), FOLDED=folded, BLOCK_M=block_m, BLOCK_C=block_c,
    )
    return out


# ---------------------------------------------------------------------------------------------
# The basic contract (per-channel work in the op layer; used across ranks)
# ---------------------------------------------------------------------------------------------

def bn_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance of x (N, C, H, W), fp32 tensors of shape (C,)."""
    return finalize_stats(_stats_partials(x))


def bn_swish_forward(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out = swish(x * scale[c] + shift[c]); out may have any strides."""
    return _forward(x, scale, shift, scale, scale, out, folded=True)


def bn_swish_backward_reduce(
    dy: torch.Tensor, x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, mean: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum g, sum g * (x - mean)) per channel, fp32 (C,), with g = dy * swish'(x * scale + shift)."""
    sum_g, sum_gxmu = finalize_sums(_reduce_partials(dy, x, scale, shift, mean, scale, folded=True))
    return sum_g, sum_gxmu


def bn_swish_backward_apply(
    dy: torch.Tensor, x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, mean: torch.Tensor,
    coef_xmu: torch.Tensor, coef_const: torch.Tensor, out: torch.Tensor,
) -> torch.Tensor:
    """out = scale * g + coef_xmu * (x - mean) + coef_const; out may have any strides."""
    return _apply(dy, x, scale, shift, mean, scale, coef_xmu, coef_const, out, folded=True)


# ---------------------------------------------------------------------------------------------
# Fused entry points (a single process's training and eval)
# ---------------------------------------------------------------------------------------------

def bn_stats_update(x: torch.Tensor, running_mean: torch.Tensor | None, running_var: torch.Tensor | None,
                    momentum: float, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(batch mean, invstd) fp32 (C,); the running statistics (when given) move towards the
    batch's in the same launch. Two launches."""
    ws = _stats_partials(x)
    C = x.shape[1]
    mean = torch.empty(C, device=x.device, dtype=torch.float32)
    invstd = torch.empty_like(mean)
    has_running = running_mean is not None and running_var is not None
    grid, block_c = _finalize_grid(C)
    _stats_finalize_kernel[grid](ws, mean, invstd, running_mean if has_running else mean,
                                 running_var if has_running else mean, C, ws.shape[1], momentum, eps,
                                 HAS_RUNNING=has_running, BLOCK_P=32, BLOCK_C=block_c)
    return mean, invstd


def bn_swish_affine_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, mean: torch.Tensor,
                            invstd: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out = swish((x - mean) * invstd * weight + bias). One launch."""
    return _forward(x, weight, bias, mean, invstd, out, folded=False)


def bn_swish_affine_backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                             mean: torch.Tensor, invstd: torch.Tensor, training: bool
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dweight, dbias) of :func:`bn_swish_affine_forward`; in training mean and invstd are
    x's batch statistics (their dependence on x enters dx). Three launches."""
    ws = _reduce_partials(dy, x, weight, bias, mean, invstd, folded=False)
    C = x.shape[1]
    coef = torch.empty((2, C), device=x.device, dtype=torch.float32)
    dweight, dbias = torch.empty_like(weight), torch.empty_like(bias)
    grid, block_c = _finalize_grid(C)
    _backward_finalize_kernel[grid](ws, weight, invstd, coef, dweight, dbias, C, ws.shape[1],
                                    float(x.numel() // C), TRAINING=training, BLOCK_P=32, BLOCK_C=block_c)
    dx = _apply(dy, x, weight, bias, mean, invstd, coef[0], coef[1], torch.empty_like(x), folded=False)
    return dx, dweight, dbias
