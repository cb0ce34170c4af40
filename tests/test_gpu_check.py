"""benchmarks/gpu_check.sh without a GPU: the dry run checks the plan (deadline arithmetic, the -m gpu
selection, the sanitizer's named tests, the benchmarks' arguments); the runner enforces each step's
cap, kills what overruns, and writes its summary; the results land where benchmarks/README.md
renders them from."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gpu_check():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        yield importlib.import_module("gpu_check")
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


@pytest.fixture(scope="module")
def results():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        yield importlib.import_module("results")
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


def test_dry_run_of_the_full_plan(tmp_path):
    """The command the README documents, with --dry-run: the plan fits 540 s and every test and
    benchmark argument it names exists."""
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run", "--out", str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "dry run: the plan is consistent" in proc.stdout
    assert "= 535 s of 540 s" in proc.stdout and "-m gpu selects" in proc.stdout
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["problems"] == [] and report["deadline_s"] == 540
    steps = [st["step"] for ph in report["plan"] for lane in ph["lanes"] for st in lane]
    assert steps == ["environment", "build", "gpu-tests", "memcheck", "racecheck", "bench-cells", "bench-model",
                     "bench-compile"]
    build = report["plan"][1]["lanes"][0][0]["commands"][0]
    assert build[1:] == ["-m", "pip", "install", "-v", "--no-build-isolation", "--no-deps", "--no-index", "-e", "."]


def test_quick_plan_fits_four_minutes_and_names_what_exists(gpu_check):
    s = gpu_check.Settings(quick=True)
    phases = gpu_check.plan(s)
    assert gpu_check.check_deadline(phases, 240.0) == []
    assert sum(ph.budget_s for ph in phases) + gpu_check.RESERVE_S <= 240
    assert all((ROOT / p).is_file() for p in gpu_check.QUICK_TEST_PATHS)
    assert gpu_check._check_bench_arguments(s, [st for ph in phases for st in ph.steps() if st.out_json]) == []


def test_deadline_arithmetic(gpu_check):
    Step, Phase = gpu_check.Step, gpu_check.Phase
    a, c, d, e, f = (Step(n, b, n) for n, b in (("a", 10), ("c", 50), ("d", 20), ("e", 20), ("f", 30)))
    phases = [Phase("A", ((a,),)), Phase("B", ((c,), (d, e))), Phase("F", ((f,),))]
    assert [ph.budget_s for ph in phases] == [10, 50, 30]
    deadline = 90 + gpu_check.RESERVE_S
    assert gpu_check.check_deadline(phases, deadline) == []
    problems = gpu_check.check_deadline(phases, deadline - 1)
    assert problems == [f"the plan needs 100 s (phases 10 + 50 + 30 + 10 s for the summary) but the deadline is "
                        f"{deadline - 1:.0f} s"]
    now = [0.0]
    clock = gpu_check.Clock(phases, deadline, now=lambda: now[0])
    assert clock.step_cap(0, phases[0].lanes[0], 0) == 10
    now[0] = 4.0                                      # a finished early: its 6 s go to the next phase
    assert clock.step_cap(1, (c,), 0) == 56
    assert clock.step_cap(1, (d, e), 0) == 36         # e keeps its 20 s
    now[0] = 30.0
    assert clock.step_cap(1, (d, e), 1) == 30
    now[0] = 75.0                                     # B overran nothing: F still has its 30 s (and the slack)
    assert clock.step_cap(2, (f,), 0) == 15 and clock.phase_end(2) == 90
    now[0] = 200.0
    assert clock.step_cap(2, (f,), 0) == 0


def test_runner_kills_an_overrunning_step_and_reports(gpu_check, tmp_path, capsys):
    """A step past its cap is killed with its children; the others run; the summary says what
    happened and the exit status is 1."""
    Step, Phase = gpu_check.Step, gpu_check.Phase
    py = sys.executable
    slow = Step("slow", 2, "sleeps", ((py, "-c", "import subprocess, sys, time; "
                                          "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
                                          "time.sleep(60)"),))
    fine = Step("fine", 20, "prints", ((py, "-c", "print('hello from fine')"),))
    broken = Step("broken", 20, "fails", ((py, "-c", "raise SystemExit(3)"),))
    phases = [Phase("one", ((slow,),)), Phase("two", ((fine,), (broken,)))]
    s = gpu_check.Settings(out=tmp_path / "out")
    run = gpu_check.Run(s, phases, 2 + 20 + gpu_check.RESERVE_S, rebuild=False)
    assert run.execute() == gpu_check.EXIT_FAILED
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    status = {r["name"]: r for r in report["steps"]}
    assert status["slow"]["status"] == "timed out" and status["slow"]["seconds"] < 15
    assert status["fine"]["status"] == "passed"
    assert status["broken"]["status"] == "failed" and "exit status 3" in status["broken"]["detail"]
    log = (tmp_path / "out" / "gpu_check.log").read_text()
    assert "hello from fine" in log and "killed after" in log
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "| slow | timed out |" in summary and "| fine | passed |" in summary
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["gpu_check.json", "gpu_check.log", "summary.md"]
    assert "slow: start (budget 2 s" in capsys.readouterr().out


def test_test_and_benchmark_steps_are_judged_by_their_output(gpu_check, tmp_path, monkeypatch):
    """A test step reports pytest's counts and failures; a benchmark step fails on a failed row or an
    unfinished JSON, even when the script exits 0; its chart leaves the output directory."""
    monkeypatch.setattr(gpu_check, "WORK_DIR", tmp_path / "work")
    out = tmp_path / "out"
    pytest_output = ("tests/a.py::u\n  tests/conftest.py:90: PytestWarning: tests/a.py::u[x-1] allocates CUDA memory "
                     "but is not marked gpu: mark it\nFAILED tests/a.py::t - boom\n===== 1 failed, 4 passed in 9.1s =====")
    rows = [{"impl": "eager", "kind": "kl", "shape": "2x3", "status": "timed"},
            {"impl": "triton", "kind": "kl", "shape": "2x3", "status": "failed: RuntimeError: x"}]
    write = ("import json, pathlib, sys; out = pathlib.Path(sys.argv[1]); "
             f"out.write_text(json.dumps({{'finished': True, 'results': {rows!r}}})); "
             "out.with_suffix('.png').write_bytes(b'png')")
    steps = [gpu_check.Step("gpu-tests", 20, "t", ((sys.executable, "-c", f"print({pytest_output!r}); exit(1)"),)),
             gpu_check.Step("bench-cells", 20, "b", ((sys.executable, "-c", write, str(out / "cell_bench.json")),),
                            out_json="cell_bench.json")]
    run = gpu_check.Run(gpu_check.Settings(out=out), [gpu_check.Phase("p", ((steps[0],), (steps[1],)))],
                        20 + gpu_check.RESERVE_S, rebuild=False)
    assert run.execute() == gpu_check.EXIT_FAILED
    tests, bench = run.results["gpu-tests"], run.results["bench-cells"]
    assert tests.status == "failed" and tests.detail.startswith("1 failed, 4 passed in 9.1s; exit status 1 of ")
    assert tests.detail.endswith("; 1 unmarked tests used the GPU")
    assert tests.failures == ["FAILED tests/a.py::t - boom", "unmarked GPU use: tests/a.py::u[x-1]"]
    assert bench.status == "failed" and bench.detail == "1 timed, 1 failed"
    assert bench.failures == ["triton kl 2x3: failed: RuntimeError: x"]
    assert not (out / "cell_bench.png").exists() and (tmp_path / "work" / "plots" / "cell_bench.png").is_file()


def test_summaries_of_pytest_and_the_sanitizer(gpu_check):
    out = "....F\nFAILED tests/a.py::t - boom\n===== 1 failed, 4 passed, 2 skipped in 9.1s =====\n"
    assert gpu_check.pytest_summary(out) == "1 failed, 4 passed, 2 skipped in 9.1s"
    assert gpu_check.pytest_summary("Traceback ...") == "no pytest summary in the output"


def test_bad_usage(gpu_check, capsys):
    assert gpu_check.main(["--deadline", "100"]) == gpu_check.EXIT_USAGE
    assert "the plan needs 535 s" in capsys.readouterr().err
    assert gpu_check.main(["--steps", "build,nope"]) == gpu_check.EXIT_USAGE
    assert gpu_check.main(["--list", "--steps", "gpu-tests,cpu-tests"]) == 0
    assert capsys.readouterr().out.splitlines()[1].startswith("cpu-tests")


def _payload(benchmark, device="NVIDIA H200", quick=False, rows=None):
    env = {"device": device, "cuda_available": not device.startswith("CPU"), "torch": "2.11.0+cu130",
           "triton": "3.6.0", "git_commit": "abc123", "time_utc": "2025-01-01T00:00:00Z"}
    return {"benchmark": benchmark, "environment": env, "quick": quick, "finished": True, "reps": 30,
            "presets": {"cifar10": {"batch": 32}}, "results": rows or []}


def test_results_are_added_per_gpu_and_rendered(results, tmp_path):
    cell_rows = [{"preset": "cifar10", "kind": "dec_e6", "cell_type": "normal_dec", "shape": "32x256x16x16",
                  "count": 58, "dtype": "bfloat16", "impl": impl, "status": "timed", "fwd_bwd_ms": ms,
                  **({"speedup": 3.0 / ms, "pct_floor_fwd_bwd": 50.0} if impl != "eager" else {})}
                 for impl, ms in (("eager", 3.0), ("triton", 1.0), ("cuda", 1.5))]
    run = tmp_path / "run"
    run.mkdir()
    (run / "cell_bench.json").write_text(json.dumps(_payload("cell_bench", rows=cell_rows)))
    (run / "gpu_check.json").write_text(json.dumps({"gpu_check": "full", "environment": {
        "commit": "abc123", "torch": {"device": "NVIDIA H200"}}, "steps": [
        {"name": "gpu-tests", "status": "passed", "detail": "700 passed"}]}))
    written = results.add([run], tmp_path / "results")
    assert sorted(p.relative_to(tmp_path).as_posix() for p in written) == [
        "results/NVIDIA_H200/cell_bench.json", "results/NVIDIA_H200/gpu_check.json"]
    text = results.render(tmp_path / "results")
    assert "### NVIDIA_H200" in text and "gpu-tests: passed (700 passed)" in text
    assert "| cifar10 | dec_e6 | normal_dec | 32x256x16x16 | 58 | bfloat16 | 3 | 1 | 1.5 | triton | 3.00x | 50 |" in text
    assert "`gen_cell`: triton 1, cuda 0" in text
    for bad in (_payload("cell_bench", device="CPU only (2 cores)"), _payload("cell_bench", quick=True)):
        (run / "cell_bench.json").write_text(json.dumps(bad))
        with pytest.raises(SystemExit):
            results.add([run / "cell_bench.json"], tmp_path / "results")


def test_readme_renders_the_committed_results(results):
    current, updated = results.update_readme(results.render())
    assert current == updated, "benchmarks/README.md is stale: run python benchmarks/results.py render"
