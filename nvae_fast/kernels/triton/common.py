"""Pieces every Triton kernel module shares: addressing, Swish, tanh, Welford tiles, finalizers.

Reductions across programs follow one pattern: each program writes fp32 partials to a workspace
``ws[k, program, column]`` and a finalize kernel merges them in program order, so results are
deterministic (no atomics) and accurate (Welford/Chan merging for moments).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def row_offsets(rows, HW, W, s_n, s_h, s_w):
    """Element offsets of flat pixel indices ``rows = n * HW + h * W + w`` (int64)."""
    rows = rows.to(tl.int64)
    n = rows // HW
    hw = rows - n * HW
    h = hw // W
    return n * s_n + h * s_h + (hw - h * W) * s_w


@triton.jit
def swish(z):
    return z * tl.sigmoid(z)


@triton.jit
def swish_grad(z):
    """d swish(z) / dz."""
    s = tl.sigmoid(z)
    return s * (1.0 + z * (1.0 - s))


@triton.jit
def tanh(x):
    """tanh to fp32 accuracy from tl.exp alone (libdevice is not available to the interpreter).

    Near zero ``1 - exp(-2|x|)`` cancels, so |x| < 0.25 uses the Taylor series to x^9 (its next
    term is below 1e-8 relative there).
    """
    ax = tl.abs(x)
    t = tl.exp(-2.0 * ax)
    big = (1.0 - t) / (1.0 + t)
    x2 = x * x
    small = ax * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 + x2 * (-17.0 / 315.0 + x2 * (62.0 / 2835.0)))))
    r = tl.where(ax < 0.25, small, big)
    return tl.where(x < 0.0, -r, r)


@triton.jit
def welford_tile(x, valid):
    """(count, mean, M2) per column of the fp32 tile ``x`` over its rows where ``valid`` holds."""
    count = tl.sum(valid.to(tl.float32), axis=0)
    mean = tl.sum(tl.where(valid, x, 0.0), axis=0) / tl.maximum(count, 1.0)
    dev = tl.where(valid, x - mean[None, :], 0.0)
    return count, mean, tl.sum(dev * dev, axis=0)


@triton.jit
def welford_merge(count, mean, m2, tile_count, tile_mean, tile_m2):
    """Chan et al.'s merge of two (count, mean, M2) partials."""
    total = count + tile_count
    delta = tile_mean - mean
    w_tile = tile_count / tl.maximum(total, 1.0)
    return total, mean + delta * w_tile, m2 + tile_m2 + delta * delta * count * w_tile


@triton.jit
def store_welford(ws_ptr, slot, num_slots, cols, C, count, mean, m2):
    """Writes a (count, mean, M2) partial to ``ws[0|1|2, slot, cols]`` of a (3, num_slots, C) workspace."""
    col_ok = cols < C
    base = ws_ptr + slot.to(tl.int64) * C + cols
    tl.store(base, count, mask=col_ok)
    tl.store(base + num_slots * C, mean, mask=col_ok)
    tl.store(base + 2 * num_slots * C, m2, mask=col_ok)


@triton.jit
def _stats_finalize_kernel(ws_ptr, mean_ptr, var_ptr, C, num_slots, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """Merges the (count, mean, M2) partials of a (3, num_slots, C) workspace, in slot order."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    count = tl.zeros([BLOCK_C], dtype=tl.float32)
    mean = tl.zeros([BLOCK_C], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_C], dtype=tl.float32)
    for p0 in range(0, num_slots, BLOCK_P):
        slots = p0 + tl.arange(0, BLOCK_P)
        mask = (slots < num_slots)[:, None] & col_ok[None, :]
        offs = slots[:, None].to(tl.int64) * C + cols[None, :]
        n_p = tl.load(ws_ptr + offs, mask=mask, other=0.0)
        mean_p = tl.load(ws_ptr + num_slots * C + offs, mask=mask, other=0.0)
        m2_p = tl.load(ws_ptr + 2 * num_slots * C + offs, mask=mask, other=0.0)
        tile_n = tl.sum(n_p, axis=0)
        tile_mean = tl.sum(n_p * mean_p, axis=0) / tl.maximum(tile_n, 1.0)
        dev = mean_p - tile_mean[None, :]
        tile_m2 = tl.sum(m2_p + n_p * dev * dev, axis=0)
        count, mean, m2 = welford_merge(count, mean, m2, tile_n, tile_mean, tile_m2)
    tl.store(mean_ptr + cols, mean, mask=col_ok)
    tl.store(var_ptr + cols, m2 / tl.maximum(count, 1.0), mask=col_ok)


@triton.jit
def _sums_finalize_kernel(ws_ptr, out_ptr, C, num_slots, K, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """out[k, c] = sum over slots of ws[k, slot, c] for k < K, in slot order."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    for k in range(K):
        acc = tl.zeros([BLOCK_C], dtype=tl.float32)
        for p0 in range(0, num_slots, BLOCK_P):
            slots = p0 + tl.arange(0, BLOCK_P)
            mask = (slots < num_slots)[:, None] & col_ok[None, :]
            offs = (k * num_slots + slots[:, None]).to(tl.int64) * C + cols[None, :]
            acc += tl.sum(tl.load(ws_ptr + offs, mask=mask, other=0.0), axis=0)
        tl.store(out_ptr + k * C + cols, acc, mask=col_ok)


def finalize_stats(ws: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, biased var), fp32 (C,), from a (3, slots, C) workspace of Welford partials."""
    _, slots, C = ws.shape
    mean = torch.empty(C, device=ws.device, dtype=torch.float32)
    var = torch.empty_like(mean)
    block_c = min(triton.next_power_of_2(C), 128)
    _stats_finalize_kernel[(triton.cdiv(C, block_c),)](ws, mean, var, C, slots, BLOCK_P=32, BLOCK_C=block_c)
    return mean, var


def finalize_sums(ws: torch.Tensor) -> torch.Tensor:
    """(K, C) fp32 sums over the slots of a (K, slots, C) workspace of partial sums."""
    K, slots, C = ws.shape
    out = torch.empty((K, C), device=ws.device, dtype=torch.float32)
    block_c = min(triton.next_power_of_2(C), 128)
    _sums_finalize_kernel[(triton.cdiv(C, block_c),)](ws, out, C, slots, K, BLOCK_P=32, BLOCK_C=block_c)
    return out


def reduction_programs(device: torch.device, other_programs: int) -> int:
    """How many programs should split a reduction so that, with ``other_programs`` independent
    ones beside each, the device holds about four per SM. The interpreter runs programs one after
    another, so there few large ones are fastest."""
    if device.type != "cuda":
        return 1
    target = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, target // max(other_programs, 1))


def strides4(t: torch.Tensor) -> tuple[int, int, int, int]:
    """(s_n, s_c, s_h, s_w) of a 4-D tensor."""
    return t.stride(0), t.stride(1), t.stride(2), t.stride(3)


_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def dot_dtype(t: torch.Tensor) -> tl.dtype:
    """``tl.dot`` operand dtype for activations like ``t``: their own. The interpreter cannot
    multiply bfloat16 (it multiplies the bit patterns, triton-lang/triton#11584), so there
    bfloat16 operands go in as fp32; GPU runs keep bfloat16."""
    if t.dtype == torch.bfloat16 and not t.is_cuda:
        return tl.float32
    return _TL_DTYPES[t.dtype]


def gemm_stages(t: torch.Tensor, stage_bytes: int) -> int:
    """Software-pipelining depth of a GEMM kernel whose operand tiles take ``stage_bytes`` of
    shared memory per stage: 3, or fewer where the GPU's per-block shared memory (99 KiB on
    sm_86/sm_89, 163 KiB on sm_80, 227 KiB on sm_90) cannot hold them. Compiled with Triton 3.9,
    the fp32 GEMMs here take about (2·stages − 1)·stage_bytes, so 2·stage_bytes per stage is
    budgeted."""
    if not t.is_cuda:
        return 3
    limit = getattr(torch.cuda.get_device_properties(t.device), "shared_memory_per_block_optin", 0)
    if not limit:
        return 3
    return max(1, min(3, limit // (2 * max(stage_bytes, 1))))


def dot_precision(t: torch.Tensor) -> str:
    """``tl.dot`` input precision for activations like ``t``: fp32 GEMMs follow PyTorch's
    convolution setting (``torch.backends.cudnn.allow_tf32``, on by default), as the eager 1x1
    convolutions they replace do; half-precision inputs are exact products anyway."""
    if t.dtype == torch.float32 and t.is_cuda and torch.backends.cudnn.allow_tf32:
        return "tf32"
    return "ieee"
