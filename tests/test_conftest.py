"""tests/conftest.py as a GPU machine sees it: a pytest session where torch reports a CUDA device
(faked by a plugin that loads before the conftest) leaves Triton compiled (no interpreter), turns
TF32 off in every test, marks requires_cuda tests gpu (so ``-m gpu`` selects them), and warns
about a test that allocates CUDA memory without the gpu marker; without CUDA the interpreter is on.
(kernel_device[cuda] and the sanitizer's tests: tests/test_gpu_check.py's dry run.)"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import full_fp32_precision

TESTS = Path(__file__).resolve().parent

FAKE_CUDA = '''
"""Makes torch report one CUDA device; allocate() stands for a test putting a tensor on it."""
import torch

allocations = 0


def allocate():
    global allocations
    allocations += 1


torch.cuda.is_available = lambda: True
torch.cuda.device_count = lambda: 1
torch.cuda.is_initialized = lambda: allocations > 0
torch.cuda.memory_stats = lambda device=None: {"allocation.all.allocated": allocations}
torch.cuda.manual_seed_all = lambda seed: None   # torch.manual_seed would seed the (absent) device
'''

SESSION_TESTS = '''
import os

import pytest
import torch

from conftest import HAS_CUDA, requires_cuda


def test_session_view(request):
    gpu = sorted(item.name for item in request.session.items if item.get_closest_marker("gpu"))
    print(f"VIEW cuda={HAS_CUDA} interpret={os.environ.get('TRITON_INTERPRET')} "
          f"tf32={torch.backends.cudnn.allow_tf32},{torch.backends.cuda.matmul.allow_tf32} gpu={','.join(gpu)}")


@requires_cuda
def test_needs_cuda():
    pass


@pytest.mark.gpu
def test_marked_gpu_use():
    import fake_cuda
    fake_cuda.allocate()


def test_unmarked_gpu_use():
    import fake_cuda
    fake_cuda.allocate()
'''


def _session(tmp_path: Path, fake_cuda: bool) -> subprocess.CompletedProcess:
    """pytest on a copy of the real conftest and the tests above, optionally with CUDA faked present."""
    shutil.copy(TESTS / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "fake_cuda.py").write_text(FAKE_CUDA)
    (tmp_path / "test_session.py").write_text(SESSION_TESTS)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tmp_path), str(TESTS.parent), env.get("PYTHONPATH")]))
    plugin = ["-p", "fake_cuda"] if fake_cuda else []
    return subprocess.run([sys.executable, "-m", "pytest", *plugin, "-p", "no:cacheprovider", "-q", "-s",
                           "-o", "markers=gpu: test", "--rootdir", str(tmp_path), str(tmp_path)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


def test_with_cuda_present(tmp_path):
    proc = _session(tmp_path, fake_cuda=True)
    out = proc.stdout
    assert "VIEW cuda=True interpret=None tf32=False,False gpu=test_marked_gpu_use,test_needs_cuda" in out, out
    assert "4 passed, 1 warning" in out, out
    assert "test_session.py::test_unmarked_gpu_use allocates CUDA memory but is not marked gpu" in out, out
    assert "test_marked_gpu_use allocates" not in out, out


def test_without_cuda(tmp_path):
    proc = _session(tmp_path, fake_cuda=False)
    assert "VIEW cuda=False interpret=1 tf32=False,False gpu=test_marked_gpu_use,test_needs_cuda" in proc.stdout, \
        proc.stdout
    # without CUDA nothing is allocated on it, so the unmarked test passes; requires_cuda skips
    assert "3 passed, 1 skipped" in proc.stdout, proc.stdout


def test_full_fp32_precision_restores_both_settings_after_an_error():
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = True, True
    try:
        with pytest.raises(RuntimeError), full_fp32_precision():
            assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
            raise RuntimeError("inside")
        assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before
