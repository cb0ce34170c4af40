"""Triton kernels of BatchNorm + Swish (contract: nvae_fast/ops/bn_swish.py).

A 4-D activation (N, C, H, W) with arbitrary strides is seen as a matrix [M = N*H*W, C]; each
program covers a [BLOCK_M, BLOCK_C] tile, so NCHW, channels-last and strided views need no copy.
Reductions write one fp32 partial per (row chunk, channel) and a finalize kernel merges them in a
fixed order: deterministic, no atomics. Launchers take and return torch tensors; they assume the
op layer already validated shapes, devices and dtypes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nvae_fast.kernels.triton.common import finalize_stats, finalize_sums, row_offsets, swish_grad


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
def _forward_kernel(
    x_ptr, y_ptr, scale_ptr, shift_ptr, M, C, HW, W,
    sx_n, sx_c, sx_h, sx_w, sy_n, sy_c, sy_h, sy_w,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """y = swish(x * scale[c] + shift[c])."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    mask = (rows < M)[:, None] & col_ok[None, :]
    cols64 = cols[None, :].to(tl.int64)
    x_offs = row_offsets(rows, HW, W, sx_n, sx_h, sx_w)[:, None] + cols64 * sx_c
    y_offs = row_offsets(rows, HW, W, sy_n, sy_h, sy_w)[:, None] + cols64 * sy_c
    scale = tl.load(scale_ptr + cols, mask=col_ok, other=0.0)
    shift = tl.load(shift_ptr + cols, mask=col_ok, other=0.0)
    x = tl.load(x_ptr + x_offs, mask=mask, other=0.0).to(tl.float32)
    z = x * scale[None, :] + shift[None, :]
    tl.store(y_ptr + y_offs, (z * tl.sigmoid(z)).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _backward_reduce_kernel(
    dy_ptr, x_ptr, scale_ptr, shift_ptr, mean_ptr, ws_ptr, M, C, HW, W,
    sx_n, sx_c, sx_h, sx_w, sd_n, sd_c, sd_h, sd_w, rows_per_prog, num_chunks,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """ws[0|1, chunk, c] = sum g, sum g * (x - mean) with g = dy * swish'(x * scale + shift)."""
    chunk = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    cols64 = cols[None, :].to(tl.int64)
    scale = tl.load(scale_ptr + cols, mask=col_ok, other=0.0)[None, :]
    shift = tl.load(shift_ptr + cols, mask=col_ok, other=0.0)[None, :]
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
def _backward_apply_kernel(
    dy_ptr, x_ptr, dx_ptr, scale_ptr, shift_ptr, mean_ptr, kxmu_ptr, kconst_ptr, M, C, HW, W,
    sx_n, sx_c, sx_h, sx_w, sd_n, sd_c, sd_h, sd_w, so_n, so_c, so_h, so_w,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """dx = scale * g + kxmu * (x - mean) + kconst with g = dy * swish'(x * scale + shift)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    mask = (rows < M)[:, None] & col_ok[None, :]
    cols64 = cols[None, :].to(tl.int64)
    scale = tl.load(scale_ptr + cols, mask=col_ok, other=0.0)[None, :]
    shift = tl.load(shift_ptr + cols, mask=col_ok, other=0.0)[None, :]
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


def bn_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance of x (N, C, H, W), fp32 tensors of shape (C,)."""
    M, C, HW, W = _geometry(x)
    block_m, block_c = _tile(x)
    rows_per_prog, chunks = _chunks(x, block_m, block_c)
    ws = torch.empty((3, chunks, C), device=x.device, dtype=torch.float32)
    _stats_partial_kernel[(chunks, triton.cdiv(C, block_c))](
        x, ws, M, C, HW, W, x.stride(0), x.stride(1), x.stride(2), x.stride(3), rows_per_prog, chunks,
        BLOCK_M=block_m, BLOCK_C=block_c,
    )
    return finalize_stats(ws)


def bn_swish_forward(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out = swish(x * scale[c] + shift[c]); out may have any strides."""
    M, C, HW, W = _geometry(x)
    block_m, block_c = _tile(x)
    grid = (triton.cdiv(M, block_m), triton.cdiv(C, block_c))
    _forward_kernel[grid](x, out, scale, shift, M, C, HW, W, *_strides(x), *_strides(out),
                          BLOCK_M=block_m, BLOCK_C=block_c)
    return out


def bn_swish_backward_reduce(
    dy: torch.Tensor, x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, mean: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum g, sum g * (x - mean)) per channel, fp32 (C,), with g = dy * swish'(x * scale + shift)."""
    M, C, HW, W = _geometry(x)
    block_m, block_c = _tile(x)
    rows_per_prog, chunks = _chunks(x, block_m, block_c)
    ws = torch.empty((2, chunks, C), device=x.device, dtype=torch.float32)
    _backward_reduce_kernel[(chunks, triton.cdiv(C, block_c))](
        dy, x, scale, shift, mean, ws, M, C, HW, W, *_strides(x), *_strides(dy), rows_per_prog, chunks,
        BLOCK_M=block_m, BLOCK_C=block_c,
    )
    sum_g, sum_gxmu = finalize_sums(ws)
    return sum_g, sum_gxmu


def bn_swish_backward_apply(
    dy: torch.Tensor, x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, mean: torch.Tensor,
    coef_xmu: torch.Tensor, coef_const: torch.Tensor, out: torch.Tensor,
) -> torch.Tensor:
    """out = scale * g + coef_xmu * (x - mean) + coef_const; out may have any strides."""
    M, C, HW, W = _geometry(x)
    block_m, block_c = _tile(x)
    grid = (triton.cdiv(M, block_m), triton.cdiv(C, block_c))
    _backward_apply_kernel[grid](
        dy, x, out, scale, shift, mean, coef_xmu, coef_const, M, C, HW, W,
        *_strides(x), *_strides(dy), *_strides(out), BLOCK_M=block_m, BLOCK_C=block_c,
    )
    return out
