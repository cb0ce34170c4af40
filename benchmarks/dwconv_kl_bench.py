"""Times the depthwise stage and the residual-normal KL: cuda kernels vs Triton vs eager PyTorch.

    python benchmarks/dwconv_kl_bench.py [--out results.json] [--iters 50] [--dtype bfloat16]

Implementations, each forward and backward, bf16 by default, on the decoder's shapes
(N=32/1536ch/16x16, N=32/384ch/32x32, N=4/360ch/128x128; 5x5 stage, stride 1):

* ``cuda``   nvae_fast.kernels.cuda.{dwconv_stage, normal_kl} (csrc/ via nvae_fast._C)
* ``triton`` nvae_fast.kernels.triton.{dwconv_stage, normal_kl}, where present
* ``eager``  stage: BatchNorm (inference, given statistics) + SiLU + cuDNN depthwise conv2d +
  var_mean, and autograd through it; KL: the contract's reference (normal_kl_ref) and autograd

Each call is timed alone with CUDA events, after warm-up, cycling through enough input sets to
exceed twice the L2 cache (so inputs come from HBM); the median is reported with the raw times.
Floors: HBM = the bytes that must move (inputs once, outputs once) / measured device-copy
bandwidth; FP32-FMA = the conv's multiply-adds / peak FP32 rate (SMs x FP32 lanes x clock).
The KL has no FMA floor (it is bound by memory and transcendentals). JSON holds device, versions,
git commit, shapes and raw times. Without a GPU the script says so and exits with status 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHAPES = [(32, 1536, 16, 16), (32, 384, 32, 32), (4, 360, 128, 128)]
KERNEL = 5
DEVICE = "cuda"  # the tests build the eager cases on the CPU to check them
# FP32 lanes per SM by compute capability major.minor (CUDA programming guide, throughput table).
FP32_LANES = {(8, 0): 64}
FP32_LANES_DEFAULT = 128


def _backends(op: str) -> dict[str, object]:
    """{name: kernel module or the reason it is unavailable} for the fast backends."""
    import importlib

    from nvae_fast import _ext

    found: dict[str, object] = {}
    reason = _ext.unavailable_reason()
    found["cuda"] = importlib.import_module(f"nvae_fast.kernels.cuda.{op}") if reason is None else reason
    try:
        found["triton"] = importlib.import_module(f"nvae_fast.kernels.triton.{op}")
    except ImportError as err:
        found["triton"] = f"not available ({err})"
    return found


def _fp32_peak() -> float:
    """FP32 FLOP/s: SMs x FP32 lanes per SM x 2 (an FMA) x the SM clock."""
    p = torch.cuda.get_device_properties(0)
    lanes = FP32_LANES.get((p.major, p.minor), FP32_LANES_DEFAULT)
    return p.multi_processor_count * lanes * 2 * p.clock_rate * 1e3


def _sets_for(bytes_per_set: int, budget: int) -> int:
    """Input sets to cycle through: together at least twice the L2 cache, within a memory budget."""
    wanted = harness.rotation_count(bytes_per_set, torch.device(DEVICE)) + 1
    return max(2, min(wanted, budget // max(bytes_per_set, 1)))


# ---- the depthwise stage ----------------------------------------------------------------------

def _stage_inputs(shape, dtype, g):
    N, C, H, W = shape
    a = torch.randn(shape, generator=g, device=DEVICE).to(dtype).contiguous(memory_format=torch.channels_last)
    dc = torch.randn(shape, generator=g, device=DEVICE).to(dtype).contiguous(memory_format=torch.channels_last)
    return a, dc


def _stage_cases(shape, dtype, sets, backends):
    N, C, H, W = shape
    g = torch.Generator(device=DEVICE).manual_seed(0)
    data = [_stage_inputs(shape, dtype, g) for _ in range(sets)]
    scale = torch.rand(C, device=DEVICE) + 0.5
    shift = torch.randn(C, device=DEVICE) * 0.2
    mean = torch.randn(C, device=DEVICE) * 0.1
    var = torch.rand(C, device=DEVICE) + 0.5
    weight = torch.randn(C, 1, KERNEL, KERNEL, device=DEVICE) / KERNEL
    # BN1 with statistics (mean, var) and affine (bn_w, bn_b) folds into the same scale and shift.
    bn_w, bn_b = scale * torch.sqrt(var + 1e-5), shift + mean * scale
    weight_lp = weight.to(dtype)

    def eager_forward(i):
        a = data[i][0]
        b = F.silu(F.batch_norm(a, mean, var, bn_w, bn_b, False, 0.0, 1e-5))
        c = F.conv2d(b, weight_lp, padding=KERNEL // 2, groups=C)
        return c, torch.var_mean(c, dim=(0, 2, 3), unbiased=False)

    graphs = []
    for a, dc in data:  # autograd graphs built once; backward is timed with retain_graph
        z = F.batch_norm(a, mean, var, bn_w, bn_b, False, 0.0, 1e-5).detach().requires_grad_()
        w = weight_lp.clone().requires_grad_()
        graphs.append((z, w, F.conv2d(F.silu(z), w, padding=KERNEL // 2, groups=C)))

    def eager_backward(i):
        a, dc = data[i]
        z, w, c = graphs[i]
        gz, gw = torch.autograd.grad(c, (z, w), dc, retain_graph=True)
        return gz.sum(dim=(0, 2, 3), dtype=torch.float32), (gz * (a - mean.view(1, -1, 1, 1).to(dtype))).sum(
            dim=(0, 2, 3), dtype=torch.float32), gw

    cases = {"eager": (eager_forward, eager_backward)}
    for name, mod in backends.items():
        if isinstance(mod, str):
            cases[name] = mod
            continue
        cases[name] = (lambda i, m=mod: m.dwconv_stage_forward(data[i][0], scale, shift, weight),
                       lambda i, m=mod: m.dwconv_stage_backward(data[i][1], data[i][0], scale, shift, mean, weight))
    return cases


def _stage_floors(shape, dtype, bandwidth, fp32):
    N, C, H, W = shape
    elems = N * C * H * W
    size = torch.finfo(dtype).bits // 8
    macs = elems * KERNEL * KERNEL
    return {  # forward: read a, write c; backward: read dc and a, write g (two convs' worth of MACs)
        "forward": (2 * elems * size / bandwidth, 2 * macs / fp32),
        "backward": (3 * elems * size / bandwidth, 4 * macs / fp32),
    }


# ---- the KL --------------------------------------------------------------------------------------

def _kl_cases(shape, dtype, sets, backends):
    from nvae_fast.ops.normal_kl import normal_kl_ref

    N, C, H, W = shape
    g = torch.Generator(device=DEVICE).manual_seed(1)

    def params():  # chunks of a channels-last (N, 2C, H, W) conv output, as in the model
        full = torch.randn(N, 2 * C, H, W, generator=g, device=DEVICE).to(dtype)
        return torch.chunk(full.contiguous(memory_format=torch.channels_last), 2, dim=1)

    data = [(*params(), *params(), torch.randn(shape, generator=g, device=DEVICE).to(dtype)) for _ in range(sets)]
    upstream = [torch.randn(N, device=DEVICE), torch.randn(N, device=DEVICE), torch.randn(N, device=DEVICE),
                torch.randn(C, device=DEVICE)]
    grad_z = torch.randn(shape, generator=g, device=DEVICE).to(dtype)

    graphs = []
    for mu_p, ls_p, mu_q, ls_q, eps in data:
        leaves = [t.detach().requires_grad_() for t in (mu_p, ls_p, mu_q, ls_q)]
        out = normal_kl_ref(*leaves, eps)
        graphs.append((leaves, out))

    def eager_backward(i):
        leaves, out = graphs[i]
        return torch.autograd.grad(out, leaves, (grad_z, *upstream), retain_graph=True)

    cases = {"eager": (lambda i: normal_kl_ref(*data[i]), eager_backward)}
    for name, mod in backends.items():
        if isinstance(mod, str):
            cases[name] = mod
            continue
        cases[name] = (lambda i, m=mod: m.normal_kl_forward(*data[i], True),
                       lambda i, m=mod: m.normal_kl_backward(grad_z, *upstream, *data[i], True))
    return cases


def _kl_floors(shape, dtype, bandwidth, fp32):
    elems = shape[0] * shape[1] * shape[2] * shape[3]
    size = torch.finfo(dtype).bits // 8
    return {  # forward: read 5 params, write z; backward: read 5 params and grad_z, write 4 gradients
        "forward": (6 * elems * size / bandwidth, None),
        "backward": (10 * elems * size / bandwidth, None),
    }


# ---- driver --------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="JSON file (default: benchmarks/results/dwconv_kl_<gpu>.json)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=10)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("dwconv_kl_bench: needs a CUDA GPU and torch sees none; nothing was measured.", file=sys.stderr)
        return 2

    import nvae_fast

    dtype = getattr(torch, args.dtype)
    props = torch.cuda.get_device_properties(0)
    device = torch.device(DEVICE)
    bandwidth, fp32 = harness.copy_bandwidth_gbs(device) * 1e9, _fp32_peak()
    free_memory = torch.cuda.mem_get_info()[0]
    report = {
        "device": {"name": props.name, "capability": f"{props.major}.{props.minor}", "sms": props.multi_processor_count,
                   "l2_bytes": props.L2_cache_size, "sm_clock_khz": props.clock_rate,
                   "copy_bandwidth_bytes_per_s": bandwidth, "fp32_peak_flop_per_s": fp32},
        "environment": harness.environment(), "nvae_fast": nvae_fast.__version__,
        "dtype": args.dtype, "kernel_size": KERNEL, "iters": args.iters, "warmup": args.warmup,
        "results": [], "unavailable": {},
    }
    for op, make_cases, floors_of in (("dwconv_stage", _stage_cases, _stage_floors),
                                      ("normal_kl", _kl_cases, _kl_floors)):
        backends = _backends(op)
        for shape in SHAPES:
            set_bytes = (2 if op == "dwconv_stage" else 6) * torch.finfo(dtype).bits // 8 * shape[0] * shape[1] \
                * shape[2] * shape[3]
            sets = _sets_for(set_bytes, free_memory // 4)
            cases = make_cases(shape, dtype, sets, backends)
            floors = floors_of(shape, dtype, bandwidth, fp32)
            for impl, fns in cases.items():
                if isinstance(fns, str):
                    report["unavailable"][f"{op}/{impl}"] = fns
                    continue
                for pass_name, fn in zip(("forward", "backward"), fns):
                    timing = harness.measure(fn, range(sets), warmup=args.warmup, reps=args.iters, device=device)
                    median, times = 1e3 * timing.median_ms, [1e3 * t for t in timing.times_ms]
                    hbm, fma = floors[pass_name]
                    row = {"op": op, "pass": pass_name, "impl": impl, "shape": list(shape), "input_sets": sets,
                           "median_us": median, "times_us": times,
                           "hbm_floor_us": hbm * 1e6, "hbm_floor_pct": 100 * hbm * 1e6 / median,
                           "fma_floor_us": None if fma is None else fma * 1e6,
                           "fma_floor_pct": None if fma is None else 100 * fma * 1e6 / median}
                    report["results"].append(row)
                    fma_txt = "" if fma is None else f"  FP32-FMA floor {row['fma_floor_pct']:5.1f}%"
                    print(f"{op:13s} {pass_name:8s} {impl:6s} {str(shape):20s} {median:9.1f} us  "
                          f"HBM floor {row['hbm_floor_pct']:5.1f}%{fma_txt}", flush=True)
            del cases
            torch.cuda.empty_cache()
    out = args.out or ROOT / "benchmarks" / "results" / f"dwconv_kl_{props.name.replace(' ', '_')}.json"
    harness.write_json(out, report)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
