"""Weight normalisation of many convolutions at once: ``w' = exp(g) * w / (||w|| + 1e-5)`` per row.

The official NVAE normalises every convolution's weight in its own forward, a handful of small
launches per convolution. Here the weights of all convolutions of a model travel as one flat
buffer and one op normalises every row of it: a row is one output channel of one convolution (its
``C_in / groups * kH * kW`` values, contiguous), so rows have different lengths.

Layout (CSR): ``w`` (T,) holds the rows back to back; ``row_ptr`` (R + 1,) int64 gives each row's
start (``row_ptr[R] == T``). Rows ``r < first_wn_row`` are plain weights (convolutions without
weight normalisation): they pass through unchanged. Rows from ``first_wn_row`` on are normalised
with ``g[r - first_wn_row]``, the log of the row's norm (``log_weight_norm``). Elements from
``mask_start`` on are first multiplied by ``mask`` (the autoregressive masks of the flows'
convolutions: ``w * mask`` is what gets normalised); ``mask`` is (T - mask_start,).

Kernel contract (each fast backend's ``nvae_fast/kernels/<backend>/weight_norm.py``):

* ``weight_norm_forward(w, g, row_ptr, first_wn_row, mask, mask_start, eps) -> (out (T,), norm (R,) fp32)``
* ``weight_norm_backward(grad, w, g, norm, row_ptr, first_wn_row, mask, mask_start, eps) -> (dw, dg)``

``norm`` is each row's norm after masking; ``out``, ``dw`` have w's dtype, ``dg`` g's.
:func:`weight_norm` is the differentiable functional form; :func:`weight_norm_ref` the plain-autograd
reference (a loop over rows, float64-capable).
"""

from __future__ import annotations

from types import ModuleType, SimpleNamespace

import torch
from torch import Tensor

from nvae_fast import backend

WEIGHT_NORM_EPS = 1e-5
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def weight_norm_ref(w: Tensor, g: Tensor, row_ptr: Tensor, first_wn_row: int, mask: Tensor | None = None,
                    mask_start: int = 0, eps: float = WEIGHT_NORM_EPS) -> Tensor:
    """Reference of :func:`weight_norm`, row by row with plain autograd (slow; for tests)."""
    if mask is not None:
        w = torch.cat([w[:mask_start], w[mask_start:] * mask])
    bounds = row_ptr.tolist()
    rows = []
    for r in range(len(bounds) - 1):
        row = w[bounds[r]:bounds[r + 1]]
        if r >= first_wn_row:
            row = torch.exp(g[r - first_wn_row]) * row / (torch.linalg.vector_norm(row) + eps)
        rows.append(row)
    return torch.cat(rows)


# ---------------------------------------------------------------------------------------------
# torch backend of the kernel contract (CSR rows through segment reductions)
# ---------------------------------------------------------------------------------------------

def _masked(w: Tensor, mask: Tensor, mask_start: int) -> Tensor:
    if mask_start >= w.numel():
        return w
    return torch.cat([w[:mask_start], w[mask_start:] * mask])


def _row_sums(values: Tensor, row_ptr: Tensor) -> Tensor:
    # unsafe=True: the layout is ours and valid; the check would read values on the host.
    return torch.segment_reduce(values, "sum", offsets=row_ptr, unsafe=True)


def _per_element(per_row: Tensor, row_ptr: Tensor, total: int) -> Tensor:
    return torch.repeat_interleave(per_row, row_ptr.diff(), output_size=total)


def _row_scale(g: Tensor, norm: Tensor, first_wn_row: int, eps: float) -> Tensor:
    ones = norm.new_ones(first_wn_row)
    return torch.cat([ones, torch.exp(g.to(norm.dtype)) / (norm[first_wn_row:] + eps)])


def _torch_forward(w, g, row_ptr, first_wn_row, mask, mask_start, eps):
    acc = torch.float64 if w.dtype == torch.float64 else torch.float32
    wm = _masked(w.to(acc), mask.to(acc), mask_start)
    norm = torch.sqrt(_row_sums(wm * wm, row_ptr))
    scale = _row_scale(g, norm, first_wn_row, eps)
    return (wm * _per_element(scale, row_ptr, w.numel())).to(w.dtype), norm


def _torch_backward(grad, w, g, norm, row_ptr, first_wn_row, mask, mask_start, eps):
    acc = norm.dtype
    wm = _masked(w.to(acc), mask.to(acc), mask_start)
    go = grad.to(acc)
    scale = _row_scale(g, norm, first_wn_row, eps)
    dot = _row_sums(go * wm, row_ptr)
    wn = norm[first_wn_row:]
    coef = torch.where(wn > 0, -scale[first_wn_row:] * dot[first_wn_row:] / (wn * (wn + eps)), 0.0)
    coef = torch.cat([coef.new_zeros(first_wn_row), coef])
    dwm = go * _per_element(scale, row_ptr, w.numel()) + wm * _per_element(coef, row_ptr, w.numel())
    dw = _masked(dwm, mask.to(acc), mask_start)
    return dw.to(w.dtype), (scale[first_wn_row:] * dot[first_wn_row:]).to(g.dtype)


_TORCH_KERNELS = SimpleNamespace(weight_norm_forward=_torch_forward, weight_norm_backward=_torch_backward)


def backend_for(device: torch.device, dtype: torch.dtype) -> str:
    """The backend that runs this op on weights of ``dtype`` on ``device`` (see nvae_fast.backend)."""
    implemented = ("triton", "torch") if dtype in _KERNEL_DTYPES else ("torch",)
    return backend.select("weight_norm", device, implemented)


def kernels_for(w: Tensor) -> ModuleType | SimpleNamespace:
    """The kernel namespace of the backend chosen for the flat weights ``w``."""
    name = backend_for(w.device, w.dtype)
    return _TORCH_KERNELS if name == "torch" else backend.kernels("weight_norm", name)


# ---------------------------------------------------------------------------------------------
# Custom ops (opaque to torch.compile) and autograd
# ---------------------------------------------------------------------------------------------

@torch.library.custom_op("nvae_fast::weight_norm", mutates_args=())
def _weight_norm_op(w: Tensor, g: Tensor, row_ptr: Tensor, first_wn_row: int, mask: Tensor, mask_start: int,
                    eps: float) -> tuple[Tensor, Tensor]:
    out, norm = kernels_for(w).weight_norm_forward(w, g, row_ptr, first_wn_row, mask, mask_start, eps)
    return out, norm


@_weight_norm_op.register_fake
def _(w, g, row_ptr, first_wn_row, mask, mask_start, eps):
    acc = torch.float64 if w.dtype == torch.float64 else torch.float32
    return torch.empty_like(w), w.new_empty(row_ptr.shape[0] - 1, dtype=acc)


@torch.library.custom_op("nvae_fast::weight_norm_backward", mutates_args=())
def _weight_norm_backward_op(grad: Tensor, w: Tensor, g: Tensor, norm: Tensor, row_ptr: Tensor, first_wn_row: int,
                             mask: Tensor, mask_start: int, eps: float) -> tuple[Tensor, Tensor]:
    dw, dg = kernels_for(w).weight_norm_backward(grad, w, g, norm, row_ptr, first_wn_row, mask, mask_start, eps)
    return dw, dg


@_weight_norm_backward_op.register_fake
def _(grad, w, g, norm, row_ptr, first_wn_row, mask, mask_start, eps):
    return torch.empty_like(w), torch.empty_like(g)


def _setup_context(ctx, inputs, output) -> None:
    w, g, row_ptr, first_wn_row, mask, mask_start, eps = inputs
    ctx.save_for_backward(w, g, output[1], row_ptr, mask)
    ctx.first_wn_row, ctx.mask_start, ctx.eps = first_wn_row, mask_start, eps
    ctx.set_materialize_grads(False)   # the norms carry no gradient: no zeros for them


def _backward(ctx, grad_out, grad_norm):
    if grad_out is None:
        return None, None, None, None, None, None, None
    w, g, norm, row_ptr, mask = ctx.saved_tensors
    dw, dg = torch.ops.nvae_fast.weight_norm_backward(grad_out.contiguous(), w, g, norm, row_ptr, ctx.first_wn_row,
                                                      mask, ctx.mask_start, ctx.eps)
    return dw, dg, None, None, None, None, None


_weight_norm_op.register_autograd(_backward, setup_context=_setup_context)


def weight_norm(w: Tensor, g: Tensor, row_ptr: Tensor, first_wn_row: int, mask: Tensor | None = None,
                mask_start: int | None = None, eps: float = WEIGHT_NORM_EPS) -> Tensor:
    """Normalised weights (T,) of the flat rows ``w`` (layout in the module docstring).

    Args:
        w: (T,) contiguous float rows; g: (R - first_wn_row,) log norms of the normalised rows,
            same dtype; row_ptr: (R + 1,) int64 row starts on w's device (not read on the host).
        first_wn_row: rows before it are copied unchanged.
        mask, mask_start: optional (T - mask_start,) mask of the elements from ``mask_start`` on.
    Differentiable in ``w`` and ``g``; two launches (forward, backward) on the triton backend.
    """
    if not isinstance(w, Tensor) or w.dim() != 1 or not w.is_contiguous() or not w.is_floating_point():
        raise ValueError(f"w must be a contiguous 1-D float tensor, got {getattr(w, 'shape', type(w))}")
    if g.dim() != 1 or g.dtype != w.dtype or g.device != w.device:
        raise ValueError(f"g must be a 1-D {w.dtype} tensor on {w.device}, got {g.dtype} {tuple(g.shape)} "
                         f"on {g.device}")
    if row_ptr.dim() != 1 or row_ptr.dtype != torch.int64 or row_ptr.device != w.device:
        raise ValueError(f"row_ptr must be a 1-D int64 tensor on {w.device}, got {row_ptr.dtype} on {row_ptr.device}")
    rows = row_ptr.shape[0] - 1
    if not 0 <= first_wn_row <= rows or g.shape[0] != rows - first_wn_row:
        raise ValueError(f"g must have one entry per normalised row: {rows - first_wn_row}, got {g.shape[0]}")
    if mask is None:
        mask, mask_start = w.new_ones(1), w.numel()
    elif mask_start is None or mask.shape != (w.numel() - mask_start,) or mask.device != w.device:
        raise ValueError(f"mask must be ({w.numel()} - mask_start,) on {w.device}, got {tuple(mask.shape)}")
    out, _ = torch.ops.nvae_fast.weight_norm(w, g, row_ptr, first_wn_row, mask.to(w.dtype), mask_start, float(eps))
    return out
