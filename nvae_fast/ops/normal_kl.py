"""Residual-normal latent groups: posterior sample, log-densities and KL, reduced per group.

Official NVAE parametrisation (``distributions.Normal``): a distribution is given by raw
``(mu, log_sigma)``; it uses ``mu' = 5 tanh(mu / 5)`` and ``sigma = exp(5 tanh(log_sigma / 5)) + 0.01``
(times a temperature ``t`` when sampling from the prior). For one latent group with prior params
``(mu_p, log_sigma_p)`` and encoder params ``(mu_q, log_sigma_q)``, all (N, C, H, W):

* posterior ``q = Normal(mu_p + mu_q, log_sigma_p + log_sigma_q)`` if ``residual`` (``res_dist``),
  else ``Normal(mu_q, log_sigma_q)``; prior ``p = Normal(mu_p, log_sigma_p)``. ``mu_p = log_sigma_p
  = None`` is the first group's standard prior (zeros: sigma = 1.01), where both forms coincide.
* ``z = mu_q' + sigma_q * eps`` (``eps`` ~ N(0, 1), or zeros for the posterior mean)
* ``log_q_conv = log q(z)``, ``log_p_conv = log p(z)``, and per element either the analytic
  ``kl = 0.5 (((mu_q' - mu_p') / sigma_p)^2 + (sigma_q / sigma_p)^2) - 0.5 - log(sigma_q / sigma_p)``
  (no flows) or ``kl = log_q_conv - log_p_conv`` (with flows, after the flows moved z).

Per group the model needs ``kl_all[n] = sum_{c,h,w} kl``, ``kl_diag[c] = mean_n sum_{h,w} kl``,
``log_q[n] = sum log_q_conv`` and ``log_p[n] = sum log_p_conv`` (fp32 whatever the input dtype).

Three functional ops cover the model:

* :func:`normal_kl` - no flows: one pass from the four params and eps to z and the four sums.
* :func:`normal_sample` - ``z = mu' + t * sigma * eps``: prior sampling with temperature, and the
  posterior sample that flows then transform.
* :func:`flow_kl` - with flows: the four sums from the flowed z and the flows' ``log_det``
  (``log_q_conv = -eps^2/2 - log(2 pi)/2 - log sigma_q - log_det``, exactly the official value,
  since ``(z0 - mu_q') / sigma_q = eps``).

Each has a ``*_ref`` reference written from the definitions (plain autograd, float64-capable).

Kernel contract: each fast backend provides ``nvae_fast/kernels/<triton|cuda>/normal_kl.py`` with
the functions below. Tensors are (N, C, H, W) of one dtype (float32/float16/bfloat16) on one
device, with any strides (a launcher may copy to a dense layout); ``mu_p``/``log_sigma_p`` may be
None (standard prior). Sums are fp32; gradients and z come back dense, in the params' dtype. A
``grad_*`` argument may be None, meaning zeros (the output did not reach the loss).

* ``normal_kl_forward(mu_p, log_sigma_p, mu_q, log_sigma_q, eps, residual)
  -> (z, kl_all, log_q, log_p, kl_diag)``
* ``normal_kl_backward(grad_z, grad_kl_all, grad_log_q, grad_log_p, grad_kl_diag,
  mu_p, log_sigma_p, mu_q, log_sigma_q, eps, residual)
  -> (d_mu_p, d_log_sigma_p, d_mu_q, d_log_sigma_q)``  (prior grads None for the standard prior)
* ``normal_sample_forward(mu, log_sigma, eps, temperature) -> z``
* ``normal_sample_backward(grad_z, mu, log_sigma, eps, temperature) -> (d_mu, d_log_sigma)``
* ``flow_kl_forward(mu_p, log_sigma_p, log_sigma_q, eps, z, log_det, residual)
  -> (kl_all, log_q, log_p, kl_diag)``
* ``flow_kl_backward(grad_kl_all, grad_log_q, grad_log_p, grad_kl_diag,
  mu_p, log_sigma_p, log_sigma_q, eps, z, log_det, residual)
  -> (d_mu_p, d_log_sigma_p, d_log_sigma_q, d_z, d_log_det)``

(``flow_kl`` needs no ``mu_q``: the posterior mean cancels out of ``log q(z0)``.)
"""

from __future__ import annotations

import math
from types import ModuleType, SimpleNamespace
from typing import NamedTuple

import torch
from torch import Tensor

from nvae_fast import backend

HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)
SIGMA_MIN = 1e-2


class GroupKL(NamedTuple):
    """Per-group results: z (N, C, H, W) in the params' dtype (None from :func:`flow_kl`) and
    fp32 sums kl_all (N,), log_q (N,), log_p (N,), kl_diag (C,)."""

    z: Tensor | None
    kl_all: Tensor
    log_q: Tensor
    log_p: Tensor
    kl_diag: Tensor


def soft_clamp5(x: Tensor) -> Tensor:
    """``5 tanh(x / 5)``: a differentiable clamp to (-5, 5)."""
    return 5.0 * torch.tanh(x / 5.0)


def _acc(x: Tensor) -> Tensor:
    return x.double() if x.dtype == torch.float64 else x.float()


def _prior(mu_p: Tensor | None, log_sigma_p: Tensor | None, like: Tensor) -> tuple[Tensor, Tensor]:
    """Clamped prior mean and sigma, in the accumulation dtype."""
    if mu_p is None:
        zeros = torch.zeros_like(_acc(like))
        return zeros, torch.exp(zeros) + SIGMA_MIN
    return soft_clamp5(_acc(mu_p)), torch.exp(soft_clamp5(_acc(log_sigma_p))) + SIGMA_MIN


def _posterior(mu_p: Tensor | None, log_sigma_p: Tensor | None, mu_q: Tensor, log_sigma_q: Tensor,
               residual: bool) -> tuple[Tensor, Tensor]:
    mu, log_sigma = _acc(mu_q), _acc(log_sigma_q)
    if residual and mu_p is not None:
        mu, log_sigma = mu + _acc(mu_p), log_sigma + _acc(log_sigma_p)
    return soft_clamp5(mu), torch.exp(soft_clamp5(log_sigma)) + SIGMA_MIN


def _log_normal(z: Tensor, mu: Tensor, sigma: Tensor) -> Tensor:
    normalized = (z - mu) / sigma
    return -0.5 * normalized * normalized - HALF_LOG_2PI - torch.log(sigma)


def _reduce(kl: Tensor, log_q_conv: Tensor, log_p_conv: Tensor, z: Tensor | None) -> GroupKL:
    return GroupKL(z, kl.sum(dim=(1, 2, 3)), log_q_conv.sum(dim=(1, 2, 3)), log_p_conv.sum(dim=(1, 2, 3)),
                   kl.sum(dim=(2, 3)).mean(dim=0))


def normal_kl_ref(mu_p: Tensor | None, log_sigma_p: Tensor | None, mu_q: Tensor, log_sigma_q: Tensor, eps: Tensor,
                  residual: bool = True) -> GroupKL:
    """Reference of :func:`normal_kl` (analytic KL, no flows)."""
    mq, sq = _posterior(mu_p, log_sigma_p, mu_q, log_sigma_q, residual)
    mp, sp = _prior(mu_p, log_sigma_p, mu_q)
    z = mq + sq * _acc(eps)
    term1 = (mq - mp) / sp
    term2 = sq / sp
    kl = 0.5 * (term1 * term1 + term2 * term2) - 0.5 - torch.log(term2)
    return _reduce(kl, _log_normal(z, mq, sq), _log_normal(z, mp, sp), z.to(mu_q.dtype))


def normal_sample_ref(mu: Tensor | None, log_sigma: Tensor | None, eps: Tensor, temperature: float = 1.0) -> Tensor:
    """Reference of :func:`normal_sample`; ``mu = log_sigma = None`` is the standard prior."""
    m, s = _prior(mu, log_sigma, eps)
    return (m + temperature * s * _acc(eps)).to(eps.dtype if mu is None else mu.dtype)


def flow_kl_ref(mu_p: Tensor | None, log_sigma_p: Tensor | None, log_sigma_q: Tensor, eps: Tensor, z: Tensor,
                log_det: Tensor, residual: bool = True) -> GroupKL:
    """Reference of :func:`flow_kl`; ``z`` is the flowed sample, ``log_det`` the flows' summed log-det."""
    log_sigma = _acc(log_sigma_q)
    if residual and log_sigma_p is not None:
        log_sigma = log_sigma + _acc(log_sigma_p)
    sq = torch.exp(soft_clamp5(log_sigma)) + SIGMA_MIN
    e = _acc(eps)
    log_q_conv = -0.5 * e * e - HALF_LOG_2PI - torch.log(sq) - _acc(log_det)
    mp, sp = _prior(mu_p, log_sigma_p, log_sigma_q)
    log_p_conv = _log_normal(_acc(z), mp, sp)
    return _reduce(log_q_conv - log_p_conv, log_q_conv, log_p_conv, None)


# ---------------------------------------------------------------------------------------------
# torch backend of the kernel contract: the forward and backward formulas written out (fp64-capable)
# ---------------------------------------------------------------------------------------------

class _Clamped(NamedTuple):
    """A soft-clamped value and its derivative with respect to the raw input."""

    value: Tensor
    grad: Tensor


def _clamped_mu(raw: Tensor) -> _Clamped:
    mu = soft_clamp5(_acc(raw))
    return _Clamped(mu, 1.0 - (mu / 5.0) ** 2)


def _clamped_sigma(raw: Tensor) -> _Clamped:
    log_sigma = soft_clamp5(_acc(raw))
    e = torch.exp(log_sigma)
    return _Clamped(e + SIGMA_MIN, e * (1.0 - (log_sigma / 5.0) ** 2))


def _standard_prior(like: Tensor) -> tuple[_Clamped, _Clamped]:
    zeros = torch.zeros((), dtype=_acc(like).dtype, device=like.device)
    return _Clamped(zeros, zeros), _Clamped(zeros + (1.0 + SIGMA_MIN), zeros)


def _prior_terms(mu_p: Tensor | None, log_sigma_p: Tensor | None, like: Tensor) -> tuple[_Clamped, _Clamped]:
    if mu_p is None:
        return _standard_prior(like)
    return _clamped_mu(mu_p), _clamped_sigma(log_sigma_p)


def _posterior_raw(mu_p: Tensor | None, log_sigma_p: Tensor | None, mu_q: Tensor | None, log_sigma_q: Tensor,
                   residual: bool) -> tuple[Tensor | None, Tensor]:
    if residual and mu_p is not None:
        return (None if mu_q is None else _acc(mu_q) + _acc(mu_p)), _acc(log_sigma_q) + _acc(log_sigma_p)
    return (None if mu_q is None else _acc(mu_q)), _acc(log_sigma_q)


def _group_sums(kl: Tensor, log_q_conv: Tensor, log_p_conv: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    kl_nc = kl.sum(dim=(2, 3))
    return kl_nc.sum(dim=1), log_q_conv.sum(dim=(1, 2, 3)), log_p_conv.sum(dim=(1, 2, 3)), kl_nc.mean(dim=0)


def _per_element(grad_n: Tensor | None, grad_c: Tensor | None, N: int, like: Tensor) -> Tensor:
    """d loss / d element of a per-sample sum (grad_n, (N,)) plus a per-channel batch mean (grad_c, (C,))."""
    out = torch.zeros((), dtype=like.dtype, device=like.device)
    if grad_n is not None:
        out = out + grad_n.to(like.dtype).view(-1, 1, 1, 1)
    if grad_c is not None:
        out = out + grad_c.to(like.dtype).view(1, -1, 1, 1) / N
    return out


def _dense_like(value: Tensor, like: Tensor) -> Tensor:
    """``value`` broadcast into a new tensor with ``like``'s shape, dtype and dense layout."""
    return torch.empty_like(like).copy_(value)


def _torch_normal_kl_forward(mu_p, log_sigma_p, mu_q, log_sigma_q, eps, residual):
    mq_raw, lsq_raw = _posterior_raw(mu_p, log_sigma_p, mu_q, log_sigma_q, residual)
    mq, sq = _clamped_mu(mq_raw).value, _clamped_sigma(lsq_raw).value
    (mp, _), (sp, _) = _prior_terms(mu_p, log_sigma_p, mq)
    e = _acc(eps)
    z = mq + sq * e
    log_q_conv = -0.5 * e * e - HALF_LOG_2PI - torch.log(sq)
    log_p_conv = _log_normal(z, mp, sp)
    ratio = sq / sp
    kl = 0.5 * (((mq - mp) / sp) ** 2 + ratio * ratio) - 0.5 - torch.log(ratio)
    return (_dense_like(z, mu_q), *_group_sums(kl, log_q_conv, log_p_conv))


def _torch_normal_kl_backward(grad_z, grad_kl_all, grad_log_q, grad_log_p, grad_kl_diag,
                              mu_p, log_sigma_p, mu_q, log_sigma_q, eps, residual):
    mq_raw, lsq_raw = _posterior_raw(mu_p, log_sigma_p, mu_q, log_sigma_q, residual)
    mq, sq = _clamped_mu(mq_raw), _clamped_sigma(lsq_raw)
    mp, sp = _prior_terms(mu_p, log_sigma_p, mq.value)
    e = _acc(eps)
    N = mu_q.shape[0]
    g_kl = _per_element(grad_kl_all, grad_kl_diag, N, e)
    g_q = _per_element(grad_log_q, None, N, e)
    g_p = _per_element(grad_log_p, None, N, e)
    z = mq.value + sq.value * e
    inv_var_p = 1.0 / (sp.value * sp.value)
    z_dev, m_dev = z - mp.value, mq.value - mp.value
    g_through_z = (0.0 if grad_z is None else _acc(grad_z)) - g_p * z_dev * inv_var_p
    d_mq = g_through_z + g_kl * m_dev * inv_var_p
    d_sq = e * g_through_z - g_q / sq.value + g_kl * (sq.value * inv_var_p - 1.0 / sq.value)
    d_mq_raw, d_lsq_raw = d_mq * mq.grad, d_sq * sq.grad
    grads = [_dense_like(d_mq_raw, mu_q), _dense_like(d_lsq_raw, log_sigma_q)]
    if mu_p is not None:
        d_mp = g_p * z_dev * inv_var_p - g_kl * m_dev * inv_var_p
        d_sp = (g_p * (z_dev * z_dev * inv_var_p - 1.0) + g_kl * (1.0 - (m_dev * m_dev + sq.value * sq.value)
                                                                  * inv_var_p)) / sp.value
        d_mp_raw, d_lsp_raw = d_mp * mp.grad, d_sp * sp.grad
        if residual:
            d_mp_raw, d_lsp_raw = d_mp_raw + d_mq_raw, d_lsp_raw + d_lsq_raw
        return _dense_like(d_mp_raw, mu_p), _dense_like(d_lsp_raw, log_sigma_p), *grads
    return None, None, *grads


def _torch_normal_sample_forward(mu, log_sigma, eps, temperature):
    (m, _), (s, _) = _prior_terms(mu, log_sigma, eps)
    return _dense_like(m + temperature * s * _acc(eps), eps if mu is None else mu)


def _torch_normal_sample_backward(grad_z, mu, log_sigma, eps, temperature):
    m, s = _clamped_mu(mu), _clamped_sigma(log_sigma)
    g = _acc(grad_z)
    return _dense_like(g * m.grad, mu), _dense_like(g * temperature * _acc(eps) * s.grad, log_sigma)


def _torch_flow_kl_forward(mu_p, log_sigma_p, log_sigma_q, eps, z, log_det, residual):
    _, lsq_raw = _posterior_raw(mu_p, log_sigma_p, None, log_sigma_q, residual)
    sq = _clamped_sigma(lsq_raw).value
    (mp, _), (sp, _) = _prior_terms(mu_p, log_sigma_p, sq)
    e = _acc(eps)
    log_q_conv = -0.5 * e * e - HALF_LOG_2PI - torch.log(sq) - _acc(log_det)
    log_p_conv = _log_normal(_acc(z), mp, sp)
    return _group_sums(log_q_conv - log_p_conv, log_q_conv, log_p_conv)


def _torch_flow_kl_backward(grad_kl_all, grad_log_q, grad_log_p, grad_kl_diag,
                            mu_p, log_sigma_p, log_sigma_q, eps, z, log_det, residual):
    _, lsq_raw = _posterior_raw(mu_p, log_sigma_p, None, log_sigma_q, residual)
    sq = _clamped_sigma(lsq_raw)
    mp, sp = _prior_terms(mu_p, log_sigma_p, sq.value)
    N = z.shape[0]
    like = sq.value
    g_kl = _per_element(grad_kl_all, grad_kl_diag, N, like)
    g_q = _per_element(grad_log_q, None, N, like) + g_kl   # kl = log_q - log_p
    g_p = _per_element(grad_log_p, None, N, like) - g_kl
    inv_var_p = 1.0 / (sp.value * sp.value)
    z_dev = _acc(z) - mp.value
    d_lsq_raw = -g_q / sq.value * sq.grad
    d_z = -g_p * z_dev * inv_var_p
    d_log_det = -g_q
    grads = [_dense_like(d_lsq_raw, log_sigma_q), _dense_like(d_z, z), _dense_like(d_log_det, log_det)]
    if mu_p is None:
        return None, None, *grads
    d_mp_raw = g_p * z_dev * inv_var_p * mp.grad
    d_lsp_raw = g_p * (z_dev * z_dev * inv_var_p - 1.0) / sp.value * sp.grad
    if residual:
        d_lsp_raw = d_lsp_raw + d_lsq_raw
    return _dense_like(d_mp_raw, mu_p), _dense_like(d_lsp_raw, log_sigma_p), *grads


_TORCH_KERNELS = SimpleNamespace(
    normal_kl_forward=_torch_normal_kl_forward,
    normal_kl_backward=_torch_normal_kl_backward,
    normal_sample_forward=_torch_normal_sample_forward,
    normal_sample_backward=_torch_normal_sample_backward,
    flow_kl_forward=_torch_flow_kl_forward,
    flow_kl_backward=_torch_flow_kl_backward,
)


# ---------------------------------------------------------------------------------------------
# Dispatch
# ---------------------------------------------------------------------------------------------

_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def kernels_for(*tensors: Tensor | None) -> ModuleType | SimpleNamespace:
    """The kernel namespace of the backend chosen for these tensors (see nvae_fast.backend).

    Fast backends take float32/float16/bfloat16; anything else (float64) runs on the torch backend.
    """
    present = [t for t in tensors if t is not None]
    if all(t.dtype in _KERNEL_DTYPES for t in present):
        # Triton first: checked against the reference on every CI run; csrc/ awaits a GPU run.
        implemented = tuple(name for name in ("triton", "cuda") if backend.has_kernels("normal_kl", name))
        implemented += ("torch",)
    else:
        implemented = ("torch",)
    name = backend.select("normal_kl", present[0].device, implemented)
    return _TORCH_KERNELS if name == "torch" else backend.kernels("normal_kl", name)


def _sum_dtype(*tensors: Tensor | None) -> torch.dtype:
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


# ---------------------------------------------------------------------------------------------
# Custom ops (opaque to torch.compile, with fake implementations) and their autograd
# ---------------------------------------------------------------------------------------------

@torch.library.custom_op("nvae_fast::normal_kl", mutates_args=())
def _normal_kl_op(mu_p: Tensor | None, log_sigma_p: Tensor | None, mu_q: Tensor, log_sigma_q: Tensor, eps: Tensor,
                  residual: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    kernels = kernels_for(mu_p, log_sigma_p, mu_q, log_sigma_q, eps)
    return tuple(kernels.normal_kl_forward(mu_p, log_sigma_p, mu_q, log_sigma_q, eps, residual))


@_normal_kl_op.register_fake
def _(mu_p, log_sigma_p, mu_q, log_sigma_q, eps, residual):
    N, C = mu_q.shape[:2]
    dtype = _sum_dtype(mu_p, log_sigma_p, mu_q, log_sigma_q, eps)
    per_sample = mu_q.new_empty(N, dtype=dtype)
    return (torch.empty_like(mu_q), per_sample, torch.empty_like(per_sample), torch.empty_like(per_sample),
            mu_q.new_empty(C, dtype=dtype))


@torch.library.custom_op("nvae_fast::normal_kl_backward", mutates_args=())
def _normal_kl_backward_op(grad_z: Tensor | None, grad_kl_all: Tensor | None, grad_log_q: Tensor | None,
                           grad_log_p: Tensor | None, grad_kl_diag: Tensor | None, mu_p: Tensor | None,
                           log_sigma_p: Tensor | None, mu_q: Tensor, log_sigma_q: Tensor, eps: Tensor,
                           residual: bool) -> list[Tensor]:
    """[d_mu_q, d_log_sigma_q] + ([d_mu_p, d_log_sigma_p] unless the prior is standard)."""
    kernels = kernels_for(mu_p, log_sigma_p, mu_q, log_sigma_q, eps)
    d_mu_p, d_log_sigma_p, d_mu_q, d_log_sigma_q = kernels.normal_kl_backward(
        grad_z, grad_kl_all, grad_log_q, grad_log_p, grad_kl_diag, mu_p, log_sigma_p, mu_q, log_sigma_q, eps, residual)
    return [d_mu_q, d_log_sigma_q] + ([] if mu_p is None else [d_mu_p, d_log_sigma_p])


@_normal_kl_backward_op.register_fake
def _(grad_z, grad_kl_all, grad_log_q, grad_log_p, grad_kl_diag, mu_p, log_sigma_p, mu_q, log_sigma_q, eps,
      residual):
    grads = [torch.empty_like(mu_q), torch.empty_like(log_sigma_q)]
    return grads + ([] if mu_p is None else [torch.empty_like(mu_p), torch.empty_like(log_sigma_p)])


def _normal_kl_setup_context(ctx, inputs, output) -> None:
    mu_p, log_sigma_p, mu_q, log_sigma_q, eps, residual = inputs
    ctx.save_for_backward(mu_p, log_sigma_p, mu_q, log_sigma_q, eps)
    ctx.residual = residual
    ctx.set_materialize_grads(False)   # outputs off the loss (log_q, log_p in training) cost no zeros


def _normal_kl_backward(ctx, grad_z, grad_kl_all, grad_log_q, grad_log_p, grad_kl_diag):
    if all(g is None for g in (grad_z, grad_kl_all, grad_log_q, grad_log_p, grad_kl_diag)):
        return None, None, None, None, None, None
    mu_p, log_sigma_p, mu_q, log_sigma_q, eps = ctx.saved_tensors
    grads = torch.ops.nvae_fast.normal_kl_backward(grad_z, grad_kl_all, grad_log_q, grad_log_p, grad_kl_diag, mu_p,
                                                   log_sigma_p, mu_q, log_sigma_q, eps, ctx.residual)
    prior = (None, None) if mu_p is None else (grads[2], grads[3])
    return *prior, grads[0], grads[1], None, None   # eps is noise: no gradient


_normal_kl_op.register_autograd(_normal_kl_backward, setup_context=_normal_kl_setup_context)


@torch.library.custom_op("nvae_fast::normal_sample", mutates_args=())
def _normal_sample_op(mu: Tensor | None, log_sigma: Tensor | None, eps: Tensor, temperature: float) -> Tensor:
    return kernels_for(mu, log_sigma, eps).normal_sample_forward(mu, log_sigma, eps, temperature)


@_normal_sample_op.register_fake
def _(mu, log_sigma, eps, temperature):
    return torch.empty_like(eps if mu is None else mu)


@torch.library.custom_op("nvae_fast::normal_sample_backward", mutates_args=())
def _normal_sample_backward_op(grad_z: Tensor, mu: Tensor, log_sigma: Tensor, eps: Tensor,
                               temperature: float) -> tuple[Tensor, Tensor]:
    d_mu, d_log_sigma = kernels_for(mu, log_sigma, eps).normal_sample_backward(grad_z, mu, log_sigma, eps, temperature)
    return d_mu, d_log_sigma


@_normal_sample_backward_op.register_fake
def _(grad_z, mu, log_sigma, eps, temperature):
    return torch.empty_like(mu), torch.empty_like(log_sigma)


def _normal_sample_setup_context(ctx, inputs, output) -> None:
    mu, log_sigma, eps, temperature = inputs
    ctx.save_for_backward(mu, log_sigma, eps)
    ctx.temperature = temperature
    ctx.set_materialize_grads(False)


def _normal_sample_backward(ctx, grad_z):
    mu, log_sigma, eps = ctx.saved_tensors
    if mu is None or grad_z is None:
        return None, None, None, None
    d_mu, d_log_sigma = torch.ops.nvae_fast.normal_sample_backward(grad_z, mu, log_sigma, eps, ctx.temperature)
    return d_mu, d_log_sigma, None, None


_normal_sample_op.register_autograd(_normal_sample_backward, setup_context=_normal_sample_setup_context)


@torch.library.custom_op("nvae_fast::flow_kl", mutates_args=())
def _flow_kl_op(mu_p: Tensor | None, log_sigma_p: Tensor | None, log_sigma_q: Tensor, eps: Tensor, z: Tensor,
                log_det: Tensor, residual: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    kernels = kernels_for(mu_p, log_sigma_p, log_sigma_q, eps, z, log_det)
    return tuple(kernels.flow_kl_forward(mu_p, log_sigma_p, log_sigma_q, eps, z, log_det, residual))


@_flow_kl_op.register_fake
def _(mu_p, log_sigma_p, log_sigma_q, eps, z, log_det, residual):
    N, C = z.shape[:2]
    dtype = _sum_dtype(mu_p, log_sigma_p, log_sigma_q, eps, z, log_det)
    per_sample = z.new_empty(N, dtype=dtype)
    return per_sample, torch.empty_like(per_sample), torch.empty_like(per_sample), z.new_empty(C, dtype=dtype)


@torch.library.custom_op("nvae_fast::flow_kl_backward", mutates_args=())
def _flow_kl_backward_op(grad_kl_all: Tensor | None, grad_log_q: Tensor | None, grad_log_p: Tensor | None,
                         grad_kl_diag: Tensor | None, mu_p: Tensor | None, log_sigma_p: Tensor | None,
                         log_sigma_q: Tensor, eps: Tensor, z: Tensor, log_det: Tensor, residual: bool) -> list[Tensor]:
    """[d_log_sigma_q, d_z, d_log_det] + ([d_mu_p, d_log_sigma_p] unless the prior is standard)."""
    kernels = kernels_for(mu_p, log_sigma_p, log_sigma_q, eps, z, log_det)
    d_mu_p, d_log_sigma_p, d_log_sigma_q, d_z, d_log_det = kernels.flow_kl_backward(
        grad_kl_all, grad_log_q, grad_log_p, grad_kl_diag, mu_p, log_sigma_p, log_sigma_q, eps, z, log_det, residual)
    return [d_log_sigma_q, d_z, d_log_det] + ([] if mu_p is None else [d_mu_p, d_log_sigma_p])


@_flow_kl_backward_op.register_fake
def _(grad_kl_all, grad_log_q, grad_log_p, grad_kl_diag, mu_p, log_sigma_p, log_sigma_q, eps, z, log_det, residual):
    grads = [torch.empty_like(log_sigma_q), torch.empty_like(z), torch.empty_like(log_det)]
    return grads + ([] if mu_p is None else [torch.empty_like(mu_p), torch.empty_like(log_sigma_p)])


def _flow_kl_setup_context(ctx, inputs, output) -> None:
    mu_p, log_sigma_p, log_sigma_q, eps, z, log_det, residual = inputs
    ctx.save_for_backward(mu_p, log_sigma_p, log_sigma_q, eps, z, log_det)
    ctx.residual = residual
    ctx.set_materialize_grads(False)


def _flow_kl_backward(ctx, grad_kl_all, grad_log_q, grad_log_p, grad_kl_diag):
    if all(g is None for g in (grad_kl_all, grad_log_q, grad_log_p, grad_kl_diag)):
        return None, None, None, None, None, None, None
    mu_p, log_sigma_p, log_sigma_q, eps, z, log_det = ctx.saved_tensors
    grads = torch.ops.nvae_fast.flow_kl_backward(grad_kl_all, grad_log_q, grad_log_p, grad_kl_diag, mu_p,
                                                 log_sigma_p, log_sigma_q, eps, z, log_det, ctx.residual)
    prior = (None, None) if mu_p is None else (grads[3], grads[4])
    return *prior, grads[0], None, grads[1], grads[2], None


_flow_kl_op.register_autograd(_flow_kl_backward, setup_context=_flow_kl_setup_context)


# ---------------------------------------------------------------------------------------------
# Public functional API
# ---------------------------------------------------------------------------------------------

def _check_group(ref_name: str, ref: Tensor, mu_p: Tensor | None, log_sigma_p: Tensor | None,
                 **tensors: Tensor | None) -> None:
    """Every tensor must be a float tensor shaped and placed like ``ref`` (a 4-D (N, C, H, W))."""
    if not isinstance(ref, Tensor) or ref.dim() != 4:
        raise ValueError(f"{ref_name} must be a 4-D tensor (N, C, H, W), got {getattr(ref, 'shape', type(ref))}")
    if not ref.is_floating_point():
        raise TypeError(f"{ref_name} must be a floating-point tensor, got {ref.dtype}")
    if (mu_p is None) != (log_sigma_p is None):
        raise ValueError("mu_p and log_sigma_p must both be tensors or both be None (standard prior)")
    for name, t in dict(mu_p=mu_p, log_sigma_p=log_sigma_p, **tensors).items():
        if t is None:
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.shape != ref.shape:
            raise ValueError(f"{name} must have shape {tuple(ref.shape)} like {ref_name}, got {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
        if t.device != ref.device:
            raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}")




def normal_kl(mu_p: Tensor | None, log_sigma_p: Tensor | None, mu_q: Tensor, log_sigma_q: Tensor, eps: Tensor,
              residual: bool = True) -> GroupKL:
    """One latent group without flows: sample z and reduce the analytic KL and log-densities.

    Args:
        mu_p, log_sigma_p: (N, C, H, W) raw prior params, or both None for the standard prior.
        mu_q, log_sigma_q: (N, C, H, W) raw encoder params (residual offsets if ``residual``).
        eps: (N, C, H, W) standard-normal noise; zeros give the posterior mean. Gets no gradient.
        residual: the official ``res_dist``.
    Returns:
        :class:`GroupKL` with z (mu_q's dtype) and fp32 sums (fp64 when an input is fp64).
    All tensors may have any strides (e.g. ``torch.chunk`` views) and any float dtype; the fused
    kernels run float32/float16/bfloat16 with fp32 math.
    """
    _check_group("mu_q", mu_q, mu_p, log_sigma_p, log_sigma_q=log_sigma_q, eps=eps)
    return GroupKL(*torch.ops.nvae_fast.normal_kl(mu_p, log_sigma_p, mu_q, log_sigma_q, eps, residual))


def normal_sample(mu: Tensor | None, log_sigma: Tensor | None, eps: Tensor, temperature: float = 1.0) -> Tensor:
    """``z = 5 tanh(mu / 5) + t (exp(5 tanh(log_sigma / 5)) + 0.01) eps``, in eps's dtype for the
    standard prior (``mu = log_sigma = None``), else mu's. All tensors (N, C, H, W); eps gets no
    gradient."""
    _check_group("eps", eps, mu, log_sigma)
    if not 0 <= temperature < float("inf"):
        raise ValueError(f"temperature must be a finite number >= 0 (0: the prior mean), got {temperature}")
    return torch.ops.nvae_fast.normal_sample(mu, log_sigma, eps, float(temperature))


def flow_kl(mu_p: Tensor | None, log_sigma_p: Tensor | None, log_sigma_q: Tensor, eps: Tensor, z: Tensor,
            log_det: Tensor, residual: bool = True) -> GroupKL:
    """One latent group with flows: the four sums from the flowed sample ``z`` and ``log_det``.

    ``eps`` is the noise that drew the pre-flow sample ``z0 = mu_q' + sigma_q * eps`` (see
    :func:`normal_sample`); the posterior mean cancels out of ``log q(z0)``, so only
    ``log_sigma_q`` is needed. Other arguments as in :func:`normal_kl`. Returns
    :class:`GroupKL` with ``z = None``.
    """
    _check_group("log_sigma_q", log_sigma_q, mu_p, log_sigma_p, eps=eps, z=z, log_det=log_det)
    return GroupKL(None, *torch.ops.nvae_fast.flow_kl(mu_p, log_sigma_p, log_sigma_q, eps, z, log_det, residual))
