"""Launchers of the csrc/ depthwise-stage kernels (contract: nvae_fast/ops/dwconv_stage.py).

Plain contract: ``a`` and ``dc`` must be dense channels-last (N, C, H, W) tensors of one kernel
dtype (float32, float16, bfloat16) on one CUDA device; ``scale``, ``shift`` and ``mean_a``
contiguous fp32 (C,); ``weight`` (C, 1, K, K) of any float dtype, K in 3, 5, 7, 11. Outputs: c and g
channels-last in a's dtype, statistics and sums fp32 (C,), dweight fp32 (C, 1, K, K).

Fused contract (``dwconv_stage_forward_fused`` / ``dwconv_stage_backward_fused``; types in
nvae_fast/ops/stage_args.py): the BatchNorms' weight and bias, the running statistics, BN1's
parameter gradients and the filter and its gradient are contiguous (C,) / (C, 1, K, K) tensors in
float32, float16 or bfloat16; means, variances and sums contiguous fp32; ``num_batches_tracked`` an
int64 tensor of one element. Everything per channel happens in the kernels: one forward launch
plus one merge (none in eval), two backward launches plus two merges.

Anything else raises a ValueError or TypeError naming the argument before any launch. Reductions
are deterministic. The kernels read the filter in its own layout and dtype (a float64 or
non-contiguous filter is copied to contiguous fp32 first, in the plain contract only).
"""

from __future__ import annotations

import torch
from torch import Tensor

from nvae_fast.kernels.cuda import common

KERNEL_SIZES = (3, 5, 7, 11)


def output_size(h: int, w: int, k: int, stride: int, upsample: bool) -> tuple[int, int]:
    """(Ho, Wo) of the stage: 'same' padding k // 2 on the (2x upsampled if ``upsample``) input."""
    scale = 2 if upsample else 1
    pad = k // 2
    return (h * scale + 2 * pad - k) // stride + 1, (w * scale + 2 * pad - k) // stride + 1


def _check_activation(name: str, t: Tensor, a: Tensor | None = None, shape: tuple[int, ...] | None = None) -> None:
    if not isinstance(t, Tensor) or t.dim() != 4:
        raise ValueError(f"{name} must be a 4-D tensor (N, C, H, W), got {getattr(t, 'shape', type(t))}")
    if a is not None and t.dtype != a.dtype:
        raise TypeError(f"{name} must have a's dtype {a.dtype}, got {t.dtype}")
    if shape is not None and tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
    if min(t.shape) == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(t.shape)}")
    if not t.is_contiguous(memory_format=torch.channels_last):
        raise ValueError(f"{name} must be dense channels-last (strides {_channels_last_strides(t.shape)}), got "
                         f"strides {t.stride()}; use .contiguous(memory_format=torch.channels_last)")


def _channels_last_strides(shape: torch.Size) -> tuple[int, int, int, int]:
    _, C, H, W = shape
    return H * W * C, 1, W * C, C


def _check_geometry(a: Tensor, weight: Tensor, stride: int, upsample: bool) -> int:
    """Checks a, the filter's shape, stride and upsample; returns K."""
    _check_activation("a", a)
    if a.dtype not in common.DTYPE_CODES:
        raise TypeError(f"a must be float32, float16 or bfloat16 for the cuda backend, got {a.dtype}")
    if not isinstance(weight, Tensor) or weight.dim() != 4:
        raise ValueError(f"weight must be a 4-D tensor (C, 1, K, K), got {getattr(weight, 'shape', type(weight))}")
    k = weight.shape[-1]
    if tuple(weight.shape) != (a.shape[1], 1, k, k) or k not in KERNEL_SIZES:
        raise ValueError(f"weight must have shape ({a.shape[1]}, 1, K, K) with K in {KERNEL_SIZES}, "
                         f"got {tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise TypeError(f"weight must be a floating-point tensor, got {weight.dtype}")
    if stride not in (1, 2):
        raise ValueError(f"stride must be 1 or 2, got {stride}")
    if upsample and stride != 1:
        raise ValueError("upsample requires stride 1 (stride 2 with upsample is not a cell of NVAE)")
    return k


def _check_dc(name: str, t: Tensor, a: Tensor, k: int, stride: int, upsample: bool) -> None:
    N, C, H, W = a.shape
    _check_activation(name, t, a, (N, C, *output_size(H, W, k, stride, upsample)))


def _check_devices(a: Tensor, **tensors: Tensor | None) -> None:
    for name, t in tensors.items():
        if t is not None and t.device != a.device:
            raise ValueError(f"{name} is on {t.device} but a is on {a.device}")


def _check_stage(a: Tensor, scale: Tensor, shift: Tensor, weight: Tensor, stride: int, upsample: bool,
                 mean_a: Tensor | None = None, dc: Tensor | None = None) -> int:
    """Validates every argument of the plain contract (layouts, shapes and dtypes first, devices last);
    returns K."""
    k = _check_geometry(a, weight, stride, upsample)
    per_channel = dict(scale=scale, shift=shift)
    if mean_a is not None:
        per_channel["mean_a"] = mean_a
    for name, v in per_channel.items():
        if not isinstance(v, Tensor) or tuple(v.shape) != (a.shape[1],):
            raise ValueError(f"{name} must have shape ({a.shape[1]},), got {getattr(v, 'shape', type(v))}")
    if dc is not None:
        _check_dc("dc", dc, a, k, stride, upsample)
    common.check_cuda_tensors("a", a, **per_channel)  # a on a CUDA device, fp32 contiguous params beside it
    _check_devices(a, weight=weight, dc=dc)
    return k


def _filter(weight: Tensor) -> tuple[Tensor, int]:
    """The filter as the kernels read it, (C, 1, K, K) contiguous in a kernel dtype, and its dtype code:
    the parameter itself unless it is float64 or not contiguous."""
    w = weight.detach()
    if w.dtype not in common.DTYPE_CODES or not w.is_contiguous():
        w = w.to(torch.float32).contiguous()
    return w, common.DTYPE_CODES[w.dtype]


def dwconv_stage_forward(a: Tensor, scale: Tensor, shift: Tensor, weight: Tensor, stride: int = 1,
                         upsample: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """c = depthwise_conv(swish(a * scale + shift) [nearest 2x upsampled], weight, stride, 'same').

    Returns (c channels-last (N, C, Ho, Wo) in a's dtype, mean_c, var_c fp32 (C,) batch statistics
    of the fp32 c, biased variance).
    """
    k = _check_stage(a, scale, shift, weight, stride, upsample)
    N, C, H, W = a.shape
    Ho, Wo = output_size(H, W, k, stride, upsample)
    c = torch.empty((N, C, Ho, Wo), dtype=a.dtype, device=a.device, memory_format=torch.channels_last)
    mean_c = torch.empty(C, dtype=torch.float32, device=a.device)
    var_c = torch.empty_like(mean_c)
    w, w_code = _filter(weight)
    device, stream = common.launch_context(a)
    ext = common.ext()
    ws = torch.empty(ext.dwconv_stage_forward_workspace_bytes(N, C, H, W, k, stride, upsample, device),
                     dtype=torch.uint8, device=a.device)
    ext.dwconv_stage_forward(a.data_ptr(), common.DTYPE_CODES[a.dtype], N, C, H, W, k, stride, upsample,
                             scale.data_ptr(), shift.data_ptr(), w.data_ptr(), w_code, c.data_ptr(),
                             mean_c.data_ptr(), var_c.data_ptr(), ws.data_ptr(), ws.numel(), device, stream)
    return c, mean_c, var_c


def dwconv_stage_backward(dc: Tensor, a: Tensor, scale: Tensor, shift: Tensor, mean_a: Tensor, weight: Tensor,
                          stride: int = 1, upsample: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Backward of the stage given dc = dL/dc (channels-last (N, C, Ho, Wo), a's dtype).

    Returns (g channels-last in a's dtype = dL/d(a * scale + shift), sum_g, sum_gxmu fp32 (C,) =
    sums of g and g * (a - mean_a), dweight fp32 (C, 1, K, K)); b is recomputed from a.
    """
    k = _check_stage(a, scale, shift, weight, stride, upsample, mean_a, dc)
    N, C, H, W = a.shape
    g = torch.empty_like(a, memory_format=torch.channels_last)
    sums = torch.empty((2, C), dtype=torch.float32, device=a.device)
    dweight = torch.empty((C, 1, k, k), dtype=torch.float32, device=a.device)
    w, w_code = _filter(weight)
    device, stream = common.launch_context(a)
    ext = common.ext()
    ws = torch.empty(ext.dwconv_stage_backward_workspace_bytes(N, C, H, W, k, stride, upsample, device),
                     dtype=torch.uint8, device=a.device)
    ext.dwconv_stage_backward(dc.data_ptr(), a.data_ptr(), common.DTYPE_CODES[a.dtype], N, C, H, W, k, stride,
                              upsample, scale.data_ptr(), shift.data_ptr(), mean_a.data_ptr(), w.data_ptr(), w_code,
                              g.data_ptr(), sums.data_ptr(), dweight.data_ptr(), ws.data_ptr(), ws.numel(), device,
                              stream)
    # Custom ops may not return outputs that share storage: the kernel writes one (2, C) block.
    return g, sums[0], sums[1].clone(), dweight


# ---------------------------------------------------------------------------------------------
# The fused contract (argument types: nvae_fast/ops/stage_args.py, read by attribute here)
# ---------------------------------------------------------------------------------------------

_PARAM_DTYPES = tuple(common.DTYPE_CODES)


def _vector(name: str, t, C: int, dtypes: tuple[torch.dtype, ...], like: Tensor) -> None:
    """t is a contiguous (C,) tensor of one of ``dtypes`` on like's device."""
    if not isinstance(t, Tensor) or tuple(t.shape) != (C,):
        raise ValueError(f"{name} must have shape ({C},), got {getattr(t, 'shape', type(t))}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name} must be {' or '.join(str(d)[6:] for d in dtypes)}, got {t.dtype}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")
    if t.device != like.device:
        raise ValueError(f"{name} is on {t.device} but a is on {like.device}")


def _bn_spec(name: str, bn, C: int, a: Tensor) -> tuple:
    """(weight, bias, param dtype code, mean, var, eps) of a BatchNormArgs, checked."""
    for field in ("weight", "bias", "mean", "var", "eps"):
        if not hasattr(bn, field):
            raise TypeError(f"{name} must be a BatchNormArgs (weight, bias, mean, var, eps), got {type(bn).__name__}")
    _vector(f"{name}.weight", bn.weight, C, _PARAM_DTYPES, a)
    _vector(f"{name}.bias", bn.bias, C, (bn.weight.dtype,), a)
    _vector(f"{name}.mean", bn.mean, C, (torch.float32,), a)
    _vector(f"{name}.var", bn.var, C, (torch.float32,), a)
    if not isinstance(bn.eps, (int, float)) or not bn.eps >= 0:
        raise ValueError(f"{name}.eps must be a number >= 0, got {bn.eps!r}")
    return (bn.weight.data_ptr(), bn.bias.data_ptr(), common.DTYPE_CODES[bn.weight.dtype], bn.mean.data_ptr(),
            bn.var.data_ptr(), float(bn.eps))


def _running_spec(running, C: int, a: Tensor) -> tuple | None:
    """(mean, var, dtype code, num_batches_tracked or 0, momentum, unbias) of a RunningUpdate, checked."""
    if running is None:
        return None
    _vector("running.mean", running.mean, C, _PARAM_DTYPES, a)
    _vector("running.var", running.var, C, (running.mean.dtype,), a)
    counter = running.num_batches_tracked
    if counter is not None:
        if not isinstance(counter, Tensor) or counter.dtype != torch.int64 or counter.numel() != 1:
            raise TypeError(f"running.num_batches_tracked must be an int64 tensor of one element, got {counter!r}")
        if counter.device != a.device:
            raise ValueError(f"running.num_batches_tracked is on {counter.device} but a is on {a.device}")
    for field in ("momentum", "unbias"):
        value = getattr(running, field)
        if not isinstance(value, (int, float)):
            raise TypeError(f"running.{field} must be a number, got {value!r}")
    return (running.mean.data_ptr(), running.var.data_ptr(), common.DTYPE_CODES[running.mean.dtype],
            0 if counter is None else counter.data_ptr(), float(running.momentum), float(running.unbias))


def _fused_filter(weight: Tensor, a: Tensor) -> None:
    if weight.dtype not in _PARAM_DTYPES or not weight.is_contiguous():
        raise TypeError(f"weight must be a contiguous float32, float16 or bfloat16 tensor for the fused cuda stage, "
                        f"got {weight.dtype} (contiguous={weight.is_contiguous()})")
    _check_devices(a, weight=weight)


def dwconv_stage_forward_fused(a: Tensor, bn1, weight: Tensor, stride: int, upsample: bool, stats: Tensor | None,
                               running=None) -> Tensor:
    """The fused forward (nvae_fast/ops/dwconv_stage.py): c (channels-last, a's dtype) with scale and
    shift folded from ``bn1`` in the kernel; ``stats`` (2, C) fp32 = (mean_c, var_c) written in place
    unless None (eval: no statistics, no merge); ``running`` (a RunningUpdate) updated from them."""
    k = _check_geometry(a, weight, stride, upsample)
    N, C, H, W = a.shape
    common.require_cuda("a", a)
    bn = _bn_spec("bn1", bn1, C, a)
    _fused_filter(weight, a)
    if stats is not None:
        if not isinstance(stats, Tensor) or tuple(stats.shape) != (2, C) or stats.dtype != torch.float32 \
                or not stats.is_contiguous():
            raise ValueError(f"stats must be a contiguous float32 tensor of shape (2, {C}), got "
                             f"{getattr(stats, 'dtype', type(stats))} {tuple(getattr(stats, 'shape', ()))}")
        _check_devices(a, stats=stats)
    elif running is not None:
        raise ValueError("running needs stats: the running statistics are updated from the batch statistics")
    run = _running_spec(running, C, a)
    Ho, Wo = output_size(H, W, k, stride, upsample)
    c = torch.empty((N, C, Ho, Wo), dtype=a.dtype, device=a.device, memory_format=torch.channels_last)
    device, stream = common.launch_context(a)
    ext = common.ext()
    ws_bytes = ext.dwconv_stage_forward_workspace_bytes(N, C, H, W, k, stride, upsample, device) if stats is not None \
        else 0
    ws = torch.empty(ws_bytes, dtype=torch.uint8, device=a.device)
    ext.dwconv_stage_forward_fused(a.data_ptr(), common.DTYPE_CODES[a.dtype], N, C, H, W, k, stride, upsample, bn,
                                   weight.data_ptr(), common.DTYPE_CODES[weight.dtype], c.data_ptr(),
                                   0 if stats is None else stats.data_ptr(), run, ws.data_ptr() if ws_bytes else 0,
                                   ws_bytes, device, stream)
    return c


def dwconv_stage_backward_fused(dz: Tensor, z: Tensor, bn_z, grad_z, a: Tensor, bn1, weight: Tensor, stride: int,
                                upsample: bool, sums: Tensor, bn1_grads: tuple[Tensor, Tensor],
                                dweight: Tensor) -> Tensor:
    """The fused backward (nvae_fast/ops/dwconv_stage.py): g (channels-last, a's dtype), with dc rebuilt
    in the kernels from dz, z (channels-last (N, C, Ho, Wo) in a's dtype), ``bn_z`` and ``grad_z``
    (a BatchNormGrad) and rounded to a's dtype; writes ``sums`` (2, C) fp32, ``bn1_grads`` (two (C,)
    tensors in bn1's parameter dtype) and ``dweight`` (C, 1, K, K) in the filter's dtype in place."""
    k = _check_geometry(a, weight, stride, upsample)
    N, C, H, W = a.shape
    _check_dc("dz", dz, a, k, stride, upsample)
    _check_dc("z", z, a, k, stride, upsample)
    common.require_cuda("a", a)
    _check_devices(a, dz=dz, z=z)
    bnz = _bn_spec("bn_z", bn_z, C, a)
    bn = _bn_spec("bn1", bn1, C, a)
    for field in ("sums", "count", "training"):
        if not hasattr(grad_z, field):
            raise TypeError(f"grad_z must be a BatchNormGrad (sums, count, training), got {type(grad_z).__name__}")
    training = bool(grad_z.training)
    if training:
        if not isinstance(grad_z.count, int) or grad_z.count <= 0:
            raise ValueError(f"grad_z.count must be a positive int, got {grad_z.count!r}")
        if not isinstance(grad_z.sums, Tensor) or tuple(grad_z.sums.shape) != (2, C) \
                or grad_z.sums.dtype != torch.float32 or not grad_z.sums.is_contiguous():
            raise ValueError(f"grad_z.sums must be a contiguous float32 tensor of shape (2, {C})")
        _check_devices(a, **{"grad_z.sums": grad_z.sums})
    _fused_filter(weight, a)
    if not isinstance(sums, Tensor) or tuple(sums.shape) != (2, C) or sums.dtype != torch.float32 \
            or not sums.is_contiguous():
        raise ValueError(f"sums must be a contiguous float32 tensor of shape (2, {C})")
    _check_devices(a, sums=sums)
    if not isinstance(bn1_grads, (tuple, list)) or len(bn1_grads) != 2:
        raise ValueError("bn1_grads must be a pair of tensors (grad of bn1.weight, grad of bn1.bias)")
    for name, t in zip(("bn1_grads[0]", "bn1_grads[1]"), bn1_grads):
        _vector(name, t, C, (bn1.weight.dtype,), a)
    if not isinstance(dweight, Tensor) or dweight.shape != weight.shape or dweight.dtype != weight.dtype \
            or not dweight.is_contiguous():
        raise ValueError(f"dweight must be a contiguous tensor like weight ({weight.dtype} {tuple(weight.shape)})")
    _check_devices(a, dweight=dweight)
    g = torch.empty_like(a, memory_format=torch.channels_last)
    device, stream = common.launch_context(a)
    ext = common.ext()
    ws = torch.empty(ext.dwconv_stage_backward_workspace_bytes(N, C, H, W, k, stride, upsample, device),
                     dtype=torch.uint8, device=a.device)
    grad = (grad_z.sums.data_ptr() if training else 0, int(grad_z.count) if training else 1, training)
    ext.dwconv_stage_backward_fused(dz.data_ptr(), z.data_ptr(), bnz, grad, a.data_ptr(), common.DTYPE_CODES[a.dtype],
                                    N, C, H, W, k, stride, upsample, bn, weight.data_ptr(),
                                    common.DTYPE_CODES[weight.dtype], g.data_ptr(), sums.data_ptr(),
                                    bn1_grads[0].data_ptr(), bn1_grads[1].data_ptr(), dweight.data_ptr(),
                                    ws.data_ptr(), ws.numel(), device, stream)
    return g


def launch_plan(shape: tuple[int, int, int, int], k: int, stride: int = 1, upsample: bool = False, *,
                sms: int, smem_per_block: int) -> dict[str, dict]:
    """What the stage's kernels launch for a of ``shape`` (N, C, H, W) on a device with ``sms``
    multiprocessors (``torch.cuda.get_device_properties(d).multi_processor_count``) where a block may
    use ``smem_per_block`` bytes of dynamic shared memory, at least 48 KiB (the kernels take what lets
    two blocks share a multiprocessor: half its shared memory less 1 KiB reserved per block, 81 KiB on
    an A100, 113 KiB on an H100/H200). Nothing runs.

    Returns ``{"forward" | "input_grad" | "weight_grad": {"blocks", "tile", "tiles", "tiles_per_block",
    "smem_bytes", "evaluations_per_element", "merge": {"parts", "segments", "seg_len", "blocks",
    "serial_loads"}}}``: the grid, the tile (outputs; positions of a for the input grad), how many
    tiles one block sums (the weight grad's runs), its dynamic shared memory, the BN1 + Swish (or
    derivative) evaluations per element of a including the halos, and the two-level merge of the
    pass's partials (``serial_loads``: values one thread merges one after another).
    """
    if len(shape) != 4 or any(not isinstance(d, int) or d <= 0 for d in shape):
        raise ValueError(f"shape must be 4 positive ints (N, C, H, W), got {shape}")
    if k not in KERNEL_SIZES:
        raise ValueError(f"k must be one of {KERNEL_SIZES}, got {k}")
    if stride not in (1, 2):
        raise ValueError(f"stride must be 1 or 2, got {stride}")
    if upsample and stride != 1:
        raise ValueError("upsample requires stride 1 (stride 2 with upsample is not a cell of NVAE)")
    if not isinstance(sms, int) or sms <= 0:
        raise ValueError(f"sms must be a positive int, got {sms}")
    if not isinstance(smem_per_block, int) or smem_per_block < 48 * 1024:
        raise ValueError(f"smem_per_block must be an int of at least 48 KiB (49152), got {smem_per_block}")
    return common.ext().dwconv_stage_launch_plan(*shape, k, stride, bool(upsample), sms, smem_per_block)
