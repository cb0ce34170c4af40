"""The dispatcher: automatic choice, explicit requests, fallbacks and their messages."""

import warnings

import pytest
import torch

import nvae_fast
from nvae_fast import backend
from nvae_fast.backend import BackendUnavailableError

from conftest import HAS_CUDA

ALL = ("cuda", "triton", "torch")
# Where the triton backend runs here: the GPU, or on a CPU-only machine the interpreter (conftest).
TRITON_DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")


def test_cpu_tensors_use_the_reference_automatically():
    assert backend.select("op", torch.device("cpu"), ALL) == "torch"


def test_python_call_wins_over_environment(monkeypatch):
    monkeypatch.setenv(backend.ENV_VAR, "torch")
    assert backend.requested_backend() == "torch"
    with nvae_fast.use_backend("triton"):
        assert backend.requested_backend() == "triton"
        assert backend.select("op", TRITON_DEVICE, ALL) == "triton"
    assert backend.requested_backend() == "torch"


def test_environment_variable_is_validated(monkeypatch):
    monkeypatch.setenv(backend.ENV_VAR, "cudnn")
    with pytest.raises(ValueError, match="NVAE_FAST_BACKEND must be one of torch, triton, cuda"):
        backend.requested_backend()
    monkeypatch.setenv(backend.ENV_VAR, "auto")
    assert backend.requested_backend() is None


def test_set_backend_rejects_unknown_names():
    with pytest.raises(ValueError, match="backend must be one of"):
        nvae_fast.set_backend("tpu")


def test_explicit_request_that_cannot_run_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with nvae_fast.use_backend("triton"), pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET"):
        backend.select("op", torch.device("cpu"), ALL)
    with nvae_fast.use_backend("cuda"), pytest.raises(BackendUnavailableError, match="CUDA tensors only"):
        backend.select("op", torch.device("cpu"), ALL)


def test_op_without_the_requested_kernel_falls_back_with_one_warning():
    backend._warned.clear()
    with nvae_fast.use_backend("cuda"), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert backend.select("only_torch_op", torch.device("cpu"), ("torch",)) == "torch"
        assert backend.select("only_torch_op", torch.device("cpu"), ("torch",)) == "torch"
    assert len(caught) == 1 and "has no 'cuda' kernel" in str(caught[0].message)


def test_automatic_choice_on_cuda_skips_missing_backends_with_one_warning(monkeypatch):
    """Pretend to be on a GPU machine where nvae_fast._C is missing: triton is used, once warned."""
    reasons = {"cuda": "nvae_fast._C is not built", "triton": None, "torch": None}
    monkeypatch.setattr(backend, "unavailable_reason", lambda name, device: reasons[name])
    backend._warned.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            assert backend.select("op", torch.device("cuda"), ALL) == "triton"
    assert len(caught) == 1 and "nvae_fast._C is not built" in str(caught[0].message)


def test_status_reports_every_backend():
    status = backend.status()
    assert set(status) == set(backend.BACKENDS)
    assert status["torch"] == "available"
    if not HAS_CUDA:
        assert status["cuda"] != "available"
