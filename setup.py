"""Build script: pure Python package plus, when a CUDA toolkit is found, the extension nvae_fast._C.

With nvcc on the PATH the kernels are compiled even on a machine without a GPU (as CI does): a few
minutes on two cores. pip shows only a spinner meanwhile; ``pip install -v`` shows the compiler's
progress ("[3/12] Building CUDA object ...").

Environment variables
---------------------
NVAE_FAST_BUILD_CUDA   unset: build the extension if a toolkit is found; if that fails, fail the
                       install where a GPU is visible, else warn and install without it.
                       0: never build it (pure Python install).  1: build it; any failure is an error.
NVAE_FAST_CUDA_ARCHS   CMake CUDA architectures, ';'- or ','-separated (default: those of the GPUs
                       nvidia-smi lists, else "80;90").
NVAE_FAST_BUILD_JOBS   parallel compile jobs (default: number of CPUs).
CMAKE_GENERATOR        CMake's generator (default: Ninja when ninja is found, else CMake's own).
CUDA_HOME / CUDA_PATH  toolkit location when nvcc is not on PATH.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
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
    found = shutil.which("nvcc")
    if found is None and Path("/usr/local/cuda/bin/nvcc").is_file():   # the toolkit's default place
        found = "/usr/local/cuda/bin/nvcc"
    return found


def _visible_gpu_archs() -> list[str]:
    """Compute capabilities of the GPUs nvidia-smi lists, as CMake architectures ("9.0" -> "90")."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return sorted({line.strip().replace(".", "") for line in out.splitlines() if line.strip().replace(".", "").isdigit()})


def _cuda_archs() -> tuple[str, str]:
    """(CMake CUDA architectures, where that choice came from)."""
    given = os.environ.get("NVAE_FAST_CUDA_ARCHS")
    if given:
        return given.replace(",", ";"), "NVAE_FAST_CUDA_ARCHS"
    visible = _visible_gpu_archs()
    if visible:
        return ";".join(visible), "the GPUs visible here; NVAE_FAST_CUDA_ARCHS overrides"
    return "80;90", "default: no GPU visible; NVAE_FAST_CUDA_ARCHS overrides"


def _find_ninja() -> str | None:
    found = shutil.which("ninja")
    if found:
        return found
    try:  # the `ninja` wheel from PyPI
        import ninja  # type: ignore[import-not-found]

        return str(Path(ninja.BIN_DIR) / "ninja")
    except ImportError:
        return None


def _pybind11_args() -> list[str]:
    """CMake arguments locating pybind11: its own CMake package, else the headers PyTorch ships
    (a GPU machine without network access may have torch but not the pybind11 package)."""
    try:
        import pybind11

        return [f"-Dpybind11_DIR={pybind11.get_cmake_dir()}"]
    except ImportError:
        pass
    import importlib.util

    spec = importlib.util.find_spec("torch")
    for location in (spec.submodule_search_locations or []) if spec else []:
        include = Path(location) / "include"
        if (include / "pybind11" / "pybind11.h").is_file():
            _log(f"pybind11 is not installed: compiling against the pybind11 headers PyTorch ships ({include})")
            return [f"-DNVAE_FAST_PYBIND11_INCLUDE_DIR={include}"]
    raise RuntimeError("pybind11 not found (pip install pybind11)")


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
            if _visible_gpu_archs():
                raise RuntimeError(f"building nvae_fast._C failed ({err}) on a machine with a GPU; fix the build "
                                   "(`pip install -v` shows the compiler's output), or install without the cuda "
                                   "backend: NVAE_FAST_BUILD_CUDA=0") from err
            _log(f"building nvae_fast._C failed ({err}); installing without it (the triton and torch "
                 "backends still work). Set NVAE_FAST_BUILD_CUDA=1 to make this an error.")

    def _cmake_build(self, ext: Extension) -> None:
        cmake = _find_cmake()
        if cmake is None:
            raise RuntimeError("cmake not found (pip install cmake)")
        nvcc = _find_nvcc()
        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        archs, why = _cuda_archs()
        config = "Debug" if self.debug else "Release"
        generator = []
        ninja = _find_ninja()
        if "CMAKE_GENERATOR" not in os.environ and ninja is not None and not (build_dir / "CMakeCache.txt").exists():
            generator = ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
        jobs = os.environ.get("NVAE_FAST_BUILD_JOBS", str(os.cpu_count() or 1))
        _log(f"compiling the CUDA kernels into nvae_fast._C for CUDA architectures {archs} ({why}) with {nvcc}, "
             f"{jobs} jobs: minutes on a few cores, GPU or not; NVAE_FAST_BUILD_CUDA=0 skips this")
        start = time.monotonic()
        subprocess.run(
            [
                cmake, str(ROOT), *generator,
                f"-DCMAKE_BUILD_TYPE={config}",
                f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
                f"-DCMAKE_CUDA_COMPILER={nvcc}",
                f"-DCMAKE_CUDA_ARCHITECTURES={archs}",
                f"-DPython_EXECUTABLE={sys.executable}",
                *_pybind11_args(),
            ],
            cwd=build_dir, check=True,
        )
        subprocess.run([cmake, "--build", ".", "--config", config, "-j", jobs], cwd=build_dir, check=True)
        _log(f"built nvae_fast._C in {time.monotonic() - start:.0f} s")


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
