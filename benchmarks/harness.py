"""The one timing harness every nvae_fast benchmark uses.

Method (see the shared DESIGN.md, "Performance method"): count the bytes and FLOPs of a kernel
first for a floor; time the median of many repetitions after warm-up with CUDA events; rotate among
enough input sets that together exceed twice the L2 cache, so no implementation is flattered by a
warm cache; read peak memory from the allocator. On a CPU-only machine the same code times with
the host clock and every record says so.

Beyond timing: which implementations a benchmark compares and why one is left out
(:func:`skip_reason`), which backend each fused op actually ran (:func:`record_dispatch`), phase
timing of a training step (:func:`measure_phases`), where results go (:func:`output_paths`:
``benchmarks/results/`` holds only full GPU runs) and a bar chart (:func:`plot_bars`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import textwrap
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from nvae_fast import backend
from nvae_fast.nn import BatchNormSwish

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"   # committed: full runs on a GPU only
SCRATCH_DIR = BENCH_DIR / "scratch"   # ignored by git: CPU runs and --quick smoke runs

# Every implementation a benchmark can compare, in table order: the official-equivalent reference
# run eagerly (nvae_fast's modules forced onto the torch backend), torch.compile of that same
# reference, and nvae_fast's fast backends picked through the dispatcher.
IMPLS: tuple[str, ...] = ("eager", "compile", "compile-max-autotune", "triton", "cuda")
COMPILE_MODES = {"compile": None, "compile-max-autotune": "max-autotune"}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass
class Timing:
    """Median and spread of one measured callable, in milliseconds."""

    median_ms: float
    min_ms: float
    max_ms: float
    reps: int
    times_ms: list[float] = field(repr=False)


def environment(device: torch.device | None = None) -> dict[str, Any]:
    """Device, driver and library versions, and the git commit: stored with every result file.
    ``device`` is where the timings run (default: the GPU if there is one)."""
    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
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
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            device=props.name,
            sm_count=props.multi_processor_count,
            l2_bytes=getattr(props, "L2_cache_size", None),
            total_memory_bytes=props.total_memory,
            cuda_runtime=torch.version.cuda,
            driver=_nvidia_smi("driver_version"),
            tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
            tf32_cudnn=torch.backends.cudnn.allow_tf32,
            cudnn_benchmark=torch.backends.cudnn.benchmark,
        )
    elif torch.cuda.is_available():
        info["device"] = f"CPU ({os.cpu_count()} cores; the GPU was not used): timings are CPU timings"
    else:
        info["device"] = f"CPU only ({os.cpu_count()} cores): timings are CPU timings"
    return info


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """``--device`` and ``--time-limit``, the same in every benchmark."""
    parser.add_argument("--device", choices=["cuda", "cpu"],
                        help="where to time (default: cuda when a GPU is visible, else cpu)")
    parser.add_argument("--time-limit", type=_positive_seconds, metavar="SECONDS",
                        help="start no new row after SECONDS (the rest are recorded as not run); the JSON is "
                             "rewritten after every row, so a run stopped from outside keeps what it measured")


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def run_device(name: str | None) -> torch.device:
    """The device ``--device`` names (default: cuda when available); cuda without a GPU is an error."""
    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible to PyTorch")
    return torch.device(name)


class TimeLimit:
    """``--time-limit``: why a row is not started any more, or None while there is time."""

    def __init__(self, seconds: float | None) -> None:
        self.seconds = seconds
        self.end = None if seconds is None else time.monotonic() + seconds

    def reason(self) -> str | None:
        if self.end is not None and time.monotonic() > self.end:
            return f"not run: --time-limit of {self.seconds:g} s reached"
        return None


def _git_commit() -> str | None:
    """HEAD (with -dirty for local changes), or NVAE_FAST_GIT_COMMIT where the tree has no .git
    (benchmarks/gpu_check.py passes its --commit on)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                             cwd=Path(__file__).resolve().parent)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=Path(__file__).resolve().parent).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("NVAE_FAST_GIT_COMMIT") or None


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


def measure_phases(fn: Callable[[Any, Callable[[], None]], Any], input_sets: Sequence[Any], phases: Sequence[str],
                   *, warmup: int = 3, reps: int = 20, device: torch.device) -> dict[str, Timing]:
    """Times the phases of ``fn(inputs, mark)``, which calls ``mark()`` once at the end of each of
    ``phases`` (e.g. forward, backward, optimizer). Returns a :class:`Timing` per phase and one for
    ``"total"``; on CUDA every mark records an event, so the phases cost no synchronisation."""
    for i in range(warmup):
        fn(input_sets[i % len(input_sets)], lambda: None)
    stamps: list[list[Any]] = []
    for i in range(reps):
        marks: list[Any] = []

        def mark(marks: list[Any] = marks) -> None:
            if device.type == "cuda":
                event = torch.cuda.Event(enable_timing=True)
                event.record()
                marks.append(event)
            else:
                marks.append(time.perf_counter())

        mark()
        fn(input_sets[i % len(input_sets)], mark)
        if len(marks) != len(phases) + 1:
            raise RuntimeError(f"the measured function marked {len(marks) - 1} phases, expected {len(phases)}")
        stamps.append(marks)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        elapsed = [[a.elapsed_time(b) for a, b in zip(m, m[1:])] for m in stamps]
    else:
        elapsed = [[(b - a) * 1e3 for a, b in zip(m, m[1:])] for m in stamps]
    per_phase = {name: [row[j] for row in elapsed] for j, name in enumerate(phases)}
    per_phase["total"] = [sum(row) for row in elapsed]
    return {name: Timing(statistics.median(t), min(t), max(t), reps, t) for name, t in per_phase.items()}


def peak_memory_bytes(fn: Callable[[], Any], device: torch.device, above_current: bool = True) -> int | None:
    """Peak allocator memory while ``fn`` runs (CUDA only): above what was allocated before it
    ran, or with ``above_current=False`` in all (parameters, optimizer state, inputs included)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device) if above_current else 0
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def saved_activation_bytes(fn: Callable[[], Any], exclude: Iterable[torch.Tensor] = ()) -> int:
    """Bytes of the distinct storages autograd saves for backward while ``fn`` runs its forward.

    Storages of ``exclude`` (pass the module's parameters and buffers: they live anyway) are not
    counted; inputs that are saved are, since the caller must keep them alive for backward.
    """
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
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


def csv_choices(choices: Sequence[str]) -> Callable[[str], list[str]]:
    """An argparse type: a comma-separated, non-empty subset of ``choices``."""
    def parse(text: str) -> list[str]:
        items = [t for t in text.split(",") if t]
        bad = [t for t in items if t not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {', '.join(choices)}, got {text!r}")
        return items
    return parse


def skip_reason(impl: str, device: torch.device, requested: bool = True) -> str | None:
    """None if ``impl`` (one of :data:`IMPLS`) is timed on ``device``, else why it is not.

    ``requested=False`` means it was not asked for explicitly (``--quick`` leaves torch.compile
    out unless it is named: compiling takes longer than the rest of a smoke run).
    """
    if impl not in IMPLS:
        raise ValueError(f"unknown implementation {impl!r}; expected one of {', '.join(IMPLS)}")
    if impl in COMPILE_MODES and not requested:
        return "not requested (--quick leaves torch.compile out unless --impls names it)"
    if impl == "triton" and device.type == "cpu":
        return "not timed: on the CPU Triton runs only in its interpreter, a correctness tool"
    if impl in ("triton", "cuda"):
        reason = backend.unavailable_reason(impl, device)
        if reason is not None:
            return f"not available: {reason}"
    return None


def forced_backend(impl: str) -> str:
    """The nvae_fast backend an implementation runs under: the references run on ``torch``."""
    return impl if impl in ("triton", "cuda") else "torch"


class _OfficialSwish(torch.autograd.Function):
    """The official NVAE Swish: saves its input, recomputes the sigmoid in backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return x * torch.sigmoid(x)

    @staticmethod
    def backward(ctx, dy: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        s = torch.sigmoid(x)
        return dy * s * (1 + x * (1 - s))


class OfficialBatchNormSwish(torch.nn.Module):
    """What the official ``SyncBatchNormSwish`` runs on one GPU: ``F.batch_norm`` then its Swish,
    as plain PyTorch ops (which torch.compile can fuse), on the parameters of ``bn``."""

    def __init__(self, bn: torch.nn.Module) -> None:
        super().__init__()
        self.bn = bn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bn = self.bn
        factor = bn._training_step_factor()
        y = torch.nn.functional.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias,
                                           bn.training or bn.running_mean is None, factor, bn.eps)
        return _OfficialSwish.apply(y)


def official_layers(module: torch.nn.Module, impl: str) -> torch.nn.Module:
    """For the reference implementations (eager and torch.compile), replaces every fused
    ``BatchNormSwish`` of ``module`` in place by :class:`OfficialBatchNormSwish` on the same
    parameters, so the baselines run the official code's ops rather than nvae_fast's custom op
    (opaque to inductor). Backend implementations keep the module as it is."""
    if impl in ("triton", "cuda"):
        return module
    for name, child in list(module.named_children()):
        if isinstance(child, BatchNormSwish):
            setattr(module, name, OfficialBatchNormSwish(child))
        else:
            official_layers(child, impl)
    return module


def compiled(module: torch.nn.Module | Callable[..., Any], impl: str) -> Any:
    """``module`` itself for eager and backend runs, else ``torch.compile`` of it in ``impl``'s mode.

    Dynamo's caches are cleared first: compiled instances of one class share the code object of
    ``forward``, and past the recompile limit dynamo would quietly run the rest eagerly.
    """
    if impl not in COMPILE_MODES:
        return module
    torch._dynamo.reset()
    return torch.compile(module, mode=COMPILE_MODES[impl])


def graph_breaks() -> int:
    """Graph breaks dynamo has counted since the last ``torch._dynamo.reset()``."""
    from torch._dynamo.utils import counters

    return sum(counters["graph_break"].values())


@contextlib.contextmanager
def record_dispatch() -> Iterator[dict[str, str]]:
    """Records, for every fused op the dispatcher routes while the block runs, the backend it chose.

    Yields a dict ``{op: backend}`` filled as calls happen. A benchmark uses it to label what ran
    (an op without a kernel for the forced backend falls back to its automatic choice) instead of
    trusting the backend it asked for.
    """
    chosen: dict[str, str] = {}
    original = backend.select

    def select(op: str, device: torch.device, implemented: Sequence[str]) -> str:
        name = original(op, device, implemented)
        chosen[op] = name
        return name

    backend.select = select
    try:
        yield chosen
    finally:
        backend.select = original


def dispatch_verdict(impl: str, chosen: dict[str, str]) -> str | None:
    """Why a fast-backend row must not be timed, or None.

    A row is skipped when no fused op ran on ``impl`` (timing it would time another backend under
    this one's name); a partial fallback is timed, and the caller labels which ops ran elsewhere.
    """
    if impl not in ("triton", "cuda"):
        return None
    if not chosen:
        return f"not implemented: this benchmark calls no fused op of nvae_fast's {impl} backend"
    if impl not in chosen.values():
        ran = ", ".join(f"{op}->{name}" for op, name in sorted(chosen.items()))
        return f"not implemented: no fused op here has a {impl} kernel ({ran})"
    return None


def device_slug(name: str) -> str:
    """A GPU's name as a directory name: ``NVIDIA H200`` -> ``NVIDIA_H200``."""
    return "".join(c if c.isalnum() or c in "-." else "_" for c in name.strip())


def output_paths(bench: str, device: torch.device, quick: bool, out: Path | None, tag: str = "") -> tuple[Path, Path]:
    """The JSON and PNG paths of a run: ``out`` (PNG beside it) if given, else
    ``results/<gpu>/<bench>_<tag>.json`` for a full GPU run and
    ``scratch/<bench>_<tag>_<quick|full>_<device>.json`` otherwise, so CPU and smoke runs never
    land among the committed GPU results."""
    if out is None:
        name = f"{bench}_{tag}" if tag else bench
        if device.type == "cuda" and not quick:
            out = RESULTS_DIR / device_slug(torch.cuda.get_device_name(device)) / f"{name}.json"
        else:
            out = SCRATCH_DIR / f"{name}_{'quick' if quick else 'full'}_{device.type}.json"
    return out, out.with_suffix(".png")


def plot_bars(path: Path, rows: list[dict[str, Any]], case_keys: Sequence[str], series_key: str,
              panels: Sequence[tuple[str, str]], title: str) -> None:
    """Grouped bar charts in one PNG, one panel per ``(value_key, ylabel)`` of ``panels``: a group
    per distinct ``case_keys`` tuple, a bar per ``series_key`` value, on a log axis. Rows without
    the panel's value (not timed, failed) are left out of it."""
    try:
        import matplotlib
    except ImportError:
        print(f"matplotlib is not installed: no chart {path.name} (the JSON holds every number)")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if any(r.get(key) is not None for key, _ in panels)]
    cases = list(dict.fromkeys(tuple(r[k] for k in case_keys) for r in rows))
    series = list(dict.fromkeys(r[series_key] for r in rows))
    width = 0.8 / max(len(series), 1)
    fig, axes = plt.subplots(len(panels), 1, squeeze=False,
                             figsize=(max(6.0, len(cases) * max(0.9, 0.3 * len(series)) + 1.5), 1 + 3.5 * len(panels)))
    for ax, (value_key, ylabel) in zip(axes[:, 0], panels):
        values = {tuple(r[k] for k in case_keys) + (r[series_key],): r[value_key] for r in rows
                  if r.get(value_key) is not None}
        for j, name in enumerate(series):  # one colour per implementation in every panel
            at = [i for i, c in enumerate(cases) if c + (name,) in values]
            if at:
                ax.bar([i + (j - (len(series) - 1) / 2) * width for i in at],
                       [values[cases[i] + (name,)] for i in at], width, label=name, color=f"C{j % 10}")
        ax.set_xticks(range(len(cases)))
        ax.set_xticklabels(["\n".join(str(v) for v in c) for c in cases], fontsize=6)
        if values and max(values.values()) > 20 * min(values.values()) > 0:
            ax.set_yscale("log")
        ax.set_ylabel(ylabel)
        if values:
            ax.legend(fontsize=7)
    axes[0, 0].set_title(textwrap.fill(title, 100), fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def format_report(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """The table of the timed rows, then one line per implementation and reason for the rest."""
    timed = [r for r in rows if r.get("status", "").startswith("timed")]
    lines = [format_table(timed, columns)] if timed else ["(nothing was timed)"]
    others: dict[tuple[str, str], int] = {}
    for r in rows:
        if not r.get("status", "").startswith("timed"):
            others[(r["impl"], r["status"])] = others.get((r["impl"], r["status"]), 0) + 1
    lines += [f"{impl}: {status} ({n} case{'s' if n > 1 else ''})" for (impl, status), n in others.items()]
    return "\n".join(lines)


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
