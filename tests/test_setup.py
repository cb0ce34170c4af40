"""setup.py's choices, without building: the architectures (the visible GPUs', else 80;90), pybind11
(its CMake package, else PyTorch's headers), and what a failed kernel build does (an error where a
GPU is visible or NVAE_FAST_BUILD_CUDA=1, else a warning)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import setuptools

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def setup_py(monkeypatch):
    """setup.py as a module, with setuptools.setup() doing nothing."""
    monkeypatch.setattr(setuptools, "setup", lambda **kwargs: None)
    spec = importlib.util.spec_from_file_location("nvae_fast_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _fake_nvidia_smi(tmp_path: Path, monkeypatch, output: str | None) -> None:
    """PATH holds only an nvidia-smi printing ``output`` (None: no nvidia-smi at all)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    if output is not None:
        script = bin_dir / "nvidia-smi"
        script.write_text(f"#!/bin/sh\nprintf '{output}'\n")
        script.chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir))


def test_architectures(setup_py, tmp_path, monkeypatch):
    monkeypatch.setenv("NVAE_FAST_CUDA_ARCHS", "80,90")
    assert setup_py._cuda_archs()[0] == "80;90"
    monkeypatch.delenv("NVAE_FAST_CUDA_ARCHS")
    _fake_nvidia_smi(tmp_path, monkeypatch, "9.0\\n9.0\\n")
    assert setup_py._cuda_archs() == ("90", "the GPUs visible here; NVAE_FAST_CUDA_ARCHS overrides")
    _fake_nvidia_smi(tmp_path, monkeypatch, "8.6\\n9.0\\n")
    assert setup_py._cuda_archs()[0] == "86;90"
    (tmp_path / "bin" / "nvidia-smi").unlink()
    assert setup_py._cuda_archs()[0] == "80;90"


def test_pybind11_from_its_package_or_pytorch_headers(setup_py, monkeypatch):
    pytest.importorskip("pybind11")
    assert setup_py._pybind11_args()[0].startswith("-Dpybind11_DIR=")
    monkeypatch.setitem(sys.modules, "pybind11", None)   # as if not installed
    (arg,) = setup_py._pybind11_args()
    include = Path(arg.removeprefix("-DNVAE_FAST_PYBIND11_INCLUDE_DIR="))
    assert (include / "pybind11" / "pybind11.h").is_file()


@pytest.mark.parametrize("mode, gpu, fails", [(None, True, True), (None, False, False), ("1", False, True)])
def test_a_failed_build(setup_py, tmp_path, monkeypatch, capsys, mode, gpu, fails):
    if mode is None:
        monkeypatch.delenv("NVAE_FAST_BUILD_CUDA", raising=False)
    else:
        monkeypatch.setenv("NVAE_FAST_BUILD_CUDA", mode)
    _fake_nvidia_smi(tmp_path, monkeypatch, "9.0\\n" if gpu else None)

    def broken(self, ext):
        raise subprocess.CalledProcessError(1, ["cmake", "--build", "."])

    monkeypatch.setattr(setup_py.CMakeBuild, "_cmake_build", broken)
    command = setup_py.CMakeBuild.__new__(setup_py.CMakeBuild)
    ext = setup_py.CMakeExtension("nvae_fast._C")
    if fails:
        with pytest.raises(RuntimeError, match="building nvae_fast._C failed"):
            command.build_extension(ext)
    else:
        command.build_extension(ext)
        assert "installing without it" in capsys.readouterr().err
