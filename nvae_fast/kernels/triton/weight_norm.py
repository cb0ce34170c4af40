"""Triton kernels of the flat weight normalisation (contract: nvae_fast/ops/weight_norm.py).

A program covers BLOCK_R consecutive rows of the CSR layout as a [BLOCK_R, BLOCK_K] tile walked
along the rows (rows of one convolution have one length, so neighbouring rows rarely waste the
tile); each row's norm is reduced inside the program, so every launch is a single pass (the
forward reads the rows twice, the backward reads rows and gradient twice), with no workspace.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_R = 16
BLOCK_K = 64


@triton.jit
def _rows(row_ptr, R, BLOCK_R: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < R
    start = tl.load(row_ptr + rows, mask=row_ok, other=0)
    end = tl.load(row_ptr + rows + 1, mask=row_ok, other=0)
    return rows, row_ok, start, end - start


@triton.jit
def _masked_tile(w_ptr, m_ptr, offs, ok, mask_start):
    """w * mask at ``offs`` (fp32); elements before ``mask_start`` have no mask."""
    w = tl.load(w_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + (offs - mask_start), mask=ok & (offs >= mask_start), other=1.0).to(tl.float32)
    return w * m, m


@triton.jit
def _scale(g_ptr, rows, row_ok, norm, first_wn_row, eps):
    is_wn = rows >= first_wn_row
    g = tl.load(g_ptr + (rows - first_wn_row), mask=row_ok & is_wn, other=0.0).to(tl.float32)
    return tl.where(is_wn, tl.exp(g) / (norm + eps), 1.0), is_wn


@triton.jit
def _forward_kernel(w_ptr, g_ptr, m_ptr, out_ptr, norm_ptr, row_ptr, R, first_wn_row, mask_start, eps,
                    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    rows, row_ok, start, length = _rows(row_ptr, R, BLOCK_R)
    longest = tl.max(length, axis=0)
    ss = tl.zeros([BLOCK_R], dtype=tl.float32)
    for k0 in range(0, longest, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        ok = k[None, :] < length[:, None]
        wm, _ = _masked_tile(w_ptr, m_ptr, start[:, None] + k[None, :], ok, mask_start)
        ss += tl.sum(wm * wm, axis=1)
    norm = tl.sqrt(ss)
    tl.store(norm_ptr + rows, norm, mask=row_ok)
    scale, _ = _scale(g_ptr, rows, row_ok, norm, first_wn_row, eps)
    for k0 in range(0, longest, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        ok = k[None, :] < length[:, None]
        offs = start[:, None] + k[None, :]
        wm, _ = _masked_tile(w_ptr, m_ptr, offs, ok, mask_start)
        tl.store(out_ptr + offs, (wm * scale[:, None]).to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _backward_kernel(grad_ptr, w_ptr, g_ptr, m_ptr, norm_ptr, dw_ptr, dg_ptr, row_ptr, R, first_wn_row, mask_start,
                     eps, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """With s = exp(g) / (n + eps): dw = m * (s * grad + c * w m), c = -s <grad, w m> / (n (n + eps)),
    dg = s <grad, w m>; plain rows: dw = m * grad."""
    rows, row_ok, start, length = _rows(row_ptr, R, BLOCK_R)
    longest = tl.max(length, axis=0)
    dot = tl.zeros([BLOCK_R], dtype=tl.float32)
    for k0 in range(0, longest, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        ok = k[None, :] < length[:, None]
        offs = start[:, None] + k[None, :]
        wm, _ = _masked_tile(w_ptr, m_ptr, offs, ok, mask_start)
        go = tl.load(grad_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        dot += tl.sum(go * wm, axis=1)
    norm = tl.load(norm_ptr + rows, mask=row_ok, other=0.0)
    scale, is_wn = _scale(g_ptr, rows, row_ok, norm, first_wn_row, eps)
    coef = tl.where(is_wn & (norm > 0), -scale * dot / tl.where(norm > 0, norm * (norm + eps), 1.0), 0.0)
    tl.store(dg_ptr + (rows - first_wn_row), (scale * dot).to(dg_ptr.dtype.element_ty), mask=row_ok & is_wn)
    for k0 in range(0, longest, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        ok = k[None, :] < length[:, None]
        offs = start[:, None] + k[None, :]
        wm, m = _masked_tile(w_ptr, m_ptr, offs, ok, mask_start)
        go = tl.load(grad_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        dw = m * (go * scale[:, None] + wm * coef[:, None])
        tl.store(dw_ptr + offs, dw.to(dw_ptr.dtype.element_ty), mask=ok)


def weight_norm_forward(w: torch.Tensor, g: torch.Tensor, row_ptr: torch.Tensor, first_wn_row: int,
                        mask: torch.Tensor, mask_start: int, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(normalised rows (T,) in w's dtype, row norms (R,) fp32)."""
    R = row_ptr.shape[0] - 1
    out = torch.empty_like(w)
    norm = torch.empty(R, device=w.device, dtype=torch.float32)
    _forward_kernel[(triton.cdiv(R, BLOCK_R),)](w, g, mask, out, norm, row_ptr, R, first_wn_row, mask_start, eps,
                                                 BLOCK_R=BLOCK_R, BLOCK_K=BLOCK_K)
    return out, norm


def weight_norm_backward(grad: torch.Tensor, w: torch.Tensor, g: torch.Tensor, norm: torch.Tensor,
                         row_ptr: torch.Tensor, first_wn_row: int, mask: torch.Tensor, mask_start: int,
                         eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(dw (T,) in w's dtype, dg in g's dtype)."""
    R = row_ptr.shape[0] - 1
    dw = torch.empty_like(w)
    dg = torch.empty_like(g)
    _backward_kernel[(triton.cdiv(R, BLOCK_R),)](grad, w, g, mask, norm, dw, dg, row_ptr, R, first_wn_row,
                                                  mask_start, eps, BLOCK_R=BLOCK_R, BLOCK_K=BLOCK_K)
    return dw, dg
