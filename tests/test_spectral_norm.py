"""Power iteration over many matrices at once (``nvae_fast.ops.spectral_norm``): the reference
against SVD, its gradient against u v^T in float64, every backend against the reference, bad input."""

import pytest
import torch

import nvae_fast
from nvae_fast.ops.spectral_norm import spectral_norm, spectral_norm_ref

from conftest import HAS_CUDA
from tolerances import assert_close

DEVICE = "cuda" if HAS_CUDA else "cpu"   # where the triton backend runs (the interpreter on CPU)
SHAPES = ((5, 7), (1, 3), (16, 9), (33, 2), (3, 70))   # rows x columns: odd, one row, tall, wide


def _layout(dtype, device="cpu", seed=0):
    """(f, layers, u, v): the matrices back to back in f, unit start vectors back to back in u, v."""
    gen = torch.Generator().manual_seed(seed)
    table, w_off, u_off, v_off = [], 0, 0, 0
    for rows, cols in SHAPES:
        table.append([w_off, rows, cols, u_off, v_off])
        w_off, u_off, v_off = w_off + rows * cols, u_off + rows, v_off + cols
    f = torch.randn(w_off, generator=gen, dtype=torch.float64)
    u = torch.cat([torch.nn.functional.normalize(torch.randn(r, generator=gen, dtype=torch.float64), dim=0)
                   for r, _ in SHAPES])
    v = torch.cat([torch.nn.functional.normalize(torch.randn(c, generator=gen, dtype=torch.float64), dim=0)
                   for _, c in SHAPES])
    layers = torch.tensor(table, dtype=torch.int64)
    return f.to(device, dtype), layers.to(device), u.to(device, dtype), v.to(device, dtype)


def test_reference_converges_to_the_largest_singular_values():
    f, layers, u, v = _layout(torch.float64)
    sigma, _, _ = spectral_norm_ref(f, layers, u, v, iterations=200)
    expected = torch.stack([torch.linalg.matrix_norm(f[w:w + r * c].view(r, c), ord=2)
                            for w, r, c, _, _ in layers.tolist()])
    assert_close(sigma.double(), expected, torch.float32)


@pytest.mark.parametrize("iterations", [0, 3])
def test_gradient_is_the_outer_product_of_the_new_vectors(iterations):
    # sigma is fp32 by contract, so a float64 gradcheck would only measure its rounding; the
    # gradient itself is exact: d sigma_l / d W_l = u_l v_l^T with the vectors the call returns
    # (held constant, as the official code does).
    f, layers, u, v = _layout(torch.float64)
    f.requires_grad_(True)
    grad = torch.arange(1.0, len(SHAPES) + 1)
    with nvae_fast.use_backend("torch"):
        sigma, u_new, v_new = spectral_norm(f, layers, u, v, iterations)
        sigma.backward(grad)
    expected = torch.cat([g * torch.outer(u_new[uo:uo + r], v_new[vo:vo + c]).reshape(-1)
                          for g, (_, r, c, uo, vo) in zip(grad.tolist(), layers.tolist())])
    assert_close(f.grad, expected)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("iterations", [0, 1, 4])
def test_backend_matches_reference(backend, dtype, iterations):
    device = DEVICE if backend == "triton" else "cpu"
    f, layers, u, v = _layout(dtype, device)
    grad = torch.rand(len(SHAPES), generator=torch.Generator().manual_seed(1)).to(device)
    f_ref = f.float().requires_grad_(True)
    sigma_ref, u_ref, v_ref = spectral_norm_ref(f_ref, layers, u.float(), v.float(), iterations)
    sigma_ref.backward(grad)
    f = f.requires_grad_(True)
    with nvae_fast.use_backend(backend):
        sigma, u_new, v_new = spectral_norm(f, layers, u, v, iterations)
        sigma.backward(grad)
    assert sigma.dtype == torch.float32 and u_new.dtype == dtype and v_new.dtype == dtype
    # Vectors round to the dtype after every iteration, so half-precision results drift a few ulps.
    scale = 1 if dtype == torch.float32 else 2
    assert_close(u_new, u_ref, dtype, scale=scale)
    assert_close(v_new, v_ref, dtype, scale=scale)
    assert_close(sigma, sigma_ref, dtype, scale=scale)
    assert_close(f.grad, f_ref.grad, dtype, scale=scale)


def test_bad_input_names_the_argument():
    f, layers, u, v = _layout(torch.float32)
    with pytest.raises(ValueError, match="u must be a contiguous 1-D"):
        spectral_norm(f, layers, u.view(-1, 1), v, 1)
    with pytest.raises(ValueError, match="v must be torch.float32"):
        spectral_norm(f, layers, u, v.double(), 1)
    with pytest.raises(ValueError, match=r"layers must be an \(L, 5\) int64"):
        spectral_norm(f, layers[:, :4], u, v, 1)
    with pytest.raises(ValueError, match="iterations must be >= 0"):
        spectral_norm(f, layers, u, v, -1)
