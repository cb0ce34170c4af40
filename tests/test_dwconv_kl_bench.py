"""benchmarks/dwconv_kl_bench.py: refuses without a GPU; its eager baselines compute what the
kernels compute, and it calls the kernel modules in the contract's argument order (checked on the
CPU with the contract references standing in for a backend)."""

import importlib.util
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from nvae_fast.ops.dwconv_stage import dwconv_stage_backward_ref, dwconv_stage_forward_ref
from nvae_fast.ops.normal_kl import normal_kl_ref

from conftest import HAS_CUDA
from tolerances import assert_close

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "dwconv_kl_bench.py"
_spec = importlib.util.spec_from_file_location("dwconv_kl_bench", _PATH)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


@pytest.mark.skipif(HAS_CUDA, reason="checks the refusal on a machine without a GPU")
def test_refuses_without_gpu(capsys):
    assert bench.main([]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


def _kl_backward_ref(grad_z, g_all, g_q, g_p, g_diag, mu_p, ls_p, mu_q, ls_q, eps, residual):
    leaves = [t.detach().requires_grad_() for t in (mu_p, ls_p, mu_q, ls_q)]
    out = normal_kl_ref(*leaves, eps, residual)
    return torch.autograd.grad(out, leaves, (grad_z, g_all, g_q, g_p, g_diag))


REFERENCE = {
    "dwconv_stage": SimpleNamespace(dwconv_stage_forward=dwconv_stage_forward_ref,
                                    dwconv_stage_backward=dwconv_stage_backward_ref),
    "normal_kl": SimpleNamespace(normal_kl_forward=lambda *args: tuple(normal_kl_ref(*args)),
                                 normal_kl_backward=_kl_backward_ref),
}


def test_eager_stage_matches_the_reference(monkeypatch):
    monkeypatch.setattr(bench, "DEVICE", "cpu")
    cases = bench._stage_cases((2, 8, 6, 7), torch.float32, 2, {"ref": REFERENCE["dwconv_stage"]})
    (eager_fwd, eager_bwd), (ref_fwd, ref_bwd) = cases["eager"], cases["ref"]
    for i in range(2):
        c, (var, mean) = eager_fwd(i)
        c_ref, mean_ref, var_ref = ref_fwd(i)
        assert_close(c, c_ref)
        assert_close(mean, mean_ref, scale=10)
        assert_close(var, var_ref, scale=10)
        sum_g, sum_gxmu, dweight = eager_bwd(i)
        _, sum_g_ref, sum_gxmu_ref, dweight_ref = ref_bwd(i)
        for x, y in ((sum_g, sum_g_ref), (sum_gxmu, sum_gxmu_ref), (dweight, dweight_ref)):
            assert_close(x, y, scale=10)


def test_eager_kl_matches_the_reference(monkeypatch):
    monkeypatch.setattr(bench, "DEVICE", "cpu")
    cases = bench._kl_cases((2, 5, 4, 3), torch.float32, 2, {"ref": REFERENCE["normal_kl"]})
    (eager_fwd, eager_bwd), (ref_fwd, ref_bwd) = cases["eager"], cases["ref"]
    for i in range(2):
        for x, y in zip(eager_fwd(i), ref_fwd(i)):
            assert_close(x, y)
        for x, y in zip(eager_bwd(i), ref_bwd(i)):
            assert_close(x, y)


def test_unavailable_backends_are_recorded_not_timed(monkeypatch):
    monkeypatch.setattr(bench, "DEVICE", "cpu")
    cases = bench._kl_cases((1, 2, 2, 2), torch.float32, 1, {"cuda": "nvae_fast._C is not built"})
    assert cases["cuda"] == "nvae_fast._C is not built"
