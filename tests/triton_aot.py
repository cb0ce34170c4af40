"""Compiles the Triton kernels of the fused cell, the depthwise stage and the KL for NVIDIA GPUs
without one: the launchers run on CPU tensors with every kernel launch recorded instead of run,
then each recorded specialisation goes through Triton's whole compiler (down to a cubin, with the
ptxas Triton ships) for the given architectures, with the launch's num_warps and num_stages. This
catches what the interpreter cannot: code that does not compile for a GPU, the bfloat16 ``tl.dot``
path the interpreter cannot run, and shared memory beyond what a block may use.

    python tests/triton_aot.py 80 90      # exit status 1 if any kernel fails to compile
    python tests/triton_aot.py --report 90 --shape 32,256,16,16 --dtype bf16
                                          # registers, spills and shared memory (ptxas -v) of every
                                          # kernel of one cell at one shape

Must run without TRITON_INTERPRET (tests/test_triton_compiles.py starts it in a subprocess). The
specialisations follow Triton's own (integers equal to 1 become constants; pointers and integers
divisible by 16 are marked so), so the code compiled is the code a GPU run would compile.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

from nvae_fast.kernels.triton import bn_swish, common, dwconv_stage, gen_cell, normal_kl
from nvae_fast.ops.gen_cell import SEParams
from nvae_fast.ops.stage_args import BatchNormArgs, BatchNormGrad, BatchNormInputGrad, RunningUpdate

_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int32: "i32",
          torch.int64: "i64"}
_GPU = torch.device("cuda")
# Shared memory a block may opt into (CUDA programming guide, compute capabilities table).
_SHARED_LIMIT = {80: 166_912, 86: 101_376, 89: 101_376, 90: 232_448}
_LAUNCH_OPTIONS = ("num_warps", "num_stages", "maxnreg")


def _record_launches(shared_limit: int = min(_SHARED_LIMIT[80], _SHARED_LIMIT[90])
                     ) -> list[tuple[JITFunction, tuple, dict]]:
    """Makes every ``kernel[grid](...)`` append (kernel, args, constexpr kwargs) instead of running,
    and the launchers choose what they would choose on a GPU (block sizes, dot dtype, precision,
    pipelining depth for ``shared_limit`` bytes of shared memory per block)."""
    launches: list[tuple[JITFunction, tuple, dict]] = []

    def record(self, *args, grid, warmup, **kwargs):
        launches.append((self, args, kwargs))

    JITFunction.run = record
    elementwise_blocks = gen_cell._elementwise_blocks
    dw_tiles, dw_chunk = dwconv_stage._tiles, dwconv_stage._chunk
    gen_cell._gpu = lambda t: True
    gen_cell.gemm_stages = lambda t, stage_bytes: common.stages_within(shared_limit, stage_bytes)
    gen_cell._elementwise_blocks = lambda device, C, rows: elementwise_blocks(_GPU, C, rows)
    dwconv_stage._tiles = lambda C, rows, cols, up, device, budget: dw_tiles(C, rows, cols, up, _GPU, budget)
    dwconv_stage._chunk = lambda halo, device: dw_chunk(halo, _GPU)
    gen_cell.dot_dtype = lambda t: common._TL_DTYPES[t.dtype]
    gen_cell.dot_precision = lambda t: "tf32" if t.dtype == torch.float32 else "ieee"
    return launches


def _launch_everything(dtype: torch.dtype, k: int, upsample: bool, stride2: bool, kl: bool,
                       shape: tuple[int, int, int, int, int] = (2, 20, 6, 5, 6)) -> None:
    """Calls every launcher once (the KL's only with ``kl``); the default shape (N, Cin, H, W, E)
    does not divide the block sizes."""
    N, Cin, H, W, E = shape
    EC, Cout = Cin * E, Cin // 2 if upsample else Cin
    Ho, Wo = (2 * H, 2 * W) if upsample else (H, W)

    def v(*shape):
        return torch.randn(*shape)

    def act(C, h, w):
        return torch.randn(N, C, h, w).to(dtype).contiguous(memory_format=torch.channels_last)

    def bn(C):
        return BatchNormArgs(v(C), v(C), v(C), v(C).abs() + 0.5, 1e-5)

    def running(C):
        return RunningUpdate(v(C), v(C), torch.zeros((), dtype=torch.long), 0.05, 1.01)

    hidden = max(Cout // 16, 4)
    se = SEParams(v(hidden, Cout), v(hidden), v(Cout, hidden), v(Cout))
    x = act(Cin, H, W)
    bn_swish.bn_stats(x)
    gen_cell.bn_stats(x, v(2, Cin), running(Cin))
    a = gen_cell.conv1_forward(x, bn(Cin), v(EC, Cin).to(dtype), v(2, EC), running(EC))
    gen_cell.conv1_forward(x, bn(Cin), v(EC, Cin).to(dtype))
    c, _, _ = dwconv_stage.dwconv_stage_forward(a, v(EC), v(EC), v(EC, 1, k, k), 1, upsample)
    dwconv_stage.dwconv_stage_forward_fused(a, bn(EC), v(EC, 1, k, k), 1, upsample, v(2, EC), running(EC))
    dwconv_stage.dwconv_stage_forward_fused(a, bn(EC), v(EC, 1, k, k), 1, upsample, None)
    e = gen_cell.conv2_forward(c, bn(EC), v(Cout, EC).to(dtype), v(2, Cout), running(Cout), v(N, Cout))
    gen_cell.conv2_forward(c, bn(EC), v(Cout, EC).to(dtype), None, None, v(N, Cout))
    for s in (se, None):
        gen_cell.output_forward(e, bn(Cout), s, v(N, Cout), act(Cout, Ho, Wo))
    dout = act(Cout, Ho, Wo)
    for s in (se, None):
        gen_cell.output_backward(dout, e, bn(Cout), s, v(N, Cout), v(2, Cout), v(N, Cout), v(N, Cout),
                                 (v(Cout), v(Cout), v(hidden, Cout), v(hidden), v(Cout, hidden), v(Cout)))
    de = BatchNormInputGrad(dout, e, bn(Cout), BatchNormGrad(v(2, Cout), N * Ho * Wo, True), 0.1, v(N, Cout),
                            v(N, Cout))
    gen_cell.conv2_backward_data(de, c, bn(EC), v(Cout, EC).to(dtype), v(2, EC), (v(EC), v(EC)))
    gen_cell.conv2_weight_grad(de, c, bn(EC), v(Cout, EC))
    dc = act(EC, Ho, Wo)
    dwconv_stage.dwconv_stage_backward(dc, a, v(EC), v(EC), v(EC), v(EC, 1, k, k), 1, upsample)
    dwconv_stage.dwconv_stage_backward_fused(dc, c, bn(EC), BatchNormGrad(v(2, EC), N * Ho * Wo, True), a, bn(EC),
                                             v(EC, 1, k, k), 1, upsample, v(2, EC), (v(EC), v(EC)), v(EC, 1, k, k))
    da = BatchNormInputGrad(a, a, bn(EC), BatchNormGrad(v(2, EC), N * H * W, True))
    gen_cell.conv1_weight_grad(da, x, bn(Cin), v(EC, Cin), v(EC, Cin), v(2, Cin), (v(Cin), v(Cin)))
    gen_cell.conv1_backward_data(da, v(EC, Cin).to(dtype), x, bn(Cin), BatchNormGrad(v(2, Cin), N * H * W, True),
                                 None if upsample else x)
    if stride2:
        c2, _, _ = dwconv_stage.dwconv_stage_forward(a, v(EC), v(EC), v(EC, 1, k, k), 2, False)
        dwconv_stage.dwconv_stage_backward(torch.randn_like(c2), a, v(EC), v(EC), v(EC), v(EC, 1, k, k), 2, False)
    if not kl:
        return
    g = act(8, H, W)
    for prior in (g, None):
        normal_kl.normal_kl_forward(prior, prior, g, g, g, True)
        normal_kl.normal_kl_backward(g, None, v(N), v(N), v(8), prior, prior, g, g, g, True)
        normal_kl.flow_kl_forward(prior, prior, g, g, g, g, True)
        normal_kl.flow_kl_backward(v(N), None, v(N), v(8), prior, prior, g, g, g, g, True)
        normal_kl.normal_sample_forward(prior, prior, g, 0.7)
    normal_kl.normal_sample_backward(g, g, g, g, 0.7)


def _signature(fn: JITFunction, args: tuple, kwargs: dict) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) as Triton's launcher would specialise the call."""
    signature, constexprs, attrs = {}, {}, {}
    values = iter(args)
    for index, param in enumerate(fn.params):
        if param.is_constexpr:
            signature[param.name], constexprs[param.name] = "constexpr", kwargs[param.name]
            continue
        value = next(values)
        if value is None:    # an unused pointer: Triton specialises None as a constant
            signature[param.name], constexprs[param.name] = "constexpr", None
        elif isinstance(value, torch.Tensor):
            signature[param.name] = "*" + _TYPES[value.dtype]
            if value.data_ptr() % 16 == 0:
                attrs[(index,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[param.name] = "fp32"
        elif value == 1 and not param.do_not_specialize:
            signature[param.name], constexprs[param.name] = "constexpr", 1
        else:
            signature[param.name] = "i64" if abs(value) >= 2**31 else "i32"
            if value % 16 == 0:
                attrs[(index,)] = [["tt.divisibility", 16]]
    return signature, constexprs, attrs


def _specialisations(launches: list[tuple[JITFunction, tuple, dict]]) -> list[tuple]:
    found = {}
    for fn, args, kwargs in launches:
        signature, constexprs, attrs = _signature(fn, args, kwargs)
        options = {k: v for k, v in kwargs.items() if k in _LAUNCH_OPTIONS}
        key = (fn.__name__, tuple(signature.items()), tuple((k, str(v)) for k, v in constexprs.items()),
               tuple(sorted(attrs)), tuple(options.items()))
        found[key] = (fn, signature, constexprs, attrs, options)
    return list(found.values())


def _compile(fn, signature, constexprs, attrs, options, arch):
    return triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
                          target=GPUTarget("cuda", arch, 32), options=options)


def _ptxas_usage(ptx: str, arch: int) -> tuple[int, int, int]:
    """(registers, spill store bytes, spill load bytes) that ptxas reports for a kernel's PTX,
    run as Triton runs it."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "kernel.ptx"
        src.write_text(ptx)
        log = subprocess.run([get_ptxas(arch).path, "-lineinfo", "-v", "--regAllocOptLevel=2",
                              f"--gpu-name={sm_arch_from_capability(arch)}", str(src), "-o", str(Path(tmp) / "k.o")],
                             capture_output=True, text=True, check=True).stderr
    registers = int(re.search(r"Used (\d+) registers", log).group(1))
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return registers, int(spills.group(1)), int(spills.group(2))


def check(archs: list[int]) -> int:
    launches = _record_launches()
    _launch_everything(torch.bfloat16, 5, upsample=True, stride2=False, kl=True)
    _launch_everything(torch.float32, 3, upsample=False, stride2=True, kl=False)
    specialisations = _specialisations(launches)
    failures = 0
    for arch in archs:
        for fn, signature, constexprs, attrs, options in specialisations:
            try:
                compiled = _compile(fn, signature, constexprs, attrs, options, arch)
                shared, limit = compiled.metadata.shared, _SHARED_LIMIT.get(arch)
                if limit is not None and shared > limit:
                    raise RuntimeError(f"needs {shared} B of shared memory, sm_{arch} allows {limit} B per block")
            except Exception as err:  # report every failing kernel, then fail
                failures += 1
                print(f"sm_{arch} {fn.__name__} {constexprs} {options}: {err}", file=sys.stderr)
    print(f"{len(specialisations)} kernel specialisations, sm_{'/'.join(map(str, archs))}: {failures} failed")
    return 1 if failures else 0


def report(arch: int, shape: tuple[int, int, int, int, int], dtype: torch.dtype, k: int, upsample: bool) -> int:
    """Prints registers, spills and shared memory of every kernel one cell launches at ``shape``."""
    launches = _record_launches(_SHARED_LIMIT[arch])
    _launch_everything(dtype, k, upsample=upsample, stride2=False, kl=False, shape=shape)
    shown = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK_K1", "BLOCK_K2", "BLOCK_C", "TH", "TW", "K", "UP", "IMGS")
    print(f"sm_{arch}, N, Cin, H, W, E = {shape}, {str(dtype).removeprefix('torch.')}, k={k}, upsample={upsample}")
    print(f"{'kernel':32s} {'blocks':44s} {'warps':>5s} {'stages':>6s} {'regs':>5s} {'spill st/ld B':>14s} "
          f"{'smem B':>7s}")
    for fn, signature, constexprs, attrs, options in _specialisations(launches):
        compiled = _compile(fn, signature, constexprs, attrs, options, arch)
        registers, spill_stores, spill_loads = _ptxas_usage(compiled.asm["ptx"], arch)
        blocks = " ".join(f"{k}={v}" for k, v in constexprs.items() if k in shown)
        print(f"{fn.__name__:32s} {blocks:44s} {compiled.metadata.num_warps:5d} {compiled.metadata.num_stages:6d} "
              f"{registers:5d} {f'{spill_stores}/{spill_loads}':>14s} {compiled.metadata.shared:7d}")
    return 0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("archs", nargs="*", type=int, default=[80, 90])
    parser.add_argument("--report", action="store_true", help="print each kernel's resources for one cell")
    parser.add_argument("--shape", default="32,256,16,16", help="N,Cin,H,W of --report")
    parser.add_argument("--expansion", type=int, default=6)
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--upsample", action="store_true")
    parser.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16")
    args = parser.parse_args(argv)
    if args.report:
        N, Cin, H, W = (int(v) for v in args.shape.split(","))
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
        return report(args.archs[0] if args.archs else 90, (N, Cin, H, W, args.expansion), dtype, args.k,
                      args.upsample)
    return check(args.archs)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
