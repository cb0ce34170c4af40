"""Launchers of the csrc/ BatchNorm + Swish kernels (contract: nvae_fast/ops/bn_swish.py).

The kernels read dense NCHW or dense channels-last tensors; anything else is copied to dense NCHW
first. Same signatures as nvae_fast/kernels/triton/bn_swish.py.
"""

from __future__ import annotations

import torch

from nvae_fast.kernels.cuda.common import DTYPE_CODES, check_cuda_tensors, ext, launch_context


def _dense(x: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """(x as a dense tensor, whether it is channels-last)."""
    if x.is_contiguous():
        return x, False
    if x.is_contiguous(memory_format=torch.channels_last):
        return x, True
    return x.contiguous(), False


def _like(t: torch.Tensor, channels_last: bool) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def _shape(x: torch.Tensor, channels_last: bool) -> tuple[int, int, int, bool]:
    N, C, H, W = x.shape
    return N, C, H * W, channels_last


def _workspace(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    nbytes = ext().bn_reduce_workspace_bytes(*_shape(x, channels_last), launch_context(x)[0])
    return torch.empty(nbytes, dtype=torch.uint8, device=x.device)


def bn_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance of x (N, C, H, W), fp32 tensors of shape (C,)."""
    check_cuda_tensors("x", x)
    x, cl = _dense(x)
    mean = torch.empty(x.shape[1], device=x.device, dtype=torch.float32)
    var = torch.empty_like(mean)
    ws = _workspace(x, cl)
    device, stream = launch_context(x)
    ext().bn_stats(x.data_ptr(), DTYPE_CODES[x.dtype], *_shape(x, cl), mean.data_ptr(), var.data_ptr(),
                   ws.data_ptr(), ws.numel(), device, stream)
    return mean, var


def bn_swish_forward(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out = swish(x * scale[c] + shift[c])."""
    check_cuda_tensors("x", x, scale=scale, shift=shift, out=out)
    x, cl = _dense(x)
    y = out if out.stride() == x.stride() else torch.empty_like(x)
    device, stream = launch_context(x)
    ext().bn_swish_forward(x.data_ptr(), y.data_ptr(), DTYPE_CODES[x.dtype], *_shape(x, cl),
                           scale.data_ptr(), shift.data_ptr(), device, stream)
    if y is not out:
        out.copy_(y)
    return out


def bn_swish_backward_reduce(
    dy: torch.Tensor, x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, mean: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum g, sum g * (x - mean)) per channel, fp32 (C,), with g = dy * swish'(x * scale + shift)."""
    check_cuda_tensors("x", x, dy=dy, scale=scale, shift=shift, mean=mean)
    x, cl = _dense(x)
    dy = _like(dy, cl)
    sum_g = torch.empty(x.shape[1], device=x.device, dtype=torch.float32)
    sum_gxmu = torch.empty_like(sum_g)
    ws = _workspace(x, cl)
    device, stream = launch_context(x)
    ext().bn_swish_backward_reduce(dy.data_ptr(), x.data_ptr(), DTYPE_CODES[x.dtype], *_shape(x, cl),
                                   scale.data_ptr(), shift.data_ptr(), mean.data_ptr(), sum_g.data_ptr(),
                                   sum_gxmu.data_ptr(), ws.data_ptr(), ws.numel(), device, stream)
    return sum_g, sum_gxmu


def bn_swish_backward_apply(
    dy: torch.Tensor, x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, mean: torch.Tensor,
    coef_xmu: torch.Tensor, coef_const: torch.Tensor, out: torch.Tensor,
) -> torch.Tensor:
    """out = scale * g + coef_xmu * (x - mean) + coef_const."""
    check_cuda_tensors("x", x, dy=dy, scale=scale, shift=shift, mean=mean, coef_xmu=coef_xmu, coef_const=coef_const,
                       out=out)
    x, cl = _dense(x)
    dy = _like(dy, cl)
    dx = out if out.stride() == x.stride() else torch.empty_like(x)
    device, stream = launch_context(x)
    ext().bn_swish_backward_apply(dy.data_ptr(), x.data_ptr(), dx.data_ptr(), DTYPE_CODES[x.dtype], *_shape(x, cl),
                                  scale.data_ptr(), shift.data_ptr(), mean.data_ptr(), coef_xmu.data_ptr(),
                                  coef_const.data_ptr(), device, stream)
    if dx is not out:
        out.copy_(dx)
    return out
