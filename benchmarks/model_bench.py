"""Times whole-model NVAE training steps and sampling for the model presets, implementation by
implementation.

Training step (as the official train.py after KL warm-up): forward under autocast, the loss
(reconstruction + KL summed over groups + spectral and BatchNorm regularisers), backward, and an
Adamax step; timed in three phases (forward with the loss, backward, optimizer) with CUDA events.
Reported: median step time, samples/s, peak memory (everything allocated, parameters and optimizer
state included). ``--max-batch-presets`` also searches the largest batch a training step fits in
(doubling, then bisection, on the GPU) and times the step at that batch.

Sampling (as the official evaluate.py): eval mode, no gradients, ``model.sample(n, t)`` at
temperature 0.7 decoded to images; reported as images/s and peak memory.

Implementations (``--impls``): ``eager`` = ``nvae_fast.NVAE`` on the torch backend (the
official-equivalent reference), ``compile`` = ``torch.compile`` of that model (its ``sample``
method for sampling), ``triton`` / ``cuda`` = the same model with its fused ops on that backend
(the JSON records which backend every op ran).

    python benchmarks/model_bench.py                       # GPU: cifar10 b32, celeba_64 b16, celeba_256 b4 + max
    python benchmarks/model_bench.py --presets cifar10 --impls eager,triton --dtypes bf16
    python benchmarks/model_bench.py --quick               # smoke run (CPU: tiny_cifar10, eager only)
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402
from preset_shapes import PRESET_BATCH  # noqa: E402

import nvae_fast  # noqa: E402
from nvae_fast import NVAE, NVAEConfig, backend  # noqa: E402
from nvae_fast.distributions import reconstruction_loss  # noqa: E402

GPU_PRESETS = ("cifar10", "celeba_64", "celeba_256")
CPU_PRESETS = ("tiny_cifar10",)
DEFAULT_IMPLS = ("eager", "compile", "triton", "cuda")
PHASES = ("forward", "backward", "optimizer")
# The official train.py's Adamax settings (learning rate and weight decay of the README commands);
# the spectral-regulariser weight only scales a term, so any positive value costs the same.
LEARNING_RATE, WEIGHT_DECAY, ADAMAX_EPS, WEIGHT_DECAY_NORM = 1e-2, 3e-4, 1e-3, 1e-2
MAX_BATCH_LIMIT = 4096


def _images(config: NVAEConfig, batch: int, device: torch.device, memory_format: torch.memory_format
            ) -> torch.Tensor:
    x = torch.rand(batch, config.in_channels, config.image_size, config.image_size, device=device)
    return x.to(memory_format=memory_format)


class Trainer:
    """One model, its optimizer and the training step of one implementation."""

    def __init__(self, config: NVAEConfig, impl: str, dtype: torch.dtype, device: torch.device,
                 memory_format: torch.memory_format) -> None:
        torch.manual_seed(0)
        self.model = harness.official_layers(NVAE(config), impl).to(device).to(memory_format=memory_format).train()
        self.forward = harness.compiled(self.model, impl)
        self.optimizer = torch.optim.Adamax(self.model.parameters(), lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY,
                                            eps=ADAMAX_EPS)
        self.dtype, self.device = dtype, device

    def step(self, x: torch.Tensor, mark: Callable[[], None]) -> None:
        """One training step; ``mark()`` after the forward (with the loss), backward and optimizer."""
        model = self.model
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            logits, _, _, kl_all, _ = self.forward(x)
            recon = reconstruction_loss(model.decoder_output(logits), x, crop=model.crop_output)
            # after the KL warm-up the official loss is the plain sum over groups (no balancing)
            nelbo = recon + torch.stack(kl_all, dim=1).sum(dim=1)
            loss = nelbo.mean() + WEIGHT_DECAY_NORM * (model.spectral_norm_parallel() + model.batchnorm_loss())
        mark()
        loss.backward()
        mark()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        mark()


def _fits(config: NVAEConfig, impl: str, dtype: torch.dtype, device: torch.device,
          memory_format: torch.memory_format, batch: int) -> bool:
    """Whether two training steps at ``batch`` run without running out of GPU memory."""
    trainer = None
    try:
        trainer = Trainer(config, impl, dtype, device, memory_format)
        x = _images(config, batch, device, memory_format)
        with nvae_fast.use_backend(harness.forced_backend(impl)):
            for _ in range(2):  # the second step holds the optimizer state too
                trainer.step(x, lambda: None)
        torch.cuda.synchronize(device)
        return True
    except torch.OutOfMemoryError:
        return False
    finally:
        del trainer
        torch.cuda.empty_cache()


def largest_batch(config: NVAEConfig, impl: str, dtype: torch.dtype, device: torch.device,
                  memory_format: torch.memory_format, start: int) -> int:
    """The largest batch whose training step fits in GPU memory: doubling from ``start``, then bisection."""
    if not _fits(config, impl, dtype, device, memory_format, start):
        raise RuntimeError(f"even batch {start} does not fit")
    good, bad = start, None
    while bad is None:
        trial = 2 * good
        if trial > MAX_BATCH_LIMIT:
            return good
        if _fits(config, impl, dtype, device, memory_format, trial):
            good = trial
        else:
            bad = trial
    while bad - good > 1:
        mid = (good + bad) // 2
        good, bad = (mid, bad) if _fits(config, impl, dtype, device, memory_format, mid) else (good, mid)
    return good


def measure(config: NVAEConfig, preset: str, batch: int, impl: str, dtype: torch.dtype, device: torch.device,
            memory_format: torch.memory_format, reps: int, warmup: int, sample_batch: int | None,
            temperature: float) -> dict[str, Any]:
    """One row: the training step's phases, throughput and memory, then sampling. Never raises for
    the implementation's failure (the row says what failed)."""
    row: dict[str, Any] = {"preset": preset, "batch": batch, "dtype": str(dtype).removeprefix("torch."),
                           "impl": impl}
    forced = harness.forced_backend(impl)
    trainer = None
    try:
        trainer = Trainer(config, impl, dtype, device, memory_format)
        inputs = [_images(config, batch, device, memory_format)]
        with nvae_fast.use_backend(forced):
            with harness.record_dispatch() as chosen:  # the first step (and compilation) says what runs
                trainer.step(inputs[0], lambda: None)
            verdict = harness.dispatch_verdict(impl, chosen)
            if verdict is not None:
                row["status"] = verdict
                return row
            timings = harness.measure_phases(trainer.step, inputs, PHASES, warmup=warmup, reps=reps, device=device)
            peak = harness.peak_memory_bytes(lambda: trainer.step(inputs[0], lambda: None), device,
                                             above_current=False)
            if impl in harness.COMPILE_MODES:
                row["graph_breaks"] = harness.graph_breaks()
            if sample_batch is not None:
                row.update(_sampling(trainer.model, impl, dtype, device, sample_batch, temperature, reps, warmup))
        row["dispatch"] = dict(chosen)
    except Exception as err:  # a failing implementation is a result to report, not a reason to stop
        traceback.print_exc()
        row["status"] = f"failed: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        return row
    finally:
        del trainer
        if device.type == "cuda":
            torch.cuda.empty_cache()
    fallbacks = {op: name for op, name in chosen.items() if name != forced}
    row["status"] = "timed" if not fallbacks else "timed, partly on other backends: " + ", ".join(
        f"{op}->{name}" for op, name in sorted(fallbacks.items()))
    step = timings["total"].median_ms
    row.update({f"{phase}_ms": timings[phase].median_ms for phase in PHASES})
    row.update(step_ms=step, samples_per_s=batch / (step * 1e-3), peak_mem_MB=None if peak is None else peak / 2**20,
               times_ms={phase: t.times_ms for phase, t in timings.items()})
    return row


def _sampling(model: NVAE, impl: str, dtype: torch.dtype, device: torch.device, batch: int, temperature: float,
              reps: int, warmup: int) -> dict[str, Any]:
    """Images/s of prior sampling at ``temperature`` (eval mode, no gradients), decoded to images."""
    model.eval()
    sample = harness.compiled(model.sample, impl)

    def generate(_: Any) -> torch.Tensor:
        with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            output = model.decoder_output(sample(batch, temperature))
            return output.mean if isinstance(output, torch.distributions.Bernoulli) else output.sample()

    timing = harness.measure(generate, [None], warmup=warmup, reps=reps, device=device)
    peak = harness.peak_memory_bytes(lambda: generate(None), device, above_current=False)
    model.train()
    return {"sample_batch": batch, "sample_ms": timing.median_ms, "images_per_s": batch / (timing.median_ms * 1e-3),
            "sample_peak_mem_MB": None if peak is None else peak / 2**20, "sample_times_ms": timing.times_ms}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", type=harness.csv_choices(list(PRESET_BATCH)),
                        help=f"default: {','.join(GPU_PRESETS)} on a GPU, {','.join(CPU_PRESETS)} on a CPU")
    parser.add_argument("--batch", type=int, help="training batch for every preset (default: the README command's)")
    parser.add_argument("--max-batch-presets", type=harness.csv_choices(list(PRESET_BATCH)),
                        help="presets for which to search the largest training batch that fits (GPU only; "
                             "default: celeba_256 when it runs on a GPU)")
    parser.add_argument("--dtypes", type=harness.csv_choices(tuple(harness.DTYPES)), default=["bf16", "fp32"],
                        help="bf16: torch.autocast with fp32 parameters, as training does")
    parser.add_argument("--impls", type=harness.csv_choices(harness.IMPLS),
                        help=f"default: {','.join(DEFAULT_IMPLS)}; --quick leaves out torch.compile unless named")
    parser.add_argument("--memory-format", choices=["channels_last", "contiguous"], default="channels_last")
    parser.add_argument("--reps", type=int, default=20, help="timed repetitions (the median is reported)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--sample-batch", type=int, default=100,
                        help="images per sampling call (the official evaluate.py's 100); 0 skips sampling")
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: the first preset, 2 repetitions, 8 samples, no batch search, no compile")
    parser.add_argument("--out", type=Path, help="JSON path, PNG beside it (default: benchmarks/results/<gpu>/ for "
                                                  "full GPU runs, benchmarks/scratch/ otherwise)")
    harness.add_run_arguments(parser)
    args = parser.parse_args(argv)
    for name in ("batch", "reps"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name} must be positive")
    if args.warmup < 0 or args.sample_batch < 0 or not args.temperature > 0:
        parser.error("--warmup and --sample-batch must be >= 0 and --temperature > 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = harness.run_device(args.device)
    time_limit = harness.TimeLimit(args.time_limit)
    env = harness.environment(device)
    if device.type == "cpu":
        print("No CUDA device: CPU timings of a small model (tiny_cifar10 unless --presets is given); "
              "they say nothing about GPU performance.")
    presets = args.presets or list(GPU_PRESETS if device.type == "cuda" else CPU_PRESETS)
    if args.quick:
        presets = presets[:1]
    max_batch_presets = [] if args.quick or device.type != "cuda" else (
        args.max_batch_presets if args.max_batch_presets is not None else [p for p in presets if p == "celeba_256"])
    reps, warmup = (2, 1) if args.quick else (args.reps, args.warmup)
    sample_batch = None if args.sample_batch == 0 else (8 if args.quick else args.sample_batch)
    impls = args.impls or list(DEFAULT_IMPLS)
    memory_format = torch.channels_last if args.memory_format == "channels_last" else torch.contiguous_format
    json_path, png_path = harness.output_paths("model_bench", device, args.quick, args.out, "+".join(presets))
    rows: list[dict[str, Any]] = []
    payload = {
        "benchmark": "model_bench", "environment": env, "backends": backend.status(), "quick": args.quick,
        "reps": reps, "warmup": warmup, "memory_format": args.memory_format, "temperature": args.temperature,
        "presets": {p: {"batch": args.batch or PRESET_BATCH[p], "config": dataclasses.asdict(NVAEConfig.preset(p))}
                    for p in presets},
        "finished": False, "results": rows}

    for preset in presets:
        config = NVAEConfig.preset(preset)
        for dtype_name in args.dtypes:
            dtype = harness.DTYPES[dtype_name]
            for impl in impls:
                searches = ["preset", "largest"] if preset in max_batch_presets else ["preset"]
                for search in searches:
                    batch = args.batch or PRESET_BATCH[preset]
                    reason = harness.skip_reason(impl, device, requested=not args.quick or args.impls is not None)
                    reason = reason or time_limit.reason()
                    if reason is None and search == "largest" and impl in harness.COMPILE_MODES:
                        reason = "not searched: torch.compile recompiles for every batch size tried"
                    if reason is None and search == "largest":
                        try:
                            batch = largest_batch(config, impl, dtype, device, memory_format, batch)
                        except Exception as err:  # reported in the row, like any other failure
                            traceback.print_exc()
                            reason = f"failed: batch search: {type(err).__name__}: {err}"
                    if reason is not None:
                        rows.append({"preset": preset, "batch": batch, "batch_from": search,
                                     "dtype": str(dtype).removeprefix("torch."), "impl": impl, "status": reason})
                        continue
                    rows.append({"batch_from": search, **measure(config, preset, batch, impl, dtype, device,
                                                                 memory_format, reps, warmup, sample_batch,
                                                                 args.temperature)})
                    print(f"  {preset} batch {batch} ({search}) {dtype_name} {impl}: {rows[-1]['status']}", flush=True)
                    harness.write_json(json_path, payload)
    eager = {(r["preset"], r["batch"], r["dtype"]): r.get("step_ms") for r in rows if r["impl"] == "eager"}
    for r in rows:
        base = eager.get((r["preset"], r["batch"], r["dtype"]))
        if base and r.get("step_ms"):
            r["speedup"] = base / r["step_ms"]
    payload["finished"] = True

    print(harness.format_report(rows, ["preset", "batch", "dtype", "impl", "forward_ms", "backward_ms",
                                       "optimizer_ms", "step_ms", "speedup", "samples_per_s", "peak_mem_MB",
                                       "images_per_s", "sample_peak_mem_MB", "status"]))
    harness.write_json(json_path, payload)
    harness.plot_bars(png_path, rows, ["preset", "batch", "dtype"], "impl",
                      [("step_ms", "training step, median ms"),
                       ("images_per_s", f"sampling, images/s (t={args.temperature})")],
                      title=f"NVAE presets - {env['device']}")
    print(f"wrote {json_path} and {png_path}")
    return 1 if any(r["status"].startswith("failed") for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
