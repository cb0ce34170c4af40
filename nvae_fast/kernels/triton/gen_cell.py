"""Triton kernels of the fused generative cell (contract and math: nvae_fast/ops/gen_cell.py).

A 4-D activation (N, C, H, W) is a matrix [M = N*H*W, C]; the 1x1 convolutions are GEMMs over it
with ``tl.dot`` (operands in the activation dtype, fp32 accumulation) whose prologues apply the
previous BatchNorm (+ Swish, or a BatchNorm backward) to each loaded tile, computing its scale and
shift from the BatchNorm's parameters and statistics, and whose epilogues gather the next
BatchNorm's statistics or backward sums. Each stage is one launch: its partial sums are merged
in the kernel by the last program to finish (an arrival counter, nvae_fast/kernels/triton/
common.py), in a fixed order, in two levels (groups of about sqrt(partials), then the groups), so
results are deterministic and no program merges more than a few dozen partials. The merging
program also does what follows per channel: the running-statistics update, the parameter
gradients of the BatchNorm, the squeeze-excitation MLP's backward.

Kernels (one launch each):

* ``_stats_kernel``            BN0's statistics of x (+ running update).
* ``_forward_gemm_kernel``     y = act(BN(x)) @ w^T, act = swish or identity; Welford partials of y
  per row tile, merged into the next BatchNorm's statistics (+ running update). Row tiles may be
  aligned to images so that the same partials give the per-(n, channel) sums that squeeze-
  excitation pools (tiles holding whole images sum them directly).
* ``_output_kernel``           out = skip + 0.1 * BN3(e) * se, se's MLP in the prologue (per image).
* ``_output_backward_kernel``  per-image sums of dout and dout * (e - mean3); the last program of
  each image runs squeeze-excitation's backward for it, the last image the sums over the batch
  (BN3's backward sums and parameter gradients, the SE weights' gradients).
* ``_conv2_backward_data_kernel``  g2 = (de @ W2) * swish'(BN2(c)) with de rebuilt in the prologue;
  BN2's backward sums and parameter gradients.
* ``_weight_grad_kernel``      dW = A^T @ B over row chunks (A an input gradient rebuilt in the
  prologue, B = swish(BN2(c)) or xhat0); the last chunk of each output tile merges the tile (two
  levels). For dW1 the merge also yields BN0's backward sums (sum du = sum da @ W1,
  sum du xhat0 = sum over EC of W1 * G) and parameter gradients, merged over the tiles of a column
  block by the last of them.
* ``_conv1_backward_data_kernel``  dx = (da @ W1) * scale0 + BN0 backward (+ residual).

The depthwise stage between the GEMMs is its own op (nvae_fast/kernels/triton/dwconv_stage.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nvae_fast.kernels.triton.common import (
    arrival_counters, arrive, bn_affine, bn_backward_coefs, bn_invstd, counters_reset_on_error, dot_dtype,
    dot_precision, finish_sums, finish_welford, gemm_stages, load_vector, merge_sum_slots,
    store_welford, strides4, swish, swish_grad, two_level_groups, welford_tile,
)

__all__ = [
    "bn_stats", "conv1_backward_data", "conv1_forward", "conv1_weight_grad", "conv2_backward_data", "conv2_forward",
    "conv2_weight_grad", "output_backward", "output_forward",
]

_OUTPUT_SCALE = tl.constexpr(0.1)   # the residual branch's scale; tensor * constexpr (the interpreter
                                     # cannot multiply a constexpr by a tensor)
_MERGE_BLOCK = tl.constexpr(16)   # slots per step of a merge loop


# ---------------------------------------------------------------------------------------------
# Addressing and tiles
# ---------------------------------------------------------------------------------------------

@triton.jit
def _pix_offsets(n, p, W, s_n, s_h, s_w, IDX64: tl.constexpr):
    """Element offsets of pixel p (= h * W + w) of image n; int64 only where a tensor needs it."""
    if IDX64:
        n = n.to(tl.int64)
        p = p.to(tl.int64)
    h = p // W
    return n * s_n + h * s_h + (p - h * W) * s_w


@triton.jit
def _flat_rows(tile, M, HW, BLOCK_M: tl.constexpr):
    """(n, p, valid) of rows tile * BLOCK_M + [0, BLOCK_M) of the [M = N * HW, C] matrix."""
    m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    n = m // HW
    return n, m - n * HW, m < M


@triton.jit
def _image_rows(tile, N, HW, tiles_per_img, IMGS: tl.constexpr, BLOCK_M: tl.constexpr):
    """(n, p, valid) of a row tile aligned to images: with IMGS > 1 the tile holds IMGS whole images,
    BLOCK_M // IMGS rows each (the rows past H*W masked); else image n spans tiles_per_img tiles."""
    r = tl.arange(0, BLOCK_M)
    if IMGS > 1:
        n = tile * IMGS + r // (BLOCK_M // IMGS)
        p = r % (BLOCK_M // IMGS)
        valid = (p < HW) & (n < N)
    else:
        n = tile // tiles_per_img + r * 0
        p = (tile % tiles_per_img) * BLOCK_M + r
        valid = p < HW
    return n, p, valid


@triton.jit
def _load(ptr, rows, row_ok, cols, col_ok, s_c):
    """fp32 [rows, cols] tile (rows: element offsets of the rows), zeros outside the masks."""
    return tl.load(ptr + rows[:, None] + cols[None, :] * s_c, mask=row_ok[:, None] & col_ok[None, :],
                   other=0.0).to(tl.float32)


@triton.jit
def _store(ptr, value, rows, row_ok, cols, col_ok, s_c):
    tl.store(ptr + rows[:, None] + cols[None, :] * s_c, value.to(ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _input_grad_tile(g_ptr, x_ptr, g_rows, x_rows, sg_c, sx_c, n, row_ok, ks, k_ok, K,
                     bw_ptr, bm_ptr, bv_ptr, sums_ptr, gate_ptr, dpool_ptr, eps, inv_count, g_scale, inv_hw,
                     GATED: tl.constexpr, TRAINING: tl.constexpr, TILE_SAMPLE: tl.constexpr):
    """dL/dx on a [rows, ks] tile of a BatchNorm's input (ops.stage_args.BatchNormInputGrad):
    ``scale * g' + kx * (x - mean) + kc``, g' = g_scale * g (* gate[n] + d_pool[n] / HW); fp32,
    zero outside the masks. With TILE_SAMPLE every row is of sample ``n`` (a scalar), so the
    per-sample factors are per column; else ``n`` holds each row's sample."""
    scale, kx, kc = bn_backward_coefs(bw_ptr, bv_ptr, sums_ptr, ks, k_ok, K, eps, inv_count, TRAINING)
    mean = load_vector(bm_ptr, ks, k_ok)
    mask = row_ok[:, None] & k_ok[None, :]
    g = _load(g_ptr, g_rows, row_ok, ks, k_ok, sg_c)
    x = _load(x_ptr, x_rows, row_ok, ks, k_ok, sx_c)
    if GATED:
        if TILE_SAMPLE:
            gate = tl.load(gate_ptr + n * K + ks, mask=k_ok, other=0.0)
            d_pool = tl.load(dpool_ptr + n * K + ks, mask=k_ok, other=0.0)
            p = (scale * g_scale * gate)[None, :]
            r = (kc + scale * d_pool * inv_hw)[None, :]
        else:
            per_sample = n[:, None] * K + ks[None, :]
            p = scale[None, :] * g_scale * tl.load(gate_ptr + per_sample, mask=mask, other=0.0)
            r = kc[None, :] + scale[None, :] * inv_hw * tl.load(dpool_ptr + per_sample, mask=mask, other=0.0)
    else:
        p = (scale * g_scale)[None, :]
        r = kc[None, :]
    return tl.where(mask, p * g + kx[None, :] * (x - mean[None, :]) + r, 0.0)


@triton.jit
def _se_hidden(n, sum_e_ptr, bw_ptr, bb_ptr, bm_ptr, bv_ptr, eps, fc1w_ptr, fc1b_ptr, C, HID, inv_hw,
               pool_ptr, BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr, STORE_POOL: tl.constexpr):
    """Pre-ReLU hidden activation [BLOCK_H] of squeeze-excitation for sample n: fc1 @ pool + b1,
    pool = BN3's scale * sum_e[n] / HW + shift (the mean over H, W of BN3(e)); STORE_POOL writes
    pool to pool_ptr (C,)."""
    hid = tl.arange(0, BLOCK_H)
    hid_ok = hid < HID
    h = tl.zeros([BLOCK_H], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cc = c0 + tl.arange(0, BLOCK_C)
        cc_ok = cc < C
        scale, shift = bn_affine(bw_ptr, bb_ptr, bm_ptr, bv_ptr, cc, cc_ok, eps)
        pool = tl.where(cc_ok, scale * tl.load(sum_e_ptr + n * C + cc, mask=cc_ok, other=0.0) * inv_hw + shift, 0.0)
        if STORE_POOL:
            tl.store(pool_ptr + cc, pool, mask=cc_ok)
        w = tl.load(fc1w_ptr + hid[:, None] * C + cc[None, :], mask=hid_ok[:, None] & cc_ok[None, :],
                    other=0.0).to(tl.float32)
        h += tl.sum(w * pool[None, :], axis=1)
    return h + load_vector(fc1b_ptr, hid, hid_ok)


@triton.jit
def _se_logits(hr, cols, col_ok, fc2w_ptr, fc2b_ptr, HID, BLOCK_H: tl.constexpr):
    """fc2 @ relu(hidden) + b2 on the channels ``cols``."""
    hid = tl.arange(0, BLOCK_H)
    w = tl.load(fc2w_ptr + cols[:, None] * HID + hid[None, :], mask=col_ok[:, None] & (hid < HID)[None, :],
                other=0.0).to(tl.float32)
    return tl.sum(w * hr[None, :], axis=1) + load_vector(fc2b_ptr, cols, col_ok)


# ---------------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------------

@triton.jit
def _stats_kernel(
    x_ptr, ws_ptr, ws2_ptr, cnt_ptr, stat_ptr, rmean_ptr, rvar_ptr, nbt_ptr,
    sx_n, sx_c, sx_h, sx_w, M, C, HW, W, num_tiles, group, momentum, unbias,
    RUNNING: tl.constexpr, IDX64: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """stat (2, C) = mean, biased variance of x per channel (+ the running update)."""
    tile = tl.program_id(0)
    pid_c = tl.program_id(1)
    n, p, row_ok = _flat_rows(tile, M, HW, BLOCK_M)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    x = _load(x_ptr, _pix_offsets(n, p, W, sx_n, sx_h, sx_w, IDX64), row_ok, cols, col_ok, sx_c)
    count, mean, m2 = welford_tile(x, row_ok[:, None] & col_ok[None, :])
    store_welford(ws_ptr, tile, num_tiles, cols, C, count, mean, m2)
    finish_welford(ws_ptr, ws2_ptr, cnt_ptr, tile, num_tiles, group, cols, C, pid_c, tl.num_programs(1), stat_ptr,
                   rmean_ptr, rvar_ptr, nbt_ptr, momentum, unbias, ws_ptr, True, RUNNING, False, _MERGE_BLOCK)


@triton.jit
def _forward_gemm_kernel(
    x_ptr, w_ptr, bw_ptr, bb_ptr, bm_ptr, bv_ptr, y_ptr,
    ws_ptr, ws2_ptr, cnt_ptr, stat_ptr, rmean_ptr, rvar_ptr, nbt_ptr, sum_ptr,
    sx_n, sx_c, sx_h, sx_w, sy_n, sy_c, sy_h, sy_w,
    N, K, NOUT, HW, W, tiles_per_img, num_tiles, group, eps, momentum, unbias,
    SWISH: tl.constexpr, STATS: tl.constexpr, RUNNING: tl.constexpr, IMAGE_SUMS: tl.constexpr,
    IMAGE_PARTIALS: tl.constexpr, IMGS: tl.constexpr, IDX64: tl.constexpr, DOT_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """y[M, NOUT] = act(BN(x)) @ w^T, w (NOUT, K) row-major in x's dtype. The BatchNorm is applied
    to x in fp32, not folded into w: folded, the bias w @ shift would cancel against x @ (w * scale)
    in the dot's precision when |mean| >> std. STATS: stat (2, NOUT) = y's batch statistics;
    sum (N, NOUT) = y summed over each image (rows aligned to images, see _image_rows), by the
    tile that holds the image (IMAGE_SUMS) or merged from the tiles of the image (IMAGE_PARTIALS)."""
    tile = tl.program_id(0)
    pid_n = tl.program_id(1)
    n, p, row_ok = _image_rows(tile, N, HW, tiles_per_img, IMGS, BLOCK_M)
    x_rows = _pix_offsets(n, p, W, sx_n, sx_h, sx_w, IDX64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < NOUT
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        scale, shift = bn_affine(bw_ptr, bb_ptr, bm_ptr, bv_ptr, ks, k_ok, eps)
        a = _load(x_ptr, x_rows, row_ok, ks, k_ok, sx_c) * scale[None, :] + shift[None, :]
        if SWISH:
            a = swish(a)
        a = tl.where(row_ok[:, None] & k_ok[None, :], a, 0.0)
        w = tl.load(w_ptr + cols[None, :] * K + ks[:, None], mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc += tl.dot(a.to(DOT_DTYPE), w.to(DOT_DTYPE), input_precision=DOT_PRECISION)
    mask = row_ok[:, None] & col_ok[None, :]
    _store(y_ptr, acc, _pix_offsets(n, p, W, sy_n, sy_h, sy_w, IDX64), row_ok, cols, col_ok, sy_c)
    acc = tl.where(mask, acc, 0.0)
    if IMAGE_SUMS:    # the tile holds whole images: their sums are final
        sums = tl.sum(tl.reshape(acc, [IMGS, BLOCK_M // IMGS, BLOCK_N]), axis=1)
        imgs = tile * IMGS + tl.arange(0, IMGS)
        tl.store(sum_ptr + imgs[:, None] * NOUT + cols[None, :], sums, mask=(imgs < N)[:, None] & col_ok[None, :])
    if STATS or IMAGE_PARTIALS:
        count, mean, m2 = welford_tile(acc, mask)
        store_welford(ws_ptr, tile, num_tiles, cols, NOUT, count, mean, m2)
        # with IMAGE_PARTIALS the groups are the tiles of one image: the group merge sums it
        finish_welford(ws_ptr, ws2_ptr, cnt_ptr, tile, num_tiles, group, cols, NOUT, pid_n, tl.num_programs(1),
                       stat_ptr, rmean_ptr, rvar_ptr, nbt_ptr, momentum, unbias, sum_ptr, STATS, RUNNING,
                       IMAGE_PARTIALS, _MERGE_BLOCK)


@triton.jit
def _output_kernel(
    e_ptr, skip_ptr, out_ptr, bw_ptr, bb_ptr, bm_ptr, bv_ptr, sum_e_ptr, fc1w_ptr, fc1b_ptr, fc2w_ptr, fc2b_ptr,
    se_n, se_c, se_h, se_w, sk_n, sk_c, sk_h, sk_w, so_n, so_c, so_h, so_w,
    N, C, HW, W, HID, tiles_per_img, eps, inv_hw,
    HAS_SE: tl.constexpr, IDX64: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """out = skip + 0.1 * BN3(e) * gate[n, c]; the gate (squeeze-excitation's MLP on the pooled
    BN3(e) of image n, from sum_e) is computed here, by every program of the image (C * hidden
    FMAs each): no kernel runs between GEMM2 and this one."""
    tile = tl.program_id(0)
    n, p, row_ok = _image_rows(tile, N, HW, tiles_per_img, 1, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    scale, shift = bn_affine(bw_ptr, bb_ptr, bm_ptr, bv_ptr, cols, col_ok, eps)
    if HAS_SE:
        image = tile // tiles_per_img
        hr = tl.maximum(_se_hidden(image, sum_e_ptr, bw_ptr, bb_ptr, bm_ptr, bv_ptr, eps, fc1w_ptr, fc1b_ptr, C, HID,
                                   inv_hw, sum_e_ptr, BLOCK_C, BLOCK_H, False), 0.0)
        gate = tl.sigmoid(_se_logits(hr, cols, col_ok, fc2w_ptr, fc2b_ptr, HID, BLOCK_H)) * _OUTPUT_SCALE
    else:
        gate = tl.full([BLOCK_C], _OUTPUT_SCALE, dtype=tl.float32)
    scale = scale * gate
    shift = shift * gate
    e = _load(e_ptr, _pix_offsets(n, p, W, se_n, se_h, se_w, IDX64), row_ok, cols, col_ok, se_c)
    skip = _load(skip_ptr, _pix_offsets(n, p, W, sk_n, sk_h, sk_w, IDX64), row_ok, cols, col_ok, sk_c)
    _store(out_ptr, skip + e * scale[None, :] + shift[None, :], _pix_offsets(n, p, W, so_n, so_h, so_w, IDX64),
           row_ok, cols, col_ok, so_c)


# ---------------------------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------------------------

@triton.jit
def _output_backward_kernel(
    dout_ptr, e_ptr, bw_ptr, bb_ptr, bm_ptr, bv_ptr, sum_e_ptr, fc1w_ptr, fc1b_ptr, fc2w_ptr, fc2b_ptr,
    ws_ptr, smp_ptr, smph_ptr, cnt_ptr,
    sums_ptr, gate_ptr, dpool_ptr, gw_ptr, gb_ptr, gfc1w_ptr, gfc1b_ptr, gfc2w_ptr, gfc2b_ptr,
    sd_n, sd_c, sd_h, sd_w, se_n, se_c, se_h, se_w,
    N, C, HW, W, HID, tiles_per_img, num_slots, eps, inv_hw,
    HAS_SE: tl.constexpr, IDX64: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """The output stage's backward (ops.gen_cell._torch_output_backward).

    Every program: partial sums of dout and dout * (e - mean3) over its rows of one image, into
    ws (2, slots, C). The last program of image n merges them (all channels) and runs the SE
    backward of sample n, writing per-sample rows of smp (6, N, C): sum dout, sum dout (e - mean3),
    pool, dL/dlogit, and dL/df summed (and weighted by e - mean3) over the image; of smph (2, N, HID):
    relu(hidden), dL/dhidden; gate and d_pool (N, C). The last image sums over the batch: BN3's
    backward sums and parameter gradients, the SE weights' gradients."""
    tile = tl.program_id(0)
    pid_c = tl.program_id(1)
    image = tile // tiles_per_img
    n, p, row_ok = _image_rows(tile, N, HW, tiles_per_img, 1, BLOCK_M)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    mask = row_ok[:, None] & col_ok[None, :]
    dout = _load(dout_ptr, _pix_offsets(n, p, W, sd_n, sd_h, sd_w, IDX64), row_ok, cols, col_ok, sd_c)
    e = _load(e_ptr, _pix_offsets(n, p, W, se_n, se_h, se_w, IDX64), row_ok, cols, col_ok, se_c)
    e_dev = tl.where(mask, e - load_vector(bm_ptr, cols, col_ok)[None, :], 0.0)
    tl.store(ws_ptr + tile * C + cols, tl.sum(dout, axis=0), mask=col_ok)
    tl.store(ws_ptr + (num_slots + tile) * C + cols, tl.sum(dout * e_dev, axis=0), mask=col_ok)

    NC = N * C
    hid = tl.arange(0, BLOCK_H)
    hid_ok = hid < HID
    if arrive(cnt_ptr + image, tiles_per_img * tl.num_programs(1)):
        row = image * C
        for c0 in range(0, C, BLOCK_C):
            cc = c0 + tl.arange(0, BLOCK_C)
            cc_ok = cc < C
            tl.store(smp_ptr + row + cc, merge_sum_slots(ws_ptr, C, image * tiles_per_img, tiles_per_img, cc, cc_ok,
                                                          BLOCK_S), mask=cc_ok)
            tl.store(smp_ptr + NC + row + cc, merge_sum_slots(ws_ptr + num_slots * C, C, image * tiles_per_img,
                                                               tiles_per_img, cc, cc_ok, BLOCK_S), mask=cc_ok)
        if HAS_SE:
            h = _se_hidden(image, sum_e_ptr, bw_ptr, bb_ptr, bm_ptr, bv_ptr, eps, fc1w_ptr, fc1b_ptr, C, HID, inv_hw,
                           smp_ptr + 2 * NC + row, BLOCK_C, BLOCK_H, True)
            hr = tl.maximum(h, 0.0)
            tl.debug_barrier()    # the rows stored above are read back by other threads
            dh = tl.zeros([BLOCK_H], dtype=tl.float32)
            for c0 in range(0, C, BLOCK_C):
                cc = c0 + tl.arange(0, BLOCK_C)
                cc_ok = cc < C
                gate = tl.sigmoid(_se_logits(hr, cc, cc_ok, fc2w_ptr, fc2b_ptr, HID, BLOCK_H))
                scale = load_vector(bw_ptr, cc, cc_ok) * bn_invstd(bv_ptr, cc, cc_ok, eps)
                sd = tl.load(smp_ptr + row + cc, mask=cc_ok, other=0.0)
                sde = tl.load(smp_ptr + NC + row + cc, mask=cc_ok, other=0.0)
                # dL/dgate = 0.1 * sum over H, W of dout * f, f = scale * (e - mean) + bias
                d_logit = (scale * sde + load_vector(bb_ptr, cc, cc_ok) * sd) * _OUTPUT_SCALE * gate * (1.0 - gate)
                d_logit = tl.where(cc_ok, d_logit, 0.0)
                tl.store(gate_ptr + row + cc, gate, mask=cc_ok)
                tl.store(smp_ptr + 3 * NC + row + cc, d_logit, mask=cc_ok)
                w = tl.load(fc2w_ptr + cc[:, None] * HID + hid[None, :], mask=cc_ok[:, None] & hid_ok[None, :],
                            other=0.0).to(tl.float32)
                dh += tl.sum(w * d_logit[:, None], axis=0)
            dh = tl.where(h > 0.0, dh, 0.0)
            tl.store(smph_ptr + image * HID + hid, hr, mask=hid_ok)
            tl.store(smph_ptr + N * HID + image * HID + hid, dh, mask=hid_ok)
            for c0 in range(0, C, BLOCK_C):
                cc = c0 + tl.arange(0, BLOCK_C)
                cc_ok = cc < C
                w = tl.load(fc1w_ptr + hid[:, None] * C + cc[None, :], mask=hid_ok[:, None] & cc_ok[None, :],
                            other=0.0).to(tl.float32)
                d_pool = tl.sum(w * dh[:, None], axis=0)
                tl.store(dpool_ptr + row + cc, d_pool, mask=cc_ok)
                gate = tl.load(gate_ptr + row + cc, mask=cc_ok, other=0.0)
                sd = tl.load(smp_ptr + row + cc, mask=cc_ok, other=0.0)
                sde = tl.load(smp_ptr + NC + row + cc, mask=cc_ok, other=0.0)
                mean = load_vector(bm_ptr, cc, cc_ok)
                sum_e = tl.load(sum_e_ptr + row + cc, mask=cc_ok, other=0.0)
                # dL/df = 0.1 * gate * dout + d_pool / HW per element
                tl.store(smp_ptr + 4 * NC + row + cc, gate * sd * _OUTPUT_SCALE + d_pool, mask=cc_ok)
                tl.store(smp_ptr + 5 * NC + row + cc,
                         gate * sde * _OUTPUT_SCALE + d_pool * inv_hw * (sum_e - mean / inv_hw), mask=cc_ok)
        else:
            tl.debug_barrier()
            for c0 in range(0, C, BLOCK_C):
                cc = c0 + tl.arange(0, BLOCK_C)
                cc_ok = cc < C
                tl.store(smp_ptr + 4 * NC + row + cc, tl.load(smp_ptr + row + cc, mask=cc_ok) * _OUTPUT_SCALE,
                         mask=cc_ok)
                tl.store(smp_ptr + 5 * NC + row + cc, tl.load(smp_ptr + NC + row + cc, mask=cc_ok) * _OUTPUT_SCALE,
                         mask=cc_ok)

        if arrive(cnt_ptr + N, N):
            for c0 in range(0, C, BLOCK_C):
                cc = c0 + tl.arange(0, BLOCK_C)
                cc_ok = cc < C
                s_g = merge_sum_slots(smp_ptr + 4 * NC, C, 0, N, cc, cc_ok, BLOCK_S)
                s_gx = merge_sum_slots(smp_ptr + 5 * NC, C, 0, N, cc, cc_ok, BLOCK_S)
                tl.store(sums_ptr + cc, s_g, mask=cc_ok)
                tl.store(sums_ptr + C + cc, s_gx, mask=cc_ok)
                tl.store(gw_ptr + cc, (s_gx * bn_invstd(bv_ptr, cc, cc_ok, eps)).to(gw_ptr.dtype.element_ty),
                         mask=cc_ok)
                tl.store(gb_ptr + cc, s_g.to(gb_ptr.dtype.element_ty), mask=cc_ok)
                if HAS_SE:
                    # fc2: sum over samples of dL/dlogit (x) relu(hidden); fc1: dL/dhidden (x) pool
                    g2 = tl.zeros([BLOCK_C, BLOCK_H], dtype=tl.float32)
                    g1 = tl.zeros([BLOCK_H, BLOCK_C], dtype=tl.float32)
                    for s0 in range(0, N, BLOCK_S):
                        ss = s0 + tl.arange(0, BLOCK_S)
                        s_ok = ss < N
                        sc = ss[:, None] * C + cc[None, :]
                        sc_ok = s_ok[:, None] & cc_ok[None, :]
                        sh = ss[:, None] * HID + hid[None, :]
                        sh_ok = s_ok[:, None] & hid_ok[None, :]
                        dl_rows = tl.load(smp_ptr + 3 * NC + sc, mask=sc_ok, other=0.0, cache_modifier=".cg")
                        pool_rows = tl.load(smp_ptr + 2 * NC + sc, mask=sc_ok, other=0.0, cache_modifier=".cg")
                        hr_rows = tl.load(smph_ptr + sh, mask=sh_ok, other=0.0, cache_modifier=".cg")
                        dh_rows = tl.load(smph_ptr + N * HID + sh, mask=sh_ok, other=0.0, cache_modifier=".cg")
                        g2 += tl.dot(tl.trans(dl_rows), hr_rows, input_precision="ieee")
                        g1 += tl.dot(tl.trans(dh_rows), pool_rows, input_precision="ieee")
                    tl.store(gfc2w_ptr + cc[:, None] * HID + hid[None, :], g2.to(gfc2w_ptr.dtype.element_ty),
                             mask=cc_ok[:, None] & hid_ok[None, :])
                    tl.store(gfc1w_ptr + hid[:, None] * C + cc[None, :], g1.to(gfc1w_ptr.dtype.element_ty),
                             mask=hid_ok[:, None] & cc_ok[None, :])
                    tl.store(gfc2b_ptr + cc, merge_sum_slots(smp_ptr + 3 * NC, C, 0, N, cc, cc_ok, BLOCK_S)
                             .to(gfc2b_ptr.dtype.element_ty), mask=cc_ok)
            if HAS_SE:
                tl.store(gfc1b_ptr + hid, merge_sum_slots(smph_ptr + N * HID, HID, 0, N, hid, hid_ok, BLOCK_S)
                         .to(gfc1b_ptr.dtype.element_ty), mask=hid_ok)


@triton.jit
def _conv2_backward_data_kernel(
    g_ptr, gx_ptr, bw_ptr, bm_ptr, bv_ptr, bsums_ptr, gate_ptr, dpool_ptr,   # de = BN3's input gradient
    w_ptr, c_ptr, cw_ptr, cb_ptr, cm_ptr, cv_ptr, out_ptr,                   # W2 (K, NOUT); c and BN2
    ws_ptr, ws2_ptr, cnt_ptr, sums_ptr, gw_ptr, gb_ptr,
    sg_n, sg_c, sg_h, sg_w, sx_n, sx_c, sx_h, sx_w, sc_n, sc_c, sc_h, sc_w, so_n, so_c, so_h, so_w,
    M, K, NOUT, HW, W, num_tiles, group, eps, inv_count, g_scale, inv_hw, c_eps,
    GATED: tl.constexpr, TRAINING: tl.constexpr, TILE_SAMPLE: tl.constexpr, IDX64: tl.constexpr,
    DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """out = g2 = (de @ w) * swish'(BN2(c)) = dL/d(BN2 output) (w (K, NOUT) row-major in the
    activations' dtype); sums (2, NOUT) = BN2's backward sums (sum g2, sum g2 * (c - mean2)) and
    its parameter gradients, merged in the kernel. TILE_SAMPLE: BLOCK_M divides H*W, so a tile's
    rows are of one sample."""
    tile = tl.program_id(0)
    pid_n = tl.program_id(1)
    n, p, row_ok = _flat_rows(tile, M, HW, BLOCK_M)
    if TILE_SAMPLE:
        sample = (tile * BLOCK_M) // HW
    else:
        sample = n
    g_rows = _pix_offsets(n, p, W, sg_n, sg_h, sg_w, IDX64)
    x_rows = _pix_offsets(n, p, W, sx_n, sx_h, sx_w, IDX64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < NOUT
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        a = _input_grad_tile(g_ptr, gx_ptr, g_rows, x_rows, sg_c, sx_c, sample, row_ok, ks, k_ok, K, bw_ptr, bm_ptr,
                             bv_ptr, bsums_ptr, gate_ptr, dpool_ptr, eps, inv_count, g_scale, inv_hw, GATED, TRAINING,
                             TILE_SAMPLE)
        w = tl.load(w_ptr + ks[:, None] * NOUT + cols[None, :], mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc += tl.dot(a.to(DOT_DTYPE), w.to(DOT_DTYPE), input_precision=DOT_PRECISION)
    mask = row_ok[:, None] & col_ok[None, :]
    c = _load(c_ptr, _pix_offsets(n, p, W, sc_n, sc_h, sc_w, IDX64), row_ok, cols, col_ok, sc_c)
    scale, shift = bn_affine(cw_ptr, cb_ptr, cm_ptr, cv_ptr, cols, col_ok, c_eps)
    g = tl.where(mask, acc * swish_grad(c * scale[None, :] + shift[None, :]), 0.0)
    _store(out_ptr, g, _pix_offsets(n, p, W, so_n, so_h, so_w, IDX64), row_ok, cols, col_ok, so_c)
    c_dev = tl.where(mask, c - load_vector(cm_ptr, cols, col_ok)[None, :], 0.0)
    tl.store(ws_ptr + tile * NOUT + cols, tl.sum(g, axis=0), mask=col_ok)
    tl.store(ws_ptr + (num_tiles + tile) * NOUT + cols, tl.sum(g * c_dev, axis=0), mask=col_ok)
    finish_sums(ws_ptr, ws2_ptr, cnt_ptr, tile, num_tiles, group, cols, NOUT, pid_n, tl.num_programs(1), sums_ptr,
                cw_ptr, cv_ptr, c_eps, gw_ptr, gb_ptr, _MERGE_BLOCK)


@triton.jit
def _weight_grad_kernel(
    g_ptr, gx_ptr, bw_ptr, bm_ptr, bv_ptr, bsums_ptr, gate_ptr, dpool_ptr,   # A = an input gradient [M, K1]
    z_ptr, zw_ptr, zb_ptr, zm_ptr, zv_ptr,                                   # B = f(z) [M, K2]
    out_ptr, ws_ptr, wsum_ptr, ws2_ptr, wsum2_ptr, part_ptr, cnt_ptr,
    w1_ptr, sums0_ptr, gw0_ptr, gb0_ptr,                                     # dW1 only: BN0's backward
    sg_n, sg_c, sg_h, sg_w, sx_n, sx_c, sx_h, sx_w, sz_n, sz_c, sz_h, sz_w,
    M, K1, K2, HW, W, rows_per_chunk, num_chunks, group, eps, inv_count, g_scale, inv_hw, z_eps,
    GATED: tl.constexpr, TRAINING: tl.constexpr, TILE_SAMPLE: tl.constexpr, B_SWISH: tl.constexpr,
    CONV1: tl.constexpr, IDX64: tl.constexpr,
    DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K1: tl.constexpr, BLOCK_K2: tl.constexpr,
):
    """out (K1, K2) = A^T @ B summed over all M rows: program (k1 block, k2 block, chunk) sums its
    chunk of rows; the last chunk of each group of ``group`` merges the group into ws2, the last
    group merges those (fixed order).

    B = swish(BN(z)) (B_SWISH: dW2 = de^T @ swish(BN2(c))) or xhat = (z - mean) / sqrt(var + eps)
    (CONV1: G = da^T @ xhat0). With CONV1 the merge writes dW1 = G * bn0.weight + (sum da) (x)
    bn0.bias, the tile's part of BN0's backward sums into part (2, K1 blocks, K2), and the last
    tile of each K2 block merges those: sums0 (2, K2) and BN0's parameter gradients."""
    pid_k1 = tl.program_id(0)
    pid_k2 = tl.program_id(1)
    chunk = tl.program_id(2)
    num_k1 = tl.num_programs(0)
    num_k2 = tl.num_programs(1)
    k1 = pid_k1 * BLOCK_K1 + tl.arange(0, BLOCK_K1)
    k1_ok = k1 < K1
    k2 = pid_k2 * BLOCK_K2 + tl.arange(0, BLOCK_K2)
    k2_ok = k2 < K2
    if B_SWISH:
        zscale, zshift = bn_affine(zw_ptr, zb_ptr, zm_ptr, zv_ptr, k2, k2_ok, z_eps)
    else:
        zscale = bn_invstd(zv_ptr, k2, k2_ok, z_eps)
        zshift = -load_vector(zm_ptr, k2, k2_ok) * zscale
    row_start = chunk * rows_per_chunk
    row_end = tl.minimum(row_start + rows_per_chunk, M)
    acc = tl.zeros([BLOCK_K1, BLOCK_K2], dtype=tl.float32)
    a_sum = tl.zeros([BLOCK_K1], dtype=tl.float32)
    for r0 in range(row_start, row_end, BLOCK_M):
        m = r0 + tl.arange(0, BLOCK_M)
        row_ok = m < row_end
        n = m // HW
        p = m - n * HW
        if TILE_SAMPLE:
            sample = r0 // HW
        else:
            sample = n
        a = _input_grad_tile(g_ptr, gx_ptr, _pix_offsets(n, p, W, sg_n, sg_h, sg_w, IDX64),
                             _pix_offsets(n, p, W, sx_n, sx_h, sx_w, IDX64), sg_c, sx_c, sample, row_ok, k1, k1_ok,
                             K1, bw_ptr, bm_ptr, bv_ptr, bsums_ptr, gate_ptr, dpool_ptr, eps, inv_count, g_scale,
                             inv_hw, GATED, TRAINING, TILE_SAMPLE)
        b = _load(z_ptr, _pix_offsets(n, p, W, sz_n, sz_h, sz_w, IDX64), row_ok, k2, k2_ok, sz_c)
        b = b * zscale[None, :] + zshift[None, :]
        if B_SWISH:
            b = swish(b)
        b = tl.where(row_ok[:, None] & k2_ok[None, :], b, 0.0)
        acc += tl.dot(tl.trans(a.to(DOT_DTYPE)), b.to(DOT_DTYPE), input_precision=DOT_PRECISION)
        a_sum += tl.sum(a, axis=0)

    tile_offs = k1[:, None].to(tl.int64) * K2 + k2[None, :]
    tile_ok = k1_ok[:, None] & k2_ok[None, :]
    matrix = K1 * K2
    tl.store(ws_ptr + chunk.to(tl.int64) * matrix + tile_offs, acc, mask=tile_ok)
    tl.store(wsum_ptr + (pid_k2 * num_chunks + chunk) * K1 + k1, a_sum, mask=k1_ok)
    num_groups = tl.cdiv(num_chunks, group)
    g = chunk // group
    first = g * group
    count = tl.minimum(group, num_chunks - first)
    tile_id = pid_k1 * num_k2 + pid_k2
    if arrive(cnt_ptr + tile_id * num_groups + g, count):
        acc = tl.zeros([BLOCK_K1, BLOCK_K2], dtype=tl.float32)
        a_sum = tl.zeros([BLOCK_K1], dtype=tl.float32)
        for i in range(first, first + count):
            acc += tl.load(ws_ptr + i * matrix + tile_offs, mask=tile_ok, other=0.0, cache_modifier=".cg")
            a_sum += tl.load(wsum_ptr + (pid_k2 * num_chunks + i) * K1 + k1, mask=k1_ok, other=0.0,
                             cache_modifier=".cg")
        tl.store(ws2_ptr + g.to(tl.int64) * matrix + tile_offs, acc, mask=tile_ok)
        tl.store(wsum2_ptr + (pid_k2 * num_groups + g) * K1 + k1, a_sum, mask=k1_ok)
        if arrive(cnt_ptr + num_k1 * num_k2 * num_groups + tile_id, num_groups):
            acc = tl.zeros([BLOCK_K1, BLOCK_K2], dtype=tl.float32)
            a_sum = tl.zeros([BLOCK_K1], dtype=tl.float32)
            for i in range(0, num_groups):
                acc += tl.load(ws2_ptr + i * matrix + tile_offs, mask=tile_ok, other=0.0, cache_modifier=".cg")
                a_sum += tl.load(wsum2_ptr + (pid_k2 * num_groups + i) * K1 + k1, mask=k1_ok, other=0.0,
                                 cache_modifier=".cg")
            if CONV1:
                # acc = G = da^T xhat0; dW1 = G * w0 + (sum da) (x) b0; BN0's sums for du = da @ W1
                out = acc * load_vector(zw_ptr, k2, k2_ok)[None, :] \
                    + a_sum[:, None] * load_vector(zb_ptr, k2, k2_ok)[None, :]
                tl.store(out_ptr + tile_offs, out.to(out_ptr.dtype.element_ty), mask=tile_ok)
                w1 = tl.load(w1_ptr + tile_offs, mask=tile_ok, other=0.0).to(tl.float32)
                tl.store(part_ptr + pid_k1 * K2 + k2, tl.sum(w1 * a_sum[:, None], axis=0), mask=k2_ok)
                tl.store(part_ptr + (num_k1 + pid_k1) * K2 + k2, tl.sum(w1 * acc, axis=0), mask=k2_ok)
                if arrive(cnt_ptr + num_k1 * num_k2 * (num_groups + 1) + pid_k2, num_k1):
                    sum_du = merge_sum_slots(part_ptr, K2, 0, num_k1, k2, k2_ok, _MERGE_BLOCK)
                    sum_du_xhat = merge_sum_slots(part_ptr + num_k1 * K2, K2, 0, num_k1, k2, k2_ok, _MERGE_BLOCK)
                    tl.store(sums0_ptr + k2, sum_du, mask=k2_ok)
                    tl.store(sums0_ptr + K2 + k2, sum_du_xhat / zscale, mask=k2_ok)
                    tl.store(gw0_ptr + k2, sum_du_xhat.to(gw0_ptr.dtype.element_ty), mask=k2_ok)
                    tl.store(gb0_ptr + k2, sum_du.to(gb0_ptr.dtype.element_ty), mask=k2_ok)
            else:
                tl.store(out_ptr + tile_offs, acc.to(out_ptr.dtype.element_ty), mask=tile_ok)


@triton.jit
def _conv1_backward_data_kernel(
    g_ptr, gx_ptr, bw_ptr, bm_ptr, bv_ptr, bsums_ptr,          # da = BN1's input gradient
    w_ptr, x_ptr, xw_ptr, xm_ptr, xv_ptr, xsums_ptr, res_ptr, out_ptr,
    sg_n, sg_c, sg_h, sg_w, sa_n, sa_c, sa_h, sa_w, sx_n, sx_c, sx_h, sx_w,
    sr_n, sr_c, sr_h, sr_w, so_n, so_c, so_h, so_w,
    M, K, NOUT, HW, W, a_eps, a_inv_count, eps, inv_count,
    TRAINING: tl.constexpr, HAS_RES: tl.constexpr, IDX64: tl.constexpr,
    DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """dx = (da @ w) * scale0 + kx0 * (x - mean0) + kc0 (+ res), w (K, NOUT) row-major in the
    activations' dtype; BN0's coefficients from its backward sums xsums (2, NOUT)."""
    tile = tl.program_id(0)
    n, p, row_ok = _flat_rows(tile, M, HW, BLOCK_M)
    g_rows = _pix_offsets(n, p, W, sg_n, sg_h, sg_w, IDX64)
    a_rows = _pix_offsets(n, p, W, sa_n, sa_h, sa_w, IDX64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < NOUT
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        a = _input_grad_tile(g_ptr, gx_ptr, g_rows, a_rows, sg_c, sa_c, n, row_ok, ks, k_ok, K, bw_ptr, bm_ptr,
                             bv_ptr, bsums_ptr, bsums_ptr, bsums_ptr, a_eps, a_inv_count, 1.0, 1.0, False, TRAINING,
                             False)
        w = tl.load(w_ptr + ks[:, None] * NOUT + cols[None, :], mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc += tl.dot(a.to(DOT_DTYPE), w.to(DOT_DTYPE), input_precision=DOT_PRECISION)
    scale, kx, kc = bn_backward_coefs(xw_ptr, xv_ptr, xsums_ptr, cols, col_ok, NOUT, eps, inv_count, TRAINING)
    x = _load(x_ptr, _pix_offsets(n, p, W, sx_n, sx_h, sx_w, IDX64), row_ok, cols, col_ok, sx_c)
    out = acc * scale[None, :] + kx[None, :] * (x - load_vector(xm_ptr, cols, col_ok)[None, :]) + kc[None, :]
    if HAS_RES:
        out += _load(res_ptr, _pix_offsets(n, p, W, sr_n, sr_h, sr_w, IDX64), row_ok, cols, col_ok, sr_c)
    _store(out_ptr, out, _pix_offsets(n, p, W, so_n, so_h, so_w, IDX64), row_ok, cols, col_ok, so_c)


# ---------------------------------------------------------------------------------------------
# Launchers (the op layer has validated shapes, devices and dtypes; vectors are contiguous)
# ---------------------------------------------------------------------------------------------

# Tiles of the GEMM stages on a GPU, largest first: (BLOCK_M, BLOCK_N, BLOCK_K for 16-bit
# operands, warps). A launch takes the first whose grid fills three quarters of the SMs at least
# (else the last): 128-row tiles where M allows. GEMM2's forward computes a sigmoid per element of
# its A tile in the prologue: its column block covers Cout (up to 256), so that each sigmoid is
# computed once, not once per column block. Chosen with ptxas's report for sm_90 at the preset
# shapes (tests/triton_aot.py --report): the first entries use <= 255 registers without spills,
# except conv2_backward_data's (8 bytes); conv1_backward_data's epilogue (x, the residual and the
# BN0 backward) needs its narrower tile not to spill.
_GEMM_TILES = {
    "conv1_forward": ((128, 128, 64, 8), (64, 128, 64, 4), (64, 64, 64, 4)),
    "conv2_forward": ((64, 256, 32, 8), (64, 128, 64, 4), (32, 128, 64, 4)),
    "conv2_backward_data": ((128, 128, 64, 8), (64, 128, 64, 4), (64, 64, 64, 4)),
    "conv1_backward_data": ((128, 64, 64, 4), (64, 64, 64, 4)),
}
# Weight-gradient tiles: (BLOCK_K1, BLOCK_K2, BLOCK_M = rows per dot for 16-bit operands, warps),
# both dot dims >= 64 where the matrix has them. dW2 = de^T @ swish(BN2(c)) covers Cout with its
# K1 block, so that the B operand's sigmoids are computed once.
_WEIGHT_GRAD_TILES = {"conv2": (256, 64, 32, 8), "conv1": (128, 128, 64, 8)}
# Programs of a weight-gradient launch per SM: its row chunks are summed in the kernel.
_WEIGHT_GRAD_PROGRAMS_PER_SM = 2


def _gpu(t: torch.Tensor) -> bool:
    """Whether a launch on t takes a GPU's tiles (the interpreter's are larger; the ahead-of-time
    compile check of tests/triton_aot.py takes a GPU's for CPU tensors)."""
    return t.is_cuda


def _sm_count(device: torch.device) -> int:
    """SMs of the GPU; 132 (an H100/H200) when compiling ahead of time without one."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132


def _dim(limit: int, size: int) -> int:
    """A block dimension: ``limit``, or the next power of two of ``size`` when smaller (>= 16 for tl.dot)."""
    return min(limit, max(16, triton.next_power_of_2(size)))


def _gemm_blocks(kind: str, M: int, K: int, NOUT: int, t: torch.Tensor) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, warps) of a GEMM stage over [M, K] x [K, NOUT] with operands like
    t. The interpreter runs programs one after another, so there tiles are larger."""
    if not _gpu(t):
        return 128, _dim(128, NOUT), _dim(128, K), 4
    fill = 3 * _sm_count(t.device) // 4
    k_scale = 2 if t.element_size() == 4 else 1    # fp32 tiles: half the K depth in the same shared memory
    candidates = [(bm, _dim(bn, NOUT), _dim(bk // k_scale, K), warps) for bm, bn, bk, warps in _GEMM_TILES[kind]]
    for bm, bn, bk, warps in candidates:
        if triton.cdiv(M, bm) * triton.cdiv(NOUT, bn) >= fill:
            return bm, bn, bk, warps
    return candidates[-1]


def _elementwise_blocks(device: torch.device, C: int, rows: int) -> tuple[int, int]:
    elements = 4096 if device.type == "cuda" else 65536
    block_c = min(triton.next_power_of_2(C), 64 if device.type == "cuda" else 256)
    return max(1, min(triton.next_power_of_2(rows), elements // block_c)), block_c


def _needs_int64(*tensors: torch.Tensor) -> bool:
    """Whether an element offset of any of the tensors may reach 2**31."""
    return any(t is not None and t.numel() and sum((s - 1) * abs(st) for s, st in zip(t.shape, t.stride())) >= 2**31
               for t in tensors)


def _channels_last(N: int, C: int, H: int, W: int, like: torch.Tensor) -> torch.Tensor:
    return torch.empty((N, C, H, W), device=like.device, dtype=like.dtype, memory_format=torch.channels_last)


def _f32(shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    return torch.empty(shape, device=like.device, dtype=torch.float32)


def _running_args(running) -> tuple[list, float, float, bool]:
    """Pointers (mean, var, num_batches_tracked), momentum, unbias and the RUNNING flag."""
    if running is None:
        return [None, None, None], 0.0, 1.0, False
    return [running.mean, running.var, running.num_batches_tracked], running.momentum, running.unbias, True


def _bn_ptrs(bn) -> list[torch.Tensor]:
    return [bn.weight, bn.bias, bn.mean, bn.var]


def _image_tiling(N: int, HW: int, block_m: int) -> tuple[int, int, int]:
    """(block_m, images per tile, tiles per image) of row tiles aligned to images."""
    hwp = triton.next_power_of_2(HW)
    if hwp <= block_m // 2:
        return block_m, block_m // hwp, 1
    block_m = min(block_m, max(16, hwp))
    return block_m, 1, triton.cdiv(HW, block_m)


def _launch(kernel, grid, counters: torch.Tensor, *args, **kwargs) -> None:
    with counters_reset_on_error(counters):
        kernel[grid](*args, **kwargs)


def bn_stats(x: torch.Tensor, out: torch.Tensor, running=None) -> None:
    """out (2, C) = mean and biased variance of x per channel, fp32; the running update when given."""
    N, C, H, W = x.shape
    M = N * H * W
    block_m, block_c = _elementwise_blocks(x.device, C, M)
    tiles, cblocks = triton.cdiv(M, block_m), triton.cdiv(C, block_c)
    group = two_level_groups(tiles)
    ws, ws2 = _f32((3, tiles, C), x), _f32((3, triton.cdiv(tiles, group), C), x)
    counters = arrival_counters(x.device, cblocks * (triton.cdiv(tiles, group) + 1))
    run, momentum, unbias, has_run = _running_args(running)
    _launch(_stats_kernel, (tiles, cblocks), counters, x, ws, ws2, counters, out, *run, *strides4(x),
            M, C, H * W, W, tiles, group, momentum, unbias,
            RUNNING=has_run, IDX64=_needs_int64(x), BLOCK_M=block_m, BLOCK_C=block_c)


def _forward_gemm(x, bn, weight, swish_prologue, stats, running, sum_e):
    """Launches _forward_gemm_kernel on row tiles aligned to images (whole images per tile when
    they are small, else tiles within one image)."""
    N, K, H, W = x.shape
    NOUT = weight.shape[0]
    HW = H * W
    block_m, block_n, block_k, warps = _gemm_blocks("conv2_forward" if swish_prologue else "conv1_forward", N * HW, K,
                                                    NOUT, x)
    block_m, imgs, tiles_per_img = _image_tiling(N, HW, block_m)
    tiles = triton.cdiv(N, imgs) if imgs > 1 else N * tiles_per_img
    cblocks = triton.cdiv(NOUT, block_n)
    # groups: the tiles of one image when an image spans several (their merge gives its sum)
    group = tiles_per_img if sum_e is not None and tiles_per_img > 1 else two_level_groups(tiles)
    groups = triton.cdiv(tiles, group)
    y = _channels_last(N, NOUT, H, W, x)
    ws, ws2 = _f32((3, tiles, NOUT), x), _f32((3, groups, NOUT), x)
    counters = arrival_counters(x.device, cblocks * (groups + 1))
    run, momentum, unbias, has_run = _running_args(running)
    _launch(_forward_gemm_kernel, (tiles, cblocks), counters,
            x, weight, *_bn_ptrs(bn), y, ws, ws2, counters, stats, *run, sum_e, *strides4(x), *strides4(y),
            N, K, NOUT, HW, W, tiles_per_img, tiles, group, bn.eps, momentum, unbias,
            SWISH=swish_prologue, STATS=stats is not None, RUNNING=has_run,
            IMAGE_SUMS=sum_e is not None and tiles_per_img == 1, IMAGE_PARTIALS=sum_e is not None and tiles_per_img > 1,
            IMGS=imgs,
            IDX64=_needs_int64(x, y), DOT_DTYPE=dot_dtype(x), DOT_PRECISION=dot_precision(x),
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps,
            num_stages=gemm_stages(x, (block_m + block_n) * block_k * x.element_size()))
    return y


def conv1_forward(x: torch.Tensor, bn0, w1: torch.Tensor, stats: torch.Tensor | None = None, running=None
                  ) -> torch.Tensor:
    """a = BN0(x) @ w1^T (w1 (EC, Cin) in x's dtype), channels-last in x's dtype; stats (2, EC) =
    a's batch statistics when given, with the running update."""
    return _forward_gemm(x, bn0, w1, False, stats, running, None)


def conv2_forward(c: torch.Tensor, bn2, w2: torch.Tensor, stats: torch.Tensor | None = None, running=None,
                  sum_e: torch.Tensor | None = None) -> torch.Tensor:
    """e = swish(BN2(c)) @ w2^T (w2 (Cout, EC) in c's dtype), channels-last; stats (2, Cout) = e's
    batch statistics when given (+ running update); sum_e (N, Cout) = e summed over H, W when given."""
    return _forward_gemm(c, bn2, w2, True, stats, running, sum_e)


def _se_args(se, like: torch.Tensor) -> tuple[list, int, int]:
    """(fc pointers, hidden size, BLOCK_H) of squeeze-excitation (None pointers without it)."""
    if se is None:
        return [None] * 4, 1, 16
    hidden = se.fc1_weight.shape[0]
    return [se.fc1_weight, se.fc1_bias, se.fc2_weight, se.fc2_bias], hidden, max(16, triton.next_power_of_2(hidden))


def output_forward(e: torch.Tensor, bn3, se, sum_e: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
    """out = skip + 0.1 * BN3(e) * gate[n, c] (gate: SE's MLP on the pooled BN3(e), from sum_e;
    1 without SE), in skip's dtype and layout."""
    out = torch.empty_like(skip)
    N, C, H, W = e.shape
    block_m, block_c = _elementwise_blocks(e.device, C, H * W)
    tiles_per_img = triton.cdiv(H * W, block_m)
    fc, hidden, block_h = _se_args(se, e)
    _output_kernel[(N * tiles_per_img, triton.cdiv(C, block_c))](
        e, skip, out, *_bn_ptrs(bn3), sum_e, *fc, *strides4(e), *strides4(skip), *strides4(out),
        N, C, H * W, W, hidden, tiles_per_img, bn3.eps, 1.0 / (H * W),
        HAS_SE=se is not None, IDX64=_needs_int64(e, skip, out), BLOCK_M=block_m, BLOCK_C=block_c, BLOCK_H=block_h,
    )
    return out


def output_backward(dout: torch.Tensor, e: torch.Tensor, bn3, se, sum_e: torch.Tensor, sums: torch.Tensor,
                    gate: torch.Tensor | None, d_pool: torch.Tensor | None, grads: tuple[torch.Tensor, ...]) -> None:
    """The output stage's and SE's backward (contract: ops.gen_cell._torch_output_backward)."""
    N, C, H, W = e.shape
    block_m, block_c = _elementwise_blocks(e.device, C, H * W)
    tiles_per_img = triton.cdiv(H * W, block_m)
    slots = N * tiles_per_img
    block_c = max(16, block_c)   # the SE gradients' tl.dot needs 16 columns
    fc, hidden, block_h = _se_args(se, e)
    ws, smp, smph = _f32((2, slots, C), e), _f32((6, N, C), e), _f32((2, N, hidden), e)
    counters = arrival_counters(e.device, N + 1)
    se_grads = list(grads[2:]) if se is not None else [None] * 4
    _launch(_output_backward_kernel, (slots, triton.cdiv(C, block_c)), counters,
            dout, e, *_bn_ptrs(bn3), sum_e, *fc, ws, smp, smph, counters, sums,
            gate if gate is not None else sums, d_pool if d_pool is not None else sums, grads[0], grads[1], *se_grads,
            *strides4(dout), *strides4(e), N, C, H * W, W, hidden, tiles_per_img, slots, bn3.eps, 1.0 / (H * W),
            HAS_SE=se is not None, IDX64=_needs_int64(dout, e), BLOCK_M=block_m, BLOCK_C=block_c, BLOCK_H=block_h,
            BLOCK_S=16)


def _input_grad_args(spec) -> tuple[list, dict]:
    """Positional arguments (g, x, BN weight, mean, var, sums, gate, d_pool) and the numbers
    (eps, inv_count, g_scale, inv_hw, GATED, TRAINING) of a BatchNormInputGrad."""
    gated = spec.gate is not None
    sums = spec.grad.sums
    ptrs = [spec.g, spec.x, spec.bn.weight, spec.bn.mean, spec.bn.var, sums,
            spec.gate if gated else sums, spec.d_pool if gated else sums]
    H, W = spec.g.shape[2:]
    numbers = dict(eps=spec.bn.eps, inv_count=1.0 / spec.grad.count, g_scale=spec.g_scale, inv_hw=1.0 / (H * W),
                   GATED=gated, TRAINING=spec.grad.training)
    return ptrs, numbers


def conv2_backward_data(de, c: torch.Tensor, bn2, w2: torch.Tensor, sums: torch.Tensor,
                        grads: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """g2 = (dL/de @ w2) * swish'(BN2(c)) (w2 (Cout, EC) in c's dtype), channels-last in c's dtype;
    sums (2, EC) = BN2's backward sums, grads = its parameter gradients."""
    N, K, H, W = de.g.shape
    NOUT = c.shape[1]
    M = N * H * W
    block_m, block_n, block_k, warps = _gemm_blocks("conv2_backward_data", M, K, NOUT, c)
    tiles, cblocks = triton.cdiv(M, block_m), triton.cdiv(NOUT, block_n)
    group = two_level_groups(tiles)
    groups = triton.cdiv(tiles, group)
    out = torch.empty_like(c, memory_format=torch.channels_last)
    ws, ws2 = _f32((2, tiles, NOUT), c), _f32((2, groups, NOUT), c)
    counters = arrival_counters(c.device, cblocks * (groups + 1))
    ptrs, nums = _input_grad_args(de)
    _launch(_conv2_backward_data_kernel, (tiles, cblocks), counters,
            *ptrs, w2, c, bn2.weight, bn2.bias, bn2.mean, bn2.var, out, ws, ws2, counters, sums, *grads,
            *strides4(de.g), *strides4(de.x), *strides4(c), *strides4(out),
            M, K, NOUT, H * W, W, tiles, group, nums["eps"], nums["inv_count"], nums["g_scale"], nums["inv_hw"],
            bn2.eps,
            GATED=nums["GATED"], TRAINING=nums["TRAINING"], TILE_SAMPLE=H * W % block_m == 0,
            IDX64=_needs_int64(de.g, de.x, c, out),
            DOT_DTYPE=dot_dtype(c), DOT_PRECISION=dot_precision(c), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
            num_warps=warps, num_stages=gemm_stages(c, (2 * block_m + block_n) * block_k * c.element_size()))
    return out


def _weight_grad(spec, z: torch.Tensor, zbn, out: torch.Tensor, conv1, w1=None, sums0=None, grads0=None) -> None:
    N, K1, H, W = spec.g.shape
    K2 = z.shape[1]
    M = N * H * W
    if _gpu(z):
        k1, k2, block_m, warps = _WEIGHT_GRAD_TILES["conv1" if conv1 else "conv2"]
        block_k1, block_k2 = _dim(k1, K1), _dim(k2, K2)
        if z.element_size() == 4:
            block_m //= 2     # fp32 tiles: half the rows per dot in the same shared memory
    else:
        block_k1, block_k2, block_m, warps = _dim(128, K1), _dim(128, K2), 128, 4
    grid_k = (triton.cdiv(K1, block_k1), triton.cdiv(K2, block_k2))
    programs = _WEIGHT_GRAD_PROGRAMS_PER_SM * _sm_count(z.device) if _gpu(z) else 1
    chunks = max(1, min(triton.cdiv(M, block_m), triton.cdiv(programs, grid_k[0] * grid_k[1])))
    rows_per_chunk = triton.cdiv(triton.cdiv(M, chunks), block_m) * block_m
    chunks = triton.cdiv(M, rows_per_chunk)
    group = two_level_groups(chunks)
    groups = triton.cdiv(chunks, group)
    ws, ws2 = _f32((chunks, K1, K2), z), _f32((groups, K1, K2), z)
    wsum, wsum2 = _f32((grid_k[1], chunks, K1), z), _f32((grid_k[1], groups, K1), z)
    part = _f32((2, grid_k[0], K2), z)
    tiles = grid_k[0] * grid_k[1]
    counters = arrival_counters(z.device, tiles * (groups + 1) + grid_k[1])
    ptrs, nums = _input_grad_args(spec)
    _launch(_weight_grad_kernel, (*grid_k, chunks), counters,
            *ptrs, z, zbn.weight, zbn.bias, zbn.mean, zbn.var, out, ws, wsum, ws2, wsum2, part, counters,
            w1 if conv1 else out, sums0 if conv1 else out, grads0[0] if conv1 else out, grads0[1] if conv1 else out,
            *strides4(spec.g), *strides4(spec.x), *strides4(z),
            M, K1, K2, H * W, W, rows_per_chunk, chunks, group, nums["eps"], nums["inv_count"], nums["g_scale"],
            nums["inv_hw"], zbn.eps, GATED=nums["GATED"], TRAINING=nums["TRAINING"],
            TILE_SAMPLE=H * W % block_m == 0, B_SWISH=not conv1, CONV1=conv1,
            IDX64=_needs_int64(spec.g, spec.x, z), DOT_DTYPE=dot_dtype(z), DOT_PRECISION=dot_precision(z),
            BLOCK_M=block_m, BLOCK_K1=block_k1, BLOCK_K2=block_k2, num_warps=warps,
            num_stages=gemm_stages(z, block_m * (2 * block_k1 + block_k2) * z.element_size()))


def conv2_weight_grad(de, c: torch.Tensor, bn2, out: torch.Tensor) -> None:
    """out (Cout, EC) = dL/de^T @ swish(BN2(c)), in out's dtype."""
    _weight_grad(de, c, bn2, out, conv1=False)


def conv1_weight_grad(da, x: torch.Tensor, bn0, w1: torch.Tensor, out: torch.Tensor, sums: torch.Tensor,
                      grads: tuple[torch.Tensor, torch.Tensor]) -> None:
    """out (EC, Cin) = dW1 = dL/da^T @ BN0(x); sums (2, Cin) = BN0's backward sums of du = da @ w1
    (w1 the conv weight (EC, Cin)); grads = BN0's parameter gradients."""
    _weight_grad(da, x, bn0, out, conv1=True, w1=w1, sums0=sums, grads0=grads)


def conv1_backward_data(da, w1: torch.Tensor, x: torch.Tensor, bn0, grad0, residual: torch.Tensor | None = None
                        ) -> torch.Tensor:
    """dx = BN0's backward of du = dL/da @ w1 (w1 (EC, Cin) in x's dtype) (+ residual), in x's dtype
    and layout."""
    N, K, H, W = da.g.shape
    NOUT = x.shape[1]
    M = N * H * W
    block_m, block_n, block_k, warps = _gemm_blocks("conv1_backward_data", M, K, NOUT, x)
    out = torch.empty_like(x)
    res = residual if residual is not None else x
    ptrs, nums = _input_grad_args(da)
    if nums["TRAINING"] != grad0.training:
        raise ValueError("conv1_backward_data: da and grad0 must both come from training or both from eval")
    _conv1_backward_data_kernel[(triton.cdiv(M, block_m), triton.cdiv(NOUT, block_n))](
        *ptrs[:6], w1, x, bn0.weight, bn0.mean, bn0.var, grad0.sums, res, out,
        *strides4(da.g), *strides4(da.x), *strides4(x), *strides4(res), *strides4(out),
        M, K, NOUT, H * W, W, nums["eps"], nums["inv_count"], bn0.eps, 1.0 / grad0.count,
        TRAINING=grad0.training, HAS_RES=residual is not None, IDX64=_needs_int64(da.g, da.x, x, res, out),
        DOT_DTYPE=dot_dtype(x), DOT_PRECISION=dot_precision(x), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        num_warps=warps, num_stages=gemm_stages(x, (2 * block_m + block_n) * block_k * x.element_size()),
    )
    return out
