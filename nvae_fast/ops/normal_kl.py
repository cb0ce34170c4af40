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
from typing import NamedTuple

import torch
from torch import Tensor

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
        eps: (N, C, H, W) standard-normal noise; zeros give the posterior mean.
        residual: the official ``res_dist``.
    Returns:
        :class:`GroupKL` with z (params' dtype) and fp32 sums (fp64 for fp64 input).
    """
    _check_group("mu_q", mu_q, mu_p, log_sigma_p, log_sigma_q=log_sigma_q, eps=eps)
    return normal_kl_ref(mu_p, log_sigma_p, mu_q, log_sigma_q, eps, residual)


def normal_sample(mu: Tensor | None, log_sigma: Tensor | None, eps: Tensor, temperature: float = 1.0) -> Tensor:
    """``z = 5 tanh(mu / 5) + t (exp(5 tanh(log_sigma / 5)) + 0.01) eps``, in eps's dtype for the
    standard prior (``mu = log_sigma = None``), else mu's. All tensors (N, C, H, W)."""
    _check_group("eps", eps, mu, log_sigma)
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    return normal_sample_ref(mu, log_sigma, eps, temperature)


def flow_kl(mu_p: Tensor | None, log_sigma_p: Tensor | None, log_sigma_q: Tensor, eps: Tensor, z: Tensor,
            log_det: Tensor, residual: bool = True) -> GroupKL:
    """One latent group with flows: the four sums from the flowed sample ``z`` and ``log_det``.

    ``eps`` is the noise that drew the pre-flow sample ``z0 = mu_q' + sigma_q * eps`` (see
    :func:`normal_sample`); the posterior mean cancels out of ``log q(z0)``, so only
    ``log_sigma_q`` is needed. Other arguments as in :func:`normal_kl`. Returns
    :class:`GroupKL` with ``z = None``.
    """
    _check_group("log_sigma_q", log_sigma_q, mu_p, log_sigma_p, eps=eps, z=z, log_det=log_det)
    return flow_kl_ref(mu_p, log_sigma_p, log_sigma_q, eps, z, log_det, residual)
