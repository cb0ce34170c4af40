"""Triton kernels of the batched power iteration (contract: nvae_fast/ops/spectral_norm.py).

One program owns one matrix for the whole call: it copies the matrix's vectors to the outputs, walks the matrix in [BLOCK_R, BLOCK_C] tiles
for each half-iteration, keeps the running vectors in the output buffers (a barrier
between writing a vector and reading it back), and ends with sigma = u^T W v. Every matrix of the
model is done in one launch whatever their shapes; each reduction runs in one program in a fixed
order, so results are deterministic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_R = 32
BLOCK_C = 64


@triton.jit
def _layer(layers_ptr, l):
    base = layers_ptr + l * 5
    return tl.load(base), tl.load(base + 1), tl.load(base + 2), tl.load(base + 3), tl.load(base + 4)


@triton.jit
def _tile(f_ptr, w_off, r, c, R, C):
    ok = (r < R)[:, None] & (c < C)[None, :]
    return tl.load(f_ptr + w_off + r[:, None].to(tl.int64) * C + c[None, :], mask=ok, other=0.0).to(tl.float32)


@triton.jit
def _scale_vector(ptr, n, ss, eps, BLOCK: tl.constexpr):
    """ptr[:n] /= max(sqrt(ss), eps)."""
    inv = 1.0 / tl.maximum(tl.sqrt(ss), eps)
    for i0 in range(0, n, BLOCK):
        i = i0 + tl.arange(0, BLOCK)
        x = tl.load(ptr + i, mask=i < n, other=0.0).to(tl.float32)
        tl.store(ptr + i, (x * inv).to(ptr.dtype.element_ty), mask=i < n)


@triton.jit
def _copy_vector(src, dst, n, BLOCK: tl.constexpr):
    for i0 in range(0, n, BLOCK):
        i = i0 + tl.arange(0, BLOCK)
        tl.store(dst + i, tl.load(src + i, mask=i < n), mask=i < n)


@triton.jit
def _rows_times_v(f_ptr, w_off, v, r, R, C, BLOCK_C: tl.constexpr):
    """(W v)[r] in fp32 for the row block ``r`` of the (R, C) matrix at ``w_off``."""
    acc = tl.zeros(r.shape, dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        vc = tl.load(v + c, mask=c < C, other=0.0).to(tl.float32)
        acc += tl.sum(_tile(f_ptr, w_off, r, c, R, C) * vc[None, :], axis=1)
    return acc


@triton.jit
def _power_iteration_kernel(f_ptr, u_in_ptr, v_in_ptr, u_ptr, v_ptr, sigma_ptr, layers_ptr, iterations, eps,
                            BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    l = tl.program_id(0)
    w_off, R, C, u_off, v_off = _layer(layers_ptr, l)
    u = u_ptr + u_off
    v = v_ptr + v_off
    _copy_vector(u_in_ptr + u_off, u, R, BLOCK_R)
    _copy_vector(v_in_ptr + v_off, v, C, BLOCK_C)
    tl.debug_barrier()
    for _ in range(iterations):
        # v = normalize(W^T u)
        ss = 0.0
        for c0 in range(0, C, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            acc = tl.zeros([BLOCK_C], dtype=tl.float32)
            for r0 in range(0, R, BLOCK_R):
                r = r0 + tl.arange(0, BLOCK_R)
                ur = tl.load(u + r, mask=r < R, other=0.0).to(tl.float32)
                acc += tl.sum(_tile(f_ptr, w_off, r, c, R, C) * ur[:, None], axis=0)
            tl.store(v + c, acc.to(v_ptr.dtype.element_ty), mask=c < C)
            ss += tl.sum(acc * acc, axis=0)
        tl.debug_barrier()
        _scale_vector(v, C, ss, eps, BLOCK_C)
        tl.debug_barrier()
        # u = normalize(W v)
        ss = 0.0
        for r0 in range(0, R, BLOCK_R):
            r = r0 + tl.arange(0, BLOCK_R)
            acc = _rows_times_v(f_ptr, w_off, v, r, R, C, BLOCK_C)
            tl.store(u + r, acc.to(u_ptr.dtype.element_ty), mask=r < R)
            ss += tl.sum(acc * acc, axis=0)
        tl.debug_barrier()
        _scale_vector(u, R, ss, eps, BLOCK_R)
        tl.debug_barrier()
    sigma = 0.0
    for r0 in range(0, R, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        acc = _rows_times_v(f_ptr, w_off, v, r, R, C, BLOCK_C)
        ur = tl.load(u + r, mask=r < R, other=0.0).to(tl.float32)
        sigma += tl.sum(ur * acc, axis=0)
    tl.store(sigma_ptr + l, sigma)


@triton.jit
def _backward_kernel(grad_ptr, u_ptr, v_ptr, df_ptr, layers_ptr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """df[W_l] = grad[l] * u_l v_l^T."""
    l = tl.program_id(0)
    w_off, R, C, u_off, v_off = _layer(layers_ptr, l)
    g = tl.load(grad_ptr + l).to(tl.float32)
    for r0 in range(0, R, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        ur = tl.load(u_ptr + u_off + r, mask=r < R, other=0.0).to(tl.float32) * g
        for c0 in range(0, C, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            vc = tl.load(v_ptr + v_off + c, mask=c < C, other=0.0).to(tl.float32)
            ok = (r < R)[:, None] & (c < C)[None, :]
            offs = w_off + r[:, None].to(tl.int64) * C + c[None, :]
            tl.store(df_ptr + offs, (ur[:, None] * vc[None, :]).to(df_ptr.dtype.element_ty), mask=ok)


def power_iteration(f: torch.Tensor, layers: torch.Tensor, u: torch.Tensor, v: torch.Tensor, iterations: int,
                    eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sigma (L,) fp32, new u, new v); the vectors of every matrix are rewritten (they tile u, v)."""
    L = layers.shape[0]
    sigma = torch.empty(L, device=f.device, dtype=torch.float32)
    u_new, v_new = torch.empty_like(u), torch.empty_like(v)
    _power_iteration_kernel[(L,)](f, u, v, u_new, v_new, sigma, layers, iterations, eps, BLOCK_R=BLOCK_R,
                                  BLOCK_C=BLOCK_C)
    return sigma, u_new, v_new


def spectral_norm_backward(grad_sigma: torch.Tensor, u: torch.Tensor, v: torch.Tensor, layers: torch.Tensor,
                           numel: int) -> torch.Tensor:
    """df (numel,) in u's dtype: grad_sigma[l] * u_l v_l^T on each matrix (the matrices tile f)."""
    df = torch.empty(numel, device=u.device, dtype=u.dtype)
    _backward_kernel[(layers.shape[0],)](grad_sigma, u, v, df, layers, BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C)
    return df
