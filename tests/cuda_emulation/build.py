"""Builds csrc/ and its pybind11 bindings with the host C++ compiler into an emulated ``_C``.

The result exposes the same functions as ``nvae_fast._C`` but runs the kernels on the CPU (see
emulator.h), taking CPU tensors' data pointers. Objects are cached under the system temp dir,
keyed by the sources, so only changed sources rebuild.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import importlib.machinery
import importlib.util
import os
import shutil
import subprocess
import sysconfig
import tempfile
from pathlib import Path
from types import ModuleType

HERE = Path(__file__).resolve().parent
CSRC = HERE.parents[1] / "csrc"
FLAGS = ["-std=c++20", "-O1", "-fPIC", "-pthread", "-Wall", "-Wno-unknown-pragmas"]


def cuda_include_dir() -> Path | None:
    """The CUDA toolkit's include directory (headers only: the emulation needs no driver)."""
    candidates = [os.environ.get(v) for v in ("CUDA_HOME", "CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(nvcc).resolve().parents[1]))
    candidates.append("/usr/local/cuda")
    for root in filter(None, candidates):
        for inc in (Path(root) / "include", Path(root) / "targets" / "x86_64-linux" / "include"):
            if all((inc / h).is_file() for h in ("cuda_runtime.h", "cuda_fp16.h", "cuda_bf16.h")):
                return inc
    return None


def unavailable_reason() -> str | None:
    if shutil.which("g++") is None:
        return "no g++ on PATH"
    if cuda_include_dir() is None:
        return "no CUDA toolkit headers (nvcc on PATH or CUDA_HOME)"
    return None


def _compile(cmd: list[str]) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"emulation build failed: {' '.join(cmd)}\n{done.stderr}")


def build() -> ModuleType:
    """Compiles (or reuses) the emulated extension and imports it."""
    import pybind11

    includes = ["-I", str(CSRC), "-I", str(cuda_include_dir()), "-I", pybind11.get_include(),
                "-I", sysconfig.get_paths()["include"]]
    sources = sorted(CSRC.glob("*.cu")) + [CSRC / "bindings.cpp", HERE / "emulator.cpp"]
    headers = sorted(CSRC.glob("*.h")) + sorted(CSRC.glob("*.cuh")) + [HERE / "emulator.h"]
    key = hashlib.sha256(" ".join(FLAGS + includes).encode())
    for f in sources + headers:
        key.update(f.name.encode() + f.read_bytes())
    out = Path(tempfile.gettempdir()) / "nvae_fast_emulation" / key.hexdigest()[:16]
    lib = out / ("_C" + sysconfig.get_config_var("EXT_SUFFIX"))
    if not lib.exists():
        out.mkdir(parents=True, exist_ok=True)
        base = ["g++", *FLAGS, "-include", str(HERE / "emulator.h"), *includes]
        jobs = []
        for src in sources:
            obj = out / (src.name + ".o")
            lang = ["-x", "c++"] if src.suffix == ".cu" else []
            jobs.append(base + lang + ["-c", str(src), "-o", str(obj)])
        with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            list(pool.map(_compile, jobs))
        tmp = lib.with_suffix(".tmp")
        _compile(["g++", "-shared", "-pthread", "-o", str(tmp)] + [str(out / (s.name + ".o")) for s in sources])
        tmp.replace(lib)
    loader = importlib.machinery.ExtensionFileLoader("_C", str(lib))
    spec = importlib.util.spec_from_loader("_C", loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module
