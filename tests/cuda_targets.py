"""Where the csrc/ kernel tests run: on a GPU, or in the CPU emulation of csrc/ (opt-in).

``kernel_device`` is a fixture parametrised over both targets; it yields the torch device to put
the inputs on. The GPU target (marked ``gpu``) needs a CUDA device and the built ``nvae_fast._C``.
The emulated target builds csrc/ with g++ (tests/cuda_emulation, about a minute on 2 cores the
first time) and points the launchers in nvae_fast.kernels.cuda at it, with CPU tensors standing in
for device memory; it runs only with NVAE_FAST_EMULATE_CUDA=1.
"""

from __future__ import annotations

import functools
import os
from types import ModuleType

import pytest

from nvae_fast.kernels.cuda import bn_swish, common

from conftest import HAS_CUDA
from cuda_emulation import build

EMULATE_ENV = "NVAE_FAST_EMULATE_CUDA"


@functools.cache
def _emulated_extension() -> ModuleType | RuntimeError:
    """The emulated extension, or the build's error (kept, so a broken build fails once, fast)."""
    try:
        return build.build()
    except RuntimeError as err:
        return err


def use_emulation(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """Routes the cuda launchers to the emulated extension for this test; skips when not enabled."""
    if os.environ.get(EMULATE_ENV) != "1":
        pytest.skip(f"set {EMULATE_ENV}=1 to run the CUDA kernels in the CPU emulation")
    reason = build.unavailable_reason()
    if reason is not None:
        pytest.skip(f"CPU emulation of csrc/ unavailable: {reason}")
    module = _emulated_extension()
    if isinstance(module, RuntimeError):
        raise module
    for launchers in (common, bn_swish):  # bn_swish imported these names from common
        monkeypatch.setattr(launchers, "ext", lambda: module)
        monkeypatch.setattr(launchers, "launch_context", lambda x: (0, 0))
    monkeypatch.setattr(common, "require_cuda", lambda name, x: None)
    return module


@pytest.fixture(params=[pytest.param("cuda", marks=pytest.mark.gpu), "emulated"])
def kernel_device(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "cuda":
        if not HAS_CUDA:
            pytest.skip("needs a CUDA device")
        return "cuda"
    use_emulation(monkeypatch)
    return "cpu"
