"""Triton kernels of the depthwise stage of the fused cell (contracts: nvae_fast/ops/dwconv_stage.py).

One launch forward, one backward, both contracts (plain and fused), every stride and upsampling.

Work: a program owns a block of channels and loops over spatial tiles of images (persistent:
``P`` programs per channel block, enough to fill the GPU, each accumulating its partial sums over
its tiles; the last of them to finish merges the ``P`` partials in two levels, in a fixed order).

Halo staging: Triton has no addressable shared memory, so each program stages its tile's input
*halo* in its own slot of a small global fp32 scratch buffer (a few tens of KiB per program,
written and read back by the same program, so it stays in L1/L2): the Swish of the BatchNorm (or, in the
backward, BN2's backward applied to (dz, z)) is computed once per input element of the halo,
stored, and the k*k taps then read the staged values. A CTA barrier (``debug_barrier``) separates
the writes from the reads (global writes are visible to the whole CTA after it) and the reads from
the next tile's writes. Every halo is clipped to the image, so a tile that covers a whole image
computes each element once.

* forward: c tile = sum over taps of w * b(shifted), b = swish(a * scale + shift) staged on the halo
  (nearest-2x upsampling is an index map into the low-resolution halo); Welford partials of c.
* backward (data and weight in one pass): the tile of ``a`` and the output pixels it owns (the conv
  outputs whose stride-aligned input falls in the tile); stages dc on the halo the transposed conv
  reads (dc given, or BN2's backward of (dz, z) applied on the fly: the fused contract) and b on the
  halo the owned outputs read; then g = (transposed conv of dc) * swish'(z1) for the tile and the
  weight gradient's k*k taps sum over dc(owned) * b(shifted) into the program's partial.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nvae_fast.kernels.triton.common import (
    arrival_counters, arrive, bn_affine, bn_backward_coefs, bn_invstd, counters_reset_on_error, finish_welford,
    load_vector, merge_sum_slots, store_welford, strides4, swish, swish_grad, two_level_groups, welford_merge,
    welford_tile,
)


@triton.jit
def _stage_affine(w_ptr, b_ptr, mean_ptr, var_ptr, cols, col_ok, eps, FOLD: tl.constexpr):
    """(scale, shift) of the prologue BatchNorm: from its parameters and statistics (FOLD, the
    fused contract) or given (the plain contract passes scale, shift as w, b)."""
    if FOLD:
        return bn_affine(w_ptr, b_ptr, mean_ptr, var_ptr, cols, col_ok, eps)
    else:
        return load_vector(w_ptr, cols, col_ok), load_vector(b_ptr, cols, col_ok)


@triton.jit
def _stage_weights(slot_w, w_ptr, cols, col_ok, local, K: tl.constexpr):
    """Copies the block's filter taps (w (C, K*K)) to slot_w (K*K, BLOCK_C): read from there at
    every tap, not hoisted into registers (K*K values a channel would not fit)."""
    for t in range(K * K):
        tl.store(slot_w + t * local.shape[0] + local, load_vector(w_ptr + t, cols * (K * K), col_ok))
    return slot_w + local


@triton.jit
def _zero_frame(slot, local, wy0, wx0, extent_h, extent_w, HALO_H: tl.constexpr, HALO_W: tl.constexpr,
                SPREAD: tl.constexpr, CHUNK: tl.constexpr, BLOCK_C: tl.constexpr):
    """Zeros the window positions (conv-grid (wy0 + hy, wx0 + hx)) no source value lands on: those
    outside [0, extent) or, with SPREAD = 2 (a stride-2 output dilated onto the conv grid), odd."""
    q = tl.arange(0, CHUNK)
    for q0 in range(0, HALO_H * HALO_W, CHUNK):
        qq = q0 + q
        hy = qq // HALO_W
        cy = wy0 + hy
        cx = wx0 + qq - hy * HALO_W
        covered = (cy >= 0) & (cy < extent_h) & (cx >= 0) & (cx < extent_w)
        if SPREAD > 1:
            covered = covered & (cy % SPREAD == 0) & (cx % SPREAD == 0)
        tl.store(slot + qq[:, None] * BLOCK_C + local[None, :], tl.zeros([CHUNK, BLOCK_C], dtype=tl.float32),
                 mask=((qq < HALO_H * HALO_W) & ~covered)[:, None])


@triton.jit
def _stage_b(slot, local, a_ptr, n, sa_n, sa_c, sa_h, sa_w, cols, col_ok, scale, shift, H, W, wy0, wx0,
             UP: tl.constexpr, HALO_H: tl.constexpr, HALO_W: tl.constexpr, CHUNK: tl.constexpr,
             BLOCK_C: tl.constexpr):
    """b = swish(a * scale + shift), computed once per pixel of a under the window and stored at
    its UP x UP conv-grid positions (nearest upsampling) inside the window (origin wy0, wx0)."""
    ay0 = tl.maximum(wy0, 0) // UP
    ax0 = tl.maximum(wx0, 0) // UP
    rh = tl.minimum(H * UP - 1, wy0 + HALO_H - 1) // UP - ay0 + 1
    rw = tl.minimum(W * UP - 1, wx0 + HALO_W - 1) // UP - ax0 + 1
    q = tl.arange(0, CHUNK)
    a_base = a_ptr + n.to(tl.int64) * sa_n
    for q0 in range(0, rh * rw, CHUNK):
        qq = q0 + q
        qy = qq // rw
        ay = ay0 + qy
        ax = ax0 + qq - qy * rw
        mask = (qq < rh * rw)[:, None] & col_ok[None, :]
        av = tl.load(a_base + (ay * sa_h + ax * sa_w)[:, None] + cols[None, :] * sa_c, mask=mask,
                     other=0.0).to(tl.float32)
        b = swish(av * scale[None, :] + shift[None, :])
        for sy in tl.static_range(UP):
            for sx in tl.static_range(UP):
                hy = ay * UP + sy - wy0
                hx = ax * UP + sx - wx0
                inside = (qq < rh * rw) & (hy >= 0) & (hy < HALO_H) & (hx >= 0) & (hx < HALO_W)
                tl.store(slot + (hy * HALO_W + hx)[:, None] * BLOCK_C + local[None, :], b, mask=inside[:, None])


@triton.jit
def _forward_kernel(
    a_ptr, w_ptr, bw_ptr, bb_ptr, bm_ptr, bv_ptr, c_ptr, scratch_ptr,
    ws_ptr, ws2_ptr, cnt_ptr, stat_ptr, rmean_ptr, rvar_ptr, nbt_ptr,
    sa_n, sa_c, sa_h, sa_w, sc_n, sc_c, sc_h, sc_w,
    C, H, W, Ho, Wo, tiles_w, tiles_per_img, num_items, group, eps, momentum, unbias,
    K: tl.constexpr, STRIDE: tl.constexpr, UP: tl.constexpr, FOLD: tl.constexpr, STATS: tl.constexpr,
    RUNNING: tl.constexpr, TH: tl.constexpr, TW: tl.constexpr, CHUNK: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """c = depthwise_conv(b) on output tiles TH x TW. The tile's input window on the conv grid
    (HALO_H x HALO_W = ((TH - 1) * STRIDE + K) x ((TW - 1) * STRIDE + K) positions, zero outside
    the grid: the convolution's padding) is staged once; tap (kh, kw) of output (ty, tx) is window
    position (STRIDE * ty + kh, STRIDE * tx + kw), a constant offset from the tap (0, 0)."""
    pid_p = tl.program_id(0)
    num_p = tl.num_programs(0)
    pid_c = tl.program_id(1)
    PAD: tl.constexpr = K // 2
    HALO_H: tl.constexpr = (TH - 1) * STRIDE + K
    HALO_W: tl.constexpr = (TW - 1) * STRIDE + K
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    local = tl.arange(0, BLOCK_C)
    scale, shift = _stage_affine(bw_ptr, bb_ptr, bm_ptr, bv_ptr, cols, col_ok, eps, FOLD)
    slot = scratch_ptr + (pid_c * num_p + pid_p).to(tl.int64) * ((HALO_H * HALO_W + K * K) * BLOCK_C)
    slot_w = _stage_weights(slot + HALO_H * HALO_W * BLOCK_C, w_ptr, cols, col_ok, local, K)
    r = tl.arange(0, TH * TW)
    ty = r // TW
    tx = r % TW
    taps = ((STRIDE * ty) * HALO_W + STRIDE * tx)[:, None] * BLOCK_C + local[None, :]
    count = tl.zeros([BLOCK_C], dtype=tl.float32)
    mean = tl.zeros([BLOCK_C], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_C], dtype=tl.float32)
    for item in range(pid_p, num_items, num_p):
        n = item // tiles_per_img
        t = item - n * tiles_per_img
        oy0 = (t // tiles_w) * TH
        ox0 = (t % tiles_w) * TW
        wy0 = oy0 * STRIDE - PAD
        wx0 = ox0 * STRIDE - PAD
        _zero_frame(slot, local, wy0, wx0, H * UP, W * UP, HALO_H, HALO_W, 1, CHUNK, BLOCK_C)
        _stage_b(slot, local, a_ptr, n, sa_n, sa_c, sa_h, sa_w, cols, col_ok, scale, shift, H, W, wy0, wx0, UP,
                 HALO_H, HALO_W, CHUNK, BLOCK_C)
        tl.debug_barrier()
        acc = tl.zeros([TH * TW, BLOCK_C], dtype=tl.float32)
        for kh in range(K):                   # rows in a loop, columns unrolled: code size K, not K * K
            for kw in tl.static_range(K):
                b = tl.load(slot + taps + (kh * HALO_W + kw) * BLOCK_C)
                acc += b * tl.load(slot_w + (kh * K + kw) * BLOCK_C)[None, :]
        oy = oy0 + ty
        ox = ox0 + tx
        out_mask = ((oy < Ho) & (ox < Wo))[:, None] & col_ok[None, :]
        c_offs = n.to(tl.int64) * sc_n + (oy * sc_h + ox * sc_w)[:, None] + cols[None, :] * sc_c
        tl.store(c_ptr + c_offs, acc.to(c_ptr.dtype.element_ty), mask=out_mask)
        if STATS:
            tile_n, tile_mean, tile_m2 = welford_tile(acc, out_mask)
            count, mean, m2 = welford_merge(count, mean, m2, tile_n, tile_mean, tile_m2)
        tl.debug_barrier()                    # every read of the window before the next tile writes it
    if STATS:
        store_welford(ws_ptr, pid_p, num_p, cols, C, count, mean, m2)
        finish_welford(ws_ptr, ws2_ptr, cnt_ptr, pid_p, num_p, group, cols, C, pid_c, tl.num_programs(1), stat_ptr,
                       rmean_ptr, rvar_ptr, nbt_ptr, momentum, unbias, ws_ptr, True, RUNNING, False, 16)


@triton.jit
def _backward_kernel(
    dz_ptr, z_ptr, zw_ptr, zm_ptr, zv_ptr, zsums_ptr,
    a_ptr, w_ptr, bw_ptr, bb_ptr, bm_ptr, bv_ptr,
    g_ptr, scratch_ptr, ws_ptr, ws2_ptr, cnt_ptr, sums_ptr, dweight_ptr, gw_ptr, gb_ptr,
    sd_n, sd_c, sd_h, sd_w, sz_n, sz_c, sz_h, sz_w, sa_n, sa_c, sa_h, sa_w, sg_n, sg_c, sg_h, sg_w,
    C, H, W, Ho, Wo, tiles_w, tiles_per_img, num_items, group, z_eps, z_inv_count, eps,
    K: tl.constexpr, STRIDE: tl.constexpr, UP: tl.constexpr, FOLD: tl.constexpr, DC_FROM_G: tl.constexpr,
    Z_TRAINING: tl.constexpr, BN_GRADS: tl.constexpr, TH: tl.constexpr, TW: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Backward on tiles TH x TW of a. Both gradients live on the conv grid (the upsampled input
    with UP = 2): dcg = dc placed at the conv-grid positions its outputs start at (o * STRIDE, zero
    elsewhere), so that db(u) = sum_t w[t] dcg(u + PAD - t) and dW[t] = sum_u dcg(u) b(u + t - PAD)
    for every stride. The tile's conv region (UP*TH x UP*TW positions) is widened by PAD on each
    side into a window where both dcg and b are staged once (zero outside the grid); every tap is
    then a constant offset. The region's positions partition the conv grid, so the weight gradient
    sums each output once.

    dc = dz (plain contract) or, DC_FROM_G, scale_z * dz + kx_z * (z - mean_z) + kc_z (BN_z's
    backward, z = the conv output c). g = (sum over the UP x UP conv positions of a pixel of db)
    * swish'(a * scale + shift). Partials ws (K*K + 2, P, C): the weight gradient's taps, sum g,
    sum g * (a - mean_a); merged in two levels by the last programs into dweight (C, K*K) and
    sums (2, C) (+ BN1's parameter gradients)."""
    pid_p = tl.program_id(0)
    num_p = tl.num_programs(0)
    pid_c = tl.program_id(1)
    PAD: tl.constexpr = K // 2
    KK: tl.constexpr = K * K
    HALO_H: tl.constexpr = UP * TH + K - 1
    HALO_W: tl.constexpr = UP * TW + K - 1
    HALO: tl.constexpr = HALO_H * HALO_W
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    local = tl.arange(0, BLOCK_C)
    scale, shift = _stage_affine(bw_ptr, bb_ptr, bm_ptr, bv_ptr, cols, col_ok, eps, FOLD)
    mean_a = load_vector(bm_ptr, cols, col_ok)
    if DC_FROM_G:
        zscale, zkx, zkc = bn_backward_coefs(zw_ptr, zv_ptr, zsums_ptr, cols, col_ok, C, z_eps, z_inv_count,
                                             Z_TRAINING)
        zmean = load_vector(zm_ptr, cols, col_ok)
    slot_dc = scratch_ptr + (pid_c * num_p + pid_p).to(tl.int64) * ((2 * HALO + KK) * BLOCK_C)
    slot_b = slot_dc + HALO * BLOCK_C
    slot_w = _stage_weights(slot_b + HALO * BLOCK_C, w_ptr, cols, col_ok, local, K)
    part = ws_ptr + pid_p * C + cols          # row i of ws at part + i * num_p * C
    for i in range(KK):
        tl.store(part + i * num_p * C, tl.zeros([BLOCK_C], dtype=tl.float32), mask=col_ok)
    r = tl.arange(0, TH * TW)
    ty = r // TW
    tx = r % TW
    q = tl.arange(0, CHUNK)
    sum_g = tl.zeros([BLOCK_C], dtype=tl.float32)
    sum_gx = tl.zeros([BLOCK_C], dtype=tl.float32)
    for item in range(pid_p, num_items, num_p):
        n = item // tiles_per_img
        t = item - n * tiles_per_img
        ay0 = (t // tiles_w) * TH
        ax0 = (t % tiles_w) * TW
        wy0 = UP * ay0 - PAD
        wx0 = UP * ax0 - PAD
        n64 = n.to(tl.int64)
        # dcg: each dc under the window computed once (from dz, z) and placed at o * STRIDE
        _zero_frame(slot_dc, local, wy0, wx0, Ho * STRIDE, Wo * STRIDE, HALO_H, HALO_W, STRIDE, CHUNK, BLOCK_C)
        oy_lo = (tl.maximum(wy0, 0) + STRIDE - 1) // STRIDE
        ox_lo = (tl.maximum(wx0, 0) + STRIDE - 1) // STRIDE
        rh = tl.minimum(Ho - 1, (wy0 + HALO_H - 1) // STRIDE) - oy_lo + 1
        rw = tl.minimum(Wo - 1, (wx0 + HALO_W - 1) // STRIDE) - ox_lo + 1
        for q0 in range(0, rh * rw, CHUNK):
            qq = q0 + q
            qy = qq // rw
            oy = oy_lo + qy
            ox = ox_lo + qq - qy * rw
            in_range = qq < rh * rw
            mask = in_range[:, None] & col_ok[None, :]
            dc = tl.load(dz_ptr + n64 * sd_n + (oy * sd_h + ox * sd_w)[:, None] + cols[None, :] * sd_c,
                         mask=mask, other=0.0).to(tl.float32)
            if DC_FROM_G:
                z = tl.load(z_ptr + n64 * sz_n + (oy * sz_h + ox * sz_w)[:, None] + cols[None, :] * sz_c,
                            mask=mask, other=0.0).to(tl.float32)
                dc = zscale[None, :] * dc + zkx[None, :] * (z - zmean[None, :]) + zkc[None, :]
            at = (oy * STRIDE - wy0) * HALO_W + ox * STRIDE - wx0
            tl.store(slot_dc + at[:, None] * BLOCK_C + local[None, :], dc, mask=in_range[:, None])
        # b: once per pixel of a under the window
        _zero_frame(slot_b, local, wy0, wx0, H * UP, W * UP, HALO_H, HALO_W, 1, CHUNK, BLOCK_C)
        _stage_b(slot_b, local, a_ptr, n, sa_n, sa_c, sa_h, sa_w, cols, col_ok, scale, shift, H, W, wy0, wx0, UP,
                 HALO_H, HALO_W, CHUNK, BLOCK_C)
        tl.debug_barrier()

        db = tl.zeros([TH * TW, BLOCK_C], dtype=tl.float32)
        for sy in tl.static_range(UP):
            for sx in tl.static_range(UP):
                # conv position u = UP * (ay0 + ty) + sy is window position UP * ty + sy + PAD
                at = ((UP * ty + sy) * HALO_W + UP * tx + sx)[:, None] * BLOCK_C + local[None, :]
                for kh in range(K):           # data: dcg at u + PAD - t
                    for kw in tl.static_range(K):
                        dc = tl.load(slot_dc + at + ((2 * PAD - kh) * HALO_W + 2 * PAD - kw) * BLOCK_C)
                        db += dc * tl.load(slot_w + (kh * K + kw) * BLOCK_C)[None, :]
                dc_own = tl.load(slot_dc + at + (PAD * HALO_W + PAD) * BLOCK_C)
                for kh in range(K):           # weight: b at u + t - PAD
                    for kw in tl.static_range(K):
                        b = tl.load(slot_b + at + (kh * HALO_W + kw) * BLOCK_C)
                        tap = part + (kh * K + kw) * num_p * C
                        tl.store(tap, tl.load(tap, mask=col_ok, other=0.0) + tl.sum(dc_own * b, axis=0), mask=col_ok)
        ay = ay0 + ty
        ax = ax0 + tx
        mask = ((ay < H) & (ax < W))[:, None] & col_ok[None, :]
        a = tl.load(a_ptr + n64 * sa_n + (ay * sa_h + ax * sa_w)[:, None] + cols[None, :] * sa_c, mask=mask,
                    other=0.0).to(tl.float32)
        g = tl.where(mask, db * swish_grad(a * scale[None, :] + shift[None, :]), 0.0)
        tl.store(g_ptr + n64 * sg_n + (ay * sg_h + ax * sg_w)[:, None] + cols[None, :] * sg_c,
                 g.to(g_ptr.dtype.element_ty), mask=mask)
        sum_g += tl.sum(g, axis=0)
        sum_gx += tl.sum(g * tl.where(mask, a - mean_a[None, :], 0.0), axis=0)
        tl.debug_barrier()                    # every read of the windows before the next tile writes them

    tl.store(part + KK * num_p * C, sum_g, mask=col_ok)
    tl.store(part + (KK + 1) * num_p * C, sum_gx, mask=col_ok)
    num_groups = tl.cdiv(num_p, group)
    grp = pid_p // group
    first = grp * group
    members = tl.minimum(group, num_p - first)
    if arrive(cnt_ptr + pid_c * num_groups + grp, members):
        for i in range(KK + 2):
            tl.store(ws2_ptr + (i * num_groups + grp) * C + cols,
                     merge_sum_slots(ws_ptr + i * num_p * C, C, first, members, cols, col_ok, 16), mask=col_ok)
        if arrive(cnt_ptr + tl.num_programs(1) * num_groups + pid_c, num_groups):
            for i in range(KK):
                total = merge_sum_slots(ws2_ptr + i * num_groups * C, C, 0, num_groups, cols, col_ok, 16)
                tl.store(dweight_ptr + cols * KK + i, total.to(dweight_ptr.dtype.element_ty), mask=col_ok)
            s0 = merge_sum_slots(ws2_ptr + KK * num_groups * C, C, 0, num_groups, cols, col_ok, 16)
            s1 = merge_sum_slots(ws2_ptr + (KK + 1) * num_groups * C, C, 0, num_groups, cols, col_ok, 16)
            tl.store(sums_ptr + cols, s0, mask=col_ok)
            tl.store(sums_ptr + C + cols, s1, mask=col_ok)
            if BN_GRADS:
                tl.store(gw_ptr + cols, (s1 * bn_invstd(bv_ptr, cols, col_ok, eps)).to(gw_ptr.dtype.element_ty),
                         mask=col_ok)
                tl.store(gb_ptr + cols, s0.to(gb_ptr.dtype.element_ty), mask=col_ok)


# ---------------------------------------------------------------------------------------------
# Launchers (the op layer has validated shapes, devices and dtypes)
# ---------------------------------------------------------------------------------------------

# Launch resources, chosen from the registers, spills and shared memory ptxas reports for sm_90
# (tests/triton_aot.py --report): the forward's 256 x 16 tile fits 128 registers a thread without
# spilling (two 8-warp blocks per SM); the backward keeps two tiles of gradients and both windows'
# taps in flight, so its 128 x 16 tile gets what registers ptxas wants (no spills).
FORWARD_WARPS, FORWARD_REGISTERS, FORWARD_TILE = 8, 128, (256, 4096)
BACKWARD_WARPS, BACKWARD_REGISTERS, BACKWARD_TILE = 8, None, (128, 2048)


def _output_size(H: int, W: int, k: int, stride: int, upsample: bool) -> tuple[int, int]:
    Hc, Wc = (2 * H, 2 * W) if upsample else (H, W)
    return (Hc + 2 * (k // 2) - k) // stride + 1, (Wc + 2 * (k // 2) - k) // stride + 1


def _tiles(C: int, rows: int, cols: int, up: int, device: torch.device, budget: tuple[int, int]
           ) -> tuple[int, int, int]:
    """(TH, TW, BLOCK_C): a tile of rows x cols pixels (powers of two; with ``up`` = 2 its conv
    region, up^2 times its pixels, within the budget) times a block of channels, ``budget`` =
    (pixels, values) on a GPU. The interpreter runs programs (and tiles) one after another, so
    there tiles are larger."""
    pixels, values, max_c = (*budget, 64) if device.type == "cuda" else (1024, 65536, 256)
    pixels //= up * up
    tw = min(triton.next_power_of_2(cols), 32 // up, pixels)
    th = min(triton.next_power_of_2(rows), max(1, pixels // tw))
    block_c = max(1, min(triton.next_power_of_2(C), max_c, max(16, values // (th * tw * up * up))))
    return th, tw, block_c


def _chunk(halo: int, device: torch.device) -> int:
    """Pixels of a window staged per step: 64 on a GPU (registers), all of them on the
    interpreter (fewer, larger steps)."""
    return min(triton.next_power_of_2(halo), 64) if device.type == "cuda" else triton.next_power_of_2(halo)


def _programs(device: torch.device, channel_blocks: int, items: int) -> int:
    """Programs per channel block: about two per SM in all on a GPU; one on the interpreter."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(items, triton.cdiv(2 * sms, channel_blocks)))


def _launch(kernel, grid, counters, *args, **kwargs) -> None:
    with counters_reset_on_error(counters):
        kernel[grid](*args, **kwargs)


def _forward(a, w_mat, bn_ptrs, eps, fold, stride, upsample, stats, running):
    N, C, H, W = a.shape
    k = int(round(w_mat.shape[1] ** 0.5))
    Ho, Wo = _output_size(H, W, k, stride, upsample)
    up = 2 if upsample else 1
    th, tw, block_c = _tiles(C, Ho, Wo, 1, a.device, FORWARD_TILE)
    halo = ((th - 1) * stride + k) * ((tw - 1) * stride + k)
    tiles_w = triton.cdiv(Wo, tw)
    tiles_per_img = triton.cdiv(Ho, th) * tiles_w
    cblocks = triton.cdiv(C, block_c)
    programs = _programs(a.device, cblocks, N * tiles_per_img)
    group = two_level_groups(programs)
    c = torch.empty((N, C, Ho, Wo), device=a.device, dtype=a.dtype, memory_format=torch.channels_last)
    scratch = torch.empty(cblocks * programs * (halo + k * k) * block_c, device=a.device, dtype=torch.float32)
    ws = torch.empty((3, programs, C), device=a.device, dtype=torch.float32)
    ws2 = torch.empty((3, triton.cdiv(programs, group), C), device=a.device, dtype=torch.float32)
    counters = arrival_counters(a.device, cblocks * (triton.cdiv(programs, group) + 1))
    run = [None] * 3 if running is None else [running.mean, running.var, running.num_batches_tracked]
    _launch(_forward_kernel, (programs, cblocks), counters,
            a, w_mat, *bn_ptrs, c, scratch, ws, ws2, counters, stats, *run, *strides4(a), *strides4(c),
            C, H, W, Ho, Wo, tiles_w, tiles_per_img, N * tiles_per_img, group, eps,
            0.0 if running is None else running.momentum, 1.0 if running is None else running.unbias,
            K=k, STRIDE=stride, UP=up, FOLD=fold, STATS=stats is not None, RUNNING=running is not None,
            TH=th, TW=tw, CHUNK=_chunk(halo, a.device), BLOCK_C=block_c, num_warps=FORWARD_WARPS,
            maxnreg=FORWARD_REGISTERS)
    return c


def _backward(dz, z, z_args, a, w_mat, bn_ptrs, eps, fold, stride, upsample, sums, dweight, bn_grads):
    """z_args: (weight, mean, var, sums, eps, count, training) of BN_z (the fused contract) or None."""
    N, C, H, W = a.shape
    k = int(round(w_mat.shape[1] ** 0.5))
    Ho, Wo = dz.shape[2:]
    up = 2 if upsample else 1
    th, tw, block_c = _tiles(C, H, W, up, a.device, BACKWARD_TILE)
    halo = (up * th + k - 1) * (up * tw + k - 1)
    tiles_w = triton.cdiv(W, tw)
    tiles_per_img = triton.cdiv(H, th) * tiles_w
    cblocks = triton.cdiv(C, block_c)
    programs = _programs(a.device, cblocks, N * tiles_per_img)
    group = two_level_groups(programs)
    groups = triton.cdiv(programs, group)
    g = torch.empty(a.shape, device=a.device, dtype=a.dtype, memory_format=torch.channels_last)
    scratch = torch.empty(cblocks * programs * (2 * halo + k * k) * block_c, device=a.device, dtype=torch.float32)
    ws = torch.empty((k * k + 2, programs, C), device=a.device, dtype=torch.float32)
    ws2 = torch.empty((k * k + 2, groups, C), device=a.device, dtype=torch.float32)
    counters = arrival_counters(a.device, cblocks * (groups + 1))
    if z_args is None:
        zw, zm, zv, zsums, z_eps, z_count, z_training = dz, dz, dz, dz, 0.0, 1, False
    else:
        zw, zm, zv, zsums, z_eps, z_count, z_training = z_args
    zt = z if z is not None else dz
    _launch(_backward_kernel, (programs, cblocks), counters,
            dz, zt, zw, zm, zv, zsums, a, w_mat, *bn_ptrs, g, scratch, ws, ws2, counters, sums, dweight,
            *(bn_grads if bn_grads is not None else (sums, sums)),
            *strides4(dz), *strides4(zt), *strides4(a), *strides4(g),
            C, H, W, Ho, Wo, tiles_w, tiles_per_img, N * tiles_per_img, group, z_eps, 1.0 / z_count, eps,
            K=k, STRIDE=stride, UP=up, FOLD=fold, DC_FROM_G=z_args is not None, Z_TRAINING=z_training,
            BN_GRADS=bn_grads is not None, TH=th, TW=tw, CHUNK=_chunk(halo, a.device),
            BLOCK_C=block_c, num_warps=BACKWARD_WARPS, maxnreg=BACKWARD_REGISTERS)
    return g


def _weight_matrix(weight: torch.Tensor) -> torch.Tensor:
    """(C, 1, k, k) -> (C, k*k): a view of a contiguous weight (no copy per call)."""
    return weight.reshape(weight.shape[0], -1)


def dwconv_stage_forward(a: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, weight: torch.Tensor,
                         stride: int = 1, upsample: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Plain contract: (c, mean_c, var_c); c channels-last in a's dtype, fp32 batch statistics."""
    stats = torch.empty((2, a.shape[1]), device=a.device, dtype=torch.float32)
    c = _forward(a, _weight_matrix(weight), [scale, shift, scale, scale], 0.0, False, stride, upsample, stats, None)
    return c, stats[0], stats[1].clone()   # distinct storage: custom-op outputs must not alias


def dwconv_stage_backward(dc: torch.Tensor, a: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
                          mean_a: torch.Tensor, weight: torch.Tensor, stride: int = 1, upsample: bool = False
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Plain contract: (g, sum_g, sum_gxmu, dweight); g channels-last in a's dtype; the rest fp32."""
    C, k = a.shape[1], weight.shape[-1]
    sums = torch.empty((2, C), device=a.device, dtype=torch.float32)
    dweight = torch.empty((C, 1, k, k), device=a.device, dtype=torch.float32)
    g = _backward(dc, None, None, a, _weight_matrix(weight), [scale, shift, mean_a, scale], 0.0, False, stride,
                  upsample, sums, dweight, None)
    return g, sums[0], sums[1].clone(), dweight


def dwconv_stage_forward_fused(a: torch.Tensor, bn, weight: torch.Tensor, stride: int, upsample: bool,
                               stats: torch.Tensor | None, running=None) -> torch.Tensor:
    """Fused contract (ops/dwconv_stage.py): c; stats (2, C) and the running update in the kernel."""
    return _forward(a, _weight_matrix(weight), [bn.weight, bn.bias, bn.mean, bn.var], bn.eps, True, stride, upsample,
                    stats, running)


def dwconv_stage_backward_fused(dz: torch.Tensor, z: torch.Tensor, bn_z, grad_z, a: torch.Tensor, bn,
                                weight: torch.Tensor, stride: int, upsample: bool, sums: torch.Tensor,
                                bn_grads: tuple[torch.Tensor, torch.Tensor], dweight: torch.Tensor) -> torch.Tensor:
    """Fused contract: g; BN_z's backward applied to (dz, z) in the kernel; writes sums, bn_grads, dweight."""
    z_args = (bn_z.weight, bn_z.mean, bn_z.var, grad_z.sums, bn_z.eps, grad_z.count, grad_z.training)
    return _backward(dz, z, z_args, a, _weight_matrix(weight), [bn.weight, bn.bias, bn.mean, bn.var], bn.eps, True,
                     stride, upsample, sums, dweight, bn_grads)
