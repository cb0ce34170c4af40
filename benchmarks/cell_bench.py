"""Times NVAE's cells and latent-group KL, one training step each (forward, forward+backward),
for every implementation, at the real shapes of the model presets.

Workloads (``--cells``):

* ``dec_e6``: the decoder's inverted-residual cell, E = 6 (``mconv_e6k5g0``: normal_dec, up_dec)
* ``dec_e3``: the post-processing inverted-residual cell, E = 3 (``mconv_e3k5g0``: normal_post, up_post)
* ``enc_bnswish``: the encoder's BN-Swish-conv cell (``res_bnswish`` twice: normal/down_pre, normal/down_enc)
* ``kl``: one latent group's residual-normal sample and KL without flows (``normal_kl``)
* ``kl_flow``: the same with flows, as the presets run it: ``normal_sample`` of the posterior,
  then ``flow_kl`` of the (here unmoved) sample; the flow cells themselves are not included

Shapes (``--presets``): every distinct cell and latent-group shape of the preset's model at the
preset's batch size (see preset_shapes.py), with ``count`` = how many of the model's cells have it.

Implementations (``--impls``, see harness.IMPLS): ``eager`` is the official-equivalent reference
(the model's own modules on nvae_fast's torch backend; for the KL ops the plain-autograd
references, the official code's arithmetic), ``compile`` / ``compile-max-autotune`` are
``torch.compile`` of that reference, ``triton`` / ``cuda`` run nvae_fast's fused ops through the
dispatcher (every op reports the backend it ran; a backend that no op here implements is
reported, not timed).

Floors: a workload's floor is the largest of the times its unavoidable work needs on each
resource: HBM bytes an ideal fused implementation must move (inputs once, outputs once, plus the
saved activations written in forward and read back in backward) over the copy bandwidth measured
in this run; tensor-core FLOPs (GEMMs, convolutions), FP32 CUDA-core FLOPs (the depthwise
convolution) and special-function operations (sigmoids) over the H200's rates (``H200``). Rows
record each time, the floor, what bounds it and the achieved fraction (``pct_floor_*``); triton
rows of the inverted-residual cells also the bytes the fused cell's launches move
(``fused_bytes_*``, ``fused_cell_stages``). benchmarks/README.md gives every count.

    python benchmarks/cell_bench.py                          # GPU: cifar10, celeba_64, celeba_256
    python benchmarks/cell_bench.py --presets cifar10 --cells dec_e6,kl --impls eager,triton
    python benchmarks/cell_bench.py --quick                  # smoke run; on a CPU-only machine the
                                                              # tiny_cifar10 shapes, eager timed only
"""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402
from preset_shapes import PRESET_BATCH, CellShape, LatentShape, model_shapes  # noqa: E402

import nvae_fast  # noqa: E402
from nvae_fast import NVAEConfig, backend  # noqa: E402
from nvae_fast.nn.cells import make_cell  # noqa: E402
from nvae_fast.ops.normal_kl import (  # noqa: E402
    flow_kl, flow_kl_ref, normal_kl, normal_kl_ref, normal_sample, normal_sample_ref)

GPU_PRESETS = ("cifar10", "celeba_64", "celeba_256")
CPU_PRESETS = ("tiny_cifar10",)
KINDS = ("dec_e6", "dec_e3", "enc_bnswish", "kl", "kl_flow")
CELL_TYPES = ("normal_pre", "down_pre", "normal_enc", "down_enc", "normal_dec", "up_dec", "up_post", "normal_post")
CELL_KINDS = {("mconv_e6k5g0",): "dec_e6", ("mconv_e3k5g0",): "dec_e3", ("res_bnswish", "res_bnswish"): "enc_bnswish"}


# ---------------------------------------------------------------------------------------------
# Workloads
# ---------------------------------------------------------------------------------------------

class KLReference(nn.Module):
    """One latent group without flows, as the official code computes it (plain autograd)."""

    def forward(self, mu_p: Tensor, log_sigma_p: Tensor, mu_q: Tensor, log_sigma_q: Tensor,
                eps: Tensor) -> tuple[Tensor, Tensor]:
        result = normal_kl_ref(mu_p, log_sigma_p, mu_q, log_sigma_q, eps, residual=True)
        return result.z, result.kl_all


class KLFused(nn.Module):
    """The same through nvae_fast's ``normal_kl`` op (dispatched per call)."""

    def forward(self, mu_p: Tensor, log_sigma_p: Tensor, mu_q: Tensor, log_sigma_q: Tensor,
                eps: Tensor) -> tuple[Tensor, Tensor]:
        result = normal_kl(mu_p, log_sigma_p, mu_q, log_sigma_q, eps, residual=True)
        return result.z, result.kl_all


class KLFlowReference(nn.Module):
    """One latent group with flows, without the flow cells: the residual posterior's sample and the
    KL of that sample (``log_det`` stands for the flows' output), in plain autograd."""

    def forward(self, mu_p: Tensor, log_sigma_p: Tensor, mu_q: Tensor, log_sigma_q: Tensor, eps: Tensor,
                log_det: Tensor) -> tuple[Tensor, Tensor]:
        z = normal_sample_ref(mu_p + mu_q, log_sigma_p + log_sigma_q, eps)
        return z, flow_kl_ref(mu_p, log_sigma_p, log_sigma_q, eps, z, log_det, residual=True).kl_all


class KLFlowFused(nn.Module):
    """The same through nvae_fast's ``normal_sample`` and ``flow_kl`` ops, as NVAE calls them."""

    def forward(self, mu_p: Tensor, log_sigma_p: Tensor, mu_q: Tensor, log_sigma_q: Tensor, eps: Tensor,
                log_det: Tensor) -> tuple[Tensor, Tensor]:
        z = normal_sample(mu_p + mu_q, log_sigma_p + log_sigma_q, eps)
        return z, flow_kl(mu_p, log_sigma_p, log_sigma_q, eps, z, log_det, residual=True).kl_all


@dataclass(frozen=True)
class Workload:
    """One benchmarked configuration: a cell or a latent group at one shape of one preset."""

    preset: str
    kind: str
    shape: CellShape | LatentShape

    @property
    def cell_type(self) -> str:
        return self.shape.cell_type if isinstance(self.shape, CellShape) else "latent"

    @property
    def input_shape(self) -> tuple[int, int, int, int]:
        return self.shape.input_shape if isinstance(self.shape, CellShape) else self.shape.shape

    @property
    def output_shape(self) -> tuple[int, int, int, int]:
        if isinstance(self.shape, LatentShape):
            return self.shape.shape
        s, scale = self.shape, {"same": 1.0, "down": 0.5, "up": 2.0}[_resample(self.shape.cell_type)]
        return (s.batch, s.c_out, int(s.height * scale), int(s.width * scale))

    def module(self, impl: str) -> nn.Module:
        """The module an implementation runs: the model's cell (its ops follow the dispatcher), or
        for the latent groups the reference or the fused functional ops."""
        if isinstance(self.shape, CellShape):
            s = self.shape
            return make_cell(s.c_in, s.c_out, s.cell_type, s.ops, s.use_se)
        fast = impl in ("triton", "cuda")
        if self.kind == "kl":
            return KLFused() if fast else KLReference()
        return KLFlowFused() if fast else KLFlowReference()

    def inputs(self, device: torch.device, dtype: torch.dtype, memory_format: torch.memory_format
               ) -> tuple[list[Tensor], list[Tensor]]:
        """(forward arguments, gradients of the outputs that reach the loss); the arguments that
        need gradients have requires_grad set. Values are in the range the model produces."""
        def act(shape: tuple[int, ...], grad: bool = True) -> Tensor:
            t = torch.randn(shape, device=device, dtype=dtype).to(memory_format=memory_format)
            return t.requires_grad_(grad)

        if isinstance(self.shape, CellShape):
            return [act(self.input_shape)], [act(self.output_shape, False)]
        shape = self.shape.shape
        params = [act(shape) for _ in range(4)]
        eps = act(shape, False)
        outputs_grad = [act(shape, False), torch.ones(shape[0], device=device, dtype=torch.float32)]
        if self.kind == "kl":
            return params + [eps], outputs_grad
        return params + [eps, act(shape, False)], outputs_grad


def _resample(cell_type: str) -> str:
    return "down" if cell_type.startswith("down") else "up" if cell_type.startswith("up") else "same"


def workloads(presets: list[str], kinds: list[str], cell_types: list[str] | None, batch: int | None
              ) -> list[Workload]:
    """Every (preset, kind, distinct shape) selected, in model order."""
    out = []
    for preset in presets:
        cells, latents = model_shapes(NVAEConfig.preset(preset), batch or PRESET_BATCH[preset])
        for shape in cells:
            kind = CELL_KINDS.get(shape.ops)
            if kind in kinds and (cell_types is None or shape.cell_type in cell_types):
                out.append(Workload(preset, kind, shape))
        for kind in ("kl", "kl_flow"):
            if kind in kinds:
                out += [Workload(preset, kind, shape) for shape in latents]
    return out


# ---------------------------------------------------------------------------------------------
# Counting: the floors (HBM bytes, tensor-core FLOPs, FP32 FLOPs, special-function operations)
# ---------------------------------------------------------------------------------------------

# The H200's rates the floors divide by. HBM: the device-to-device copy measured on it (read +
# write bytes); a run on a GPU divides by its own measured copy instead. Tensor cores: dense
# bf16/fp16 as measured (~790 of the 989 TFLOP/s on the data sheet), TF32 (fp32 GEMMs, PyTorch's
# default for convolutions) half that. FP32 CUDA cores: 132 SMs x 128 FMA/clock x 2 x 1.98 GHz.
# Special-function units: 16 MUFU operations (ex2, rcp, ...) per clock per SM, 4.18 T/s; a
# sigmoid costs two (ex2 and rcp), and its derivative reuses it.
H200 = {"hbm_GBs": 4300.0, "tensor_TFLOPs": {"bfloat16": 790.0, "float16": 790.0, "float32": 395.0},
        "fp32_TFLOPs": 67.0, "sfu_Gops": 4180.0}
SFU_PER_SIGMOID = 2


def traffic(w: Workload, elem: int) -> dict[str, float]:
    """The work an ideal fused training step cannot avoid (see benchmarks/README.md "The floors").

    Returns bytes_fwd, bytes_fwd_bwd (HBM bytes: inputs read once, outputs written once, the saved
    activations written in forward and read back in backward), gemm_flop (tensor cores) and
    dw_flop (FP32 CUDA cores: the depthwise convolution) of the forward (forward+backward is three
    times each: the input and the weight gradients each cost one forward), and sfu_fwd,
    sfu_fwd_bwd (special-function operations: one sigmoid per activation element and pass, its
    derivative and a recomputed Swish reusing it; the KL's tanh, exp).
    """
    N, C, H, W = w.input_shape
    _, Co, Ho, Wo = w.output_shape
    x, out = N * C * H * W, N * Co * Ho * Wo
    if w.kind in ("kl", "kl_flow"):
        n = x
        # soft clamps (tanh = ex2 + rcp) of four parameter tensors, two exp for the sigmas
        sfu = n * (4 * 2 + 2)
        moved = (6, 16) if w.kind == "kl" else (6, 17)
        return dict(bytes_fwd=moved[0] * n * elem, bytes_fwd_bwd=moved[1] * n * elem, gemm_flop=0.0, dw_flop=0.0,
                    sfu_fwd=float(sfu), sfu_fwd_bwd=float(2 * sfu))
    s = w.shape
    if w.kind in ("dec_e6", "dec_e3"):
        E, k = _mconv_params(s.ops[0])
        EC, M_in, M_out = E * C, N * H * W, N * Ho * Wo
        # saved: a = conv1(BN0(x)) (at the input resolution: nearest upsampling commutes with
        # BN0, the 1x1 conv and BN1), c = the depthwise conv's output, e = conv2's output
        saved = M_in * EC + M_out * EC + M_out * Co
        gemm = 2 * M_in * C * EC + 2 * M_out * EC * Co
        if _resample(s.cell_type) == "up":
            gemm += 2 * M_in * C * Co  # the skip's 1x1 conv, at the input resolution (it commutes with the upsampling)
        dw = 2 * M_out * EC * k * k
        sigmoids = M_in * EC + M_out * EC + (N * Co if s.use_se else 0)   # swish(BN1(a)), swish(BN2(c)), SE
    else:
        M_out = N * Ho * Wo
        # saved: the inputs of the second BN-Swish and of SE (the first BN-Swish input is x)
        saved = 2 * M_out * Co
        gemm = 2 * M_out * 9 * (C * Co + Co * Co)
        if _resample(s.cell_type) == "down":
            gemm += 2 * M_out * C * Co  # FactorizedReduce: four strided 1x1 convs, C -> Co in all
        dw = 0
        sigmoids = x + M_out * Co + (N * Co if s.use_se else 0)
    fwd = x + out + saved
    bwd = out + x + saved + x  # read dout, x, the saved activations; write dx
    sfu = SFU_PER_SIGMOID * sigmoids
    return dict(bytes_fwd=fwd * elem, bytes_fwd_bwd=(fwd + bwd) * elem, gemm_flop=float(gemm), dw_flop=float(dw),
                sfu_fwd=float(sfu), sfu_fwd_bwd=float(2 * sfu))


def floors(counts: dict[str, float], dtype: torch.dtype, hbm_GBs: float | None = None, tf32: bool = True
           ) -> dict[str, float | str]:
    """Per phase (fwd, fwd_bwd): the time in microseconds each resource needs at the H200's rates
    (HBM at ``hbm_GBs`` GB/s when measured), the floor (the largest) and what bounds it.

    ``counts`` holds :func:`traffic`'s keys. fp32 GEMMs run on the tensor cores as TF32 when
    ``tf32`` (PyTorch's convolution default, which the fused kernels follow), else on the FP32
    CUDA cores with the depthwise convolution."""
    on_tensor_cores = dtype != torch.float32 or tf32
    tensor_flop = counts["gemm_flop"] if on_tensor_cores else 0.0
    fp32_flop = counts["dw_flop"] + (0.0 if on_tensor_cores else counts["gemm_flop"])
    tensor = H200["tensor_TFLOPs"][str(dtype).removeprefix("torch.")]
    out: dict[str, float | str] = {}
    for phase, passes in (("fwd", 1), ("fwd_bwd", 3)):
        times = {
            "hbm": counts[f"bytes_{phase}"] / ((hbm_GBs or H200["hbm_GBs"]) * 1e3),
            "tensor": passes * tensor_flop / (tensor * 1e6),
            "fp32": passes * fp32_flop / (H200["fp32_TFLOPs"] * 1e6),
            "sfu": counts[f"sfu_{phase}"] / (H200["sfu_Gops"] * 1e3),
        }
        for name, us in times.items():
            out[f"{name}_{phase}_us"] = us
        bound = max(times, key=times.get)
        out[f"floor_{phase}_us"], out[f"bound_{phase}"] = times[bound], bound
    return out


def fused_cell_stages(N: int, C: int, Co: int, H: int, W: int, E: int, upsample: bool, elem: int
                      ) -> list[dict[str, float | str]]:
    """What each launch of nvae_fast's fused cell (triton backend) reads and writes in HBM, in
    bytes, once per element (a stage that rereads a tile for another column block reads it from L2;
    per-channel statistics, sums and weights left out). The up-cell's skip (a 1x1 convolution and
    a bilinear upsampling, outside the fused op) is not included."""
    Ho, Wo = (2 * H, 2 * W) if upsample else (H, W)
    x, a = N * C * H * W, N * E * C * H * W
    c, e = N * E * C * Ho * Wo, N * Co * Ho * Wo
    stages = [  # (stage, elements read, elements written)
        ("bn_stats: BN0 statistics", x, 0),
        ("conv1_forward: a = BN0(x) @ W1^T", x, a),
        ("dwconv forward: c = dw(swish(BN1(a)))", a, c),
        ("conv2_forward: e = swish(BN2(c)) @ W2^T", c, e),
        ("output_forward: out = skip + 0.1 BN3(e) se", 2 * e, e),
        ("output_backward: sums of dout, dout e; SE", 2 * e, 0),
        ("conv2_backward_data: g2 = de @ W2 * swish'", 2 * e + c, c),
        ("conv2_weight_grad: dW2 = de^T swish(BN2(c))", 2 * e + c, 0),
        ("dwconv backward: g1, dWdw (dc from g2, c)", 2 * c + a, a),
        ("conv1_weight_grad: dW1, BN0 sums", 2 * a + x, 0),
        ("conv1_backward_data: dx", 2 * a + x + (0 if upsample else e), x),
    ]
    return [dict(stage=name, read_bytes=float(r * elem), write_bytes=float(wr * elem)) for name, r, wr in stages]


def _mconv_params(op: str) -> tuple[int, int]:
    """(expansion, kernel size) of an ``mconv_e{E}k{K}g0`` operation name."""
    e, k = op.removeprefix("mconv_e").split("g")[0].split("k")
    return int(e), int(k)


# ---------------------------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------------------------

def _training_step(module: nn.Module, dtype: torch.dtype, device: torch.device
                   ) -> tuple[Callable[[Any], Any], Callable[[Any], Any]]:
    """(forward, forward+backward) callables on an input set (args, grad_outputs); backward
    computes the gradients of every input that needs one and of every parameter, without
    accumulating into ``.grad``."""
    params = [p for p in module.parameters() if p.requires_grad]

    def fwd(s: tuple[list[Tensor], list[Tensor]]) -> Any:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            return module(*s[0])

    def fwd_bwd(s: tuple[list[Tensor], list[Tensor]]) -> Any:
        out = fwd(s)
        outs = list(out) if isinstance(out, tuple) else [out]
        targets = [t for t in s[0] if t.requires_grad] + params
        return torch.autograd.grad(outs, targets, s[1])

    return fwd, fwd_bwd


def measure(w: Workload, impl: str, dtype: torch.dtype, memory_format: torch.memory_format, reps: int,
            warmup: int, device: torch.device, copy_gbs: float | None) -> dict[str, Any]:
    """One row: times, memory, floors and what ran. Never raises for the implementation's failure."""
    row: dict[str, Any] = {
        "preset": w.preset, "kind": w.kind, "cell_type": w.cell_type,
        "ops": list(w.shape.ops) if isinstance(w.shape, CellShape) else None,
        "shape": "x".join(map(str, w.input_shape)), "out_shape": "x".join(map(str, w.output_shape)),
        "count": w.shape.count, "dtype": str(dtype).removeprefix("torch."), "impl": impl,
    }
    elem = torch.empty((), dtype=dtype).element_size()
    row.update(traffic(w, elem))
    if impl == "triton" and w.kind in ("dec_e6", "dec_e3"):
        E, _ = _mconv_params(w.shape.ops[0])
        stages = fused_cell_stages(*w.input_shape[:2], w.shape.c_out, *w.input_shape[2:], E,
                                   _resample(w.cell_type) == "up", elem)
        row["fused_bytes_fwd"] = sum(st["read_bytes"] + st["write_bytes"] for st in stages[:5])
        row["fused_bytes_fwd_bwd"] = sum(st["read_bytes"] + st["write_bytes"] for st in stages)
    forced = harness.forced_backend(impl)
    try:
        torch.manual_seed(0)
        module = harness.official_layers(w.module(impl), impl).to(device).to(memory_format=memory_format).train()
        sets = [w.inputs(device, dtype, memory_format)]
        set_bytes = sum(t.numel() * t.element_size() for part in sets[0] for t in part)
        sets += [w.inputs(device, dtype, memory_format) for _ in range(harness.rotation_count(set_bytes, device) - 1)]
        fwd, fwd_bwd = _training_step(harness.compiled(module, impl), dtype, device)
        with nvae_fast.use_backend(forced):
            with harness.record_dispatch() as chosen:  # the first call (and compilation) says what runs
                fwd_bwd(sets[0])
            verdict = harness.dispatch_verdict(impl, chosen)
            if verdict is not None:
                row["status"] = verdict
                return row
            t_fwd = harness.measure(fwd, sets, warmup=warmup, reps=reps, device=device)
            t_all = harness.measure(fwd_bwd, sets, warmup=warmup, reps=reps, device=device)
            peak = harness.peak_memory_bytes(lambda: fwd_bwd(sets[0]), device)
            saved = harness.saved_activation_bytes(lambda: fwd(sets[0]),
                                                   exclude=[*module.parameters(), *module.buffers()])
        row["dispatch"] = dict(chosen)
        if impl in harness.COMPILE_MODES:
            row["graph_breaks"] = harness.graph_breaks()
    except Exception as err:  # a failing implementation is a result to report, not a reason to stop
        traceback.print_exc()
        row["status"] = f"failed: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return row
    fallbacks = {op: name for op, name in chosen.items() if name != forced}
    row["status"] = "timed" if not fallbacks else "timed, partly on other backends: " + ", ".join(
        f"{op}->{name}" for op, name in sorted(fallbacks.items()))
    row.update(fwd_ms=t_fwd.median_ms, fwd_bwd_ms=t_all.median_ms, times_fwd_ms=t_fwd.times_ms,
               times_fwd_bwd_ms=t_all.times_ms, peak_mem_MB=None if peak is None else peak / 2**20,
               saved_MB=saved / 2**20)
    for phase in ("fwd", "fwd_bwd"):
        ms, nbytes = row[f"{phase}_ms"], row[f"bytes_{phase}"]
        flop = (1 if phase == "fwd" else 3) * (row["gemm_flop"] + row["dw_flop"])
        row[f"GBs_{phase}"] = nbytes / (ms * 1e-3) / 1e9
        row[f"TFLOPs_{phase}"] = flop / (ms * 1e-3) / 1e12
    if copy_gbs is not None:   # a GPU run: its own copy bandwidth for the HBM floor, the H200's other rates
        row.update(floors(row, dtype, copy_gbs, tf32=torch.backends.cudnn.allow_tf32))
        for phase in ("fwd", "fwd_bwd"):
            row[f"floor_{phase}_ms"] = row[f"floor_{phase}_us"] * 1e-3
            row[f"pct_floor_{phase}"] = 100 * row[f"floor_{phase}_ms"] / row[f"{phase}_ms"]
    return row


def _with_speedups(rows: list[dict[str, Any]]) -> None:
    """Adds to the timed rows ``speedup`` (eager forward+backward time over this row's) and
    ``model_ms`` (count x forward+backward: this shape's share of a training step)."""
    eager = {(r["preset"], r["kind"], r["cell_type"], r["shape"], r["dtype"]): r.get("fwd_bwd_ms")
             for r in rows if r["impl"] == "eager"}
    for r in rows:
        base = eager.get((r["preset"], r["kind"], r["cell_type"], r["shape"], r["dtype"]))
        if base and r.get("fwd_bwd_ms"):
            r["speedup"] = base / r["fwd_bwd_ms"]
        if r.get("fwd_bwd_ms"):
            r["model_ms"] = r["count"] * r["fwd_bwd_ms"]


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", type=harness.csv_choices(list(PRESET_BATCH)),
                        help=f"model presets whose shapes to run (default: {','.join(GPU_PRESETS)} on a GPU, "
                             f"{','.join(CPU_PRESETS)} on a CPU)")
    parser.add_argument("--cells", type=harness.csv_choices(KINDS), default=list(KINDS),
                        help="workloads (default: all)")
    parser.add_argument("--cell-types", type=harness.csv_choices(CELL_TYPES),
                        help="keep only cells of these official cell types (default: all)")
    parser.add_argument("--batch", type=int, help="batch size for every preset (default: the preset's own)")
    parser.add_argument("--dtypes", type=harness.csv_choices(tuple(harness.DTYPES)), default=["bf16", "fp32"],
                        help="bf16 runs under torch.autocast with fp32 parameters, as training does")
    parser.add_argument("--impls", type=harness.csv_choices(harness.IMPLS),
                        help=f"default: all ({','.join(harness.IMPLS)}); --quick leaves out torch.compile unless named")
    parser.add_argument("--memory-format", choices=["channels_last", "contiguous"], default="channels_last")
    parser.add_argument("--reps", type=int, default=100, help="timed repetitions (the median is reported)")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: the first shape of each workload, 3 repetitions, no torch.compile")
    parser.add_argument("--out", type=Path, help="JSON path, PNG beside it (default: benchmarks/results/<gpu>/ for "
                                                  "full GPU runs, benchmarks/scratch/ otherwise)")
    harness.add_run_arguments(parser)
    args = parser.parse_args(argv)
    if args.batch is not None and args.batch < 1:
        parser.error(f"--batch must be positive, got {args.batch}")
    if args.reps < 1 or args.warmup < 0:
        parser.error("--reps must be >= 1 and --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = harness.run_device(args.device)
    time_limit = harness.TimeLimit(args.time_limit)
    env = harness.environment(device)
    if device.type == "cpu":
        print("No CUDA device: CPU timings at small shapes (the tiny_cifar10 preset unless --presets is given); "
              "they say nothing about GPU performance.")
    presets = args.presets or list(GPU_PRESETS if device.type == "cuda" else CPU_PRESETS)
    chosen = workloads(presets, args.cells, args.cell_types, args.batch)
    if args.quick:
        firsts: dict[str, Workload] = {}
        for w in chosen:
            firsts.setdefault(w.kind, w)
        chosen = list(firsts.values())
    reps, warmup = (3, 1) if args.quick else (args.reps, args.warmup)
    impls = args.impls or list(harness.IMPLS)
    memory_format = torch.channels_last if args.memory_format == "channels_last" else torch.contiguous_format
    copy_gbs = harness.copy_bandwidth_gbs(device)
    json_path, png_path = harness.output_paths("cell_bench", device, args.quick, args.out, "+".join(presets))
    rows: list[dict[str, Any]] = []
    payload = {
        "benchmark": "cell_bench", "environment": env, "backends": backend.status(), "copy_GBs": copy_gbs,
        "quick": args.quick, "reps": reps, "warmup": warmup, "memory_format": args.memory_format,
        "presets": {p: {"batch": args.batch or PRESET_BATCH[p]} for p in presets},
        "finished": False, "results": rows}

    for w in chosen:
        for dtype_name in args.dtypes:
            for impl in impls:
                reason = harness.skip_reason(impl, device, requested=not args.quick or args.impls is not None)
                reason = reason or time_limit.reason()
                if reason is not None:
                    rows.append({"preset": w.preset, "kind": w.kind, "cell_type": w.cell_type,
                                 "shape": "x".join(map(str, w.input_shape)), "count": w.shape.count,
                                 "dtype": str(harness.DTYPES[dtype_name]).removeprefix("torch."), "impl": impl,
                                 "status": reason})
                    continue
                rows.append(measure(w, impl, harness.DTYPES[dtype_name], memory_format, reps, warmup, device,
                                    copy_gbs))
                print(f"  {w.preset} {w.kind} {w.cell_type} {rows[-1]['shape']} {dtype_name} {impl}: "
                      f"{rows[-1]['status']}", flush=True)
                harness.write_json(json_path, payload)
    _with_speedups(rows)
    payload["finished"] = True

    print(harness.format_report(rows, ["preset", "kind", "cell_type", "shape", "count", "dtype", "impl", "fwd_ms",
                                       "fwd_bwd_ms", "speedup", "model_ms", "GBs_fwd_bwd", "pct_floor_fwd_bwd",
                                       "bound_fwd_bwd", "peak_mem_MB", "saved_MB", "status"]))
    harness.write_json(json_path, payload)
    harness.plot_bars(png_path, rows, ["preset", "kind", "cell_type", "shape", "dtype"], "impl",
                      [("fwd_ms", "forward, median ms"), ("fwd_bwd_ms", "forward+backward, median ms")],
                      title=f"NVAE cells, one training step - {env['device']}")
    print(f"wrote {json_path} and {png_path}")
    return 1 if any(r["status"].startswith("failed") for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
