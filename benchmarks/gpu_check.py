"""The GPU check: every GPU test and the decisive benchmarks of nvae_fast in one command, within a
deadline it enforces. Run it through ``benchmarks/gpu_check.sh`` from the repository root of a
bare GPU machine (no network needed):

    PYTHON=/path/to/python bash benchmarks/gpu_check.sh --out DIR     # default deadline 540 s
    bash benchmarks/gpu_check.sh --quick --out DIR                    # the short plan, 240 s
    bash benchmarks/gpu_check.sh --dry-run                            # no GPU: check the plan

Steps (``--steps`` runs a subset; ``--list`` prints them with their budgets):

1. ``environment``: GPU, driver, toolkit and library versions, the commit.
2. ``build``: ``pip install --no-build-isolation --no-deps --no-index -e .`` with
   NVAE_FAST_BUILD_CUDA=1 (a failed build is an error), for the GPU's architecture only, with
   Ninja; skipped when ``nvae_fast._C`` was already built from the same sources for it.
3. ``gpu-tests``: ``pytest -m gpu`` in parallel (pytest-xdist) with Triton's and inductor's
   caches under ``build/gpu_check/``; beside it, on the same GPU, ``memcheck`` and ``racecheck``:
   compute-sanitizer on a small named subset of the CUDA kernel tests.
4. ``bench-cells``: cell_bench.py on the cifar10 decoder and post-processing cells and the KL in
   bf16 (eager, triton, cuda); ``bench-model``: model_bench.py, one cifar10 training step at
   batch 32 (eager against the fused backends); ``bench-compile``: the cells under torch.compile.
   Each passes its benchmark a ``--time-limit`` short of its cap.
5. ``cpu-tests`` (only when named in ``--steps``): the rest of the suite with the GPU present.

Each step has a budget; a step may use its own and whatever earlier steps left unused, never time
the steps after it are owed, and is killed (with its child processes) when that runs out. The
output directory gets few files: ``gpu_check.log`` (every step's output), ``summary.md`` (the
table), ``gpu_check.json`` (plan, environment, per-step results) and each benchmark's JSON (its
chart goes to ``build/gpu_check/plots/``). The exit status is 0 only if every step passed, 1 otherwise, 2 for bad usage or no GPU.
``--dry-run`` runs no GPU step: it prints the plan, checks the deadline arithmetic, collects the
``-m gpu`` tests and the sanitizer's named tests, and parses the benchmarks' arguments.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
WORK_DIR = ROOT / "build" / "gpu_check"   # caches, per-step logs, the build stamp (ignored by git)
DEFAULT_OUT = ROOT / "benchmarks" / "scratch" / "gpu_check"
DEADLINE_S = {"full": 540.0, "quick": 240.0}
RESERVE_S = 10.0            # kept back for the summary
LOG_LIMIT = 2 << 20         # bytes of one step's output kept in gpu_check.log (its head and tail)
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

# compute-sanitizer's subset: one or two tests per CUDA kernel family, small shapes, every code
# path that matters (vector and scalar channels, strided inputs, every filter size, up-sampling,
# stride 2, the reductions). The ids are checked by the dry run, in CI.
MEMCHECK_TESTS = (
    "tests/test_cuda_bn_swish_kernels.py::test_kernels_match_the_formulas[cuda-3x96x4x4-channels_last-bfloat16]",
    "tests/test_cuda_bn_swish_kernels.py::test_kernels_match_the_formulas[cuda-1x3x17x33-strided-float16]",
    "tests/test_cuda_dwconv_stage.py::test_matches_reference[cuda-k3-s1-up-2x33x9x10-bfloat16]",
    "tests/test_cuda_dwconv_stage.py::test_matches_reference[cuda-k5-s2-3x33x35x40-float16]",
    "tests/test_cuda_dwconv_stage.py::test_matches_reference[cuda-k7-s1-3x3x5x7-float32]",
    "tests/test_cuda_dwconv_stage.py::test_matches_reference[cuda-k11-s1-3x20x17x40-float32]",
    "tests/test_cuda_dwconv_stage.py::test_all_dtypes_vector_and_scalar_channels[cuda-1-False-dtype1]",
    "tests/test_cuda_dwconv_stage.py::test_fused_contract_matches_its_reference[cuda-k3-up-bf16-params-bf16]",
    "tests/test_cuda_dwconv_stage.py::test_fused_contract_matches_its_reference[cuda-k11-bf16]",
    "tests/test_cuda_normal_kl.py::test_normal_kl_matches_reference[cuda-3x20x5x7-channels_last_chunk-bfloat16-True-True]",
    "tests/test_cuda_normal_kl.py::test_normal_kl_matches_reference[cuda-1x1x1x1-nchw_chunk-bfloat16-False-True]",
    "tests/test_cuda_normal_kl.py::test_reductions_are_deterministic[cuda]",
)
RACECHECK_TESTS = (   # shared memory: the block reductions and the depthwise halo tiles
    "tests/test_cuda_bn_swish_kernels.py::test_kernels_match_the_formulas[cuda-3x96x4x4-channels_last-bfloat16]",
    "tests/test_cuda_dwconv_stage.py::test_matches_reference[cuda-k5-s2-3x33x35x40-float16]",
    "tests/test_cuda_dwconv_stage.py::test_matches_reference[cuda-k11-s1-3x20x17x40-float32]",
    "tests/test_cuda_dwconv_stage.py::test_fused_contract_matches_its_reference[cuda-k7-s2-fp16]",
    "tests/test_cuda_normal_kl.py::test_reductions_are_deterministic[cuda]",
)
# --quick: the CUDA kernels' own tests, the KL, the fused model, the extension.
QUICK_TEST_PATHS = ("tests/test_extension.py", "tests/test_cuda_bn_swish_kernels.py", "tests/test_cuda_dwconv_stage.py",
                    "tests/test_cuda_normal_kl.py", "tests/test_normal_kl.py", "tests/test_model_fused.py")
# The sources nvae_fast._C is built from: the build step is skipped when they and the
# architecture are those of the last build on this machine.
EXTENSION_SOURCES = ("csrc", "CMakeLists.txt", "setup.py", "pyproject.toml")


# ---------------------------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Step:
    """One step: a command (or several, run in turn) with a time budget in seconds."""

    name: str
    budget_s: float
    what: str
    commands: tuple[tuple[str, ...], ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    out_json: str | None = None   # the benchmark JSON it writes into the output directory
    row_margin_s: float = 0.0     # a benchmark starts no row this close to its cap (its --time-limit)


@dataclass(frozen=True)
class Phase:
    """Steps run side by side in lanes (each lane in order); the phase lasts as long as its
    longest lane."""

    name: str
    lanes: tuple[tuple[Step, ...], ...]

    @property
    def budget_s(self) -> float:
        return max(sum(s.budget_s for s in lane) for lane in self.lanes)

    def steps(self) -> list[Step]:
        return [s for lane in self.lanes for s in lane]


@dataclass
class Settings:
    """What the plan depends on; the environment step fills in the machine's values."""

    python: str = sys.executable
    out: Path = DEFAULT_OUT
    quick: bool = False
    arch: str = "<sm>"       # CUDA architecture for the build, e.g. "90"
    cpus: int = os.cpu_count() or 1
    xdist: bool = True       # pytest-xdist present
    timeout_plugin: bool = True
    sanitizer: str = "compute-sanitizer"
    cuda_home: str | None = None   # the toolkit found, when nvcc is not on PATH

    @property
    def workers(self) -> int:
        return max(1, min(self.cpus - 1, 16))   # a core left for the sanitizer beside the tests


def _pytest(s: Settings, *args: str, parallel: bool = True, per_test_timeout: int = 180) -> tuple[str, ...]:
    # A test module that cannot be imported (a missing optional package) is reported, not fatal.
    cmd = [s.python, "-m", "pytest", "-q", "-ra", "-p", "no:cacheprovider", "--continue-on-collection-errors"]
    if parallel and s.xdist and s.workers > 1:
        cmd += ["-n", str(s.workers), "--dist", "load"]
    if s.timeout_plugin:
        cmd += ["--timeout", str(per_test_timeout)]
    return (*cmd, *args)


def _sanitizer(s: Settings, tool: str, tests: Sequence[str]) -> tuple[str, ...]:
    # Only our kernels (namespace nvae) are instrumented; PyTorch's and Triton's run as usual.
    # CUDA API errors are left out: PyTorch and the extension probe the driver on purpose.
    return (s.sanitizer, "--tool", tool, "--kernel-name", "kns=nvae", "--report-api-errors", "no",
            "--error-exitcode", "86", "--print-limit", "20", *_pytest(s, *tests, parallel=False, per_test_timeout=600))


def plan(s: Settings, steps: Sequence[str] | None = None) -> list[Phase]:
    """The phases of a run in ``s``'s mode, keeping only the ``steps`` named (default: all but
    cpu-tests)."""
    quick = s.quick
    caches = (("TRITON_CACHE_DIR", str(WORK_DIR / "triton-cache")),
              ("TORCHINDUCTOR_CACHE_DIR", str(WORK_DIR / "inductor-cache")))
    tests_env = (*caches, ("NVAE_FAST_EXPECT_EXT", "1"), ("OMP_NUM_THREADS", "1"))
    cells = ("--presets", "cifar10", "--dtypes", "bf16", "--cells", "dec_e6,kl" if quick else "dec_e6,dec_e3,kl")
    reps = ("--quick",) if quick else ("--reps", "30", "--warmup", "5")
    model_args = (("--quick", "--impls", "eager,triton") if quick else
                  ("--impls", "eager,triton,cuda", "--reps", "10", "--warmup", "3"))
    margin = 15.0 if quick else 40.0   # about one row: its first call compiles its kernels
    all_phases = [
        Phase("environment", ((Step("environment", 10 if quick else 15,
                                    "GPU, driver, toolkit, library versions and the commit"),),)),
        Phase("build", ((Step(
            "build", 80 if quick else 100,
            f"nvae_fast._C for sm_{s.arch} only (Ninja), offline editable install; a failed build is an error",
            ((s.python, "-m", "pip", "install", "-v", "--no-build-isolation", "--no-deps", "--no-index", "-e", "."),
             (s.python, "-c", "from nvae_fast import _ext; r = _ext.unavailable_reason(); "
                              "print('nvae_fast._C:', r or 'loaded, sees the GPU'); raise SystemExit(r is not None)")),
            (("NVAE_FAST_BUILD_CUDA", "1"), ("NVAE_FAST_CUDA_ARCHS", s.arch), ("NVAE_FAST_BUILD_JOBS", str(s.cpus)))),),)),
        Phase("tests", (
            (Step("gpu-tests", 70 if quick else 190,
                  "pytest -m gpu" + (" on the CUDA kernels, the KL and the fused model" if quick else ", every GPU test")
                  + f", {s.workers} workers, Triton cache",
                  (_pytest(s, "-m", "gpu", *(QUICK_TEST_PATHS if quick else ("tests",))),), tests_env),),
            (Step("memcheck", 60 if quick else 80,
                  f"compute-sanitizer memcheck, {len(MEMCHECK_TESTS[:4] if quick else MEMCHECK_TESTS)} CUDA kernel tests",
                  (_sanitizer(s, "memcheck", MEMCHECK_TESTS[:4] if quick else MEMCHECK_TESTS),),
                  (*tests_env, ("PYTORCH_NO_CUDA_MEMORY_CACHING", "1"))),
             *(() if quick else (Step("racecheck", 100, f"compute-sanitizer racecheck, {len(RACECHECK_TESTS)} tests",
                                      (_sanitizer(s, "racecheck", RACECHECK_TESTS),), tests_env),))),
        )),
        Phase("benchmarks", ((
            Step("bench-cells", 35 if quick else 60,
                 "cell_bench: cifar10 " + ("decoder cell and KL" if quick else "decoder and post-processing cells, KL")
                 + ", bf16, eager/triton/cuda",
                 ((s.python, "benchmarks/cell_bench.py", *cells, "--impls", "eager,triton,cuda", *reps,
                   "--time-limit", "<time-limit>", "--out", str(s.out / "cell_bench.json")),), caches,
                 "cell_bench.json", margin),
            Step("bench-model", 35 if quick else 60,
                 "model_bench: one cifar10 training step at batch 32, bf16, eager against the fused backends",
                 ((s.python, "benchmarks/model_bench.py", "--presets", "cifar10", "--batch", "32", "--dtypes", "bf16",
                   "--sample-batch", "0", *model_args, "--time-limit", "<time-limit>",
                   "--out", str(s.out / "model_bench.json")),), caches, "model_bench.json", margin),
            *(() if quick else (Step(
                "bench-compile", 100, "cell_bench: the same cells and KL under torch.compile (and eager, for the speedup)",
                ((s.python, "benchmarks/cell_bench.py", *cells, "--impls", "eager,compile", *reps,
                  "--time-limit", "<time-limit>", "--out", str(s.out / "cell_bench_compile.json")),), caches,
                "cell_bench_compile.json", margin),)),
        ),)),
        Phase("cpu-tests", ((Step("cpu-tests", 240, "pytest -m 'not gpu': the CPU tests with the GPU present",
                                  (_pytest(s, "-m", "not gpu", "tests"),), tests_env),),)),
    ]
    names = [st.name for ph in all_phases for st in ph.steps()]
    wanted = [n for n in names if n != "cpu-tests"] if steps is None else list(steps)
    unknown = [n for n in wanted if n not in names]
    if unknown:
        raise ValueError(f"unknown step(s) {', '.join(unknown)}; the steps are {', '.join(names)}")
    phases = []
    for ph in all_phases:
        lanes = tuple(tuple(st for st in lane if st.name in wanted) for lane in ph.lanes)
        lanes = tuple(lane for lane in lanes if lane)
        if lanes:
            phases.append(Phase(ph.name, lanes))
    return phases


def check_deadline(phases: Sequence[Phase], deadline_s: float) -> list[str]:
    """Problems with the plan's time arithmetic (empty: it fits)."""
    problems = [f"step {st.name} has a non-positive budget" for ph in phases for st in ph.steps() if st.budget_s <= 0]
    need = sum(ph.budget_s for ph in phases) + RESERVE_S
    if need > deadline_s:
        problems.append(f"the plan needs {need:.0f} s (phases {' + '.join(f'{ph.budget_s:.0f}' for ph in phases)} + "
                        f"{RESERVE_S:.0f} s for the summary) but the deadline is {deadline_s:.0f} s")
    for ph in phases:
        for st in ph.steps():
            if st.out_json and st.budget_s <= st.row_margin_s:
                problems.append(f"step {st.name}: budget {st.budget_s:.0f} s leaves no time before its "
                                f"{st.row_margin_s:.0f} s row margin")
    return problems


class Clock:
    """The run's deadline: how long each step may take, so that the steps after it keep their budgets."""

    def __init__(self, phases: Sequence[Phase], deadline_s: float, now: Callable[[], float] = time.monotonic) -> None:
        self.phases, self.deadline_s, self.now = list(phases), deadline_s, now
        self.start = now()

    def elapsed(self) -> float:
        return self.now() - self.start

    def phase_end(self, index: int) -> float:
        """Elapsed seconds by which phase ``index`` must end: the deadline less the summary's
        reserve and the budgets of the phases after it."""
        return self.deadline_s - RESERVE_S - sum(ph.budget_s for ph in self.phases[index + 1:])

    def step_cap(self, index: int, lane: Sequence[Step], position: int) -> float:
        """Seconds step ``lane[position]`` of phase ``index`` may run from now: until the phase's end
        less the budgets of the steps after it in its lane (at least its own budget when the run
        is on time, more when earlier steps left time unused)."""
        later = sum(st.budget_s for st in lane[position + 1:])
        return max(0.0, self.phase_end(index) - later - self.elapsed())


# ---------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------

@dataclass
class StepResult:
    name: str
    status: str = "not run"    # passed | failed | timed out | skipped | not run
    seconds: float = 0.0
    budget_s: float = 0.0
    cap_s: float = 0.0
    detail: str = ""
    failures: list[str] = field(default_factory=list)


class Run:
    """One execution of the plan: the log, the console lines, the results."""

    def __init__(self, s: Settings, phases: list[Phase], deadline_s: float, rebuild: bool) -> None:
        self.s, self.phases, self.rebuild = s, phases, rebuild
        self.clock = Clock(phases, deadline_s)
        self.deadline_s = deadline_s
        self.results: dict[str, StepResult] = {}
        self.environment: dict[str, Any] = {}
        self.lock = threading.Lock()
        s.out.mkdir(parents=True, exist_ok=True)
        (WORK_DIR / "logs").mkdir(parents=True, exist_ok=True)
        self.log_path = s.out / "gpu_check.log"
        self.log_path.write_text("")

    def say(self, text: str) -> None:
        line = f"[{self.clock.elapsed():4.0f}s/{self.deadline_s:.0f}s] {text}"
        with self.lock:
            print(line, flush=True)
            with self.log_path.open("a") as log:
                log.write(line + "\n")

    def _append_log(self, name: str, path: Path) -> None:
        text = path.read_text(errors="replace")
        if len(text) > LOG_LIMIT:   # the output directory's files must stay small
            text = (text[:LOG_LIMIT // 8] + f"\n[gpu_check] ... {len(text) - LOG_LIMIT} characters left out, "
                    f"all of them in {path} ...\n" + text[-(LOG_LIMIT - LOG_LIMIT // 8):])
        with self.lock, self.log_path.open("a") as log:
            log.write(f"\n===== {name} =====\n{text}===== end of {name} =====\n\n")

    def execute(self) -> int:
        self.say(f"GPU check ({'quick' if self.s.quick else 'full'}): deadline {self.deadline_s:.0f} s, "
                 f"output in {self.s.out}")
        for index in range(len(self.phases)):
            phase = self.phases[index]
            threads = [threading.Thread(target=self._run_lane, args=(index, lane)) for lane in phase.lanes]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            if phase.name == "environment":
                if self.results["environment"].status != "passed":
                    break   # no GPU, or no torch: nothing after this can run
                # The commands depend on what was found (architecture, plugins): plan again, same budgets.
                self.phases = plan(self.s, [st.name for ph in self.phases for st in ph.steps()])
                self.clock.phases = self.phases
        return self.finish()

    def _run_lane(self, index: int, lane: Sequence[Step]) -> None:
        for position, step in enumerate(lane):
            cap = self.clock.step_cap(index, lane, position)
            result = StepResult(step.name, budget_s=step.budget_s, cap_s=cap)
            self.results[step.name] = result
            if cap < 1.0:
                result.status, result.detail = "timed out", "no time left before the deadline"
                self.say(f"{step.name}: not started, no time left before the deadline")
                continue
            self.say(f"{step.name}: start (budget {step.budget_s:.0f} s, may take {cap:.0f} s) - {step.what}")
            start = time.monotonic()
            try:
                runner = getattr(self, "_step_" + step.name.replace("-", "_"), None)
                (runner or self._step_commands)(step, cap, result)
            except Exception as err:   # the check's own failure is a failed step, never a lost summary
                result.status, result.detail = "failed", f"{type(err).__name__}: {err}"
            result.seconds = time.monotonic() - start
            self.say(f"{step.name}: {result.status} in {result.seconds:.0f} s"
                     + (f" - {result.detail}" if result.detail else ""))
            for line in result.failures[:20]:
                self.say(f"  {line}")

    def _spawn(self, step: Step, cap: float, result: StepResult, commands: Sequence[Sequence[str]] | None = None,
               extra_env: dict[str, str] | None = None) -> str:
        """Runs the step's commands in turn within ``cap`` seconds (killing the process group past
        it); sets result.status; returns their output."""
        env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "NVAE_FAST_EMULATE_CUDA")}
        env.update(dict(step.env))
        env.update(extra_env or {})
        # the Python's own bin (pip-installed ninja, cmake) and the toolkit's, ahead of the rest
        bins = [str(Path(self.s.python).parent)]
        if self.s.cuda_home and "CUDA_HOME" not in env:
            env["CUDA_HOME"] = self.s.cuda_home
            bins.append(str(Path(self.s.cuda_home) / "bin"))
        env["PATH"] = os.pathsep.join([*bins, env.get("PATH", "")])
        env["NVAE_FAST_GIT_COMMIT"] = self.environment.get("commit") or ""
        log_path = WORK_DIR / "logs" / f"{step.name}.log"
        end = time.monotonic() + cap
        result.status = "passed"
        with log_path.open("w") as log:
            for cmd in commands if commands is not None else step.commands:
                cmd = [c.replace("<time-limit>", f"{max(1.0, end - time.monotonic() - step.row_margin_s):.0f}")
                       for c in cmd]
                log.write("$ " + " ".join(cmd) + "\n")
                log.flush()
                proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
                if not self._wait(step.name, proc, end):
                    result.status = "timed out"
                    log.write(f"\n[gpu_check] killed after {cap:.0f} s\n")
                    break
                if proc.returncode != 0:
                    result.status = "failed"
                    result.detail = f"exit status {proc.returncode} of {Path(cmd[0]).name} {' '.join(cmd[1:3])}"
                    break
        self._append_log(step.name, log_path)
        output = log_path.read_text(errors="replace")
        if result.status != "passed":
            for line in output.splitlines()[-15:]:
                self.say(f"  | {line}")
        return output

    def _wait(self, name: str, proc: subprocess.Popen, end: float) -> bool:
        """Waits for ``proc`` until ``end`` (monotonic), saying every 30 s that it still runs;
        past ``end`` kills its process group and returns False."""
        while True:
            try:
                proc.wait(timeout=max(0.0, min(30.0, end - time.monotonic())))
                return True
            except subprocess.TimeoutExpired:
                if time.monotonic() >= end:
                    try:
                        os.killpg(proc.pid, 9)
                    except ProcessLookupError:
                        pass
                    proc.wait()
                    return False
                self.say(f"{name}: still running, {end - time.monotonic():.0f} s left")

    # --- steps -------------------------------------------------------------------------------

    def _step_commands(self, step: Step, cap: float, result: StepResult) -> None:
        if step.out_json:   # never report an earlier run's file
            (self.s.out / step.out_json).unlink(missing_ok=True)
        output = self._spawn(step, cap, result)
        if step.name in ("gpu-tests", "cpu-tests", "memcheck", "racecheck"):
            summary = pytest_summary(output)
            result.detail = summary + (f"; {result.detail}" if result.detail and result.status != "passed" else "")
            result.failures = [line for line in output.splitlines() if line.startswith(("FAILED ", "ERROR "))]
            unmarked = sorted(set(re.findall(r"(\S+::\S+) allocates CUDA memory but is not marked gpu", output)))
            if unmarked:   # tests/conftest.py's warning: they ran on the GPU, but -m gpu leaves them out
                result.detail += f"; {len(unmarked)} unmarked tests used the GPU"
                result.failures += [f"unmarked GPU use: {t}" for t in unmarked]
            if step.name in ("memcheck", "racecheck"):
                errors = re.findall(r"ERROR SUMMARY: (\d+) error", output)
                hazards = re.findall(r"RACECHECK SUMMARY: (\d+) hazard", output)
                result.detail += "; " + ", ".join(
                    [f"{sum(map(int, errors))} sanitizer errors"] + ([f"{sum(map(int, hazards))} hazards"] if hazards
                                                                     else []))
        if step.out_json:
            self._check_bench_json(step, result)

    def _check_bench_json(self, step: Step, result: StepResult) -> None:
        path = self.s.out / step.out_json
        png = path.with_suffix(".png")
        if png.is_file():   # the output directory keeps to a few files: the charts go to the work directory
            (WORK_DIR / "plots").mkdir(parents=True, exist_ok=True)
            png.replace(WORK_DIR / "plots" / png.name)
        if not path.is_file():
            result.status, result.detail = "failed", f"{step.out_json} was not written; {result.detail}"
            return
        payload = json.loads(path.read_text())
        rows = payload.get("results", [])
        counts: dict[str, int] = {}
        for r in rows:
            key = r["status"].split(":")[0].split(",")[0]
            counts[key] = counts.get(key, 0) + 1
        result.detail = ", ".join(f"{n} {k}" for k, n in counts.items()) + (
            "" if payload.get("finished") else ", interrupted") + (f"; {result.detail}" if result.detail else "")
        result.failures = [f"{r['impl']} {r.get('kind', r.get('preset'))} {r.get('shape', '')}: {r['status']}"
                           for r in rows if r["status"].startswith(("failed", "not run"))]
        if result.status == "passed" and (counts.get("failed") or counts.get("not run") or not payload.get("finished")):
            result.status = "failed"

    def _step_environment(self, step: Step, cap: float, result: StepResult) -> None:
        env = probe_environment(self.s.python, timeout=max(5.0, cap - 2))
        self.environment = env
        with self.lock, self.log_path.open("a") as log:
            log.write(json.dumps(env, indent=1) + "\n")
        gpu = env.get("torch", {})
        if not gpu.get("cuda_available"):
            result.status = "failed"
            result.detail = (f"PyTorch sees no GPU ({gpu.get('error') or 'torch.cuda.is_available() is False'}); "
                             "without one, --dry-run checks the plan")
            return
        self.s.arch = gpu["arch"]
        modules = env.get("modules", {})
        self.s.xdist = bool(modules.get("xdist"))
        self.s.timeout_plugin = bool(modules.get("pytest_timeout"))
        self.s.sanitizer = env["tools"].get("compute-sanitizer", {}).get("path") or "compute-sanitizer"
        nvcc = env["tools"].get("nvcc", {}).get("path")
        if nvcc and shutil.which("nvcc") is None:
            self.s.cuda_home = str(Path(nvcc).parent.parent)
        # what the check's steps use, then the package's own dependencies the tests import
        missing = [m for m in ("xdist", "pytest_timeout", "setuptools", "numpy", "tqdm", "PIL", "safetensors",
                               "tensorboard", "sklearn", "matplotlib") if not modules.get(m)]
        missing += [t for t in ("nvcc", "cmake", "ninja", "compute-sanitizer") if not env["tools"].get(t, {}).get("path")]
        result.status = "passed"
        result.detail = (f"{gpu['device']} (sm_{gpu['arch']}, {gpu['sm_count']} SMs), torch {gpu['version']}, "
                         f"triton {modules.get('triton') or '-'}, {env['cpus']} CPUs, commit {env['commit'] or '?'}")
        if missing:
            result.detail += f"; missing: {', '.join(missing)}"

    def _step_build(self, step: Step, cap: float, result: StepResult) -> None:
        stamp_path, stamp = WORK_DIR / "extension_stamp.json", extension_stamp(self.s.arch, self.s.python)
        if not self.rebuild and stamp_path.is_file() and json.loads(stamp_path.read_text()) == stamp:
            verify = (step.commands[-1],)
            self._spawn(step, cap, result, verify)
            if result.status == "passed":
                result.status, result.detail = "skipped", f"sm_{self.s.arch} build of these sources already installed"
                return
        stamp_path.unlink(missing_ok=True)
        output = self._spawn(step, cap, result)
        built = re.search(r"built nvae_fast\._C in (\d+) s", output)
        result.detail = (f"sm_{self.s.arch}" + (f", compiled in {built.group(1)} s" if built else "")
                         + (f"; {result.detail}" if result.detail else ""))
        if result.status == "passed":
            stamp_path.write_text(json.dumps(stamp))

    def finish(self) -> int:
        """Writes gpu_check.json and summary.md; the exit status."""
        for ph in self.phases:
            for st in ph.steps():
                self.results.setdefault(st.name, StepResult(st.name, budget_s=st.budget_s))
        ok = all(r.status in ("passed", "skipped") for r in self.results.values())
        no_gpu = self.results.get("environment") is not None and self.results["environment"].status == "failed"
        report = {
            "gpu_check": "quick" if self.s.quick else "full", "ok": ok, "deadline_s": self.deadline_s,
            "elapsed_s": round(self.clock.elapsed(), 1), "environment": self.environment,
            "plan": plan_json(self.phases), "steps": [asdict(r) for r in self.results.values()],
        }
        (self.s.out / "gpu_check.json").write_text(json.dumps(report, indent=1))
        summary = render_summary(report, self.s.out)
        (self.s.out / "summary.md").write_text(summary)
        with self.lock, self.log_path.open("a") as log:
            log.write("\n" + summary)
        print("\n" + summary, flush=True)
        self.say(f"{'all steps passed' if ok else 'FAILED'}; files in {self.s.out}")
        return EXIT_OK if ok else EXIT_USAGE if no_gpu else EXIT_FAILED


# ---------------------------------------------------------------------------------------------
# Environment, stamps, summaries
# ---------------------------------------------------------------------------------------------

_PROBE = r"""
import importlib, importlib.util, json, os, sys
info = {"python": sys.version.split()[0], "executable": sys.executable, "cpus": os.cpu_count(), "modules": {}}
for name in ("triton", "pytest", "xdist", "pytest_timeout", "setuptools", "wheel", "pybind11", "ninja", "cmake",
             "numpy", "tqdm", "PIL", "sklearn", "tensorboard", "safetensors", "matplotlib", "lmdb"):
    if importlib.util.find_spec(name) is None:
        info["modules"][name] = None
        continue
    try:
        info["modules"][name] = getattr(importlib.import_module(name), "__version__", "present")
    except Exception as err:
        info["modules"][name] = f"broken: {err}"
try:
    import torch
    t = {"version": torch.__version__, "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available()}
    if t["cuda_available"]:
        p = torch.cuda.get_device_properties(0)
        t.update(device=p.name, arch=f"{p.major}{p.minor}", sm_count=p.multi_processor_count,
                 memory_GiB=round(p.total_memory / 2**30, 1), device_count=torch.cuda.device_count())
except Exception as err:
    t = {"cuda_available": False, "error": f"{type(err).__name__}: {err}"}
info["torch"] = t
print(json.dumps(info))
"""


def _tool_output(cmd: Sequence[str], timeout: float) -> str | None:
    """A tool's answer (its last three non-empty lines, joined), or None if it did not run."""
    try:
        out = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = [line.strip() for line in (out.stdout + out.stderr).splitlines() if line.strip()]
    return " / ".join(lines[-3:]) or None


def git_commit() -> str | None:
    """HEAD (with -dirty for local changes), or NVAE_FAST_GIT_COMMIT where the tree has no .git."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                               text=True, timeout=10).stdout.strip()
        return head + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("NVAE_FAST_GIT_COMMIT") or None


def source_digest(paths: Sequence[str] = ("nvae_fast", "csrc", "tests", "benchmarks", "CMakeLists.txt", "setup.py",
                                          "pyproject.toml")) -> str:
    """sha256 over the project's source files (names and contents): identifies the tree a run
    checked when there is no git metadata beside it."""
    digest = hashlib.sha256()
    for path in paths:
        base = ROOT / path
        files = [base] if base.is_file() else sorted(p for p in base.rglob("*") if p.is_file()
                                                    and p.suffix in (".py", ".cu", ".cuh", ".h", ".cpp", ".txt", ".toml",
                                                                     ".sh", ".json", ".md")
                                                    and "scratch" not in p.parts and "__pycache__" not in p.parts)
        for f in files:
            digest.update(str(f.relative_to(ROOT)).encode() + b"\0" + f.read_bytes() + b"\0")
    return digest.hexdigest()


def extension_stamp(arch: str, python: str) -> dict[str, str]:
    return {"arch": arch, "python": python, "sources": source_digest(EXTENSION_SOURCES)}


def probe_environment(python: str, timeout: float = 15.0) -> dict[str, Any]:
    """Versions of everything the check uses, from the Python that runs it."""
    try:
        out = subprocess.run([python, "-c", _PROBE], capture_output=True, text=True, timeout=timeout, cwd=ROOT)
        info = json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else {
            "torch": {"cuda_available": False, "error": out.stderr.strip()[-500:]}}
    except (OSError, subprocess.SubprocessError, json.JSONDecodeError, IndexError) as err:
        info = {"torch": {"cuda_available": False, "error": f"{type(err).__name__}: {err}"}}
    info.setdefault("cpus", os.cpu_count())
    info.setdefault("modules", {})
    tools = {}
    for tool, cmd in (("nvidia-smi", ["nvidia-smi", "--query-gpu=name,compute_cap,driver_version,memory.total,"
                                      "clocks.max.sm,power.limit", "--format=csv,noheader"]),
                      ("nvcc", ["nvcc", "--version"]), ("cmake", ["cmake", "--version"]),
                      ("ninja", ["ninja", "--version"]), ("compute-sanitizer", ["compute-sanitizer", "--version"]),
                      ("git", ["git", "--version"])):
        path = shutil.which(cmd[0])
        if path is None and tool in ("nvcc", "compute-sanitizer"):
            for home in filter(None, (os.environ.get("CUDA_HOME"), "/usr/local/cuda")):
                candidate = Path(home) / "bin" / cmd[0]
                if candidate.is_file():
                    path = str(candidate)
                    break
        tools[tool] = {"path": path, "version": _tool_output([path, *cmd[1:]], 10) if path else None}
    info["tools"] = tools
    info["commit"] = git_commit()
    info["source_sha256"] = source_digest()
    info["time_utc"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return info


def pytest_summary(output: str) -> str:
    """pytest's closing counts ("412 passed, 3 skipped in 98.2s"), or what went wrong."""
    for line in reversed(output.splitlines()):
        text = line.strip("= ").strip()
        if re.search(r"\d+ (passed|failed|error|errors|skipped|deselected)\b", text) or "no tests ran" in text:
            return text
    return "no pytest summary in the output"


def plan_json(phases: Sequence[Phase]) -> list[dict[str, Any]]:
    return [{"phase": ph.name, "budget_s": ph.budget_s,
             "lanes": [[{"step": st.name, "budget_s": st.budget_s, "what": st.what,
                         "commands": [list(c) for c in st.commands], "env": dict(st.env)} for st in lane]
                       for lane in ph.lanes]} for ph in phases]


def _bench_tables(out: Path) -> list[str]:
    lines: list[str] = []
    cell_rows = []
    for name in ("cell_bench.json", "cell_bench_compile.json"):
        if (out / name).is_file():
            cell_rows += [r for r in json.loads((out / name).read_text()).get("results", []) if r.get("fwd_bwd_ms")
                          and (name == "cell_bench.json" or r["impl"] != "eager")]
    if cell_rows:
        rows = sorted(cell_rows, key=lambda r: (r["kind"], r["cell_type"], r["shape"]))
        if rows:
            lines += ["", "cells (cifar10 shapes, forward+backward, median ms; speedup over eager):", "",
                      "| workload | cell | shape | dtype | impl | ms | speedup | % of HBM floor |",
                      "| --- | --- | --- | --- | --- | --- | --- | --- |"]
            lines += [f"| {r['kind']} | {r['cell_type']} | {r['shape']} | {r['dtype']} | {r['impl']} | "
                      f"{r['fwd_bwd_ms']:.3g} | {r.get('speedup', float('nan')):.2f} | "
                      f"{r.get('pct_floor_fwd_bwd', float('nan')):.0f} |" for r in rows]
    model = out / "model_bench.json"
    if model.is_file():
        rows = [r for r in json.loads(model.read_text()).get("results", []) if r.get("step_ms")]
        if rows:
            lines += ["", "training step (model_bench, median ms):", "",
                      "| preset | batch | dtype | impl | step ms | speedup | peak MiB |", "| --- | --- | --- | --- | --- | --- | --- |"]
            lines += [f"| {r['preset']} | {r['batch']} | {r['dtype']} | {r['impl']} | {r['step_ms']:.3g} | "
                      f"{r.get('speedup', float('nan')):.2f} | {r.get('peak_mem_MB') or float('nan'):.0f} |" for r in rows]
    return lines


def render_summary(report: dict[str, Any], out: Path) -> str:
    env = report.get("environment") or {}
    gpu = env.get("torch", {})
    lines = [f"# GPU check ({report['gpu_check']}): {'passed' if report['ok'] else 'FAILED'}", "",
             f"{gpu.get('device', 'no GPU')}, torch {gpu.get('version', '?')}, commit {env.get('commit') or '?'}, "
             f"{report['elapsed_s']:.0f} s of {report['deadline_s']:.0f} s", "",
             "| step | status | seconds | budget | detail |", "| --- | --- | --- | --- | --- |"]
    for r in report["steps"]:
        lines.append(f"| {r['name']} | {r['status']} | {r['seconds']:.0f} | {r['budget_s']:.0f} | "
                     f"{r['detail'].replace('|', '/')} |")
    for r in report["steps"]:
        if r["failures"]:
            lines += ["", f"{r['name']}:"] + [f"- {f}" for f in r["failures"][:30]]
    lines += _bench_tables(out)
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# Dry run
# ---------------------------------------------------------------------------------------------

def dry_run(s: Settings, phases: list[Phase], deadline_s: float) -> int:
    """Prints the plan and checks what can be checked without a GPU; 0 if all is well."""
    print(f"GPU check plan ({'quick' if s.quick else 'full'}), deadline {deadline_s:.0f} s:")
    for ph in phases:
        print(f"  phase {ph.name}: {ph.budget_s:.0f} s" + (" (lanes side by side)" if len(ph.lanes) > 1 else ""))
        for lane in ph.lanes:
            for st in lane:
                print(f"    {st.name:12s} {st.budget_s:5.0f} s  {st.what}")
                for cmd in st.commands:
                    print("        $ " + " ".join(cmd))
    total = sum(ph.budget_s for ph in phases)
    print(f"  total {total:.0f} s + {RESERVE_S:.0f} s reserve = {total + RESERVE_S:.0f} s of {deadline_s:.0f} s")
    problems = check_deadline(phases, deadline_s)
    names = {st.name for ph in phases for st in ph.steps()}
    if names & {"gpu-tests", "memcheck", "racecheck", "cpu-tests"}:
        problems += _check_test_selection(s, names)
    problems += _check_bench_arguments(s, [st for ph in phases for st in ph.steps() if st.out_json])
    for p in problems:
        print(f"PROBLEM: {p}")
    print("dry run: " + ("the plan is consistent" if not problems else f"{len(problems)} problem(s)"))
    if s.out:
        s.out.mkdir(parents=True, exist_ok=True)
        (s.out / "gpu_check.json").write_text(json.dumps(
            {"gpu_check": "dry run", "quick": s.quick, "deadline_s": deadline_s, "problems": problems,
             "plan": plan_json(phases)}, indent=1))
    return EXIT_OK if not problems else EXIT_FAILED


def _collect(s: Settings, *args: str) -> tuple[set[str], str]:
    env = {k: v for k, v in os.environ.items() if k != "NVAE_FAST_EMULATE_CUDA"}
    out = subprocess.run([s.python, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *args], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=600)
    ids = {line.strip() for line in out.stdout.splitlines() if "::" in line}
    return ids, "" if out.returncode == 0 else (out.stdout + out.stderr).strip()[-2000:]


def _check_test_selection(s: Settings, names: set[str]) -> list[str]:
    gpu, error = _collect(s, "-m", "gpu", "tests")
    if error:
        return [f"`pytest --collect-only -m gpu tests` failed:\n{error}"]
    problems = [] if gpu else ["`-m gpu` selects no test"]
    print(f"  -m gpu selects {len(gpu)} tests")
    named = set(MEMCHECK_TESTS) | set(RACECHECK_TESTS)
    problems += [f"sanitizer test {t} is not a test marked gpu" for t in sorted(named - gpu)]
    missing = [p for p in QUICK_TEST_PATHS if not (ROOT / p).is_file()]
    problems += [f"--quick test file {p} does not exist" for p in missing]
    return problems


_ARGS_CHECK = """
import importlib, json, sys
sys.path.insert(0, "benchmarks")
for step, script, args in json.loads(sys.argv[1]):
    try:
        importlib.import_module(script).parse_args(args)
    except SystemExit:
        print(f"step {step}: {script} refuses its arguments {' '.join(args)}", flush=True)
"""


def _check_bench_arguments(s: Settings, steps: Sequence[Step]) -> list[str]:
    """Problems with the benchmark steps' arguments, parsed by the benchmarks themselves (one process)."""
    calls = [(st.name, Path(cmd[1]).stem, [c.replace("<time-limit>", "60") for c in cmd[2:]])
             for st in steps for cmd in st.commands]
    if not calls:
        return []
    out = subprocess.run([s.python, "-c", _ARGS_CHECK, json.dumps(calls)], cwd=ROOT, capture_output=True, text=True,
                         timeout=600)
    problems = [line for line in out.stdout.splitlines() if line.startswith("step ")]
    if out.returncode != 0:
        problems.append(f"checking the benchmarks' arguments failed: {out.stderr.strip()[-600:]}")
    for line in out.stderr.splitlines():
        if "error:" in line:   # argparse's reason
            problems.append(line.strip())
    return problems


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output directory (default: {DEFAULT_OUT})")
    parser.add_argument("--quick", action="store_true", help=f"the short plan ({DEADLINE_S['quick']:.0f} s)")
    parser.add_argument("--deadline", type=float, help="seconds the whole run may take (default: 540, --quick 240)")
    parser.add_argument("--steps", help="comma-separated steps to run (default: all but cpu-tests)")
    parser.add_argument("--dry-run", action="store_true", help="no GPU step: print the plan and check it")
    parser.add_argument("--list", action="store_true", help="print the steps and their budgets, then exit")
    parser.add_argument("--rebuild", action="store_true", help="build nvae_fast._C even if this build is installed")
    parser.add_argument("--commit", help="the commit checked, where the tree has no .git (recorded in every JSON)")
    args = parser.parse_args(argv)
    if args.deadline is not None and not args.deadline > 0:
        parser.error(f"--deadline must be positive, got {args.deadline}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.commit:
        os.environ["NVAE_FAST_GIT_COMMIT"] = args.commit
    s = Settings(out=args.out.resolve(), quick=args.quick)
    deadline = args.deadline or DEADLINE_S["quick" if args.quick else "full"]
    try:
        phases = plan(s, None if args.steps is None else [n for n in args.steps.split(",") if n])
    except ValueError as err:
        print(f"gpu_check: --steps: {err}", file=sys.stderr)
        return EXIT_USAGE
    if args.list:
        for ph in phases:
            for st in ph.steps():
                print(f"{st.name:12s} {st.budget_s:5.0f} s  {st.what}")
        return EXIT_OK
    if args.dry_run:
        return dry_run(s, phases, deadline)
    problems = check_deadline(phases, deadline)
    if problems:
        print("gpu_check: " + "; ".join(problems) + ("" if args.quick else " (--quick plans 240 s)"), file=sys.stderr)
        return EXIT_USAGE
    return Run(s, phases, deadline, args.rebuild).execute()


if __name__ == "__main__":
    sys.exit(main())
