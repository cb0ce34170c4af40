"""Largest singular values of many weight matrices at once, by power iteration (the official
NVAE's spectral regulariser ``spectral_norm_parallel``).

Every matrix lives in one flat buffer ``f`` (T,): matrix l is ``f[w_off : w_off + R * C].view(R, C)``
(a convolution's weight as C_out x the rest, row-major). Its singular vectors ``u_l`` (R,) and
``v_l`` (C,) live in the flat buffers ``u`` and ``v`` at ``u_off`` and ``v_off``. ``layers`` is an
(L, 5) int64 table of ``(w_off, R, C, u_off, v_off)`` on f's device.

One call runs ``iterations`` power iterations on every matrix, starting from ``u``,

    v_l <- normalize(W_l^T u_l),   u_l <- normalize(W_l v_l)     (normalize(x) = x / max(||x||, eps))

and returns the new vectors (``u``, ``v`` are not modified) and ``sigma_l = u_l^T W_l v_l`` (L,),
differentiable in ``f`` with the vectors held constant (d sigma_l / d W_l = u_l v_l^T), as the
official code does.

Kernel contract (``nvae_fast/kernels/<backend>/spectral_norm.py``):

* ``power_iteration(f, layers, u, v, iterations, eps) -> (sigma (L,) fp32, new u, new v)``
* ``spectral_norm_backward(grad_sigma, u, v, layers, numel) -> df (numel,)`` in u's dtype (the
  matrices tile ``f``: every element belongs to exactly one of them).

:func:`spectral_norm` is the functional form; :func:`spectral_norm_ref` the plain-autograd reference.
"""

from __future__ import annotations

from types import ModuleType, SimpleNamespace

import torch
import torch.nn.functional as F
from torch import Tensor

from nvae_fast import backend

POWER_ITER_EPS = 1e-3
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _matrices(f: Tensor, layers: list[list[int]]) -> list[Tensor]:
    return [f[w_off:w_off + rows * cols].view(rows, cols) for w_off, rows, cols, _, _ in layers]


def spectral_norm_ref(f: Tensor, layers: Tensor, u: Tensor, v: Tensor, iterations: int,
                      eps: float = POWER_ITER_EPS) -> tuple[Tensor, Tensor, Tensor]:
    """Reference of :func:`spectral_norm`, one matrix after another with plain autograd."""
    table = layers.tolist()
    u, v = u.clone(), v.clone()
    matrices = _matrices(f, table)
    with torch.no_grad():
        for (_, rows, cols, u_off, v_off), weight in zip(table, matrices):
            ul, vl = u[u_off:u_off + rows], v[v_off:v_off + cols]
            for _ in range(iterations):
                vl.copy_(F.normalize(weight.t() @ ul, dim=0, eps=eps))
                ul.copy_(F.normalize(weight @ vl, dim=0, eps=eps))
    sigmas = [u[u_off:u_off + rows] @ (weight @ v[v_off:v_off + cols])
              for (_, rows, cols, u_off, v_off), weight in zip(table, matrices)]
    return torch.stack(sigmas).float(), u, v


# ---------------------------------------------------------------------------------------------
# torch backend of the kernel contract
# ---------------------------------------------------------------------------------------------

def _torch_power_iteration(f, layers, u, v, iterations, eps):
    with torch.no_grad():
        return spectral_norm_ref(f, layers, u, v, iterations, eps)


def _torch_backward(grad_sigma, u, v, layers, numel):
    df = u.new_zeros(numel)
    for l, (w_off, rows, cols, u_off, v_off) in enumerate(layers.tolist()):
        outer = torch.outer(u[u_off:u_off + rows], v[v_off:v_off + cols]) * grad_sigma[l].to(u.dtype)
        df[w_off:w_off + rows * cols] = outer.reshape(-1)
    return df


_TORCH_KERNELS = SimpleNamespace(power_iteration=_torch_power_iteration, spectral_norm_backward=_torch_backward)


def kernels_for(f: Tensor) -> ModuleType | SimpleNamespace:
    """The kernel namespace of the backend chosen for the flat matrices ``f``."""
    implemented = ("triton", "torch") if f.dtype in _KERNEL_DTYPES else ("torch",)
    name = backend.select("spectral_norm", f.device, implemented)
    return _TORCH_KERNELS if name == "torch" else backend.kernels("spectral_norm", name)


# ---------------------------------------------------------------------------------------------
# Custom ops and autograd
# ---------------------------------------------------------------------------------------------

@torch.library.custom_op("nvae_fast::spectral_norm", mutates_args=())
def _spectral_norm_op(f: Tensor, layers: Tensor, u: Tensor, v: Tensor, iterations: int,
                      eps: float) -> tuple[Tensor, Tensor, Tensor]:
    sigma, u_new, v_new = kernels_for(f).power_iteration(f, layers, u, v, iterations, eps)
    return sigma, u_new, v_new


@_spectral_norm_op.register_fake
def _(f, layers, u, v, iterations, eps):
    return f.new_empty(layers.shape[0], dtype=torch.float32), torch.empty_like(u), torch.empty_like(v)


@torch.library.custom_op("nvae_fast::spectral_norm_backward", mutates_args=())
def _spectral_norm_backward_op(grad_sigma: Tensor, u: Tensor, v: Tensor, layers: Tensor, numel: int) -> Tensor:
    return kernels_for(u).spectral_norm_backward(grad_sigma, u, v, layers, numel)


@_spectral_norm_backward_op.register_fake
def _(grad_sigma, u, v, layers, numel):
    return u.new_empty(numel)


def _setup_context(ctx, inputs, output) -> None:
    f, layers, u, v, iterations, eps = inputs
    ctx.save_for_backward(output[1], output[2], layers)
    ctx.numel, ctx.dtype = f.numel(), f.dtype
    ctx.set_materialize_grads(False)   # the vectors carry no gradient: no zeros for them


def _backward(ctx, grad_sigma, grad_u, grad_v):
    if grad_sigma is None:
        return None, None, None, None, None, None
    u, v, layers = ctx.saved_tensors
    df = torch.ops.nvae_fast.spectral_norm_backward(grad_sigma.contiguous(), u, v, layers, ctx.numel)
    return df.to(ctx.dtype), None, None, None, None, None


_spectral_norm_op.register_autograd(_backward, setup_context=_setup_context)


def spectral_norm(f: Tensor, layers: Tensor, u: Tensor, v: Tensor, iterations: int,
                  eps: float = POWER_ITER_EPS) -> tuple[Tensor, Tensor, Tensor]:
    """``iterations`` power iterations on every matrix of ``f`` from the vectors ``u``, ``v``:
    ``(sigma (L,) fp32, new u, new v)``, sigma differentiable in ``f``. Layout in the module
    docstring; ``u`` and ``v`` have f's dtype and device. One launch forward, one backward on the
    triton backend; no value is read on the host.
    """
    for name, t in (("f", f), ("u", u), ("v", v)):
        if not isinstance(t, Tensor) or t.dim() != 1 or not t.is_contiguous() or not t.is_floating_point():
            raise ValueError(f"{name} must be a contiguous 1-D float tensor, got {getattr(t, 'shape', type(t))}")
        if t.device != f.device or t.dtype != f.dtype:
            raise ValueError(f"{name} must be {f.dtype} on {f.device}, got {t.dtype} on {t.device}")
    if layers.dim() != 2 or layers.shape[1] != 5 or layers.dtype != torch.int64 or layers.device != f.device:
        raise ValueError(f"layers must be an (L, 5) int64 tensor on {f.device}, got {layers.dtype} "
                         f"{tuple(layers.shape)} on {layers.device}")
    if iterations < 0:
        raise ValueError(f"iterations must be >= 0, got {iterations}")
    return torch.ops.nvae_fast.spectral_norm(f, layers, u, v, int(iterations), float(eps))
