"""Residual-normal KL: references against torch.distributions, backends against the references."""

import itertools
import warnings

import pytest
import torch
from torch.distributions import Normal, kl_divergence

import nvae_fast
from nvae_fast.ops.normal_kl import (
    GroupKL, flow_kl, flow_kl_ref, normal_kl, normal_kl_ref, normal_sample, normal_sample_ref, soft_clamp5,
)

from conftest import HAS_CUDA, requires_cuda
from tolerances import assert_close

DEVICE = "cuda" if HAS_CUDA else "cpu"


def _raw(shape, dtype=torch.float64, layout="nchw", scale=2.0, device="cpu"):
    """Raw params drawn wide enough to reach the soft clamps, in the given layout: 'nchw',
    'channels_last', or 'chunk' (a torch.chunk view of a twice-as-wide tensor, as the model has)."""
    N, C, H, W = shape
    if layout == "chunk":
        t = torch.randn(N, 2 * C, H, W, dtype=torch.float64) * scale
        return t.to(device, dtype).chunk(2, dim=1)[1]
    t = (torch.randn(shape, dtype=torch.float64) * scale).to(device, dtype)
    return t.to(memory_format=torch.channels_last) if layout == "channels_last" else t


def _official_normal(mu, log_sigma, t=1.0):
    return Normal(soft_clamp5(mu), t * (torch.exp(soft_clamp5(log_sigma)) + 1e-2))


# ---------------------------------------------------------------------------------------------
# References against the definitions (float64)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("prior,residual", [(True, True), (True, False), (False, True)])
def test_normal_kl_ref_matches_torch_distributions(prior, residual):
    shape = (3, 4, 5, 2)
    mu_p, ls_p = (_raw(shape), _raw(shape)) if prior else (None, None)
    mu_q, ls_q, eps = _raw(shape), _raw(shape), torch.randn(shape, dtype=torch.float64)
    out = normal_kl_ref(mu_p, ls_p, mu_q, ls_q, eps, residual)
    zeros = torch.zeros(shape, dtype=torch.float64)
    p = _official_normal(zeros, zeros) if mu_p is None else _official_normal(mu_p, ls_p)
    q = _official_normal(mu_q + mu_p, ls_q + ls_p) if (prior and residual) else _official_normal(mu_q, ls_q)
    z = q.mean + q.stddev * eps
    kl = kl_divergence(q, p)
    assert_close(out.z, z)
    assert_close(out.kl_all, kl.sum(dim=(1, 2, 3)))
    assert_close(out.kl_diag, kl.sum(dim=(2, 3)).mean(dim=0))
    assert_close(out.log_q, q.log_prob(z).sum(dim=(1, 2, 3)))
    assert_close(out.log_p, p.log_prob(z).sum(dim=(1, 2, 3)))


def test_flow_kl_ref_matches_torch_distributions():
    shape = (2, 3, 4, 4)
    mu_p, ls_p, mu_q, ls_q = (_raw(shape) for _ in range(4))
    eps = torch.randn(shape, dtype=torch.float64)
    q = _official_normal(mu_q + mu_p, ls_q + ls_p)
    p = _official_normal(mu_p, ls_p)
    z0 = q.mean + q.stddev * eps
    z, log_det = z0 * 0.9 + 0.1, torch.full(shape, -0.1053605156578263, dtype=torch.float64)  # log 0.9
    out = flow_kl_ref(mu_p, ls_p, ls_q, eps, z, log_det, residual=True)
    log_q = q.log_prob(z0) - log_det
    assert_close(out.log_q, log_q.sum(dim=(1, 2, 3)))
    assert_close(out.log_p, p.log_prob(z).sum(dim=(1, 2, 3)))
    assert_close(out.kl_all, (log_q - p.log_prob(z)).sum(dim=(1, 2, 3)))


def test_normal_sample_ref_matches_torch_distributions_with_temperature():
    shape = (2, 3, 4, 5)
    mu, ls, eps = _raw(shape), _raw(shape), torch.randn(shape, dtype=torch.float64)
    d = _official_normal(mu, ls, t=0.6)
    assert_close(normal_sample_ref(mu, ls, eps, 0.6), d.mean + d.stddev * eps)
    assert_close(normal_sample_ref(None, None, eps, 0.6), 0.6 * 1.01 * eps)


# ---------------------------------------------------------------------------------------------
# torch backend: the hand-written backward formulas against finite differences (float64)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("prior,residual", [(True, True), (True, False), (False, True)])
def test_torch_backend_gradcheck(prior, residual):
    shape = (2, 3, 2, 3)
    prior_leaves = [_raw(shape).requires_grad_(), _raw(shape).requires_grad_()] if prior else []
    mu_q, ls_q = _raw(shape).requires_grad_(), _raw(shape).requires_grad_()
    z, log_det = _raw(shape).requires_grad_(), _raw(shape, scale=0.3).requires_grad_()
    eps = torch.randn(shape, dtype=torch.float64)

    def prior_of(args):
        return tuple(args[:2]) if prior else (None, None)

    def kl_fn(*args):
        return tuple(normal_kl(*prior_of(args), *args[-2:], eps, residual))

    def flow_fn(*args):
        return tuple(flow_kl(*prior_of(args), args[-3], eps, args[-2], args[-1], residual)[1:])

    with nvae_fast.use_backend("torch"):
        assert torch.autograd.gradcheck(kl_fn, prior_leaves + [mu_q, ls_q])
        assert torch.autograd.gradcheck(flow_fn, prior_leaves + [ls_q, z, log_det])
        assert torch.autograd.gradcheck(lambda m, s: normal_sample(m, s, eps, 0.7), (mu_q, ls_q))


# ---------------------------------------------------------------------------------------------
# Triton against the reference
# ---------------------------------------------------------------------------------------------

SHAPES = [(1, 1, 1, 1), (3, 20, 5, 7), (2, 3, 8, 8), (1, 36, 1, 1), (2, 5, 1, 9)]


def _group(shape, dtype, layout, prior):
    mu_p, ls_p = (_raw(shape, dtype, layout, device=DEVICE), _raw(shape, dtype, layout, device=DEVICE)) \
        if prior else (None, None)
    mu_q, ls_q = _raw(shape, dtype, layout, device=DEVICE), _raw(shape, dtype, layout, device=DEVICE)
    eps = torch.randn(shape, device=DEVICE).to(dtype)
    return [t if t is None else t.requires_grad_() for t in (mu_p, ls_p, mu_q, ls_q)] + [eps]


def _grads_of(outputs, inputs, seeds):
    present = [t for t in inputs if t is not None]
    used = [(o, s) for o, s in zip(outputs, seeds) if o is not None and s is not None]
    return torch.autograd.grad([o for o, _ in used], present, [s for _, s in used])


def _compare(got, expected, dtype, where):
    for name, a, b in zip(GroupKL._fields, got, expected):
        if b is None:
            assert a is None
            continue
        # Sums are fp32 whatever the input dtype; the half-precision error comes from rounding the
        # inputs' neighbours, so half-precision cases use the dtype's tolerance.
        assert_close(a, b, dtype, scale=4, msg=f"{name}, {where}")


def _cases():
    for i, (shape, layout, (prior, residual)) in enumerate(itertools.product(
            SHAPES, ("nchw", "channels_last", "chunk"), ((True, True), (True, False), (False, True)))):
        if i % 2 == 0 or shape[0] * shape[2] * shape[3] == 1:  # half the grid, every shape and layout
            yield pytest.param(shape, layout, prior, residual, id=f"{shape}-{layout}-prior{prior}-res{residual}")


@pytest.mark.gpu
@pytest.mark.parametrize("shape,layout,prior,residual", list(_cases()))
def test_triton_normal_kl_matches_reference(shape, layout, prior, residual):
    mu_p, ls_p, mu_q, ls_q, eps = _group(shape, torch.float32, layout, prior)
    expected = normal_kl_ref(mu_p, ls_p, mu_q, ls_q, eps, residual)
    with nvae_fast.use_backend("triton"):
        got = normal_kl(mu_p, ls_p, mu_q, ls_q, eps, residual)
    where = f"{shape} {layout} prior={prior} residual={residual}"
    _compare(got, expected, torch.float32, where)
    assert got.z.is_contiguous() or got.z.is_contiguous(memory_format=torch.channels_last)
    # Seed only some outputs: the others' gradients arrive as None or zeros.
    seeds = [torch.randn_like(expected.z), torch.randn_like(expected.kl_all), None, torch.randn_like(expected.log_p),
             torch.randn_like(expected.kl_diag)]
    inputs = (mu_p, ls_p, mu_q, ls_q)
    for a, b in zip(_grads_of(got, inputs, seeds), _grads_of(expected, inputs, seeds)):
        assert_close(a, b, torch.float32, scale=4, msg=f"grad, {where}")


@pytest.mark.gpu
@pytest.mark.parametrize("shape,layout,prior,residual", list(_cases())[::2])
def test_triton_flow_kl_matches_reference(shape, layout, prior, residual):
    mu_p, ls_p, _, ls_q, eps = _group(shape, torch.float32, layout, prior)
    z = _raw(shape, torch.float32, layout, device=DEVICE).requires_grad_()
    log_det = _raw(shape, torch.float32, layout, scale=0.3, device=DEVICE).requires_grad_()
    expected = flow_kl_ref(mu_p, ls_p, ls_q, eps, z, log_det, residual)
    with nvae_fast.use_backend("triton"):
        got = flow_kl(mu_p, ls_p, ls_q, eps, z, log_det, residual)
    where = f"{shape} {layout} prior={prior} residual={residual}"
    _compare(got, expected, torch.float32, where)
    seeds = [None, torch.randn_like(expected.kl_all), torch.randn_like(expected.log_q), None,
             torch.randn_like(expected.kl_diag)]
    inputs = (mu_p, ls_p, ls_q, z, log_det)
    for a, b in zip(_grads_of(got, inputs, seeds), _grads_of(expected, inputs, seeds)):
        assert_close(a, b, torch.float32, scale=4, msg=f"grad, {where}")


@pytest.mark.gpu
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("prior", [True, False])
@pytest.mark.parametrize("layout", ["nchw", "chunk"])
def test_triton_normal_sample_matches_reference(temperature, prior, layout):
    shape = (3, 20, 5, 7)
    mu, ls, _, _, eps = _group(shape, torch.float32, layout, prior)
    expected = normal_sample_ref(mu, ls, eps, temperature)
    with nvae_fast.use_backend("triton"):
        got = normal_sample(mu, ls, eps, temperature)
    assert got.dtype == expected.dtype
    assert_close(got, expected)
    if prior:
        seed = torch.randn_like(expected)
        for a, b in zip(torch.autograd.grad(got, (mu, ls), seed), torch.autograd.grad(expected, (mu, ls), seed)):
            assert_close(a, b)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_half_precision(dtype):
    """Half inputs, fp32 math: every result is the fp32 value on the same (upcast) inputs, rounded
    once to the output dtype (sums stay fp32)."""
    shape = (2, 20, 5, 7)
    inputs = _group(shape, dtype, "chunk", True)
    upcast = [t.detach().float().requires_grad_() for t in inputs[:4]] + [inputs[4].float()]
    expected = normal_kl_ref(*upcast)
    with nvae_fast.use_backend("triton"):
        got = normal_kl(*inputs)
    assert got.z.dtype == dtype and got.kl_all.dtype == torch.float32
    _compare(got._replace(z=None), expected._replace(z=None), torch.float32, f"{dtype} sums")
    assert_close(got.z, expected.z, dtype)
    seeds = [torch.randn_like(expected.z).to(dtype), torch.randn_like(expected.kl_all),
             torch.randn_like(expected.log_q), torch.randn_like(expected.log_p), None]
    got_grads = _grads_of(got, inputs[:4], seeds)
    seeds[0] = seeds[0].float()
    for a, b in zip(got_grads, _grads_of(expected, upcast[:4], seeds)):
        assert a.dtype == dtype
        assert_close(a, b, dtype)


@requires_cuda
@pytest.mark.parametrize("shape", [(32, 20, 16, 16), (8, 64, 32, 32)])
def test_triton_large_shapes_on_gpu(shape):
    for prior, residual in ((True, True), (False, True)):
        mu_p, ls_p, mu_q, ls_q, eps = _group(shape, torch.bfloat16, "chunk", prior)
        expected = normal_kl_ref(mu_p, ls_p, mu_q, ls_q, eps, residual)
        with nvae_fast.use_backend("triton"):
            got = normal_kl(mu_p, ls_p, mu_q, ls_q, eps, residual)
        _compare(got, expected, torch.float32, f"{shape}")


# ---------------------------------------------------------------------------------------------
# Registration, dispatch and bad input
# ---------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("prior", [True, False])
def test_opcheck(prior):
    shape = (2, 3, 4, 5)
    mu_p, ls_p, mu_q, ls_q, eps = _group(shape, torch.float32, "nchw", prior)
    z, log_det = (torch.randn(shape, device=DEVICE, requires_grad=True) for _ in range(2))
    torch.library.opcheck(torch.ops.nvae_fast.normal_kl.default, (mu_p, ls_p, mu_q, ls_q, eps, True))
    torch.library.opcheck(torch.ops.nvae_fast.flow_kl.default, (mu_p, ls_p, ls_q, eps, z, log_det, True))
    torch.library.opcheck(torch.ops.nvae_fast.normal_sample.default, (mu_p, ls_p, eps, 0.8))


@pytest.mark.gpu
def test_compiles_without_graph_breaks():
    shape = (2, 3, 4, 5)
    mu_p, ls_p, mu_q, ls_q, eps = _group(shape, torch.float32, "nchw", True)

    def loss(*args):
        out = normal_kl(*args, eps)
        return out.kl_all.sum() + out.log_q.sum() - out.log_p.sum() + out.z.square().mean()

    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    got = compiled(mu_p, ls_p, mu_q, ls_q)
    expected = loss(mu_p, ls_p, mu_q, ls_q)
    assert_close(got, expected)
    inputs = (mu_p, ls_p, mu_q, ls_q)
    for a, b in zip(torch.autograd.grad(got, inputs), torch.autograd.grad(expected, inputs)):
        assert_close(a, b)


@pytest.mark.gpu
def test_float64_runs_on_the_torch_backend():
    mu_p, ls_p, mu_q, ls_q, eps = _group((2, 3, 2, 2), torch.float64, "nchw", True)
    with nvae_fast.use_backend("triton"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)   # "no 'triton' kernel" (warned once per process)
        out = normal_kl(mu_p, ls_p, mu_q, ls_q, eps)
    assert out.kl_all.dtype == torch.float64
    for a, b in zip(out, normal_kl_ref(mu_p, ls_p, mu_q, ls_q, eps)):
        assert_close(a, b)


def test_bad_inputs_raise_clear_errors():
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match="must both be tensors or both be None"):
        normal_kl(x, None, x, x, x)
    with pytest.raises(ValueError, match=r"eps must have shape \(2, 3, 4, 4\)"):
        normal_kl(None, None, x, x, torch.randn(2, 3, 4, 5))
    with pytest.raises(ValueError, match="4-D"):
        normal_kl(None, None, torch.randn(2, 3), x, x)
    with pytest.raises(TypeError, match="floating-point"):
        normal_kl(None, None, x, x.long(), x)
    with pytest.raises(ValueError, match="temperature must be a finite number >= 0"):
        normal_sample(x, x, x, -1.0)
    with pytest.raises(ValueError, match="is on meta"):
        flow_kl(None, None, x, x, x, torch.empty(2, 3, 4, 4, device="meta"))
