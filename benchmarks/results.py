"""The committed GPU results: ``benchmarks/results/<gpu>/*.json``, and their table in benchmarks/README.md.

    python benchmarks/results.py add DIR        # a GPU check's output directory (or any full GPU run's JSON)
    python benchmarks/results.py render         # rewrite the README's "Latest results" from results/
    python benchmarks/results.py render --check # exit 1 if the README is not what results/ renders (CI)

``add`` copies the benchmark JSON files of a run (and their PNGs if any, and ``gpu_check.json``
with the tests' and sanitizer's outcome) into ``results/<gpu>/`` under their own names; a later
file of the same name for the same GPU replaces the earlier one (git keeps the history).
It refuses CPU runs and ``--quick`` smoke runs. ``render`` writes, per GPU, the environment and
commit, the cell and training-step tables, and which implementation was fastest per workload: the
evidence the automatic backend order of each op is to follow.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
README = BENCH_DIR / "README.md"
BEGIN, END = "<!-- results:begin (benchmarks/results.py render) -->", "<!-- results:end -->"
# The op whose backend order a workload's rows are evidence for.
OP_OF_KIND = {"dec_e6": "gen_cell", "dec_e3": "gen_cell", "enc_bnswish": "bn_swish", "kl": "normal_kl",
              "kl_flow": "normal_kl"}
FAST_IMPLS = ("triton", "cuda")
NO_RESULTS = ("**No GPU results are committed yet.** Until an op has measured rows here, its automatic backend "
              "order stays as written in its module and is unmeasured.")


def device_slug(name: str) -> str:
    """A GPU's name as a directory name: ``NVIDIA H200`` -> ``NVIDIA_H200`` (as harness.device_slug)."""
    return "".join(c if c.isalnum() or c in "-." else "_" for c in name.strip())


def _load(path: Path) -> dict[str, Any]:
    try:
        payload = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise SystemExit(f"{path}: not a readable JSON file ({err})")
    if not isinstance(payload, dict):
        raise SystemExit(f"{path}: expected a JSON object")
    return payload


def add(sources: Sequence[Path], results_dir: Path = RESULTS_DIR) -> list[Path]:
    """Copies the full GPU runs among ``sources`` (files, or directories of them) into
    ``results_dir/<gpu>/``; returns the files written. Refuses CPU and quick runs."""
    files: list[Path] = []
    for src in sources:
        files += sorted(src.glob("*.json")) if src.is_dir() else [src]
    written: list[Path] = []
    check = next((f for f in files if f.name == "gpu_check.json"), None)
    benches = [f for f in files if f.name != "gpu_check.json"]
    device = None
    for f in benches:
        payload = _load(f)
        if "benchmark" not in payload or "results" not in payload:
            raise SystemExit(f"{f}: not a benchmark result (no 'benchmark' and 'results')")
        env = payload.get("environment", {})
        if not env.get("cuda_available") or str(env.get("device", "")).startswith("CPU"):
            raise SystemExit(f"{f}: a CPU run; benchmarks/results/ holds GPU runs only")
        if payload.get("quick"):
            raise SystemExit(f"{f}: a --quick smoke run (a few repetitions); results/ holds full runs only")
        if not payload.get("finished", True):
            raise SystemExit(f"{f}: the run did not finish (stopped from outside); rerun it")
        device = device_slug(env["device"])
        dest = results_dir / device / f.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, dest)
        written.append(dest)
        png = f.with_suffix(".png")
        if png.is_file():
            shutil.copyfile(png, dest.with_suffix(".png"))
            written.append(dest.with_suffix(".png"))
    if check is not None:
        payload = _load(check)
        gpu = payload.get("environment", {}).get("torch", {}).get("device")
        if not gpu:
            raise SystemExit(f"{check}: no GPU recorded (a dry run, or a run without a GPU)")
        if device is not None and device_slug(gpu) != device:
            raise SystemExit(f"{check}: GPU {gpu!r} differs from the benchmarks' ({device})")
        dest = results_dir / device_slug(gpu) / "gpu_check.json"
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(check, dest)
        written.append(dest)
    if not written:
        raise SystemExit("nothing to add: no benchmark JSON or gpu_check.json among " + ", ".join(map(str, sources)))
    return written


def _ms(value: Any) -> str:
    return "-" if value is None else f"{value:.3g}"


def _cell_tables(payload: dict[str, Any]) -> list[str]:
    rows = payload["results"]
    impls = [i for i in ("eager", "compile", "compile-max-autotune", "triton", "cuda") if any(r["impl"] == i for r in rows)]
    cases: dict[tuple, dict[str, dict[str, Any]]] = {}
    for r in rows:
        cases.setdefault((r["preset"], r["kind"], r["cell_type"], r["shape"], r["dtype"]), {})[r["impl"]] = r
    lines = ["| preset | workload | cell | shape | count | dtype | " + " | ".join(f"{i} ms" for i in impls)
             + " | fastest | speedup | % HBM floor |",
             "| " + " | ".join(["---"] * (9 + len(impls))) + " |"]
    for (preset, kind, cell, shape, dtype), by_impl in cases.items():
        timed = {i: r for i, r in by_impl.items() if r.get("fwd_bwd_ms")}
        best = min(timed.values(), key=lambda r: r["fwd_bwd_ms"]) if timed else None
        count = next(iter(by_impl.values())).get("count", "")
        lines.append(f"| {preset} | {kind} | {cell} | {shape} | {count} | {dtype} | "
                     + " | ".join(_ms(by_impl.get(i, {}).get("fwd_bwd_ms")) for i in impls)
                     + f" | {best['impl'] if best else '-'} | "
                     + (f"{best['speedup']:.2f}x" if best and best.get("speedup") else "-") + " | "
                     + (f"{best['pct_floor_fwd_bwd']:.0f}" if best and best.get("pct_floor_fwd_bwd") else "-") + " |")
    return lines


def _model_table(payload: dict[str, Any]) -> list[str]:
    lines = ["| preset | batch | dtype | impl | forward ms | backward ms | optimizer ms | step ms | speedup | "
             "peak MiB | status |", "| " + " | ".join(["---"] * 11) + " |"]
    for r in payload["results"]:
        lines.append(f"| {r['preset']} | {r['batch']} | {r['dtype']} | {r['impl']} | {_ms(r.get('forward_ms'))} | "
                     f"{_ms(r.get('backward_ms'))} | {_ms(r.get('optimizer_ms'))} | {_ms(r.get('step_ms'))} | "
                     + (f"{r['speedup']:.2f}x" if r.get("speedup") else "-") + " | "
                     + (f"{r['peak_mem_MB']:.0f}" if r.get("peak_mem_MB") else "-")
                     + f" | {r['status'].split(':')[0]} |")
    return lines


def fastest_backends(payloads: Sequence[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """Per op, how many measured (workload, shape, dtype) cases each fast backend won against the
    other: the evidence for the op's automatic order."""
    wins: dict[str, dict[str, int]] = {}
    for payload in payloads:
        if payload.get("benchmark") != "cell_bench":
            continue
        cases: dict[tuple, dict[str, float]] = {}
        for r in payload["results"]:
            if r["impl"] in FAST_IMPLS and r.get("fwd_bwd_ms") and r["status"] == "timed":
                cases.setdefault((r["kind"], r["cell_type"], r["shape"], r["dtype"]), {})[r["impl"]] = r["fwd_bwd_ms"]
        for (kind, *_), times in cases.items():
            if len(times) == len(FAST_IMPLS):
                op = OP_OF_KIND.get(kind, kind)
                winner = min(times, key=times.get)
                wins.setdefault(op, dict.fromkeys(FAST_IMPLS, 0))[winner] += 1
    return wins


def render(results_dir: Path = RESULTS_DIR) -> str:
    """The "Latest results" text for every GPU under ``results_dir``."""
    devices = sorted(d for d in results_dir.iterdir() if d.is_dir()) if results_dir.is_dir() else []
    blocks: list[str] = []
    for d in devices:
        payloads = [(f, _load(f)) for f in sorted(d.glob("*.json"))]
        benches = [(f, p) for f, p in payloads if "benchmark" in p]
        if not benches and not any(f.name == "gpu_check.json" for f, _ in payloads):
            continue
        blocks.append(f"### {d.name}")
        for f, p in payloads:
            if f.name == "gpu_check.json":
                steps = ", ".join(f"{s['name']}: {s['status']}" + (f" ({s['detail']})" if s.get("detail") else "")
                                  for s in p.get("steps", []) if s["name"] != "environment")
                env = p.get("environment", {})
                blocks.append(f"GPU check ({p.get('gpu_check')}, commit {env.get('commit') or '?'}, "
                              f"{env.get('time_utc', '?')}): {steps}.")
        for f, p in benches:
            env = p.get("environment", {})
            blocks.append(f"`{f.relative_to(results_dir.parent)}`: {env.get('device')}, torch {env.get('torch')}, "
                          f"triton {env.get('triton')}, CUDA {env.get('cuda_runtime')}, driver {env.get('driver')}, "
                          f"commit {env.get('git_commit') or '?'}, {env.get('time_utc', '?')}; "
                          f"{p.get('reps')} repetitions (median)"
                          + (f", copy bandwidth {p['copy_GBs']:.0f} GB/s" if p.get("copy_GBs") else "") + ".")
            blocks.append("")
            blocks += _cell_tables(p) if p["benchmark"] == "cell_bench" else _model_table(p) \
                if p["benchmark"] == "model_bench" else [f"({p['benchmark']}: see the JSON)"]
            blocks.append("")
        wins = fastest_backends([p for _, p in benches])
        if wins:
            blocks.append("Fastest fast backend per op (cases won, forward+backward): " + "; ".join(
                f"`{op}`: " + ", ".join(f"{impl} {n}" for impl, n in counts.items()) for op, counts in wins.items())
                + ". Ops without a row here keep their written order, unmeasured.")
    return "\n\n".join(b for b in "\n".join(blocks).split("\n\n") if b.strip()) if blocks else NO_RESULTS


def update_readme(text: str, readme: Path = README) -> tuple[str, str]:
    """(current README, README with ``text`` between the markers)."""
    current = readme.read_text()
    if BEGIN not in current or END not in current:
        raise SystemExit(f"{readme}: the markers {BEGIN} ... {END} are missing")
    head, rest = current.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return current, f"{head}{BEGIN}\n{text.strip()}\n{END}{tail}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p_add = sub.add_parser("add", help="copy full GPU runs into benchmarks/results/<gpu>/ and re-render the README")
    p_add.add_argument("sources", type=Path, nargs="+", help="gpu_check output directories or benchmark JSON files")
    p_render = sub.add_parser("render", help="rewrite the README's latest results from benchmarks/results/")
    p_render.add_argument("--check", action="store_true", help="only check that the README is up to date")
    args = parser.parse_args(argv)
    if args.command == "add":
        for path in add(args.sources):
            print(f"wrote {path}")
    current, updated = update_readme(render())
    if args.command == "render" and args.check:
        if current != updated:
            print(f"{README} is not what benchmarks/results/ renders: run python benchmarks/results.py render",
                  file=sys.stderr)
            return 1
        return 0
    if current != updated:
        README.write_text(updated)
        print(f"updated {README}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
