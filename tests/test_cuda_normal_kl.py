"""CUDA kernels of the residual-normal latent groups (csrc/normal_kl.cu, nvae_fast/kernels/cuda/normal_kl.py).

Forward outputs are compared with the contract's references evaluated in float64 from the same
(rounded) inputs, and gradients with autograd through those references, on a GPU or in the CPU
emulation of csrc/ (see cuda_targets.py). Argument errors are checked on the CPU.
"""

import os

import pytest
import torch

from nvae_fast.kernels.cuda import common
from nvae_fast.kernels.cuda import normal_kl as K
from nvae_fast.ops.normal_kl import flow_kl_ref, normal_kl_ref, normal_sample_ref

from conftest import requires_cuda
from cuda_targets import kernel_device  # noqa: F401  (fixture)
from tolerances import TOL, assert_close

SHAPES = [(3, 20, 5, 7), (1, 1, 1, 1), (2, 37, 16, 16), (4, 8, 3, 33)]
LAYOUTS = ("nchw_chunk", "channels_last_chunk", "dense")
PRIORS = ((True, True), (True, False), (False, True))  # (prior given, residual)


def _pair(shape, dtype, layout, g, device):
    """Two (N, C, H, W) params laid out as the model's: torch.chunk(conv output, 2, dim=1)."""
    N, C, H, W = shape
    if layout == "dense":
        return tuple((torch.randn(shape, generator=g) * 2).to(dtype).to(device) for _ in range(2))
    full = (torch.randn(N, 2 * C, H, W, generator=g) * 2).to(dtype).to(device)
    if layout == "channels_last_chunk":
        full = full.contiguous(memory_format=torch.channels_last)
    return torch.chunk(full, 2, dim=1)


def _dense(t):
    return t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last)


def _sum_tol(out, ref, count, where):
    """fp32 sums of `count` terms against float64: rounding grows with the number of terms."""
    torch.testing.assert_close(out.double(), ref.double(), atol=2e-6 * count, rtol=2e-4, msg=lambda m: f"{where}\n{m}")


def _reference_gradients(fn, params, upstream):
    """Gradients of sum(output * upstream) over fn's outputs, by autograd through the reference.

    fn(dtype, *params) evaluates the reference at that precision. Returns (float64 gradients,
    float32 gradients: PyTorch's own fp32 error is the yardstick, per-element sums of the absolute
    per-path gradients: a parameter's gradient adds one term per upstream gradient and the terms
    can cancel, while rounding follows their magnitudes).
    """
    leaves = [p.detach().double().requires_grad_() for p in params]
    outputs = fn(torch.float64, *leaves)
    total = scale = None
    for out, up in zip(outputs, upstream):
        grads = torch.autograd.grad((out * up.double()).sum(), leaves, retain_graph=True, allow_unused=True,
                                    materialize_grads=True)
        total = grads if total is None else [t + g for t, g in zip(total, grads)]
        scale = [g.abs() for g in grads] if scale is None else [s + g.abs() for s, g in zip(scale, grads)]
    leaves32 = [p.detach().float().requires_grad_() for p in params]
    loss32 = sum((out * up.float()).sum() for out, up in zip(fn(torch.float32, *leaves32), upstream))
    grads32 = torch.autograd.grad(loss32, leaves32, allow_unused=True, materialize_grads=True)
    return total, grads32, scale


def _assert_grad_close(actual, expected, expected32, term_scale, dtype, what):
    """fp32: the largest error at most 4x PyTorch's own fp32 error plus 8 ulps of the largest value
    (the GPU math library rounds differently from libm), and every element within 1e-3 of its magnitude and
    its paths' (a formula error in any regime shows up). Half precision: within the dtype's
    tolerance plus 64 fp32 ulps of the paths' magnitude (fp32 math, one rounding at the end);
    values beyond the dtype's range must overflow to the same infinity as the reference."""
    actual = actual.double()
    err = (actual - expected).abs()
    if dtype == torch.float32:
        eps = torch.finfo(torch.float32).eps
        bound = 4 * (expected32.double() - expected).abs().max() + 8 * eps * expected.abs().max()
        assert err.max() <= bound, f"{what}: largest error {err.max():.3g} > {bound:.3g} (4x torch fp32's + 8 ulps)"
        allowed = 1e-3 * (expected.abs() + term_scale) + TOL[torch.float32][0]
    else:
        overflow = expected.to(dtype).isinf()
        assert torch.equal(actual[overflow], expected.to(dtype)[overflow].double()), f"{what}: overflow differs"
        err = err.masked_fill(overflow, 0)
        atol, rtol = TOL[dtype]
        allowed = atol + rtol * expected.abs() + 64 * torch.finfo(torch.float32).eps * term_scale
    worst = int((err - allowed).argmax())
    assert bool((err <= allowed).all()), (
        f"{what}: {int((err > allowed).sum())} of {err.numel()} elements off; worst at flat index {worst}: got "
        f"{actual.flatten()[worst].item()}, expected {expected.flatten()[worst].item()}, allowed error "
        f"{allowed.flatten()[worst].item():.3g}")


def _randn_like(ref, g, dtype=torch.float32):
    return torch.randn(ref.shape, generator=g).to(dtype).to(ref.device)


def _cases():
    for i, shape in enumerate(SHAPES):
        for j, layout in enumerate(LAYOUTS):
            dtype = (torch.float32, torch.bfloat16, torch.float16)[(i + j) % 3]
            yield pytest.param(shape, layout, dtype, id=f"{'x'.join(map(str, shape))}-{layout}-{str(dtype)[6:]}")


@pytest.mark.parametrize("prior,residual", PRIORS)
@pytest.mark.parametrize("shape,layout,dtype", list(_cases()))
def test_normal_kl_matches_reference(shape, layout, dtype, prior, residual, kernel_device):
    g = torch.Generator().manual_seed(sum(shape))
    mu_q, log_sigma_q = _pair(shape, dtype, layout, g, kernel_device)
    mu_p, log_sigma_p = _pair(shape, dtype, layout, g, kernel_device) if prior else (None, None)
    eps = _randn_like(mu_q, g, dtype)
    where = f"normal_kl {shape} {layout} {dtype} prior={prior} residual={residual}"

    z, kl_all, log_q, log_p, kl_diag = K.normal_kl_forward(mu_p, log_sigma_p, mu_q, log_sigma_q, eps, residual)
    params = [t for t in (mu_p, log_sigma_p, mu_q, log_sigma_q) if t is not None]

    def reference(dt, *p):
        prior_p = p[:2] if prior else (None, None)
        return normal_kl_ref(*prior_p, *p[-2:], eps.to(dt), residual)

    ref = reference(torch.float64, *(t.double() for t in params))
    assert z.dtype == dtype and z.shape == mu_q.shape and _dense(z)
    assert_close(z, ref.z.to(dtype), dtype, msg=f"z, {where}")
    N, C, H, W = shape
    _sum_tol(kl_all, ref.kl_all, C * H * W, f"kl_all, {where}")
    _sum_tol(log_q, ref.log_q, C * H * W, f"log_q, {where}")
    _sum_tol(log_p, ref.log_p, C * H * W, f"log_p, {where}")
    _sum_tol(kl_diag, ref.kl_diag, H * W, f"kl_diag, {where}")

    grad_z = _randn_like(mu_q, g, dtype)
    grads = [torch.randn(n, generator=g).to(kernel_device) for n in (N, N, N, C)]
    expected = _reference_gradients(reference, params, (grad_z, *grads))
    got = K.normal_kl_backward(grad_z, *grads, mu_p, log_sigma_p, mu_q, log_sigma_q, eps, residual)
    if not prior:
        assert got[0] is None and got[1] is None
        got = got[2:]
    names = ("d_mu_p", "d_log_sigma_p", "d_mu_q", "d_log_sigma_q")[-len(got):]
    for name, x, *e in zip(names, got, *expected):
        assert x.dtype == dtype and x.shape == mu_q.shape and _dense(x)
        _assert_grad_close(x, *e, dtype, f"{name}, {where}")


@pytest.mark.parametrize("prior,residual", PRIORS)
@pytest.mark.parametrize("shape,layout,dtype", list(_cases()))
def test_flow_kl_matches_reference(shape, layout, dtype, prior, residual, kernel_device):
    g = torch.Generator().manual_seed(sum(shape) + 1)
    _, log_sigma_q = _pair(shape, dtype, layout, g, kernel_device)
    mu_p, log_sigma_p = _pair(shape, dtype, layout, g, kernel_device) if prior else (None, None)
    eps = _randn_like(log_sigma_q, g, dtype)
    z = (_randn_like(log_sigma_q, g) * 2).to(dtype)
    log_det = (_randn_like(log_sigma_q, g) * 0.1).to(dtype)
    where = f"flow_kl {shape} {layout} {dtype} prior={prior} residual={residual}"

    out = K.flow_kl_forward(mu_p, log_sigma_p, log_sigma_q, eps, z, log_det, residual)
    params = [t for t in (mu_p, log_sigma_p, log_sigma_q) if t is not None] + [z, log_det]

    def reference(dt, *p):
        prior_p = p[:2] if prior else (None, None)
        return flow_kl_ref(*prior_p, p[-3], eps.to(dt), p[-2], p[-1], residual)[1:]

    ref = reference(torch.float64, *(t.double() for t in params))
    N, C, H, W = shape
    for name, x, e, count in zip(("kl_all", "log_q", "log_p", "kl_diag"), out, ref,
                                 (C * H * W,) * 3 + (H * W,)):
        _sum_tol(x, e, count, f"{name}, {where}")

    grads = [torch.randn(n, generator=g).to(kernel_device) for n in (N, N, N, C)]
    expected = _reference_gradients(reference, params, grads)
    got = K.flow_kl_backward(*grads, mu_p, log_sigma_p, log_sigma_q, eps, z, log_det, residual)
    if not prior:
        assert got[0] is None and got[1] is None
        got = got[2:]
    names = ("d_mu_p", "d_log_sigma_p", "d_log_sigma_q", "d_z", "d_log_det")[-len(got):]
    for name, x, *e in zip(names, got, *expected):
        assert x.dtype == dtype and x.shape == log_sigma_q.shape and _dense(x)
        _assert_grad_close(x, *e, dtype, f"{name}, {where}")


@pytest.mark.parametrize("prior,temperature", [(True, 1.0), (True, 0.7), (False, 0.8)])
@pytest.mark.parametrize("shape,layout,dtype", list(_cases()))
def test_normal_sample_matches_reference(shape, layout, dtype, prior, temperature, kernel_device):
    g = torch.Generator().manual_seed(sum(shape) + 2)
    mu, log_sigma = _pair(shape, dtype, layout, g, kernel_device) if prior else (None, None)
    eps = _randn_like(mu if prior else torch.empty(shape, device=kernel_device), g, dtype)
    where = f"normal_sample {shape} {layout} {dtype} prior={prior} t={temperature}"
    z = K.normal_sample_forward(mu, log_sigma, eps, temperature)

    def reference(dt, *p):
        return (normal_sample_ref(*(p if prior else (None, None)), eps.to(dt), temperature),)

    z_ref = reference(torch.float64, *((mu.double(), log_sigma.double()) if prior else ()))[0]
    assert z.dtype == dtype and z.shape == eps.shape and _dense(z)
    assert_close(z, z_ref.to(dtype), dtype, msg=f"z, {where}")
    grad_z = _randn_like(eps, g, dtype)
    got = K.normal_sample_backward(grad_z, mu, log_sigma, eps, temperature)
    if not prior:
        assert got == (None, None)
        return
    expected = _reference_gradients(reference, (mu, log_sigma), (grad_z,))
    for name, x, *e in zip(("d_mu", "d_log_sigma"), got, *expected):
        assert x.dtype == dtype and x.shape == eps.shape and _dense(x)
        _assert_grad_close(x, *e, dtype, f"{name}, {where}")


def test_absent_upstream_gradients_are_zeros(kernel_device):
    g = torch.Generator().manual_seed(5)
    mu_q, log_sigma_q = _pair((2, 6, 4, 4), torch.float32, "dense", g, kernel_device)
    mu_p, log_sigma_p = _pair((2, 6, 4, 4), torch.float32, "dense", g, kernel_device)
    eps = _randn_like(mu_q, g)
    grad_kl_all = torch.randn(2, generator=g).to(kernel_device)
    zeros = torch.zeros(2, device=kernel_device)
    got = K.normal_kl_backward(None, grad_kl_all, None, None, None, mu_p, log_sigma_p, mu_q, log_sigma_q, eps, True)
    full = K.normal_kl_backward(torch.zeros_like(mu_q), grad_kl_all, zeros, zeros, torch.zeros(6, device=kernel_device),
                                mu_p, log_sigma_p, mu_q, log_sigma_q, eps, True)
    for x, y in zip(got, full):
        assert torch.equal(x, y)


def test_reductions_are_deterministic(kernel_device):
    g = torch.Generator().manual_seed(6)
    mu_q, log_sigma_q = _pair((4, 37, 16, 16), torch.float32, "channels_last_chunk", g, kernel_device)
    eps = _randn_like(mu_q, g)
    first = K.normal_kl_forward(None, None, mu_q, log_sigma_q, eps, True)
    second = K.normal_kl_forward(None, None, mu_q, log_sigma_q, eps, True)
    for x, y in zip(first, second):
        assert torch.equal(x, y)


@requires_cuda
@pytest.mark.parametrize("layout", ["nchw_chunk", "channels_last_chunk"])
def test_cuda_large_group(layout):
    """A latent group at the largest scale of a 256x256 model: many blocks and partials."""
    g = torch.Generator().manual_seed(7)
    shape = (8, 20, 128, 128)
    mu_q, log_sigma_q = _pair(shape, torch.float32, layout, g, "cuda")
    mu_p, log_sigma_p = _pair(shape, torch.float32, layout, g, "cuda")
    eps = _randn_like(mu_q, g)
    out = K.normal_kl_forward(mu_p, log_sigma_p, mu_q, log_sigma_q, eps, True)
    ref = normal_kl_ref(*(t.double() for t in (mu_p, log_sigma_p, mu_q, log_sigma_q, eps)), True)
    assert_close(out[0], ref.z.float(), torch.float32)
    for name, x, e, count in zip(("kl_all", "log_q", "log_p", "kl_diag"), out[1:], ref[1:],
                                 (20 * 128 * 128,) * 3 + (128 * 128,)):
        _sum_tol(x, e, count, f"{name}, {layout}")


# ---------------------------------------------------------------------------------------------
# Arguments (CPU: every check runs before any launch)
# ---------------------------------------------------------------------------------------------

def _cpu_group(shape=(2, 3, 4, 4), dtype=torch.float32):
    return [torch.randn(shape, dtype=dtype) for _ in range(5)]


def test_bad_arguments_raise_before_launch():
    mu_p, ls_p, mu_q, ls_q, eps = _cpu_group()
    with pytest.raises(ValueError, match="mu_p and log_sigma_p must both be tensors or both be None"):
        K.normal_kl_forward(mu_p, None, mu_q, ls_q, eps, True)
    with pytest.raises(ValueError, match="4-D"):
        K.normal_kl_forward(None, None, mu_q[0], ls_q[0], eps[0], True)
    with pytest.raises(TypeError, match="mu_q must be float32, float16 or bfloat16"):
        K.normal_kl_forward(None, None, mu_q.double(), ls_q.double(), eps.double(), True)
    with pytest.raises(TypeError, match="log_sigma_q must have mu_q's dtype"):
        K.normal_kl_forward(None, None, mu_q, ls_q.half(), eps, True)
    with pytest.raises(ValueError, match=r"eps must have shape \(2, 3, 4, 4\)"):
        K.normal_kl_forward(None, None, mu_q, ls_q, eps[:, :2], True)
    with pytest.raises(ValueError, match="must not be empty"):
        K.normal_kl_forward(None, None, mu_q[:0], ls_q[:0], eps[:0], True)
    with pytest.raises(ValueError, match="temperature must be finite and >= 0"):
        K.normal_sample_forward(None, None, eps, -1.0)
    with pytest.raises(ValueError, match="mu and log_sigma must both be tensors"):
        K.normal_sample_forward(mu_p, None, eps, 1.0)
    with pytest.raises(ValueError, match=r"z must have shape"):
        K.flow_kl_forward(None, None, ls_q, eps, mu_q[:1], eps, True)


def test_cpu_tensors_are_refused():
    mu_p, ls_p, mu_q, ls_q, eps = _cpu_group()
    with pytest.raises(ValueError, match="mu_q must be a CUDA tensor for the cuda backend"):
        K.normal_kl_forward(mu_p, ls_p, mu_q, ls_q, eps, True)
    with pytest.raises(ValueError, match="eps must be a CUDA tensor"):
        K.normal_sample_forward(None, None, eps, 1.0)


def test_device_and_gradient_mismatches_are_refused(monkeypatch):
    """The checks past the CUDA-device test, reached on the CPU by waiving that test."""
    monkeypatch.setattr(common, "require_cuda", lambda name, x: None)
    mu_p, ls_p, mu_q, ls_q, eps = _cpu_group()
    with pytest.raises(ValueError, match="eps is on meta but mu_q is on cpu"):
        K.normal_kl_forward(mu_p, ls_p, mu_q, ls_q, eps.to("meta"), True)
    with pytest.raises(ValueError, match=r"grad_kl_all must have shape \(2,\)"):
        K.normal_kl_backward(None, torch.ones(3), None, None, None, mu_p, ls_p, mu_q, ls_q, eps, True)
    with pytest.raises(ValueError, match=r"grad_kl_diag must have shape \(3,\)"):
        K.flow_kl_backward(None, None, None, torch.ones(2), mu_p, ls_p, ls_q, eps, mu_q, eps, True)
    with pytest.raises(ValueError, match="grad_log_q is on meta but the params are on cpu"):
        K.normal_kl_backward(None, None, torch.ones(2, device="meta"), None, None, mu_p, ls_p, mu_q, ls_q, eps, True)
    with pytest.raises(TypeError, match="grad_z must have mu_q's dtype"):
        K.normal_kl_backward(eps.half(), None, None, None, None, mu_p, ls_p, mu_q, ls_q, eps, True)


@requires_cuda
def test_cuda_device_mismatch_is_refused():
    mu_p, ls_p, mu_q, ls_q, eps = _cpu_group()
    with pytest.raises(ValueError, match="eps is on cpu but mu_q is on cuda"):
        K.normal_kl_forward(mu_p.cuda(), ls_p.cuda(), mu_q.cuda(), ls_q.cuda(), eps, True)


@pytest.mark.gpu   # checks the build the GPU check makes
@pytest.mark.skipif(os.environ.get("NVAE_FAST_EXPECT_EXT") != "1",
                    reason="set NVAE_FAST_EXPECT_EXT=1 where the install built nvae_fast._C (CI does)")
def test_extension_exposes_the_kl_kernels():
    from nvae_fast import _C

    for name in ("normal_kl_workspace_bytes", "normal_kl_forward", "normal_kl_backward", "flow_kl_forward",
                 "flow_kl_backward", "normal_sample_forward", "normal_sample_backward"):
        assert callable(getattr(_C, name)), name
