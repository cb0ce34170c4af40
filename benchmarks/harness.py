"""The one timing harness every nvae_fast benchmark uses.

Method (see the shared DESIGN.md, "Performance method"): count the bytes and FLOPs of a kernel
first for a floor; time the median of many repetitions after warm-up with CUDA events; rotate among
enough input sets that together exceed twice the L2 cache, so no implementation is flattered by a
warm cache; read peak memory from the allocator. On a CPU-only machine the same code times with
the host clock and every record says so.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch


@dataclass
class Timing:
    """Median and spread of one measured callable, in milliseconds."""

    median_ms: float
    min_ms: float
    max_ms: float
    reps: int
    times_ms: list[float] = field(repr=False)


def environment() -> dict[str, Any]:
    """Device, driver and library versions, and the git commit: stored with every result file."""
    info: dict[str, Any] = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "host_cpu": platform.processor() or platform.machine(),
        "cuda_available": torch.cuda.is_available(),
        "git_commit": _git_commit(),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(
            device=props.name,
            sm_count=props.multi_processor_count,
            l2_bytes=getattr(props, "L2_cache_size", None),
            total_memory_bytes=props.total_memory,
            cuda_runtime=torch.version.cuda,
            driver=_nvidia_smi("driver_version"),
        )
    else:
        info["device"] = f"CPU only ({os.cpu_count()} cores): timings are CPU timings"
    return info


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                             cwd=Path(__file__).resolve().parent)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=Path(__file__).resolve().parent).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def _nvidia_smi(query: str) -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"], capture_output=True,
                             text=True, check=True)
        return out.stdout.strip().splitlines()[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        return None


def rotation_count(bytes_per_set: int, device: torch.device) -> int:
    """How many input sets to rotate through so that together they exceed twice the L2 cache."""
    if device.type != "cuda":
        return 1
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 * 2**20) or 50 * 2**20
    return max(1, -(-2 * l2 // max(bytes_per_set, 1)))


def measure(fn: Callable[[Any], Any], input_sets: Sequence[Any], *, warmup: int = 10, reps: int = 50,
            device: torch.device) -> Timing:
    """Times ``fn(input_sets[i % len])``: median of ``reps`` runs after ``warmup`` runs.

    On CUDA each run is bracketed by its own pair of events (no host clock, no sync inside);
    on CPU the host clock times each run.
    """
    for i in range(warmup):
        fn(input_sets[i % len(input_sets)])
    times: list[float] = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        for i, (start, end) in enumerate(events):
            start.record()
            fn(input_sets[i % len(input_sets)])
            end.record()
        torch.cuda.synchronize(device)
        times = [start.elapsed_time(end) for start, end in events]
    else:
        for i in range(reps):
            t0 = time.perf_counter()
            fn(input_sets[i % len(input_sets)])
            times.append((time.perf_counter() - t0) * 1e3)
    return Timing(statistics.median(times), min(times), max(times), reps, times)


def peak_memory_bytes(fn: Callable[[], Any], device: torch.device) -> int | None:
    """Peak allocator memory above what was allocated before ``fn`` ran (CUDA only)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def saved_activation_bytes(fn: Callable[[], torch.Tensor]) -> int:
    """Bytes of the distinct tensors autograd saves for backward while ``fn`` runs its forward."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def copy_bandwidth_gbs(device: torch.device, nbytes: int = 1 << 30) -> float | None:
    """Measured device-to-device copy bandwidth (bytes read + written per second, in GB/s)."""
    if device.type != "cuda":
        return None
    src = torch.empty(nbytes // 2, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    timing = measure(lambda _: dst.copy_(src), [None], warmup=3, reps=20, device=device)
    return 2 * src.numel() / (timing.median_ms * 1e-3) / 1e9


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Writes ``payload`` (dataclasses converted) atomically: a temporary file, then a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=lambda o: asdict(o) if hasattr(o, "__dataclass_fields__")
                              else str(o)))
    tmp.replace(path)


def format_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """A plain fixed-width table of ``rows`` restricted to ``columns``."""
    cells = [[_fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
    line = "  ".join(c.ljust(w) for c, w in zip(columns, widths))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(out)


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)
