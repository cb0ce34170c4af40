"""Triton kernels of the residual-normal KL (contract and math: nvae_fast/ops/normal_kl.py).

Every tensor is addressed as (n, c, hw) with its own strides, so ``torch.chunk`` views of a
parameter tensor (NCHW or channels-last) are read in place; a view whose H and W cannot be merged
into one stride is copied first. A program covers one sample n, a block of channels and a chunk of
H*W; the reductions write per-(n, chunk, c) fp32 partials that torch sums in a fixed order
(deterministic), and every backward is a single elementwise pass.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from nvae_fast.kernels.triton.common import reduction_programs, tanh

HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)
SIGMA_MIN = 1e-2


@triton.jit
def _load(ptr, n, cols, hw, s_n, s_c, s_hw, mask):
    offs = n.to(tl.int64) * s_n + cols[:, None].to(tl.int64) * s_c + hw[None, :].to(tl.int64) * s_hw
    return tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _store(ptr, value, n, cols, hw, s_n, s_c, s_hw, mask):
    offs = n.to(tl.int64) * s_n + cols[:, None].to(tl.int64) * s_c + hw[None, :].to(tl.int64) * s_hw
    tl.store(ptr + offs, value.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _clamp_mu(raw):
    """(5 tanh(raw / 5), its derivative)."""
    mu = 5.0 * tanh(raw / 5.0)
    return mu, 1.0 - mu * mu / 25.0


@triton.jit
def _clamp_sigma(raw):
    """(exp(5 tanh(raw / 5)) + 0.01, its derivative)."""
    log_sigma = 5.0 * tanh(raw / 5.0)
    e = tl.exp(log_sigma)
    return e + 0.01, e * (1.0 - log_sigma * log_sigma / 25.0)


@triton.jit
def _tile(hw_start, hw_end, h0, C, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    hw = h0 + tl.arange(0, BLOCK_HW)
    return cols, hw, (cols < C)[:, None] & (hw < hw_end)[None, :]


@triton.jit
def _store_partials(ws_ptr, n, chunk, num_chunks, N, C, kl, log_q, log_p, BLOCK_C: tl.constexpr):
    """ws[k, n * num_chunks + chunk, c] for k = kl, log_q, log_p."""
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    plane = N * num_chunks * C
    base = ws_ptr + (n * num_chunks + chunk) * C + cols
    tl.store(base, kl, mask=col_ok)
    tl.store(base + plane, log_q, mask=col_ok)
    tl.store(base + 2 * plane, log_p, mask=col_ok)


@triton.jit
def _normal_kl_forward_kernel(
    mp_ptr, lsp_ptr, mq_ptr, lsq_ptr, eps_ptr, z_ptr, ws_ptr,
    smp_n, smp_c, smp_hw, slp_n, slp_c, slp_hw, smq_n, smq_c, smq_hw, slq_n, slq_c, slq_hw,
    se_n, se_c, se_hw, sz_n, sz_c, sz_hw,
    N, C, HW, hw_per_prog, num_chunks, half_log_2pi,
    HAS_PRIOR: tl.constexpr, RESIDUAL: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    n = tl.program_id(0)
    chunk = tl.program_id(2)
    hw_start = chunk * hw_per_prog
    hw_end = tl.minimum(hw_start + hw_per_prog, HW)
    acc_kl = tl.zeros([BLOCK_C], dtype=tl.float32)
    acc_q = tl.zeros([BLOCK_C], dtype=tl.float32)
    acc_p = tl.zeros([BLOCK_C], dtype=tl.float32)
    for h0 in range(hw_start, hw_end, BLOCK_HW):
        cols, hw, mask = _tile(hw_start, hw_end, h0, C, BLOCK_C, BLOCK_HW)
        mq_raw = _load(mq_ptr, n, cols, hw, smq_n, smq_c, smq_hw, mask)
        lsq_raw = _load(lsq_ptr, n, cols, hw, slq_n, slq_c, slq_hw, mask)
        e = _load(eps_ptr, n, cols, hw, se_n, se_c, se_hw, mask)
        if HAS_PRIOR:
            mp_raw = _load(mp_ptr, n, cols, hw, smp_n, smp_c, smp_hw, mask)
            lsp_raw = _load(lsp_ptr, n, cols, hw, slp_n, slp_c, slp_hw, mask)
            mp, _ = _clamp_mu(mp_raw)
            sp, _ = _clamp_sigma(lsp_raw)
            if RESIDUAL:
                mq_raw += mp_raw
                lsq_raw += lsp_raw
        else:
            mp = tl.zeros([BLOCK_C, BLOCK_HW], dtype=tl.float32)
            sp = tl.full([BLOCK_C, BLOCK_HW], 1.0 + 0.01, dtype=tl.float32)
        mq, _ = _clamp_mu(mq_raw)
        sq, _ = _clamp_sigma(lsq_raw)
        z = mq + sq * e
        _store(z_ptr, z, n, cols, hw, sz_n, sz_c, sz_hw, mask)
        log_q = -0.5 * e * e - half_log_2pi - tl.log(sq)
        zn = (z - mp) / sp
        log_p = -0.5 * zn * zn - half_log_2pi - tl.log(sp)
        t1 = (mq - mp) / sp
        t2 = sq / sp
        kl = 0.5 * (t1 * t1 + t2 * t2) - 0.5 - tl.log(t2)
        acc_kl += tl.sum(tl.where(mask, kl, 0.0), axis=1)
        acc_q += tl.sum(tl.where(mask, log_q, 0.0), axis=1)
        acc_p += tl.sum(tl.where(mask, log_p, 0.0), axis=1)
    _store_partials(ws_ptr, n, chunk, num_chunks, N, C, acc_kl, acc_q, acc_p, BLOCK_C)


@triton.jit
def _normal_kl_backward_kernel(
    gz_ptr, gka_ptr, gq_ptr, gp_ptr, gkd_ptr,
    mp_ptr, lsp_ptr, mq_ptr, lsq_ptr, eps_ptr, dmp_ptr, dlsp_ptr, dmq_ptr, dlsq_ptr,
    sgz_n, sgz_c, sgz_hw, smp_n, smp_c, smp_hw, slp_n, slp_c, slp_hw, smq_n, smq_c, smq_hw,
    slq_n, slq_c, slq_hw, se_n, se_c, se_hw, sdmp_n, sdmp_c, sdmp_hw, sdlp_n, sdlp_c, sdlp_hw,
    sdmq_n, sdmq_c, sdmq_hw, sdlq_n, sdlq_c, sdlq_hw,
    N, C, HW, hw_per_prog,
    HAS_GZ: tl.constexpr, HAS_PRIOR: tl.constexpr, RESIDUAL: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    n = tl.program_id(0)
    hw_start = tl.program_id(2) * hw_per_prog
    hw_end = tl.minimum(hw_start + hw_per_prog, HW)
    cols0 = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    g_kl = (tl.load(gka_ptr + n) + tl.load(gkd_ptr + cols0, mask=cols0 < C, other=0.0) / N)[:, None]
    g_q = tl.load(gq_ptr + n)
    g_p = tl.load(gp_ptr + n)
    for h0 in range(hw_start, hw_end, BLOCK_HW):
        cols, hw, mask = _tile(hw_start, hw_end, h0, C, BLOCK_C, BLOCK_HW)
        mq_raw = _load(mq_ptr, n, cols, hw, smq_n, smq_c, smq_hw, mask)
        lsq_raw = _load(lsq_ptr, n, cols, hw, slq_n, slq_c, slq_hw, mask)
        e = _load(eps_ptr, n, cols, hw, se_n, se_c, se_hw, mask)
        if HAS_PRIOR:
            mp_raw = _load(mp_ptr, n, cols, hw, smp_n, smp_c, smp_hw, mask)
            lsp_raw = _load(lsp_ptr, n, cols, hw, slp_n, slp_c, slp_hw, mask)
            mp, dmp = _clamp_mu(mp_raw)
            sp, dsp = _clamp_sigma(lsp_raw)
            if RESIDUAL:
                mq_raw += mp_raw
                lsq_raw += lsp_raw
        else:
            mp = tl.zeros([BLOCK_C, BLOCK_HW], dtype=tl.float32)
            sp = tl.full([BLOCK_C, BLOCK_HW], 1.0 + 0.01, dtype=tl.float32)
        mq, dmq = _clamp_mu(mq_raw)
        sq, dsq = _clamp_sigma(lsq_raw)
        z = mq + sq * e
        inv_var_p = 1.0 / (sp * sp)
        z_dev = z - mp
        m_dev = mq - mp
        g_z = -g_p * z_dev * inv_var_p
        if HAS_GZ:
            g_z += _load(gz_ptr, n, cols, hw, sgz_n, sgz_c, sgz_hw, mask)
        d_mq_raw = (g_z + g_kl * m_dev * inv_var_p) * dmq
        d_lsq_raw = (e * g_z - g_q / sq + g_kl * (sq * inv_var_p - 1.0 / sq)) * dsq
        _store(dmq_ptr, d_mq_raw, n, cols, hw, sdmq_n, sdmq_c, sdmq_hw, mask)
        _store(dlsq_ptr, d_lsq_raw, n, cols, hw, sdlq_n, sdlq_c, sdlq_hw, mask)
        if HAS_PRIOR:
            d_mp_raw = (g_p * z_dev * inv_var_p - g_kl * m_dev * inv_var_p) * dmp
            d_lsp_raw = (g_p * (z_dev * z_dev * inv_var_p - 1.0)
                         + g_kl * (1.0 - (m_dev * m_dev + sq * sq) * inv_var_p)) / sp * dsp
            if RESIDUAL:
                d_mp_raw += d_mq_raw
                d_lsp_raw += d_lsq_raw
            _store(dmp_ptr, d_mp_raw, n, cols, hw, sdmp_n, sdmp_c, sdmp_hw, mask)
            _store(dlsp_ptr, d_lsp_raw, n, cols, hw, sdlp_n, sdlp_c, sdlp_hw, mask)


@triton.jit
def _sample_forward_kernel(
    mu_ptr, ls_ptr, eps_ptr, z_ptr,
    sm_n, sm_c, sm_hw, sl_n, sl_c, sl_hw, se_n, se_c, se_hw, sz_n, sz_c, sz_hw,
    C, HW, hw_per_prog, temperature,
    HAS_PRIOR: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    n = tl.program_id(0)
    hw_start = tl.program_id(2) * hw_per_prog
    hw_end = tl.minimum(hw_start + hw_per_prog, HW)
    for h0 in range(hw_start, hw_end, BLOCK_HW):
        cols, hw, mask = _tile(hw_start, hw_end, h0, C, BLOCK_C, BLOCK_HW)
        e = _load(eps_ptr, n, cols, hw, se_n, se_c, se_hw, mask)
        if HAS_PRIOR:
            mu, _ = _clamp_mu(_load(mu_ptr, n, cols, hw, sm_n, sm_c, sm_hw, mask))
            sigma, _ = _clamp_sigma(_load(ls_ptr, n, cols, hw, sl_n, sl_c, sl_hw, mask))
            z = mu + temperature * sigma * e
        else:
            z = temperature * (1.0 + 0.01) * e
        _store(z_ptr, z, n, cols, hw, sz_n, sz_c, sz_hw, mask)


@triton.jit
def _sample_backward_kernel(
    gz_ptr, mu_ptr, ls_ptr, eps_ptr, dmu_ptr, dls_ptr,
    sg_n, sg_c, sg_hw, sm_n, sm_c, sm_hw, sl_n, sl_c, sl_hw, se_n, se_c, se_hw,
    sdm_n, sdm_c, sdm_hw, sdl_n, sdl_c, sdl_hw,
    C, HW, hw_per_prog, temperature,
    BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    n = tl.program_id(0)
    hw_start = tl.program_id(2) * hw_per_prog
    hw_end = tl.minimum(hw_start + hw_per_prog, HW)
    for h0 in range(hw_start, hw_end, BLOCK_HW):
        cols, hw, mask = _tile(hw_start, hw_end, h0, C, BLOCK_C, BLOCK_HW)
        g = _load(gz_ptr, n, cols, hw, sg_n, sg_c, sg_hw, mask)
        _, dmu = _clamp_mu(_load(mu_ptr, n, cols, hw, sm_n, sm_c, sm_hw, mask))
        _, dsigma = _clamp_sigma(_load(ls_ptr, n, cols, hw, sl_n, sl_c, sl_hw, mask))
        e = _load(eps_ptr, n, cols, hw, se_n, se_c, se_hw, mask)
        _store(dmu_ptr, g * dmu, n, cols, hw, sdm_n, sdm_c, sdm_hw, mask)
        _store(dls_ptr, g * temperature * e * dsigma, n, cols, hw, sdl_n, sdl_c, sdl_hw, mask)


@triton.jit
def _flow_kl_forward_kernel(
    mp_ptr, lsp_ptr, lsq_ptr, eps_ptr, z_ptr, ld_ptr, ws_ptr,
    smp_n, smp_c, smp_hw, slp_n, slp_c, slp_hw, slq_n, slq_c, slq_hw, se_n, se_c, se_hw,
    sz_n, sz_c, sz_hw, sd_n, sd_c, sd_hw,
    N, C, HW, hw_per_prog, num_chunks, half_log_2pi,
    HAS_PRIOR: tl.constexpr, RESIDUAL: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    n = tl.program_id(0)
    chunk = tl.program_id(2)
    hw_start = chunk * hw_per_prog
    hw_end = tl.minimum(hw_start + hw_per_prog, HW)
    acc_kl = tl.zeros([BLOCK_C], dtype=tl.float32)
    acc_q = tl.zeros([BLOCK_C], dtype=tl.float32)
    acc_p = tl.zeros([BLOCK_C], dtype=tl.float32)
    for h0 in range(hw_start, hw_end, BLOCK_HW):
        cols, hw, mask = _tile(hw_start, hw_end, h0, C, BLOCK_C, BLOCK_HW)
        lsq_raw = _load(lsq_ptr, n, cols, hw, slq_n, slq_c, slq_hw, mask)
        e = _load(eps_ptr, n, cols, hw, se_n, se_c, se_hw, mask)
        z = _load(z_ptr, n, cols, hw, sz_n, sz_c, sz_hw, mask)
        log_det = _load(ld_ptr, n, cols, hw, sd_n, sd_c, sd_hw, mask)
        if HAS_PRIOR:
            lsp_raw = _load(lsp_ptr, n, cols, hw, slp_n, slp_c, slp_hw, mask)
            mp, _ = _clamp_mu(_load(mp_ptr, n, cols, hw, smp_n, smp_c, smp_hw, mask))
            sp, _ = _clamp_sigma(lsp_raw)
            if RESIDUAL:
                lsq_raw += lsp_raw
        else:
            mp = tl.zeros([BLOCK_C, BLOCK_HW], dtype=tl.float32)
            sp = tl.full([BLOCK_C, BLOCK_HW], 1.0 + 0.01, dtype=tl.float32)
        sq, _ = _clamp_sigma(lsq_raw)
        log_q = -0.5 * e * e - half_log_2pi - tl.log(sq) - log_det
        zn = (z - mp) / sp
        log_p = -0.5 * zn * zn - half_log_2pi - tl.log(sp)
        acc_kl += tl.sum(tl.where(mask, log_q - log_p, 0.0), axis=1)
        acc_q += tl.sum(tl.where(mask, log_q, 0.0), axis=1)
        acc_p += tl.sum(tl.where(mask, log_p, 0.0), axis=1)
    _store_partials(ws_ptr, n, chunk, num_chunks, N, C, acc_kl, acc_q, acc_p, BLOCK_C)


@triton.jit
def _flow_kl_backward_kernel(
    gka_ptr, gq_ptr, gp_ptr, gkd_ptr,
    mp_ptr, lsp_ptr, lsq_ptr, z_ptr, dmp_ptr, dlsp_ptr, dlsq_ptr, dz_ptr, dld_ptr,
    smp_n, smp_c, smp_hw, slp_n, slp_c, slp_hw, slq_n, slq_c, slq_hw, sz_n, sz_c, sz_hw,
    sdmp_n, sdmp_c, sdmp_hw, sdlp_n, sdlp_c, sdlp_hw, sdlq_n, sdlq_c, sdlq_hw, sdz_n, sdz_c, sdz_hw,
    sdd_n, sdd_c, sdd_hw,
    N, C, HW, hw_per_prog,
    HAS_PRIOR: tl.constexpr, RESIDUAL: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    n = tl.program_id(0)
    hw_start = tl.program_id(2) * hw_per_prog
    hw_end = tl.minimum(hw_start + hw_per_prog, HW)
    cols0 = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    g_kl = (tl.load(gka_ptr + n) + tl.load(gkd_ptr + cols0, mask=cols0 < C, other=0.0) / N)[:, None]
    g_q = tl.load(gq_ptr + n) + g_kl   # kl = log_q - log_p
    g_p = tl.load(gp_ptr + n) - g_kl
    for h0 in range(hw_start, hw_end, BLOCK_HW):
        cols, hw, mask = _tile(hw_start, hw_end, h0, C, BLOCK_C, BLOCK_HW)
        lsq_raw = _load(lsq_ptr, n, cols, hw, slq_n, slq_c, slq_hw, mask)
        z = _load(z_ptr, n, cols, hw, sz_n, sz_c, sz_hw, mask)
        if HAS_PRIOR:
            lsp_raw = _load(lsp_ptr, n, cols, hw, slp_n, slp_c, slp_hw, mask)
            mp, dmp = _clamp_mu(_load(mp_ptr, n, cols, hw, smp_n, smp_c, smp_hw, mask))
            sp, dsp = _clamp_sigma(lsp_raw)
            if RESIDUAL:
                lsq_raw += lsp_raw
        else:
            mp = tl.zeros([BLOCK_C, BLOCK_HW], dtype=tl.float32)
            sp = tl.full([BLOCK_C, BLOCK_HW], 1.0 + 0.01, dtype=tl.float32)
        sq, dsq = _clamp_sigma(lsq_raw)
        inv_var_p = 1.0 / (sp * sp)
        z_dev = z - mp
        d_lsq_raw = -g_q / sq * dsq
        _store(dlsq_ptr, d_lsq_raw, n, cols, hw, sdlq_n, sdlq_c, sdlq_hw, mask)
        _store(dz_ptr, -g_p * z_dev * inv_var_p, n, cols, hw, sdz_n, sdz_c, sdz_hw, mask)
        _store(dld_ptr, -g_q + tl.zeros([BLOCK_C, BLOCK_HW], dtype=tl.float32), n, cols, hw,
               sdd_n, sdd_c, sdd_hw, mask)
        if HAS_PRIOR:
            d_mp_raw = g_p * z_dev * inv_var_p * dmp
            d_lsp_raw = g_p * (z_dev * z_dev * inv_var_p - 1.0) / sp * dsp
            if RESIDUAL:
                d_lsp_raw += d_lsq_raw
            _store(dmp_ptr, d_mp_raw, n, cols, hw, sdmp_n, sdmp_c, sdmp_hw, mask)
            _store(dlsp_ptr, d_lsp_raw, n, cols, hw, sdlp_n, sdlp_c, sdlp_hw, mask)


# ---------------------------------------------------------------------------------------------
# Launchers (the op layer has validated shapes, devices and dtypes)
# ---------------------------------------------------------------------------------------------

def _mergeable(t: torch.Tensor) -> torch.Tensor:
    """t itself if its H and W merge into one stride, else a contiguous copy."""
    H, W = t.shape[2:]
    return t if H == 1 or W == 1 or t.stride(2) == W * t.stride(3) else t.contiguous()


def _empty_like(t: torch.Tensor) -> torch.Tensor:
    """A new dense tensor like t (its layout when H and W merge, else contiguous)."""
    out = torch.empty_like(t)
    return out if _mergeable(out) is out else torch.empty(t.shape, dtype=t.dtype, device=t.device)


def _strides(t: torch.Tensor | None) -> tuple[int, int, int]:
    """(s_n, s_c, s_hw) of a tensor prepared by _mergeable; zeros for an absent one."""
    if t is None:
        return 0, 0, 0
    return t.stride(0), t.stride(1), t.stride(3) if t.shape[3] > 1 else t.stride(2)


class _Launch:
    """Grid and block sizes for (N, C, H*W): programs (n, channel block, H*W chunk)."""

    def __init__(self, like: torch.Tensor) -> None:
        N, C, H, W = like.shape
        HW = H * W
        self.N, self.C, self.HW = N, C, HW
        self.block_hw = min(triton.next_power_of_2(HW), 128)
        self.block_c = min(triton.next_power_of_2(C), max(1, 2048 // self.block_hw))
        c_blocks = triton.cdiv(C, self.block_c)
        chunks = min(triton.cdiv(HW, self.block_hw), reduction_programs(like.device, N * c_blocks))
        self.hw_per_prog = triton.cdiv(triton.cdiv(HW, chunks), self.block_hw) * self.block_hw
        self.chunks = triton.cdiv(HW, self.hw_per_prog)
        self.grid = (N, c_blocks, self.chunks)

    def workspace(self, device: torch.device) -> torch.Tensor:
        return torch.empty((3, self.N * self.chunks, self.C), device=device, dtype=torch.float32)

    def group_sums(self, ws: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(kl_all, log_q, log_p, kl_diag) from the per-(n, chunk, c) partials."""
        sums = ws.view(3, self.N, self.chunks, self.C).sum(dim=2)
        return sums[0].sum(dim=1), sums[1].sum(dim=1), sums[2].sum(dim=1), sums[0].mean(dim=0)


def _per_sample(grad: torch.Tensor | None, size: int, device: torch.device) -> torch.Tensor:
    if grad is None:
        return torch.zeros(size, device=device, dtype=torch.float32)
    return grad.to(torch.float32).contiguous()


def normal_kl_forward(mu_p, log_sigma_p, mu_q, log_sigma_q, eps, residual):
    """-> (z, kl_all, log_q, log_p, kl_diag); z dense in mu_q's dtype, sums fp32."""
    mu_p, log_sigma_p = (None, None) if mu_p is None else (_mergeable(mu_p), _mergeable(log_sigma_p))
    mu_q, log_sigma_q, eps = _mergeable(mu_q), _mergeable(log_sigma_q), _mergeable(eps)
    launch = _Launch(mu_q)
    z = _empty_like(mu_q)
    ws = launch.workspace(mu_q.device)
    has_prior = mu_p is not None
    _normal_kl_forward_kernel[launch.grid](
        mu_p if has_prior else mu_q, log_sigma_p if has_prior else mu_q, mu_q, log_sigma_q, eps, z, ws,
        *_strides(mu_p), *_strides(log_sigma_p), *_strides(mu_q), *_strides(log_sigma_q), *_strides(eps),
        *_strides(z), launch.N, launch.C, launch.HW, launch.hw_per_prog, launch.chunks, HALF_LOG_2PI,
        HAS_PRIOR=has_prior, RESIDUAL=residual, BLOCK_C=launch.block_c, BLOCK_HW=launch.block_hw,
    )
    return (z, *launch.group_sums(ws))


def normal_kl_backward(grad_z, grad_kl_all, grad_log_q, grad_log_p, grad_kl_diag,
                       mu_p, log_sigma_p, mu_q, log_sigma_q, eps, residual):
    """-> (d_mu_p, d_log_sigma_p, d_mu_q, d_log_sigma_q); prior grads None for the standard prior."""
    has_prior = mu_p is not None
    mu_p, log_sigma_p = (_mergeable(mu_p), _mergeable(log_sigma_p)) if has_prior else (None, None)
    mu_q, log_sigma_q, eps = _mergeable(mu_q), _mergeable(log_sigma_q), _mergeable(eps)
    grad_z = None if grad_z is None else _mergeable(grad_z)
    launch = _Launch(mu_q)
    device = mu_q.device
    d_mu_q, d_log_sigma_q = _empty_like(mu_q), _empty_like(log_sigma_q)
    d_mu_p, d_log_sigma_p = (_empty_like(mu_p), _empty_like(log_sigma_p)) if has_prior else (None, None)
    _normal_kl_backward_kernel[launch.grid](
        grad_z if grad_z is not None else mu_q,
        _per_sample(grad_kl_all, launch.N, device), _per_sample(grad_log_q, launch.N, device),
        _per_sample(grad_log_p, launch.N, device), _per_sample(grad_kl_diag, launch.C, device),
        mu_p if has_prior else mu_q, log_sigma_p if has_prior else mu_q, mu_q, log_sigma_q, eps,
        d_mu_p if has_prior else d_mu_q, d_log_sigma_p if has_prior else d_mu_q, d_mu_q, d_log_sigma_q,
        *_strides(grad_z), *_strides(mu_p), *_strides(log_sigma_p), *_strides(mu_q), *_strides(log_sigma_q),
        *_strides(eps), *_strides(d_mu_p), *_strides(d_log_sigma_p), *_strides(d_mu_q), *_strides(d_log_sigma_q),
        launch.N, launch.C, launch.HW, launch.hw_per_prog,
        HAS_GZ=grad_z is not None, HAS_PRIOR=has_prior, RESIDUAL=residual,
        BLOCK_C=launch.block_c, BLOCK_HW=launch.block_hw,
    )
    return d_mu_p, d_log_sigma_p, d_mu_q, d_log_sigma_q


def normal_sample_forward(mu, log_sigma, eps, temperature):
    """-> z, dense, in eps's dtype for the standard prior (mu None), else mu's."""
    has_prior = mu is not None
    mu, log_sigma = (_mergeable(mu), _mergeable(log_sigma)) if has_prior else (None, None)
    eps = _mergeable(eps)
    z = _empty_like(mu if has_prior else eps)
    launch = _Launch(eps)
    _sample_forward_kernel[launch.grid](
        mu if has_prior else eps, log_sigma if has_prior else eps, eps, z,
        *_strides(mu), *_strides(log_sigma), *_strides(eps), *_strides(z),
        launch.C, launch.HW, launch.hw_per_prog, float(temperature),
        HAS_PRIOR=has_prior, BLOCK_C=launch.block_c, BLOCK_HW=launch.block_hw,
    )
    return z


def normal_sample_backward(grad_z, mu, log_sigma, eps, temperature):
    """-> (d_mu, d_log_sigma), dense, in the params' dtypes."""
    grad_z, mu, log_sigma, eps = _mergeable(grad_z), _mergeable(mu), _mergeable(log_sigma), _mergeable(eps)
    d_mu, d_log_sigma = _empty_like(mu), _empty_like(log_sigma)
    launch = _Launch(mu)
    _sample_backward_kernel[launch.grid](
        grad_z, mu, log_sigma, eps, d_mu, d_log_sigma,
        *_strides(grad_z), *_strides(mu), *_strides(log_sigma), *_strides(eps), *_strides(d_mu),
        *_strides(d_log_sigma), launch.C, launch.HW, launch.hw_per_prog, float(temperature),
        BLOCK_C=launch.block_c, BLOCK_HW=launch.block_hw,
    )
    return d_mu, d_log_sigma


def flow_kl_forward(mu_p, log_sigma_p, log_sigma_q, eps, z, log_det, residual):
    """-> (kl_all, log_q, log_p, kl_diag), fp32."""
    has_prior = mu_p is not None
    mu_p, log_sigma_p = (_mergeable(mu_p), _mergeable(log_sigma_p)) if has_prior else (None, None)
    log_sigma_q, eps, z, log_det = _mergeable(log_sigma_q), _mergeable(eps), _mergeable(z), _mergeable(log_det)
    launch = _Launch(z)
    ws = launch.workspace(z.device)
    _flow_kl_forward_kernel[launch.grid](
        mu_p if has_prior else z, log_sigma_p if has_prior else z, log_sigma_q, eps, z, log_det, ws,
        *_strides(mu_p), *_strides(log_sigma_p), *_strides(log_sigma_q), *_strides(eps), *_strides(z),
        *_strides(log_det), launch.N, launch.C, launch.HW, launch.hw_per_prog, launch.chunks, HALF_LOG_2PI,
        HAS_PRIOR=has_prior, RESIDUAL=residual, BLOCK_C=launch.block_c, BLOCK_HW=launch.block_hw,
    )
    return launch.group_sums(ws)


def flow_kl_backward(grad_kl_all, grad_log_q, grad_log_p, grad_kl_diag,
                     mu_p, log_sigma_p, log_sigma_q, eps, z, log_det, residual):
    """-> (d_mu_p, d_log_sigma_p, d_log_sigma_q, d_z, d_log_det); prior grads None for the standard prior."""
    has_prior = mu_p is not None
    mu_p, log_sigma_p = (_mergeable(mu_p), _mergeable(log_sigma_p)) if has_prior else (None, None)
    log_sigma_q, z = _mergeable(log_sigma_q), _mergeable(z)
    launch = _Launch(z)
    device = z.device
    d_log_sigma_q, d_z, d_log_det = _empty_like(log_sigma_q), _empty_like(z), _empty_like(log_det)
    d_mu_p, d_log_sigma_p = (_empty_like(mu_p), _empty_like(log_sigma_p)) if has_prior else (None, None)
    _flow_kl_backward_kernel[launch.grid](
        _per_sample(grad_kl_all, launch.N, device), _per_sample(grad_log_q, launch.N, device),
        _per_sample(grad_log_p, launch.N, device), _per_sample(grad_kl_diag, launch.C, device),
        mu_p if has_prior else z, log_sigma_p if has_prior else z, log_sigma_q, z,
        d_mu_p if has_prior else d_z, d_log_sigma_p if has_prior else d_z, d_log_sigma_q, d_z, d_log_det,
        *_strides(mu_p), *_strides(log_sigma_p), *_strides(log_sigma_q), *_strides(z), *_strides(d_mu_p),
        *_strides(d_log_sigma_p), *_strides(d_log_sigma_q), *_strides(d_z), *_strides(d_log_det),
        launch.N, launch.C, launch.HW, launch.hw_per_prog,
        HAS_PRIOR=has_prior, RESIDUAL=residual, BLOCK_C=launch.block_c, BLOCK_HW=launch.block_hw,
    )
    return d_mu_p, d_log_sigma_p, d_log_sigma_q, d_z, d_log_det
