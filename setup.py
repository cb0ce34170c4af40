"""Build script: pure Python package plus, when a CUDA toolkit is found, the extension nvae_fast._C.

Environment variables
---------------------
NVAE_FAST_BUILD_CUDA   unset: build the extension if a toolkit is found, warn and go on if it fails.
                       0: never build it (pure Python install).  1: build it; any failure is an error.
NVAE_FAST_CUDA_ARCHS   CMake CUDA architectures, ';'- or ','-separated (default "80;90").
NVAE_FAST_BUILD_JOBS   parallel compile jobs (default: number of CPUs).
CUDA_HOME / CUDA_PATH  toolkit location when nvcc is not on PATH.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def _log(msg: str) -> None:
    print(f"nvae_fast setup: {msg}", file=sys.stderr, flush=True)


def _find_nvcc() -> str | None:
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def _gpu_seen() -> bool:
    """Whether the NVIDIA driver shows a device (Linux; elsewhere assumed so)."""
    return not sys.platform.startswith("linux") or any(Path("/dev").glob("nvidia[0-9]*"))


def _find_cmake() -> str | None:
    found = shutil.which("cmake")
    if found:
        return found
    try:  # the `cmake` wheel from PyPI
        import cmake  # type: ignore[import-not-found]

        return str(Path(cmake.CMAKE_BIN_DIR) / "cmake")
    except ImportError:
        return None


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    """Configures and builds CMakeLists.txt; the module lands where setuptools expects the extension."""

    def build_extension(self, ext: Extension) -> None:
        required = os.environ.get("NVAE_FAST_BUILD_CUDA") == "1"
        try:
            self._cmake_build(ext)
        except (OSError, subprocess.CalledProcessError, RuntimeError) as err:
            if required:
                raise RuntimeError(f"building nvae_fast._C failed (NVAE_FAST_BUILD_CUDA=1): {err}") from err
            _log(f"building nvae_fast._C failed ({err}); installing without it (the triton and torch "
                 "backends still work). Set NVAE_FAST_BUILD_CUDA=1 to make this an error.")

    def _cmake_build(self, ext: Extension) -> None:
        import pybind11

        cmake = _find_cmake()
        if cmake is None:
            raise RuntimeError("cmake not found (pip install cmake)")
        nvcc = _find_nvcc()
        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        archs = os.environ.get("NVAE_FAST_CUDA_ARCHS", "80;90").replace(",", ";")
        config = "Debug" if self.debug else "Release"
        subprocess.run(
            [
                cmake, str(ROOT),
                f"-DCMAKE_BUILD_TYPE={config}",
                f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
                f"-DCMAKE_CUDA_COMPILER={nvcc}",
                f"-DCMAKE_CUDA_ARCHITECTURES={archs}",
                f"-DPython_EXECUTABLE={sys.executable}",
                f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            ],
            cwd=build_dir, check=True,
        )
        jobs = os.environ.get("NVAE_FAST_BUILD_JOBS", str(os.cpu_count() or 1))
        sources = len(list((ROOT / "csrc").glob("*.cu")))
        gpu = "" if _gpu_seen() else " (no GPU seen on this machine: the kernels will not run here)"
        _log(f"compiling nvae_fast._C: {sources} CUDA sources for architectures {archs} with {jobs} jobs, "
             f"several minutes on a small machine{gpu}; NVAE_FAST_BUILD_CUDA=0 skips it, pip install -v "
             "shows the progress")
        subprocess.run([cmake, "--build", ".", "--config", config, "-j", jobs], cwd=build_dir, check=True)


def _extensions() -> list[Extension]:
    mode = os.environ.get("NVAE_FAST_BUILD_CUDA")
    # pip runs this file once per build hook; speak only in the one that builds.
    building = any(cmd in sys.argv for cmd in ("bdist_wheel", "editable_wheel", "build_ext", "install", "develop"))
    if mode == "0":
        if building:
            _log("NVAE_FAST_BUILD_CUDA=0: installing pure Python, without nvae_fast._C")
        return []
    if _find_nvcc() is None:
        if mode == "1":
            raise RuntimeError("NVAE_FAST_BUILD_CUDA=1 but no CUDA toolkit found (no nvcc on PATH, CUDA_HOME or CUDA_PATH)")
        if building:
            _log("no CUDA toolkit found (nvcc not on PATH, CUDA_HOME unset): installing pure Python, "
                 "without nvae_fast._C; the torch and triton backends are unaffected")
        return []
    return [CMakeExtension("nvae_fast._C")]


setup(ext_modules=_extensions(), cmdclass={"build_ext": CMakeBuild})
