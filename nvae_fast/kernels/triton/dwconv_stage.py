"""Triton kernels of the depthwise stage of the fused cell (contract: nvae_fast/ops/dwconv_stage.py).

Layout: a program covers a tile of pixels of one image times a block of channels; channels-last
tensors make every tap a coalesced [pixels, channels] load, but any strides are accepted.
``b = swish(a * scale + shift)`` is recomputed at every tap from ``a`` (never stored), with zero
padding applied to b (not a) at the image borders. With ``UPSAMPLE`` the conv runs on the nearest
2x-upsampled b: conv-grid pixel (y, x) reads a at (y // 2, x // 2).

* forward: c tile = sum over taps of w * b(shifted); epilogue: Welford partials of c (fp32).
* backward data: a program covers pixels of a; for each (upsample sub-pixel and) tap it gathers
  the output pixel that read it (transposed conv), then ``g = db * swish'(z)``; epilogue: partial
  sums of g and g * (a - mean_a).
* backward weight: one program per (pixel chunk, channel block, tap) sums dc * b(shifted); the
  chunk partials are merged in order (deterministic).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nvae_fast.ops.dwconv_stage import output_size
from nvae_fast.kernels.triton.common import (
    finalize_stats, finalize_sums, reduction_programs, store_welford, strides4, swish, swish_grad, welford_tile,
)


@triton.jit
def _tap(start, k, size, UPSAMPLE: tl.constexpr):
    """(index into a along one axis, in bounds) of conv-grid coordinate ``start + k`` on an axis of
    ``size`` (twice a's with UPSAMPLE). Out-of-bounds coordinates are clamped to 0, so that no
    negative number is divided (Triton and the interpreter round those differently)."""
    u = start + k
    ok = (u >= 0) & (u < size)
    u = tl.where(ok, u, 0)
    if UPSAMPLE:
        u = u // 2
    return u, ok


@triton.jit
def _forward_kernel(
    a_ptr, w_ptr, scale_ptr, shift_ptr, c_ptr, ws_ptr,
    sa_n, sa_c, sa_h, sa_w, sc_n, sc_c, sc_h, sc_w,
    C, Hc, Wc, Ho, Wo, tiles_per_img, num_slots,
    K: tl.constexpr, STRIDE: tl.constexpr, UPSAMPLE: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    n = pid // tiles_per_img
    pix = ((pid - n * tiles_per_img) * BLOCK_P + tl.arange(0, BLOCK_P)).to(tl.int64)
    pix_ok = pix < Ho * Wo
    oy = pix // Wo
    ox = pix - oy * Wo
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    cols64 = cols.to(tl.int64)
    scale = tl.load(scale_ptr + cols, mask=col_ok, other=0.0)[None, :]
    shift = tl.load(shift_ptr + cols, mask=col_ok, other=0.0)[None, :]
    a_base = a_ptr + n.to(tl.int64) * sa_n + cols64[None, :] * sa_c
    w_base = w_ptr + cols * (K * K)
    y0 = oy * STRIDE - K // 2
    x0 = ox * STRIDE - K // 2
    acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    for kh in range(K):   # rows in a loop, columns unrolled: code size K, not K * K (k = 11 compiles fast)
        iy, y_ok = _tap(y0, kh, Hc, UPSAMPLE)
        y_ok = y_ok & pix_ok
        y_off = iy * sa_h
        for kw in tl.static_range(K):
            ix, x_ok = _tap(x0, kw, Wc, UPSAMPLE)
            mask = (y_ok & x_ok)[:, None] & col_ok[None, :]
            a = tl.load(a_base + (y_off + ix * sa_w)[:, None], mask=mask, other=0.0).to(tl.float32)
            b = tl.where(mask, swish(a * scale + shift), 0.0)
            w = tl.load(w_base + (kh * K + kw), mask=col_ok, other=0.0).to(tl.float32)
            acc += b * w[None, :]
    out_mask = pix_ok[:, None] & col_ok[None, :]
    c_offs = n.to(tl.int64) * sc_n + (oy * sc_h + ox * sc_w)[:, None] + cols64[None, :] * sc_c
    tl.store(c_ptr + c_offs, acc.to(c_ptr.dtype.element_ty), mask=out_mask)
    count, mean, m2 = welford_tile(acc, out_mask)
    store_welford(ws_ptr, pid, num_slots, cols, C, count, mean, m2)


@triton.jit
def _transposed_tap(start, k, size, STRIDE: tl.constexpr):
    """(output index, valid) of the output pixel that read conv-grid coordinate ``start - k + PAD``
    (``start`` includes PAD): ``o * STRIDE + k - PAD = u``."""
    t = start - k
    ok = t >= 0
    t = tl.where(ok, t, 0)
    if STRIDE > 1:
        ok = ok & (t % STRIDE == 0)
        t = t // STRIDE
    return t, ok & (t < size)


@triton.jit
def _backward_data_kernel(
    dc_ptr, a_ptr, w_ptr, scale_ptr, shift_ptr, mean_ptr, g_ptr, ws_ptr,
    sd_n, sd_c, sd_h, sd_w, sa_n, sa_c, sa_h, sa_w, sg_n, sg_c, sg_h, sg_w,
    C, H, W, Ho, Wo, tiles_per_img, num_slots,
    K: tl.constexpr, STRIDE: tl.constexpr, UP: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """UP = 2 for the up-cell (each pixel of a feeds 2x2 conv-grid pixels), else 1."""
    pid = tl.program_id(0)
    n = pid // tiles_per_img
    pix = ((pid - n * tiles_per_img) * BLOCK_P + tl.arange(0, BLOCK_P)).to(tl.int64)
    pix_ok = pix < H * W
    iy = pix // W
    ix = pix - iy * W
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    cols64 = cols.to(tl.int64)
    dc_base = dc_ptr + n.to(tl.int64) * sd_n + cols64[None, :] * sd_c
    w_base = w_ptr + cols * (K * K)
    db = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    for sy in tl.static_range(UP):       # the 2x2 conv-grid pixels that share one pixel of a
        for sx in tl.static_range(UP):
            y0 = iy * UP + sy + K // 2
            x0 = ix * UP + sx + K // 2
            for kh in range(K):   # rows in a loop, columns unrolled, as in the forward
                oy, y_ok = _transposed_tap(y0, kh, Ho, STRIDE)
                y_ok = y_ok & pix_ok
                y_off = oy * sd_h
                for kw in tl.static_range(K):
                    ox, x_ok = _transposed_tap(x0, kw, Wo, STRIDE)
                    mask = (y_ok & x_ok)[:, None] & col_ok[None, :]
                    dc = tl.load(dc_base + (y_off + ox * sd_w)[:, None], mask=mask, other=0.0).to(tl.float32)
                    w = tl.load(w_base + (kh * K + kw), mask=col_ok, other=0.0).to(tl.float32)
                    db += dc * w[None, :]
    mask = pix_ok[:, None] & col_ok[None, :]
    a = tl.load(a_ptr + n.to(tl.int64) * sa_n + (iy * sa_h + ix * sa_w)[:, None] + cols64[None, :] * sa_c,
                mask=mask, other=0.0).to(tl.float32)
    scale = tl.load(scale_ptr + cols, mask=col_ok, other=0.0)[None, :]
    shift = tl.load(shift_ptr + cols, mask=col_ok, other=0.0)[None, :]
    mean = tl.load(mean_ptr + cols, mask=col_ok, other=0.0)[None, :]
    g = tl.where(mask, db * swish_grad(a * scale + shift), 0.0)
    g_offs = n.to(tl.int64) * sg_n + (iy * sg_h + ix * sg_w)[:, None] + cols64[None, :] * sg_c
    tl.store(g_ptr + g_offs, g.to(g_ptr.dtype.element_ty), mask=mask)
    base = ws_ptr + pid.to(tl.int64) * C + cols
    tl.store(base, tl.sum(g, axis=0), mask=col_ok)
    tl.store(base + num_slots * C, tl.sum(g * (a - mean), axis=0), mask=col_ok)


@triton.jit
def _backward_weight_kernel(
    dc_ptr, a_ptr, scale_ptr, shift_ptr, ws_ptr,
    sd_n, sd_c, sd_h, sd_w, sa_n, sa_c, sa_h, sa_w,
    C, Hc, Wc, Ho, Wo, rows_total, rows_per_prog, num_chunks,
    K: tl.constexpr, STRIDE: tl.constexpr, UPSAMPLE: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """ws[tap, chunk, c] = sum over this chunk's output pixels of dc * b at the tap's input pixel."""
    chunk = tl.program_id(0)
    tap = tl.program_id(2)
    kh = tap // K
    kw = tap - kh * K
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    cols64 = cols.to(tl.int64)
    scale = tl.load(scale_ptr + cols, mask=col_ok, other=0.0)[None, :]
    shift = tl.load(shift_ptr + cols, mask=col_ok, other=0.0)[None, :]
    row_start = chunk.to(tl.int64) * rows_per_prog
    row_end = tl.minimum(row_start + rows_per_prog, rows_total)
    acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    HWo = Ho * Wo
    for r0 in range(row_start, row_end, BLOCK_P):
        rows = r0 + tl.arange(0, BLOCK_P)
        row_ok = rows < row_end
        n = rows // HWo
        pix = rows - n * HWo
        oy = pix // Wo
        ox = pix - oy * Wo
        dc = tl.load(dc_ptr + (n * sd_n + oy * sd_h + ox * sd_w)[:, None] + cols64[None, :] * sd_c,
                     mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        iy, y_ok = _tap(oy * STRIDE - K // 2, kh, Hc, UPSAMPLE)
        ix, x_ok = _tap(ox * STRIDE - K // 2, kw, Wc, UPSAMPLE)
        mask = (row_ok & y_ok & x_ok)[:, None] & col_ok[None, :]
        a = tl.load(a_ptr + (n * sa_n + iy * sa_h + ix * sa_w)[:, None] + cols64[None, :] * sa_c,
                    mask=mask, other=0.0).to(tl.float32)
        b = tl.where(mask, swish(a * scale + shift), 0.0)
        acc += tl.sum(dc * b, axis=0)
    tl.store(ws_ptr + (tap.to(tl.int64) * num_chunks + chunk) * C + cols, acc, mask=col_ok)


# ---------------------------------------------------------------------------------------------
# Launchers (the op layer has validated shapes, devices and dtypes)
# ---------------------------------------------------------------------------------------------

# Warps of the forward and input-gradient kernels: their 4096-element tiles keep K taps of
# addresses live per element, and with 4 warps (32 elements a thread) ptxas spills kilobytes.
TILE_WARPS = 8


def _blocks(C: int, pixels: int, device: torch.device) -> tuple[int, int]:
    """(BLOCK_P, BLOCK_C) of a [pixels, channels] tile. On a GPU up to 64 channels and about 4096
    elements; the interpreter runs programs one after another, so there tiles are much larger."""
    elements, max_c = (4096, 64) if device.type == "cuda" else (65536, 256)
    block_c = min(triton.next_power_of_2(C), max_c)
    block_p = max(16, min(triton.next_power_of_2(pixels), elements // block_c))
    return block_p, block_c


def _weight_matrix(weight: torch.Tensor) -> torch.Tensor:
    return weight.reshape(weight.shape[0], -1).contiguous()


def dwconv_stage_forward(a: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, weight: torch.Tensor,
                         stride: int = 1, upsample: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(c, mean_c, var_c): c channels-last in a's dtype, fp32 batch statistics (biased variance)."""
    N, C, H, W = a.shape
    k = weight.shape[-1]
    Ho, Wo = output_size(H, W, k, stride, upsample)
    c = torch.empty((N, C, Ho, Wo), device=a.device, dtype=a.dtype, memory_format=torch.channels_last)
    block_p, block_c = _blocks(C, Ho * Wo, a.device)
    tiles = triton.cdiv(Ho * Wo, block_p)
    ws = torch.empty((3, N * tiles, C), device=a.device, dtype=torch.float32)
    _forward_kernel[(N * tiles, triton.cdiv(C, block_c))](
        a, _weight_matrix(weight), scale, shift, c, ws, *strides4(a), *strides4(c),
        C, H * (2 if upsample else 1), W * (2 if upsample else 1), Ho, Wo, tiles, N * tiles,
        K=k, STRIDE=stride, UPSAMPLE=upsample, BLOCK_P=block_p, BLOCK_C=block_c, num_warps=TILE_WARPS,
    )
    mean, var = finalize_stats(ws)
    return c, mean, var


def dwconv_stage_backward(dc: torch.Tensor, a: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
                          mean_a: torch.Tensor, weight: torch.Tensor, stride: int = 1, upsample: bool = False
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(g, sum_g, sum_gxmu, dweight): g channels-last in a's dtype; sums and dweight (C, 1, k, k) fp32."""
    N, C, H, W = a.shape
    k = weight.shape[-1]
    Ho, Wo = dc.shape[2:]
    w = _weight_matrix(weight)
    g = torch.empty(a.shape, device=a.device, dtype=a.dtype, memory_format=torch.channels_last)
    block_p, block_c = _blocks(C, H * W, a.device)
    tiles = triton.cdiv(H * W, block_p)
    c_blocks = triton.cdiv(C, block_c)
    ws = torch.empty((2, N * tiles, C), device=a.device, dtype=torch.float32)
    _backward_data_kernel[(N * tiles, c_blocks)](
        dc, a, w, scale, shift, mean_a, g, ws, *strides4(dc), *strides4(a), *strides4(g),
        C, H, W, Ho, Wo, tiles, N * tiles,
        K=k, STRIDE=stride, UP=2 if upsample else 1, BLOCK_P=block_p, BLOCK_C=block_c, num_warps=TILE_WARPS,
    )
    sum_g, sum_gxmu = (s.clone() for s in finalize_sums(ws))   # separate tensors: outputs must not alias

    rows = N * Ho * Wo
    block_p, block_c = _blocks(C, rows, a.device)
    c_blocks = triton.cdiv(C, block_c)
    chunks = max(1, min(triton.cdiv(rows, block_p), reduction_programs(a.device, c_blocks * k * k)))
    rows_per_prog = triton.cdiv(triton.cdiv(rows, chunks), block_p) * block_p
    chunks = triton.cdiv(rows, rows_per_prog)
    ws_w = torch.empty((k * k, chunks, C), device=a.device, dtype=torch.float32)
    _backward_weight_kernel[(chunks, c_blocks, k * k)](
        dc, a, scale, shift, ws_w, *strides4(dc), *strides4(a),
        C, H * (2 if upsample else 1), W * (2 if upsample else 1), Ho, Wo, rows, rows_per_prog, chunks,
        K=k, STRIDE=stride, UPSAMPLE=upsample, BLOCK_P=block_p, BLOCK_C=block_c,
    )
    dweight = finalize_sums(ws_w).t().reshape(C, 1, k, k).contiguous()
    return g, sum_g, sum_gxmu, dweight
