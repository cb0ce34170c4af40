"""Times the fused generative cell (training step: forward and forward+backward) against PyTorch.

Implementations: the official layer structure run eagerly (BatchNorm2d, the fused BatchNorm+Swish
the official code uses, convolutions, squeeze-excitation), ``torch.compile`` of it, and
``nvae_fast.ops.gen_cell`` under each backend that can run here (Triton's CPU interpreter is a
correctness tool and never timed). The floor is the HBM traffic of an ideal fused training step
(forward reads x and writes out, a, c, e; backward reads x, a, c, e, dout and writes dx), divided by
the device-copy bandwidth measured in the same run; the depthwise FLOPs are recorded beside it.

    python benchmarks/cell_bench.py                 # GPU: CIFAR-10 decoder/post-process cells, bf16
    python benchmarks/cell_bench.py --quick         # smoke run (CPU: one small cell, says so)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

import nvae_fast  # noqa: E402
from nvae_fast import backend  # noqa: E402
from nvae_fast.ops.gen_cell import GenCellParams, GenCellRunningStats, gen_cell  # noqa: E402

# (name, N, Cin, E, k, H, W, upsample): the CIFAR-10 preset's decoder cells (C=256 at 16x16, E=6),
# its up cell, and its post-process cells (C=128 at 32x32, E=3).
GPU_CELLS = [
    ("normal_dec", 32, 256, 6, 5, 16, 16, False),
    ("up_dec", 32, 256, 6, 5, 16, 16, True),
    ("normal_post", 32, 128, 3, 5, 32, 32, False),
]
CPU_CELLS = [("normal_dec", 4, 32, 6, 5, 8, 8, False)]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class EagerCell(nn.Module):
    """The official Cell(InvertedResidual + SE) from torch.nn layers and nvae_fast.BatchNormSwish."""

    def __init__(self, Cin: int, Cout: int, E: int, k: int, upsample: bool) -> None:
        super().__init__()
        EC = Cin * E
        layers: list[nn.Module] = [nn.UpsamplingNearest2d(scale_factor=2)] if upsample else []
        layers += [nn.BatchNorm2d(Cin, momentum=0.05), nn.Conv2d(Cin, EC, 1, bias=False),
                   nvae_fast.BatchNormSwish(EC, momentum=0.05),
                   nn.Conv2d(EC, EC, k, padding=k // 2, groups=EC, bias=False),
                   nvae_fast.BatchNormSwish(EC, momentum=0.05), nn.Conv2d(EC, Cout, 1, bias=False),
                   nn.BatchNorm2d(Cout, momentum=0.05)]
        self.conv = nn.Sequential(*layers)
        hidden = max(Cout // 16, 4)
        self.se = nn.Sequential(nn.Linear(Cout, hidden), nn.ReLU(), nn.Linear(hidden, Cout), nn.Sigmoid())

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None) -> torch.Tensor:
        s = self.conv(x)
        s = s * self.se(s.mean(dim=(2, 3)))[:, :, None, None]
        return (x if skip is None else skip) + 0.1 * s

    def params(self) -> tuple[GenCellParams, GenCellRunningStats]:
        bns = [m for m in self.conv if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        convs = [m for m in self.conv if isinstance(m, nn.Conv2d)]
        params = GenCellParams(bns[0].weight, bns[0].bias, convs[0].weight, bns[1].weight, bns[1].bias,
                               convs[1].weight, bns[2].weight, bns[2].bias, convs[2].weight, bns[3].weight,
                               bns[3].bias, self.se[0].weight, self.se[0].bias, self.se[2].weight, self.se[2].bias)
        return params, GenCellRunningStats(*(t for bn in bns for t in (bn.running_mean, bn.running_var)))


class FusedCell(nn.Module):
    """The same parameters through nvae_fast.ops.gen_cell."""

    def __init__(self, eager: EagerCell, upsample: bool) -> None:
        super().__init__()
        self.eager, self.upsample = eager, upsample

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None) -> torch.Tensor:
        params, running = self.eager.params()
        return gen_cell(x, params, running, skip, self.upsample, training=True)


def _implementations(cell: tuple, device: torch.device) -> dict[str, tuple[nn.Module, str | None]]:
    _, _, Cin, E, k, _, _, upsample = cell
    Cout = Cin // 2 if upsample else Cin
    impls: dict[str, tuple[nn.Module, str | None]] = {
        "eager": (EagerCell(Cin, Cout, E, k, upsample).to(device), None),
        "torch.compile": (torch.compile(EagerCell(Cin, Cout, E, k, upsample).to(device)), None),
    }
    if backend.unavailable_reason("triton", device) is None and device.type == "cuda":
        impls["nvae_fast[triton]"] = (FusedCell(EagerCell(Cin, Cout, E, k, upsample).to(device), upsample), "triton")
    return impls


def run(cells: list[tuple], dtype: torch.dtype, reps: int, warmup: int, device: torch.device) -> list[dict]:
    copy_gbs = harness.copy_bandwidth_gbs(device)
    elem = torch.empty((), dtype=dtype).element_size()
    rows = []
    for cell in cells:
        name, N, Cin, E, k, H, W, upsample = cell
        Cout, EC = (Cin // 2 if upsample else Cin), Cin * E
        Ho, Wo = (2 * H, 2 * W) if upsample else (H, W)
        x_n, a_n, c_n, e_n = N * Cin * H * W, N * EC * H * W, N * EC * Ho * Wo, N * Cout * Ho * Wo
        skip_n = e_n if upsample else 0
        fwd_bytes = elem * (x_n + skip_n + e_n + a_n + c_n + e_n)           # read x (skip), write out, a, c, e
        bwd_bytes = elem * (e_n + x_n + a_n + c_n + e_n + x_n)              # read dout, x, a, c, e; write dx
        sets = []
        for _ in range(harness.rotation_count(elem * (2 * x_n + 2 * e_n + skip_n), device)):
            x = torch.randn(N, Cin, H, W, device=device, dtype=dtype).to(memory_format=torch.channels_last)
            skip = torch.randn(N, Cout, Ho, Wo, device=device, dtype=dtype).to(memory_format=torch.channels_last) \
                if upsample else None
            dout = torch.randn(N, Cout, Ho, Wo, device=device, dtype=dtype).to(memory_format=torch.channels_last)
            sets.append((x.requires_grad_(), skip, dout))
        for impl, (module, forced) in _implementations(cell, device).items():
            module.train()

            def fwd(s, module=module):
                with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                    return module(s[0], s[1])

            def fwd_bwd(s):
                fwd(s).backward(s[2])

            with nvae_fast.use_backend(forced):
                t_fwd = harness.measure(fwd, sets, warmup=warmup, reps=reps, device=device)
                t_all = harness.measure(fwd_bwd, sets, warmup=warmup, reps=reps, device=device)
                peak = harness.peak_memory_bytes(lambda: fwd_bwd(sets[0]), device)
                saved = harness.saved_activation_bytes(lambda: fwd(sets[0]))
            floor = None if copy_gbs is None else (fwd_bytes + bwd_bytes) / (copy_gbs * 1e9) * 1e3
            rows.append({
                "cell": name, "shape": f"{N}x{Cin}x{H}x{W}", "E": E, "k": k, "dtype": str(dtype)[6:], "impl": impl,
                "fwd_ms": t_fwd.median_ms, "fwd_bwd_ms": t_all.median_ms,
                "floor_fwd_bwd_ms": floor, "pct_of_floor": None if floor is None else 100 * floor / t_all.median_ms,
                "dwconv_fwd_GFLOP": 2 * c_n * k * k / 1e9,
                "peak_mem_MB": None if peak is None else peak / 2**20, "saved_MB": saved / 2**20,
                "times_fwd_ms": t_fwd.times_ms, "times_fwd_bwd_ms": t_all.times_ms,
            })
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="few repetitions, first cell only: a smoke run")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/...)")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    env = harness.environment()
    if device.type == "cpu":
        print("No CUDA device: timing the CPU on a small cell, eager and torch.compile only (not representative).")
    cells = (GPU_CELLS if device.type == "cuda" else CPU_CELLS)[: 1 if args.quick else None]
    reps, warmup = (3, 1) if args.quick else (args.reps, args.warmup)
    rows = run(cells, DTYPES[args.dtype], reps, warmup, device)
    print(harness.format_table(rows, ["cell", "shape", "E", "dtype", "impl", "fwd_ms", "fwd_bwd_ms", "pct_of_floor",
                                      "peak_mem_MB", "saved_MB"]))
    slug = env["device"].split(" (")[0].replace(" ", "_")
    out = args.out or Path(__file__).resolve().parent / "results" / f"cell_{slug}.json"
    harness.write_json(out, {"benchmark": "gen_cell", "environment": env, "backends": backend.status(),
                             "quick": args.quick, "results": rows})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
