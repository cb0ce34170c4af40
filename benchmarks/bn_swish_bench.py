"""Times fused BatchNorm + Swish (training, forward and forward+backward) against PyTorch.

Implementations: eager ``F.batch_norm`` + ``F.silu``, ``torch.compile`` of the same, and the
nvae_fast module under each available backend. The floor is an ideal fused pass: forward reads x
and writes y, backward reads x and dy and writes dx (statistics are negligible), divided by the
device-copy bandwidth measured in the same run.

    python benchmarks/bn_swish_bench.py                 # GPU: the issue's shapes, bf16, channels-last
    python benchmarks/bn_swish_bench.py --quick         # smoke run (CPU: small shapes, says so)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

import nvae_fast  # noqa: E402
from nvae_fast import BatchNormSwish, backend  # noqa: E402

GPU_SHAPES = [(32, 1536, 16, 16), (4, 90, 256, 256)]
CPU_SHAPES = [(4, 64, 16, 16)]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _eager_module(C: int, device: torch.device) -> torch.nn.Module:
    class EagerBNSwish(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn = torch.nn.BatchNorm2d(C, momentum=0.05).to(device)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.silu(self.bn(x))

    return EagerBNSwish()


def _implementations(C: int, device: torch.device) -> dict[str, tuple[torch.nn.Module, str | None]]:
    """name -> (module, backend to force or None). Backends that cannot run here are left out (the
    JSON records why); Triton's CPU interpreter is a correctness tool, never timed."""
    impls: dict[str, tuple[torch.nn.Module, str | None]] = {
        "eager": (_eager_module(C, device), None),
        "torch.compile": (torch.compile(_eager_module(C, device)), None),
    }
    for name in ("torch", "triton", "cuda"):
        if backend.unavailable_reason(name, device) is None and not (name == "triton" and device.type == "cpu"):
            impls[f"nvae_fast[{name}]"] = (BatchNormSwish(C, momentum=0.05).to(device), name)
    return impls


def run(shapes: list[tuple[int, int, int, int]], dtype: torch.dtype, reps: int, warmup: int,
        device: torch.device) -> list[dict]:
    copy_gbs = harness.copy_bandwidth_gbs(device)
    rows = []
    for shape in shapes:
        numel = torch.Size(shape).numel()
        elem = torch.empty((), dtype=dtype).element_size()
        bytes_fwd, bytes_fwd_bwd = 2 * numel * elem, 5 * numel * elem
        n_sets = harness.rotation_count(3 * numel * elem, device)
        sets = []
        for _ in range(n_sets):
            x = torch.randn(shape, device=device, dtype=dtype).to(memory_format=torch.channels_last)
            sets.append((x.requires_grad_(), torch.randn_like(x)))
        for name, (module, forced) in _implementations(shape[1], device).items():
            module.train()

            def fwd(s, module=module):
                return module(s[0])

            def fwd_bwd(s, module=module):
                module(s[0]).backward(s[1])

            with nvae_fast.use_backend(forced):
                t_fwd = harness.measure(fwd, sets, warmup=warmup, reps=reps, device=device)
                t_all = harness.measure(fwd_bwd, sets, warmup=warmup, reps=reps, device=device)
                peak = harness.peak_memory_bytes(lambda: fwd_bwd(sets[0]), device)
                saved = harness.saved_activation_bytes(lambda: fwd(sets[0]))
            row = {
                "shape": "x".join(map(str, shape)), "dtype": str(dtype).removeprefix("torch."), "impl": name,
                "fwd_ms": t_fwd.median_ms, "fwd_bwd_ms": t_all.median_ms,
                "fwd_bwd_GBs": bytes_fwd_bwd / (t_all.median_ms * 1e-3) / 1e9,
                "floor_fwd_bwd_ms": None if copy_gbs is None else bytes_fwd_bwd / (copy_gbs * 1e9) * 1e3,
                "floor_fwd_ms": None if copy_gbs is None else bytes_fwd / (copy_gbs * 1e9) * 1e3,
                "peak_mem_MB": None if peak is None else peak / 2**20, "saved_MB": saved / 2**20,
                "times_fwd_ms": t_fwd.times_ms, "times_fwd_bwd_ms": t_all.times_ms,
            }
            if row["floor_fwd_bwd_ms"]:
                row["pct_of_floor"] = 100 * row["floor_fwd_bwd_ms"] / t_all.median_ms
            rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--reps", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="few repetitions, smallest shape: a smoke run")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON path (default: benchmarks/results/ for full GPU runs, else benchmarks/scratch/)")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    env = harness.environment()
    if device.type == "cpu":
        print("No CUDA device: timing the CPU at small shapes (not representative of GPU performance).")
    shapes = (GPU_SHAPES if device.type == "cuda" else CPU_SHAPES)[: 1 if args.quick else None]
    reps, warmup = (5, 2) if args.quick else (args.reps, args.warmup)
    rows = run(shapes, DTYPES[args.dtype], reps, warmup, device)
    print(harness.format_table(rows, ["shape", "dtype", "impl", "fwd_ms", "fwd_bwd_ms", "fwd_bwd_GBs",
                                      "pct_of_floor", "peak_mem_MB", "saved_MB"]))
    out, _ = harness.output_paths("bn_swish", device, args.quick, args.out)
    harness.write_json(out, {"benchmark": "bn_swish", "environment": env, "backends": backend.status(),
                             "quick": args.quick, "results": rows})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
