"""What every launcher of the csrc/ kernels needs: the extension, dtype codes, checks, stream."""

from __future__ import annotations

from types import ModuleType

import torch

from nvae_fast import _ext

# Must match nvae::DType in csrc/nvae_fast.h.
DTYPE_CODES: dict[torch.dtype, int] = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def ext() -> ModuleType:
    """The loaded nvae_fast._C (RuntimeError with the reason if it cannot be used)."""
    return _ext.extension()


def require_cuda(name: str, x: torch.Tensor) -> None:
    """Raises unless x lives on a CUDA device: the kernels dereference its pointer there."""
    if not x.is_cuda:
        raise ValueError(f"{name} must be a CUDA tensor for the cuda backend, got device {x.device}")


# Tensors passed to check_cuda_tensors by these names are activations like x, not per-channel vectors.
ACTIVATION_NAMES = ("dy", "out")


def check_cuda_tensors(name: str, x: torch.Tensor, **others: torch.Tensor) -> None:
    """Raises before any launch unless x is a CUDA tensor of a kernel dtype, ``dy`` and ``out``
    (when given) match x in dtype and shape, and every other tensor is a per-channel parameter:
    contiguous fp32 of shape (x.shape[1],). Everything must be on x's device. Kernels would
    otherwise read or write out of bounds."""
    require_cuda(name, x)
    if x.dtype not in DTYPE_CODES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16 for the cuda backend, got {x.dtype}")
    channels = x.shape[1]
    for pname, p in others.items():
        if p.device != x.device:
            raise ValueError(f"{pname} is on {p.device} but {name} is on {x.device}")
        if pname in ACTIVATION_NAMES:
            if p.dtype != x.dtype or p.shape != x.shape:
                raise ValueError(f"{pname} must match {name} in dtype and shape, got {p.dtype} {tuple(p.shape)} "
                                 f"vs {x.dtype} {tuple(x.shape)}")
        elif p.dtype != torch.float32 or not p.is_contiguous():
            raise TypeError(f"{pname} must be a contiguous float32 tensor, got {p.dtype} "
                            f"(contiguous={p.is_contiguous()})")
        elif tuple(p.shape) != (channels,):
            raise ValueError(f"{pname} must have shape ({channels},) (one value per channel of {name}), "
                             f"got {tuple(p.shape)}")


def launch_context(x: torch.Tensor) -> tuple[int, int]:
    """(device index, handle of torch's current stream on x's device)."""
    return x.device.index, torch.cuda.current_stream(x.device).cuda_stream
