"""Test setup: without a GPU, Triton kernels run on the CPU through its interpreter.

TRITON_INTERPRET must be set before triton.jit wraps any kernel, so before nvae_fast's Triton
modules are imported: here, at collection time.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")


@pytest.fixture(autouse=True)
def _seed_and_reset_backend():
    """Every test starts seeded, with automatic backend choice."""
    import nvae_fast

    torch.manual_seed(0)
    nvae_fast.set_backend(None)
    yield
    nvae_fast.set_backend(None)


@pytest.fixture
def small_cpu_convs():
    """Runs a test with oneDNN off: on the tiny shapes of model tests, generating oneDNN kernels for
    each new convolution shape costs several times more CPU than PyTorch's plain CPU convolution."""
    enabled = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    yield
    torch.backends.mkldnn.enabled = enabled
