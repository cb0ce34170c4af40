"""The op layer on the ``cuda`` backend: the fused ops, called as the model calls them, with their
csrc/ kernels running in the CPU emulation (tests/cuda_emulation/).

The kernel tests (test_cuda_*.py) call the launchers directly; these check the seam between the
op layer and the launchers: the layouts, dtypes and arguments the ops really pass, and that a
whole forward/backward through each op equals the reference. Opt-in with NVAE_FAST_EMULATE_CUDA=1
(CI sets it); on a GPU machine the same checks run for real in the GPU tests.
"""

import warnings

import pytest
import torch

import nvae_fast
from nvae_fast import backend
from nvae_fast.kernels.cuda import dwconv_stage as cuda_dwconv_stage
from nvae_fast.ops.dwconv_stage import (dwconv_stage_backward, dwconv_stage_backward_ref, dwconv_stage_forward,
                                        dwconv_stage_forward_ref)
from nvae_fast.ops.normal_kl import flow_kl, flow_kl_ref, normal_kl, normal_kl_ref, normal_sample, normal_sample_ref

from cuda_targets import use_emulation
from test_bn_swish import _check_backend_against_reference
from test_gen_cell import _compare, _inputs, _params, _run


class backend_recorder:
    """Records, per op family, which backends the dispatcher chose inside the block."""

    def __enter__(self) -> dict[str, set[str]]:
        self.chosen: dict[str, set[str]] = {}
        self.real = backend.select

        def select(op, device, implemented):
            name = self.real(op, device, implemented)
            self.chosen.setdefault(op.split("[")[0], set()).add(name)
            return name

        backend.select = select
        return self.chosen

    def __exit__(self, *exc) -> None:
        backend.select = self.real


@pytest.fixture
def emulated_cuda_backend(monkeypatch):
    """Lets the dispatcher pick ``cuda`` for CPU tensors, whose launchers then run the emulation."""
    use_emulation(monkeypatch)
    real = backend.unavailable_reason
    monkeypatch.setattr(backend, "unavailable_reason",
                        lambda name, device: None if name == "cuda" else real(name, device))
    with warnings.catch_warnings():
        # gen_cell has no cuda kernel of its own: its GEMM stages fall back, with a warning
        warnings.filterwarnings("ignore", "gen_cell", RuntimeWarning)
        yield


@pytest.fixture
def stage_calls(monkeypatch):
    """Counts the calls of the cuda depthwise stage's launchers, per contract."""
    calls: dict[str, int] = {}
    for name in ("dwconv_stage_forward", "dwconv_stage_backward", "dwconv_stage_forward_fused",
                 "dwconv_stage_backward_fused"):
        def counted(*args, _real=getattr(cuda_dwconv_stage, name), _name=name):
            calls[_name] = calls.get(_name, 0) + 1
            return _real(*args)
        monkeypatch.setattr(cuda_dwconv_stage, name, counted)
    return calls


@pytest.mark.parametrize("upsample,training", [(False, True), (True, True), (False, False)])
def test_fused_cell_with_the_cuda_depthwise_stage(emulated_cuda_backend, stage_calls, upsample, training):
    """The fused cell takes the cuda stage's fused contract (BatchNorms folded, BN2's backward
    applied as the windows load, running statistics and parameter gradients in the kernels), not
    the plain contract behind torch ops."""
    params, running = _params(20, 10 if upsample else 20, 6, 5)
    x, skip, dout = _inputs(2, 20, 10 if upsample else 20, 5, 7, upsample)
    expected = _run("ref", x, skip, dout, params, running, upsample, training, torch.float64)
    with backend_recorder() as chosen:
        got = _run("cuda", x, skip, dout, params, running, upsample, training, torch.float32)
    assert chosen["dwconv_stage"] == {"cuda"}
    assert stage_calls == {"dwconv_stage_forward_fused": 1, "dwconv_stage_backward_fused": 1}
    _compare(got, expected, torch.float32, f"cuda stage, upsample={upsample}, training={training}", scale=25)


@pytest.mark.parametrize("upsample", [False, True])
def test_dwconv_stage_ops_on_the_cuda_backend(emulated_cuda_backend, upsample):
    g = torch.Generator().manual_seed(5)
    a = torch.randn(2, 12, 5, 7, generator=g).contiguous(memory_format=torch.channels_last)
    scale, shift, weight = torch.rand(12, generator=g) + 0.5, torch.randn(12, generator=g), torch.randn(12, 1, 5, 5,
                                                                                                          generator=g)
    with backend_recorder() as chosen, nvae_fast.use_backend("cuda"):
        got = dwconv_stage_forward(a, scale, shift, weight, 1, upsample)
        dc = torch.randn(got[0].shape, generator=g).contiguous(memory_format=torch.channels_last)
        got += dwconv_stage_backward(dc, a, scale, shift, got[1], weight, 1, upsample)
    assert chosen["dwconv_stage"] == {"cuda"}
    expected = dwconv_stage_forward_ref(a, scale, shift, weight, 1, upsample)
    expected += dwconv_stage_backward_ref(dc, a, scale, shift, got[1], weight, 1, upsample)
    for i, (x, y) in enumerate(zip(got, expected)):
        torch.testing.assert_close(x, y, atol=1e-4, rtol=1e-4, msg=lambda m, i=i: f"output {i}: {m}")


@pytest.mark.parametrize("residual", [True, False])
def test_kl_ops_on_the_cuda_backend(emulated_cuda_backend, residual):
    g = torch.Generator().manual_seed(3)
    data = dict(param=torch.randn(3, 16, 5, 6, generator=g), prior=torch.randn(2, 3, 8, 5, 6, generator=g),
                eps=torch.randn(3, 8, 5, 6, generator=g), log_det=torch.randn(3, 8, 5, 6, generator=g))

    def run(kl, sample, flow, dtype):
        enc = data["param"].to(dtype).contiguous(memory_format=torch.channels_last).requires_grad_()
        mu_q, log_sigma_q = torch.chunk(enc, 2, dim=1)  # strided views, as the model passes them
        mu_p, log_sigma_p = (t.to(dtype).requires_grad_() for t in data["prior"].unbind(0))
        eps, log_det = data["eps"].to(dtype), data["log_det"].to(dtype).requires_grad_()
        out = kl(mu_p, log_sigma_p, mu_q, log_sigma_q, eps, residual)
        z = sample(mu_p, log_sigma_p, eps, 0.7)
        f = flow(mu_p, log_sigma_p, log_sigma_q, eps, z * 1.1, log_det, residual)
        loss = (out.z.square().sum() + out.kl_all.sum() + out.log_q.sum() - out.log_p.sum()
                + out.kl_diag.square().sum() + f.kl_all.sum() + f.log_p.sum())
        grads = torch.autograd.grad(loss, (mu_p, log_sigma_p, enc, log_det))
        return [out.z, out.kl_all, out.log_q, out.log_p, out.kl_diag, z, f.kl_all, f.log_q, f.log_p, *grads]

    with backend_recorder() as chosen, nvae_fast.use_backend("cuda"):
        got = run(normal_kl, normal_sample, flow_kl, torch.float32)
    assert chosen["normal_kl"] == {"cuda"}
    exact = run(normal_kl_ref, normal_sample_ref, flow_kl_ref, torch.float64)
    fp32 = run(normal_kl_ref, normal_sample_ref, flow_kl_ref, torch.float32)
    for i, (a, ref, ref32) in enumerate(zip(got, exact, fp32)):
        # The gradients cancel large terms: measure against PyTorch's own fp32 error on the same math.
        err, err32 = (a.double() - ref).abs().max().item(), (ref32.double() - ref).abs().max().item()
        assert err <= 4 * err32 + 1e-5 * max(1.0, ref.abs().max().item()), f"output {i}: {err} vs fp32 {err32}"


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "strided"])
def test_bn_swish_on_the_cuda_backend(emulated_cuda_backend, layout):
    _check_backend_against_reference("cuda", (3, 20, 5, 7), torch.float32, layout, True, "cpu")
