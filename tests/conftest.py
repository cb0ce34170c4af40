"""Test setup, on a CPU-only machine and on a GPU machine alike.

* Without a GPU, Triton kernels run on the CPU through its interpreter. TRITON_INTERPRET must be
  set before triton.jit wraps any kernel, so before nvae_fast's Triton modules are imported: here,
  at collection time. With a GPU it is left alone, and Triton compiles for the GPU; a test that
  runs Triton on CPU tensors there must arrange the interpreter itself (a subprocess started with
  TRITON_INTERPRET=1) or use the GPU.
* The marker ``gpu`` selects the tests that run on a CUDA device when one is present (`-m gpu`,
  the test step of benchmarks/gpu_check.sh); :func:`requires_cuda` (skip without a GPU) marks
  ``gpu`` as well. On a GPU machine, a test that allocates CUDA memory without the marker gets a
  warning naming it (``GPU_USE_WARNING``): it runs on the GPU there (the CLI's default device, say)
  but the GPU check leaves it out; mark it, or give it a CPU device.
* fp32 convolutions and matmuls run without TF32 during every test: the tests compare fp32 results
  with float64 references at fp32 tolerances, and TF32 (on by default for cuDNN convolutions, and
  followed by the fused cell's GEMMs) rounds their operands to 10 mantissa bits.
"""

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import TypeVar

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()

if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

F = TypeVar("F", bound=Callable)


def requires_cuda(test: F) -> F:
    """Decorator: the test needs a CUDA device; skipped without one, selected by ``-m gpu``."""
    return pytest.mark.gpu(pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")(test))


@contextlib.contextmanager
def full_fp32_precision() -> Iterator[None]:
    """fp32 convolutions (cuDNN) and matmuls (cuBLAS) without TF32 while the block runs; both
    settings are restored afterwards, whatever the block raised. (pytest's monkeypatch cannot
    undo ``torch.backends.cuda.matmul.allow_tf32``: that object serves the name through
    ``__getattr__``, so the undo tries ``delattr``, raises, and skips the undos after it.)"""
    cudnn, matmul = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = cudnn
        torch.backends.cuda.matmul.allow_tf32 = matmul


GPU_USE_WARNING = "allocates CUDA memory but is not marked gpu"


def cuda_allocations() -> int:
    """How many CUDA allocations this process has made so far (0 while CUDA is uninitialised)."""
    if not (HAS_CUDA and torch.cuda.is_initialized()):
        return 0
    return int(torch.cuda.memory_stats().get("allocation.all.allocated", 0))


@pytest.fixture(autouse=True)
def _seed_and_reset_backend():
    """Every test starts seeded, with automatic backend choice and TF32 off."""
    import nvae_fast

    torch.manual_seed(0)
    nvae_fast.set_backend(None)
    with full_fp32_precision():
        yield
    nvae_fast.set_backend(None)


@pytest.fixture(autouse=True)
def _gpu_use_is_marked(request: pytest.FixtureRequest):
    """On a GPU machine, warns about a test that allocates CUDA memory without the ``gpu`` marker:
    `-m gpu` (the GPU check) leaves it out."""
    before = cuda_allocations()
    yield
    if request.node.get_closest_marker("gpu") is None and cuda_allocations() > before:
        request.node.warn(pytest.PytestWarning(
            f"{request.node.nodeid} {GPU_USE_WARNING}: mark it @pytest.mark.gpu for `-m gpu` "
            "(benchmarks/gpu_check.sh), or give it a CPU device"))


@pytest.fixture
def small_cpu_convs():
    """Runs a test with oneDNN off: on the tiny shapes of model tests, generating oneDNN kernels for
    each new convolution shape costs several times more CPU than PyTorch's plain CPU convolution."""
    enabled = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    yield
    torch.backends.mkldnn.enabled = enabled
