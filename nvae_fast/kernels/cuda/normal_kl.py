"""Launchers of the csrc/ residual-normal kernels (contract: nvae_fast/ops/normal_kl.py, "Kernel contract").

Every (N, C, H, W) tensor may have any strides: the kernels read each through its own strides, so
the ``torch.chunk(param, 2, dim=1)`` views of the model are used in place, never copied. All of a
call's tensors share one kernel dtype (float32, float16, bfloat16) and one CUDA device; z and the
gradients come back dense (``torch.empty_like``: channels-last for channels-last-like inputs) in
that dtype, the sums as fp32. Upstream gradients of the sums may be None (zeros), as may grad_z.
Bad arguments raise a ValueError or TypeError naming the argument before any launch.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from nvae_fast.kernels.cuda import common

_View = tuple[int, tuple[int, ...]]


def _view(t: Tensor) -> _View:
    return t.data_ptr(), tuple(t.stride())


def _check(ref_name: str, ref: Tensor, **tensors: Tensor | None) -> None:
    """ref and every present tensor: 4-D, non-empty, one kernel dtype, one shape, one CUDA device."""
    if not isinstance(ref, Tensor) or ref.dim() != 4:
        raise ValueError(f"{ref_name} must be a 4-D tensor (N, C, H, W), got {getattr(ref, 'shape', type(ref))}")
    if ref.dtype not in common.DTYPE_CODES:
        raise TypeError(f"{ref_name} must be float32, float16 or bfloat16 for the cuda backend, got {ref.dtype}")
    if ref.numel() == 0:
        raise ValueError(f"{ref_name} must not be empty, got shape {tuple(ref.shape)}")
    for name, t in tensors.items():
        if t is None:
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.shape != ref.shape:
            raise ValueError(f"{name} must have shape {tuple(ref.shape)} like {ref_name}, got {tuple(t.shape)}")
        if t.dtype != ref.dtype:
            raise TypeError(f"{name} must have {ref_name}'s dtype {ref.dtype}, got {t.dtype}")
    common.require_cuda(ref_name, ref)
    for name, t in tensors.items():
        if t is not None and t.device != ref.device:
            raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}")


def _check_prior(mu_p: Tensor | None, log_sigma_p: Tensor | None) -> None:
    if (mu_p is None) != (log_sigma_p is None):
        raise ValueError("mu_p and log_sigma_p must both be tensors or both be None (standard prior)")


def _vector(name: str, g: Tensor | None, size: int, like: Tensor) -> Tensor | None:
    """An upstream gradient of a sum as a contiguous fp32 (size,) tensor on like's device, or None."""
    if g is None:
        return None
    if not isinstance(g, Tensor) or tuple(g.shape) != (size,):
        raise ValueError(f"{name} must have shape ({size},), got {getattr(g, 'shape', type(g))}")
    if not g.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {g.dtype}")
    if g.device != like.device:
        raise ValueError(f"{name} is on {g.device} but the params are on {like.device}")
    return g.detach().to(torch.float32).contiguous()


def _views(**tensors: Tensor | None) -> dict[str, _View]:
    return {name: _view(t) for name, t in tensors.items() if t is not None}


def _grad_vectors(ref: Tensor, grad_kl_all: Tensor | None, grad_log_q: Tensor | None, grad_log_p: Tensor | None,
                  grad_kl_diag: Tensor | None) -> dict[str, Tensor]:
    N, C = ref.shape[:2]
    vecs = dict(grad_kl_all=_vector("grad_kl_all", grad_kl_all, N, ref),
                grad_log_q=_vector("grad_log_q", grad_log_q, N, ref),
                grad_log_p=_vector("grad_log_p", grad_log_p, N, ref),
                grad_kl_diag=_vector("grad_kl_diag", grad_kl_diag, C, ref))
    return {name: v for name, v in vecs.items() if v is not None}


def _reduce(fn_name: str, ref: Tensor, residual: bool, views: dict[str, _View]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Runs a reducing kernel; returns (kl_all, log_q, log_p, kl_diag)."""
    N, C = ref.shape[:2]
    sums = torch.empty((3, N), dtype=torch.float32, device=ref.device)
    kl_diag = torch.empty(C, dtype=torch.float32, device=ref.device)
    device, stream = common.launch_context(ref)
    ext = common.ext()
    code = common.DTYPE_CODES[ref.dtype]
    ws = torch.empty(ext.normal_kl_workspace_bytes(code, tuple(ref.shape), residual, views, device),
                     dtype=torch.uint8, device=ref.device)
    getattr(ext, fn_name)(code, tuple(ref.shape), residual, views,
                          {"sums_n": sums.data_ptr(), "kl_diag": kl_diag.data_ptr()}, ws.data_ptr(), ws.numel(),
                          device, stream)
    # Custom ops may not return outputs that share storage: the kernel writes one (3, N) block.
    return sums[0], sums[1].clone(), sums[2].clone(), kl_diag


def _elementwise(fn_name: str, ref: Tensor, residual: bool, temperature: float, views: dict[str, _View],
                 vectors: dict[str, Tensor]) -> None:
    device, stream = common.launch_context(ref)
    getattr(common.ext(), fn_name)(common.DTYPE_CODES[ref.dtype], tuple(ref.shape), residual, temperature, views,
                                   {name: v.data_ptr() for name, v in vectors.items()}, device, stream)


def normal_kl_forward(mu_p: Tensor | None, log_sigma_p: Tensor | None, mu_q: Tensor, log_sigma_q: Tensor, eps: Tensor,
                      residual: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(z, kl_all, log_q, log_p, kl_diag) of one latent group without flows."""
    _check_prior(mu_p, log_sigma_p)
    _check("mu_q", mu_q, mu_p=mu_p, log_sigma_p=log_sigma_p, log_sigma_q=log_sigma_q, eps=eps)
    z = torch.empty_like(mu_q)
    views = _views(mu_p=mu_p, log_sigma_p=log_sigma_p, mu_q=mu_q, log_sigma_q=log_sigma_q, eps=eps, z_out=z)
    return (z, *_reduce("normal_kl_forward", mu_q, bool(residual), views))


def normal_kl_backward(grad_z: Tensor | None, grad_kl_all: Tensor | None, grad_log_q: Tensor | None,
                       grad_log_p: Tensor | None, grad_kl_diag: Tensor | None, mu_p: Tensor | None,
                       log_sigma_p: Tensor | None, mu_q: Tensor, log_sigma_q: Tensor, eps: Tensor, residual: bool
                       ) -> tuple[Tensor | None, Tensor | None, Tensor, Tensor]:
    """(d_mu_p, d_log_sigma_p, d_mu_q, d_log_sigma_q); the prior's are None for the standard prior."""
    _check_prior(mu_p, log_sigma_p)
    _check("mu_q", mu_q, mu_p=mu_p, log_sigma_p=log_sigma_p, log_sigma_q=log_sigma_q, eps=eps, grad_z=grad_z)
    vectors = _grad_vectors(mu_q, grad_kl_all, grad_log_q, grad_log_p, grad_kl_diag)
    d_mu_q, d_log_sigma_q = torch.empty_like(mu_q), torch.empty_like(log_sigma_q)
    d_mu_p = None if mu_p is None else torch.empty_like(mu_p)
    d_log_sigma_p = None if log_sigma_p is None else torch.empty_like(log_sigma_p)
    views = _views(mu_p=mu_p, log_sigma_p=log_sigma_p, mu_q=mu_q, log_sigma_q=log_sigma_q, eps=eps, grad_z=grad_z,
                   d_mu_p=d_mu_p, d_log_sigma_p=d_log_sigma_p, d_mu_q=d_mu_q, d_log_sigma_q=d_log_sigma_q)
    _elementwise("normal_kl_backward", mu_q, bool(residual), 1.0, views, vectors)
    return d_mu_p, d_log_sigma_p, d_mu_q, d_log_sigma_q


def _check_temperature(temperature: float) -> float:
    t = float(temperature)
    if not (t >= 0 and math.isfinite(t)):
        raise ValueError(f"temperature must be finite and >= 0, got {temperature}")
    return t


def normal_sample_forward(mu: Tensor | None, log_sigma: Tensor | None, eps: Tensor, temperature: float) -> Tensor:
    """z = mu' + temperature * sigma * eps (mu = log_sigma = None: the standard prior)."""
    if (mu is None) != (log_sigma is None):
        raise ValueError("mu and log_sigma must both be tensors or both be None (standard prior)")
    t = _check_temperature(temperature)
    _check("eps", eps, mu=mu, log_sigma=log_sigma)
    z = torch.empty_like(eps if mu is None else mu)
    _elementwise("normal_sample_forward", eps, False, t, _views(mu=mu, log_sigma=log_sigma, eps=eps, z_out=z), {})
    return z


def normal_sample_backward(grad_z: Tensor | None, mu: Tensor | None, log_sigma: Tensor | None, eps: Tensor,
                           temperature: float) -> tuple[Tensor | None, Tensor | None]:
    """(d_mu, d_log_sigma); (None, None) for the standard prior, which has no parameters."""
    if (mu is None) != (log_sigma is None):
        raise ValueError("mu and log_sigma must both be tensors or both be None (standard prior)")
    t = _check_temperature(temperature)
    _check("eps", eps, mu=mu, log_sigma=log_sigma, grad_z=grad_z)
    if mu is None:
        return None, None
    d_mu, d_log_sigma = torch.empty_like(mu), torch.empty_like(log_sigma)
    views = _views(mu=mu, log_sigma=log_sigma, eps=eps, grad_z=grad_z, d_mu=d_mu, d_log_sigma=d_log_sigma)
    _elementwise("normal_sample_backward", eps, False, t, views, {})
    return d_mu, d_log_sigma


def flow_kl_forward(mu_p: Tensor | None, log_sigma_p: Tensor | None, log_sigma_q: Tensor, eps: Tensor, z: Tensor,
                    log_det: Tensor, residual: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(kl_all, log_q, log_p, kl_diag) of one latent group from the flowed sample z and log_det."""
    _check_prior(mu_p, log_sigma_p)
    _check("log_sigma_q", log_sigma_q, mu_p=mu_p, log_sigma_p=log_sigma_p, eps=eps, z=z, log_det=log_det)
    views = _views(mu_p=mu_p, log_sigma_p=log_sigma_p, log_sigma_q=log_sigma_q, eps=eps, z=z, log_det=log_det)
    return _reduce("flow_kl_forward", log_sigma_q, bool(residual), views)


def flow_kl_backward(grad_kl_all: Tensor | None, grad_log_q: Tensor | None, grad_log_p: Tensor | None,
                     grad_kl_diag: Tensor | None, mu_p: Tensor | None, log_sigma_p: Tensor | None,
                     log_sigma_q: Tensor, eps: Tensor, z: Tensor, log_det: Tensor, residual: bool
                     ) -> tuple[Tensor | None, Tensor | None, Tensor, Tensor, Tensor]:
    """(d_mu_p, d_log_sigma_p, d_log_sigma_q, d_z, d_log_det); the prior's are None for the standard prior."""
    _check_prior(mu_p, log_sigma_p)
    _check("log_sigma_q", log_sigma_q, mu_p=mu_p, log_sigma_p=log_sigma_p, eps=eps, z=z, log_det=log_det)
    vectors = _grad_vectors(log_sigma_q, grad_kl_all, grad_log_q, grad_log_p, grad_kl_diag)
    d_log_sigma_q, d_z, d_log_det = torch.empty_like(log_sigma_q), torch.empty_like(z), torch.empty_like(log_det)
    d_mu_p = None if mu_p is None else torch.empty_like(mu_p)
    d_log_sigma_p = None if log_sigma_p is None else torch.empty_like(log_sigma_p)
    views = _views(mu_p=mu_p, log_sigma_p=log_sigma_p, log_sigma_q=log_sigma_q, eps=eps, z=z, log_det=log_det,
                   d_mu_p=d_mu_p, d_log_sigma_p=d_log_sigma_p, d_log_sigma_q=d_log_sigma_q, d_z=d_z,
                   d_log_det=d_log_det)
    _elementwise("flow_kl_backward", log_sigma_q, bool(residual), 1.0, views, vectors)
    return d_mu_p, d_log_sigma_p, d_log_sigma_q, d_z, d_log_det
