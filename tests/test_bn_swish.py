"""BatchNorm + Swish: reference against PyTorch, every backend against the reference."""

import itertools

import pytest
import torch
import torch.nn.functional as F

import nvae_fast
from nvae_fast import BatchNormSwish, backend, bn_swish, bn_swish_ref
from nvae_fast.backend import BackendUnavailableError

from conftest import HAS_CUDA, requires_cuda
from tolerances import assert_close

HALF_DTYPES = (torch.float16, torch.bfloat16)
DEVICE = "cuda" if HAS_CUDA else "cpu"   # where the triton backend runs (the interpreter on CPU)


def _torch_bn_swish(x, weight, bias, rm, rv, training, momentum, eps):
    y = F.batch_norm(x, rm, rv, weight, bias, training, momentum, eps)
    return y * torch.sigmoid(y)


def _params(C, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(C)
    weight = (torch.rand(C, generator=g) + 0.5).to(device, dtype)
    bias = (torch.randn(C, generator=g) * 0.2).to(device, dtype)
    rm = (torch.randn(C, generator=g) * 0.1).to(device, dtype)
    rv = (torch.rand(C, generator=g) + 0.5).to(device, dtype)
    return weight, bias, rm, rv


def _make_x(shape, dtype, layout, device="cpu"):
    """x of `shape` in the given layout: 'nchw', 'channels_last', or 'strided' (a non-dense view)."""
    N, C, H, W = shape
    if layout == "strided":
        return (torch.randn(N, C, H, 2 * W, device=device) * 1.5 + 0.3).to(dtype)[..., ::2]
    x = (torch.randn(N, C, H, W, device=device) * 1.5 + 0.3).to(dtype)
    return x.to(memory_format=torch.channels_last) if layout == "channels_last" else x


# ---------------------------------------------------------------------------------------------
# Reference
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (1, 20, 4, 4), (4, 1, 1, 1)])
def test_reference_matches_torch_batch_norm(shape, training):
    x = torch.randn(shape, dtype=torch.float64) * 2 + 1
    w, b, rm, rv = _params(shape[1], torch.float64)
    rm2, rv2 = rm.clone(), rv.clone()
    out = bn_swish_ref(x, w, b, rm, rv, training, 0.05, 1e-5)
    expected = _torch_bn_swish(x, w, b, rm2, rv2, training, 0.05, 1e-5)
    assert_close(out, expected)
    assert_close(rm, rm2)
    assert_close(rv, rv2)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("fn", [bn_swish_ref, bn_swish], ids=["reference", "fused_op"])
def test_gradcheck_float64(fn, training):
    """The reference's autograd and the custom op's hand-written backward (torch backend) against
    finite differences."""
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    w, b, rm, rv = _params(3, torch.float64)
    w.requires_grad_()
    b.requires_grad_()
    assert torch.autograd.gradcheck(lambda *a: fn(*a, rm.clone(), rv.clone(), training), (x, w, b))


# ---------------------------------------------------------------------------------------------
# Fast backends against the reference
# ---------------------------------------------------------------------------------------------

SHAPES = [
    (1, 1, 1, 2), (1, 3, 5, 7), (2, 20, 1, 1), (3, 96, 4, 4), (1, 20, 17, 33), (2, 3, 8, 8), (3, 1, 9, 2),
]
LAYOUTS = ("nchw", "channels_last", "strided")


def _check_backend_against_reference(backend, shape, dtype, layout, training, device):
    C = shape[1]
    w, b, rm, rv = _params(C, device=device)
    x = _make_x(shape, dtype, layout, device)
    x_ref = x.detach().clone().requires_grad_()
    x.requires_grad_()
    w_ref, b_ref = w.clone().requires_grad_(), b.clone().requires_grad_()
    w.requires_grad_()
    b.requires_grad_()
    rm_ref, rv_ref = rm.clone(), rv.clone()
    dy = torch.randn(shape, device=device).to(dtype)

    y_ref = bn_swish_ref(x_ref, w_ref, b_ref, rm_ref, rv_ref, training, 0.05, 1e-5)
    y_ref.backward(dy)
    with nvae_fast.use_backend(backend):
        y = bn_swish(x, w, b, rm, rv, training, 0.05, 1e-5)
        y.backward(dy)

    where = f"{backend} {shape} {dtype} {layout} training={training}"
    assert y.dtype == x.dtype and y.shape == x.shape
    if layout == "channels_last" and min(shape[2:]) > 1 and C > 1:
        assert y.is_contiguous(memory_format=torch.channels_last), where
        assert x.grad.is_contiguous(memory_format=torch.channels_last), where
    assert_close(y, y_ref, dtype, msg=f"output, {where}")
    assert_close(x.grad, x_ref.grad, dtype, msg=f"grad x, {where}")
    # Parameter gradients are fp32 sums over N*H*W terms whose inputs are exactly equal.
    assert_close(w.grad, w_ref.grad, torch.float32, scale=10, msg=f"grad weight, {where}")
    assert_close(b.grad, b_ref.grad, torch.float32, scale=10, msg=f"grad bias, {where}")
    assert_close(rm, rm_ref, torch.float32, msg=f"running_mean, {where}")
    assert_close(rv, rv_ref, torch.float32, msg=f"running_var, {where}")


def _cases():
    """Every shape x layout x mode; dtypes rotate through the cases (all dtypes are also covered
    on one shape by test_triton_all_dtypes)."""
    combos = itertools.product(SHAPES, LAYOUTS, (True, False))
    for i, (shape, layout, training) in enumerate(combos):
        if training and shape[0] * shape[2] * shape[3] == 1:
            continue
        dtype = (torch.float32, torch.float16, torch.bfloat16)[i % 3]
        yield pytest.param(shape, dtype, layout, training, id=f"{shape}-{layout}-{'train' if training else 'eval'}")


@pytest.mark.gpu
@pytest.mark.parametrize("shape,dtype,layout,training", list(_cases()))
def test_triton_matches_reference(shape, dtype, layout, training):
    _check_backend_against_reference("triton", shape, dtype, layout, training, DEVICE)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_triton_all_dtypes(dtype, layout):
    _check_backend_against_reference("triton", (2, 20, 5, 7), dtype, layout, True, DEVICE)


@requires_cuda
@pytest.mark.parametrize("shape,dtype,layout,training", list(_cases()))
def test_cuda_matches_reference(shape, dtype, layout, training):
    _check_backend_against_reference("cuda", shape, dtype, layout, training, "cuda")


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(32, 1536, 16, 16), (4, 90, 64, 64), (2, 24, 9, 9)])
def test_cuda_large_shapes(shape, dtype):
    for layout in ("nchw", "channels_last"):
        _check_backend_against_reference("cuda", shape, dtype, layout, True, "cuda")


@pytest.mark.gpu
def test_triton_statistics_are_accurate_far_from_zero():
    """Mean 1000, std 1: naive fp32 sum-of-squares would lose the variance entirely."""
    x = torch.randn(4, 8, 16, 16) + 1000.0
    eps = 1e-5
    running_mean, running_var = torch.full((8,), 2.0), torch.full((8,), 3.0)
    with nvae_fast.use_backend("triton"):
        mean, var = backend.kernels("bn_swish", "triton").bn_stats(x.to(DEVICE))
        running_mean, running_var = running_mean.to(DEVICE), running_var.to(DEVICE)
        fused_mean, invstd = torch.ops.nvae_fast.bn_stats(x.to(DEVICE), running_mean, running_var, 0.25, eps)
    ref_var, ref_mean = torch.var_mean(x.double(), dim=(0, 2, 3), unbiased=False)
    mean, var, fused_mean, invstd = mean.cpu(), var.cpu(), fused_mean.cpu(), invstd.cpu()
    running_mean, running_var = running_mean.cpu(), running_var.cpu()
    torch.testing.assert_close(mean.double(), ref_mean, atol=1e-4, rtol=0)
    torch.testing.assert_close(var.double(), ref_var, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(fused_mean, mean, atol=0, rtol=0)
    torch.testing.assert_close(invstd.double(), torch.rsqrt(ref_var + eps), atol=0, rtol=1e-3)
    # The running statistics move a quarter of the way towards the batch's (unbiased variance).
    n = x.numel() // 8
    torch.testing.assert_close(running_mean.double(), 0.75 * 2.0 + 0.25 * ref_mean, atol=1e-4, rtol=0)
    torch.testing.assert_close(running_var.double(), 0.75 * 3.0 + 0.25 * ref_var * n / (n - 1), atol=1e-3, rtol=1e-3)


# ---------------------------------------------------------------------------------------------
# Module
# ---------------------------------------------------------------------------------------------

def test_module_state_dict_matches_official_layout():
    m = BatchNormSwish(7, eps=1e-5, momentum=0.05)
    assert list(m.state_dict()) == ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    official_like = torch.nn.BatchNorm2d(7)
    m.load_state_dict(official_like.state_dict(), strict=True)


@pytest.mark.parametrize("momentum", [0.05, None])
def test_module_matches_batchnorm2d_plus_swish(momentum):
    m = BatchNormSwish(6, momentum=momentum)
    bn = torch.nn.BatchNorm2d(6, momentum=momentum)
    with torch.no_grad():
        m.weight.uniform_(0.5, 1.5)
        m.bias.normal_()
    bn.load_state_dict(m.state_dict())
    for step in range(3):
        x = torch.randn(4, 6, 5, 5) + step
        assert_close(m(x), F.silu(bn(x)))
    assert_close(m.running_mean, bn.running_mean)
    assert_close(m.running_var, bn.running_var)
    assert int(m.num_batches_tracked) == int(bn.num_batches_tracked) == 3
    m.eval()
    bn.eval()
    x = torch.randn(2, 6, 3, 3)
    assert_close(m(x), F.silu(bn(x)))


def test_module_without_running_stats_uses_batch_stats_in_eval():
    m = BatchNormSwish(4, track_running_stats=False).eval()
    x = torch.randn(3, 4, 5, 5)
    assert_close(m(x), F.silu(F.batch_norm(x, None, None, m.weight, m.bias, True)))


def test_module_under_torch_compile_has_no_graph_break():
    m = BatchNormSwish(5)
    x = torch.randn(2, 5, 4, 4, requires_grad=True)
    compiled = torch.compile(m, backend="aot_eager", fullgraph=True)
    y = compiled(x)
    y.sum().backward()
    m2 = BatchNormSwish(5)
    x2 = x.detach().clone().requires_grad_()
    y2 = m2(x2)
    y2.sum().backward()
    assert_close(y, y2)
    assert_close(x.grad, x2.grad)
    assert_close(m.running_var, m2.running_var)


@pytest.mark.parametrize("training", [True, False])
def test_opcheck(training):
    x = torch.randn(2, 3, 4, 5, requires_grad=True)
    w, b, rm, rv = _params(3)
    w.requires_grad_()
    mean, invstd = torch.ops.nvae_fast.bn_stats(x.detach(), None, None, 0.1, 1e-5)
    torch.library.opcheck(torch.ops.nvae_fast.bn_swish.default, (x, w, b, mean, invstd, training))
    torch.library.opcheck(torch.ops.nvae_fast.bn_stats.default, (x.detach(), rm, rv, 0.1, 1e-5))
    dy = torch.randn_like(x)
    torch.library.opcheck(torch.ops.nvae_fast.bn_swish_backward.default,
                          (dy, x.detach(), w.detach(), b, mean, invstd, training))


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------

def test_bad_inputs_raise_clear_errors():
    w, b, rm, rv = _params(4)
    with pytest.raises(ValueError, match="4-D"):
        bn_swish(torch.randn(2, 4, 5), w, b, rm, rv)
    with pytest.raises(ValueError, match=r"weight must have shape \(3,\)"):
        bn_swish(torch.randn(2, 3, 5, 5), w, b, rm, rv)
    with pytest.raises(TypeError, match="x must be float"):
        bn_swish(torch.ones(2, 4, 5, 5, dtype=torch.int64), w, b, rm, rv)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        bn_swish(torch.randn(1, 4, 1, 1), w, b, rm, rv, training=True)
    with pytest.raises(ValueError, match="running_mean and running_var"):
        bn_swish(torch.randn(2, 4, 3, 3), w, b, None, None, training=False)
    with pytest.raises(ValueError, match="4-D"):
        BatchNormSwish(4)(torch.randn(2, 4))


@requires_cuda
def test_mismatched_devices_raise():
    w, b, rm, rv = _params(4)
    with pytest.raises(ValueError, match="weight is on cpu but x is on cuda"):
        bn_swish(torch.randn(2, 4, 3, 3, device="cuda"), w, b, rm.cuda(), rv.cuda())


def test_mismatched_devices_raise_on_meta():
    """Same check without a GPU: a meta-device x against CPU parameters."""
    w, b, rm, rv = _params(4)
    with pytest.raises(ValueError, match="weight is on cpu but x is on meta"):
        bn_swish(torch.empty(2, 4, 3, 3, device="meta"), w, b, rm, rv)


@pytest.mark.skipif(HAS_CUDA, reason="checks the error without a GPU")
def test_explicit_cuda_backend_without_gpu_raises():
    w, b, rm, rv = _params(4)
    with nvae_fast.use_backend("cuda"), pytest.raises(BackendUnavailableError, match="cuda"):
        bn_swish(torch.randn(2, 4, 3, 3), w, b, rm, rv)
