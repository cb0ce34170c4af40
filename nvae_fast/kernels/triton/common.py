"""Pieces every Triton kernel module shares: addressing, Swish, tanh, Welford tiles, finalizers.

Reductions across programs write fp32 partials to a workspace ``ws[k, slot, column]`` that are
merged in a fixed slot order, so results are deterministic (no floating-point atomics) and accurate
(Welford/Chan merging for moments). Two ways to merge them:

* a separate finalize kernel (:func:`finalize_stats`, :func:`finalize_sums`), one more launch;
* in the kernel itself: the last program to arrive at an arrival counter (:func:`arrive`) merges
  the partials its group wrote. With :func:`arrival_counters` and a two-level structure (groups of
  about sqrt(slots) programs merge into group partials, the last group merges those) no program
  merges more than a few dozen partials and no launch is spent on the merge.
"""

from __future__ import annotations

import contextlib
import math

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
    count, mean, m2 = merge_welford_slots(ws_ptr, num_slots, C, 0, num_slots, cols, col_ok, BLOCK_P)
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
    return stages_within(getattr(torch.cuda.get_device_properties(t.device), "shared_memory_per_block_optin", 0),
                         stage_bytes)


def stages_within(limit: int, stage_bytes: int) -> int:
    """:func:`gemm_stages` for a GPU with ``limit`` bytes of shared memory per block (0: unknown)."""
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


# ---------------------------------------------------------------------------------------------
# Merging partials in the kernel that wrote them: arrival counters
# ---------------------------------------------------------------------------------------------

@triton.jit
def arrive(counter_ptr, expected):
    """True in exactly one of the ``expected`` programs that call it on one counter: the last to
    arrive, which may then read every partial the others stored before arriving. It also resets
    the counter to 0, so that every counter is 0 again when the kernel ends.

    Memory ordering, on a GPU where programs run concurrently in any order: each program stores
    its partials (plain stores by all its threads), then a CTA barrier (``debug_barrier`` is
    ``bar.sync``) orders all those stores before the one thread that performs the counter's
    atomic add, with acq_rel semantics at GPU scope. Its release half publishes the stores the
    barrier ordered before it (release is cumulative in the PTX memory model); its acquire half,
    in the last arriver, synchronises with every earlier add (each add reads the value the
    previous one wrote, and each is itself acq_rel, so happens-before chains through all of
    them). Triton hands the add's result to the other threads through shared memory behind a
    second barrier, so the merging threads' loads are ordered after the acquire; they bypass L1
    (``.cg``) so that no line cached before the acquire can be read. The reset is relaxed: the
    next launch on the stream starts after this one ends. Under the interpreter programs run one
    after another, so the last program in launch order merges.
    """
    tl.debug_barrier()
    old = tl.atomic_add(counter_ptr, 1, sem="acq_rel", scope="gpu")
    last = old == expected - 1
    if last:
        tl.atomic_xchg(counter_ptr, 0, sem="relaxed", scope="gpu")
    return last


@triton.jit
def merge_welford_slots(ws_ptr, num_slots, C, first, count_slots, cols, col_ok, BLOCK_S: tl.constexpr):
    """(count, mean, M2) per column of slots [first, first + count_slots) of a (3, num_slots, C)
    fp32 Welford workspace, merged in slot order (blocks of BLOCK_S slots, Chan's merge between)."""
    count = tl.zeros(cols.shape, dtype=tl.float32)
    mean = tl.zeros(cols.shape, dtype=tl.float32)
    m2 = tl.zeros(cols.shape, dtype=tl.float32)
    end = first + count_slots
    for s0 in range(first, end, BLOCK_S):
        slots = s0 + tl.arange(0, BLOCK_S)
        mask = (slots < end)[:, None] & col_ok[None, :]
        offs = slots[:, None].to(tl.int64) * C + cols[None, :]
        n_p = tl.load(ws_ptr + offs, mask=mask, other=0.0, cache_modifier=".cg")
        mean_p = tl.load(ws_ptr + num_slots * C + offs, mask=mask, other=0.0, cache_modifier=".cg")
        m2_p = tl.load(ws_ptr + 2 * num_slots * C + offs, mask=mask, other=0.0, cache_modifier=".cg")
        tile_n = tl.sum(n_p, axis=0)
        tile_mean = tl.sum(n_p * mean_p, axis=0) / tl.maximum(tile_n, 1.0)
        dev = mean_p - tile_mean[None, :]
        tile_m2 = tl.sum(m2_p + n_p * dev * dev, axis=0)
        count, mean, m2 = welford_merge(count, mean, m2, tile_n, tile_mean, tile_m2)
    return count, mean, m2


@triton.jit
def merge_sum_slots(ws_ptr, C, first, count_slots, cols, col_ok, BLOCK_S: tl.constexpr):
    """Per-column sum of rows [first, first + count_slots) of a (slots, C) fp32 workspace, in
    slot order."""
    acc = tl.zeros(cols.shape, dtype=tl.float32)
    end = first + count_slots
    for s0 in range(first, end, BLOCK_S):
        slots = s0 + tl.arange(0, BLOCK_S)
        mask = (slots < end)[:, None] & col_ok[None, :]
        offs = slots[:, None].to(tl.int64) * C + cols[None, :]
        acc += tl.sum(tl.load(ws_ptr + offs, mask=mask, other=0.0, cache_modifier=".cg"), axis=0)
    return acc


@triton.jit
def load_vector(ptr, cols, col_ok):
    """fp32 values of a per-channel vector (any float dtype), 0 outside ``col_ok``."""
    return tl.load(ptr + cols, mask=col_ok, other=0.0).to(tl.float32)


@triton.jit
def bn_invstd(var_ptr, cols, col_ok, eps):
    """1 / sqrt(var + eps), correctly rounded (per channel: the cost does not matter, the bits do)."""
    return tl.div_rn(1.0, tl.sqrt_rn(load_vector(var_ptr, cols, col_ok) + eps))


@triton.jit
def bn_affine(w_ptr, b_ptr, mean_ptr, var_ptr, cols, col_ok, eps):
    """(scale, shift) of a BatchNorm as the per-channel affine ``x * scale + shift`` (fp32)."""
    scale = load_vector(w_ptr, cols, col_ok) * bn_invstd(var_ptr, cols, col_ok, eps)
    return scale, load_vector(b_ptr, cols, col_ok) - load_vector(mean_ptr, cols, col_ok) * scale


@triton.jit
def bn_backward_coefs(w_ptr, var_ptr, sums_ptr, cols, col_ok, C, eps, inv_count, TRAINING: tl.constexpr):
    """(scale, kx, kc) of BatchNorm's backward ``dx = scale * g + kx * (x - mean) + kc`` with g the
    gradient of its output and ``sums`` (2, C) = (sum g, sum g * (x - mean)) over the batch. In
    eval the statistics are constants: kx = kc = 0."""
    invstd = bn_invstd(var_ptr, cols, col_ok, eps)
    scale = load_vector(w_ptr, cols, col_ok) * invstd
    if TRAINING:
        kx = -scale * invstd * invstd * load_vector(sums_ptr + C, cols, col_ok) * inv_count
        kc = -scale * load_vector(sums_ptr, cols, col_ok) * inv_count
    else:
        kx = tl.zeros(cols.shape, dtype=tl.float32)
        kc = tl.zeros(cols.shape, dtype=tl.float32)
    return scale, kx, kc


@triton.jit
def finish_bn_stats(count, mean, m2, cols, col_ok, stat_ptr, C, rmean_ptr, rvar_ptr, nbt_ptr, momentum, unbias,
                    first_block, RUNNING: tl.constexpr):
    """Writes mean and biased variance to ``stat`` (2, C); with RUNNING also the running statistics
    as torch.nn.BatchNorm2d updates them (``running += momentum * (batch - running)``, unbiased
    variance ``var * unbias``) and, in the program of the first channel block, num_batches_tracked."""
    var = m2 / tl.maximum(count, 1.0)
    tl.store(stat_ptr + cols, mean, mask=col_ok)
    tl.store(stat_ptr + C + cols, var, mask=col_ok)
    if RUNNING:
        old_mean = load_vector(rmean_ptr, cols, col_ok)
        old_var = load_vector(rvar_ptr, cols, col_ok)
        tl.store(rmean_ptr + cols, (old_mean + momentum * (mean - old_mean)).to(rmean_ptr.dtype.element_ty),
                 mask=col_ok)
        tl.store(rvar_ptr + cols, (old_var + momentum * (var * unbias - old_var)).to(rvar_ptr.dtype.element_ty),
                 mask=col_ok)
        if first_block:
            tl.store(nbt_ptr, tl.load(nbt_ptr) + 1)


@triton.jit
def finish_welford(ws_ptr, ws2_ptr, cnt_ptr, slot, num_slots, group, cols, C, pid_c, num_cblocks,
                   stat_ptr, rmean_ptr, rvar_ptr, nbt_ptr, momentum, unbias, sum_ptr,
                   STATS: tl.constexpr, RUNNING: tl.constexpr, GROUP_SUMS: tl.constexpr, BLOCK_S: tl.constexpr):
    """The in-kernel merge of Welford partials, after this program stored its (count, mean, M2)
    in ``slot`` of ws (3, num_slots, C) for its channel block ``pid_c``.

    Level 1: the last of each group of ``group`` consecutive slots merges them into ws2
    (3, groups, C) (with GROUP_SUMS also writing the group's sum, count * mean, to sum[g] (C,):
    the per-image sums when groups are the tiles of one image). Level 2 (STATS): the last group
    merges ws2 and writes mean, biased variance and the running update (:func:`finish_bn_stats`).
    Uses num_cblocks * (groups + 1) counters from ``cnt``."""
    col_ok = cols < C
    num_groups = tl.cdiv(num_slots, group)
    g = slot // group
    first = g * group
    if arrive(cnt_ptr + pid_c * num_groups + g, tl.minimum(group, num_slots - first)):
        count, mean, m2 = merge_welford_slots(ws_ptr, num_slots, C, first, tl.minimum(group, num_slots - first),
                                              cols, col_ok, BLOCK_S)
        if GROUP_SUMS:
            tl.store(sum_ptr + g.to(tl.int64) * C + cols, count * mean, mask=col_ok)
        if STATS:
            store_welford(ws2_ptr, g, num_groups, cols, C, count, mean, m2)
            if arrive(cnt_ptr + num_cblocks * num_groups + pid_c, num_groups):
                count, mean, m2 = merge_welford_slots(ws2_ptr, num_groups, C, 0, num_groups, cols, col_ok, BLOCK_S)
                finish_bn_stats(count, mean, m2, cols, col_ok, stat_ptr, C, rmean_ptr, rvar_ptr, nbt_ptr, momentum,
                                unbias, pid_c == 0, RUNNING)


@triton.jit
def finish_sums(ws_ptr, ws2_ptr, cnt_ptr, slot, num_slots, group, cols, C, pid_c, num_cblocks, out_ptr,
                w_ptr, var_ptr, eps, gw_ptr, gb_ptr, BLOCK_S: tl.constexpr):
    """The in-kernel two-level merge of a BatchNorm's backward partial sums, after this program
    stored its (sum g, sum g * (x - mean)) in ``slot`` of ws (2, num_slots, C): out (2, C) = the
    sums, and the BatchNorm's parameter gradients gw = out[1] / sqrt(var + eps), gb = out[0].
    Uses num_cblocks * (groups + 1) counters from ``cnt``."""
    col_ok = cols < C
    num_groups = tl.cdiv(num_slots, group)
    g = slot // group
    first = g * group
    n = tl.minimum(group, num_slots - first)
    if arrive(cnt_ptr + pid_c * num_groups + g, n):
        s0 = merge_sum_slots(ws_ptr, C, first, n, cols, col_ok, BLOCK_S)
        s1 = merge_sum_slots(ws_ptr + num_slots * C, C, first, n, cols, col_ok, BLOCK_S)
        tl.store(ws2_ptr + g * C + cols, s0, mask=col_ok)
        tl.store(ws2_ptr + (num_groups + g) * C + cols, s1, mask=col_ok)
        if arrive(cnt_ptr + num_cblocks * num_groups + pid_c, num_groups):
            s0 = merge_sum_slots(ws2_ptr, C, 0, num_groups, cols, col_ok, BLOCK_S)
            s1 = merge_sum_slots(ws2_ptr + num_groups * C, C, 0, num_groups, cols, col_ok, BLOCK_S)
            tl.store(out_ptr + cols, s0, mask=col_ok)
            tl.store(out_ptr + C + cols, s1, mask=col_ok)
            invstd = bn_invstd(var_ptr, cols, col_ok, eps)
            tl.store(gw_ptr + cols, (s1 * invstd).to(gw_ptr.dtype.element_ty), mask=col_ok)
            tl.store(gb_ptr + cols, s0.to(gb_ptr.dtype.element_ty), mask=col_ok)


def two_level_groups(slots: int) -> int:
    """Group size of a two-level merge of ``slots`` partials: about sqrt(slots), so that neither
    level merges more than a few dozen (2048 slots: 45 groups of 46)."""
    return max(1, math.isqrt(max(slots - 1, 0)) + 1)


_COUNTERS: dict[tuple, torch.Tensor] = {}


def arrival_counters(device: torch.device, count: int) -> torch.Tensor:
    """int32 zeros for :func:`arrive`, at least ``count`` of them: one buffer per device and CUDA
    stream, allocated once (kernels that use counters leave them at 0; kernels on one stream run
    one after another, so they can share the buffer). Allocate before capturing a CUDA graph (a
    warm-up step does)."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else None
    key = (device, stream)
    buffer = _COUNTERS.get(key)
    if buffer is None or buffer.numel() < count:
        buffer = torch.zeros(max(count, 4096), dtype=torch.int32, device=device)
        _COUNTERS[key] = buffer
    return buffer


@contextlib.contextmanager
def counters_reset_on_error(counters: torch.Tensor):
    """Zeroes the counters if a launch fails part-way (then some may have been left non-zero)."""
    try:
        yield
    except BaseException:
        counters.zero_()
        raise
