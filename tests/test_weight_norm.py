"""Weight normalisation of many convolutions at once (``nvae_fast.ops.weight_norm``): the reference
against per-row math, gradcheck in float64, every backend against the reference, bad input."""

import pytest
import torch

import nvae_fast
from nvae_fast.ops.weight_norm import weight_norm, weight_norm_ref

from conftest import HAS_CUDA
from tolerances import assert_close

DEVICE = "cuda" if HAS_CUDA else "cpu"   # where the triton backend runs (the interpreter on CPU)
# Rows of uneven length (a 1x1 conv's row of 1, an odd 7, a long 75): the first two plain, the
# rest normalised; the mask covers the tail from inside row 4, as the flows' masked convs do.
ROW_LENGTHS = (7, 1, 30, 13, 1, 75, 5)
FIRST_WN_ROW = 2


def _layout(dtype, device="cpu", masked=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    row_ptr = torch.tensor([0, *torch.tensor(ROW_LENGTHS).cumsum(0).tolist()], dtype=torch.int64)
    total = int(row_ptr[-1])
    w = torch.randn(total, generator=gen, dtype=torch.float64)
    g = torch.randn(len(ROW_LENGTHS) - FIRST_WN_ROW, generator=gen, dtype=torch.float64) * 0.3
    mask_start = int(row_ptr[4]) - 3 if masked else total
    mask = (torch.rand(total - mask_start, generator=gen) > 0.4).to(torch.float64)
    return (w.to(device, dtype), g.to(device, dtype), row_ptr.to(device), mask.to(device, dtype), mask_start)


def test_reference_normalises_each_row():
    w, g, row_ptr, mask, mask_start = _layout(torch.float64)
    out = weight_norm_ref(w, g, row_ptr, FIRST_WN_ROW, mask, mask_start)
    wm = torch.cat([w[:mask_start], w[mask_start:] * mask])
    bounds = row_ptr.tolist()
    for r in range(len(ROW_LENGTHS)):
        row, got = wm[bounds[r]:bounds[r + 1]], out[bounds[r]:bounds[r + 1]]
        if r < FIRST_WN_ROW:
            assert torch.equal(got, row)
        else:
            expected = torch.exp(g[r - FIRST_WN_ROW]) * row / (row.norm() + 1e-5)
            assert_close(got, expected)


@pytest.mark.parametrize("masked", [False, True])
def test_torch_backend_gradcheck(masked):
    w, g, row_ptr, mask, mask_start = _layout(torch.float64, masked=masked)
    w.requires_grad_(True)
    g.requires_grad_(True)
    with nvae_fast.use_backend("torch"):
        assert torch.autograd.gradcheck(
            lambda w, g: weight_norm(w, g, row_ptr, FIRST_WN_ROW, mask if masked else None,
                                     mask_start if masked else None), (w, g))


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("masked", [False, True])
def test_backend_matches_reference(backend, dtype, masked):
    device = DEVICE if backend == "triton" else "cpu"
    w, g, row_ptr, mask, mask_start = _layout(dtype, device, masked)
    grad = torch.randn(w.shape, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    # The reference in fp32 on the same (rounded) inputs: kernels accumulate in fp32.
    w_ref, g_ref = w.float().requires_grad_(True), g.float().requires_grad_(True)
    expected = weight_norm_ref(w_ref, g_ref, row_ptr, FIRST_WN_ROW, mask.float() if masked else None, mask_start)
    expected.backward(grad.float())
    w, g = w.requires_grad_(True), g.requires_grad_(True)
    with nvae_fast.use_backend(backend):
        out = weight_norm(w, g, row_ptr, FIRST_WN_ROW, mask if masked else None, mask_start if masked else None)
        out.backward(grad)
    assert out.dtype == dtype
    assert_close(out, expected, dtype)
    assert_close(w.grad, w_ref.grad, dtype, scale=2)
    assert_close(g.grad, g_ref.grad, dtype, scale=2)


def test_bad_input_names_the_argument():
    w, g, row_ptr, mask, mask_start = _layout(torch.float32)
    with pytest.raises(ValueError, match="w must be a contiguous 1-D"):
        weight_norm(w.view(-1, 1), g, row_ptr, FIRST_WN_ROW)
    with pytest.raises(ValueError, match="g must be a 1-D torch.float32"):
        weight_norm(w, g.double(), row_ptr, FIRST_WN_ROW)
    with pytest.raises(ValueError, match="row_ptr must be a 1-D int64"):
        weight_norm(w, g, row_ptr.int(), FIRST_WN_ROW)
    with pytest.raises(ValueError, match="one entry per normalised row"):
        weight_norm(w, g[1:], row_ptr, FIRST_WN_ROW)
    with pytest.raises(ValueError, match="mask must be"):
        weight_norm(w, g, row_ptr, FIRST_WN_ROW, mask[1:], mask_start)
