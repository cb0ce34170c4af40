"""Launchers of the csrc/ depthwise-stage kernels (contract: nvae_fast/ops/dwconv_stage.py).

``a`` and ``dc`` must be dense channels-last (N, C, H, W) tensors of one kernel dtype (float32,
float16, bfloat16) on one CUDA device; ``scale``, ``shift`` and ``mean_a`` contiguous fp32 (C,);
``weight`` (C, 1, K, K) of any float dtype, K in 3, 5, 7, 11. Anything else raises a ValueError or
TypeError naming the argument before any launch. Outputs: c and g channels-last in a's dtype,
statistics and sums fp32 (C,), dweight fp32 (C, 1, K, K). Reductions are deterministic.

The kernels take the filter tap-major, (K * K, C) fp32; the launchers transpose it (C * K * K
values, negligible next to the activations).
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


def _check_stage(a: Tensor, scale: Tensor, shift: Tensor, weight: Tensor, stride: int, upsample: bool,
                 mean_a: Tensor | None = None, dc: Tensor | None = None) -> int:
    """Validates every argument (layouts, shapes and dtypes first, devices last); returns K."""
    _check_activation("a", a)
    if a.dtype not in common.DTYPE_CODES:
        raise TypeError(f"a must be float32, float16 or bfloat16 for the cuda backend, got {a.dtype}")
    per_channel = dict(scale=scale, shift=shift)
    if mean_a is not None:
        per_channel["mean_a"] = mean_a
    for name, v in per_channel.items():
        if not isinstance(v, Tensor) or tuple(v.shape) != (a.shape[1],):
            raise ValueError(f"{name} must have shape ({a.shape[1]},), got {getattr(v, 'shape', type(v))}")
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
    if dc is not None:
        N, C, H, W = a.shape
        _check_activation("dc", dc, a, (N, C, *output_size(H, W, k, stride, upsample)))
    common.check_cuda_tensors("a", a, **per_channel)  # a on a CUDA device, fp32 contiguous params beside it
    for name, t in (("weight", weight), ("dc", dc)):
        if t is not None and t.device != a.device:
            raise ValueError(f"{name} is on {t.device} but a is on {a.device}")
    return k


def _taps(weight: Tensor, k: int) -> Tensor:
    """(C, 1, K, K) -> contiguous fp32 (K * K, C): taps[ky * K + kx, c] = weight[c, 0, ky, kx]."""
    return weight.detach().to(torch.float32).reshape(weight.shape[0], k * k).t().contiguous()


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
    taps = _taps(weight, k)
    device, stream = common.launch_context(a)
    ext = common.ext()
    ws = torch.empty(ext.dwconv_stage_forward_workspace_bytes(N, C, H, W, k, stride, upsample, device),
                     dtype=torch.uint8, device=a.device)
    ext.dwconv_stage_forward(a.data_ptr(), common.DTYPE_CODES[a.dtype], N, C, H, W, k, stride, upsample,
                             scale.data_ptr(), shift.data_ptr(), taps.data_ptr(), c.data_ptr(), mean_c.data_ptr(),
                             var_c.data_ptr(), ws.data_ptr(), ws.numel(), device, stream)
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
    taps = _taps(weight, k)
    device, stream = common.launch_context(a)
    ext = common.ext()
    ws = torch.empty(ext.dwconv_stage_backward_workspace_bytes(N, C, H, W, k, stride, upsample, device),
                     dtype=torch.uint8, device=a.device)
    ext.dwconv_stage_backward(dc.data_ptr(), a.data_ptr(), common.DTYPE_CODES[a.dtype], N, C, H, W, k, stride,
                              upsample, scale.data_ptr(), shift.data_ptr(), mean_a.data_ptr(), taps.data_ptr(),
                              g.data_ptr(), sums.data_ptr(), dweight.data_ptr(), ws.data_ptr(), ws.numel(), device,
                              stream)
    # Custom ops may not return outputs that share storage: the kernel writes one (2, C) block.
    return g, sums[0], sums[1].clone(), dweight


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
