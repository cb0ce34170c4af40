"""Compiles the Triton kernels of the fused cell, the depthwise stage and the KL for NVIDIA GPUs
without one: the launchers run on CPU tensors with every kernel launch recorded instead of run,
then each recorded specialisation goes through Triton's whole compiler (down to a cubin, with the
ptxas Triton ships) for the given architectures, with the launch's num_warps and num_stages. This
catches what the interpreter cannot: code that does not compile for a GPU, the bfloat16 ``tl.dot``
path the interpreter cannot run, and shared memory beyond what a block may use.

    python tests/triton_aot.py 80 90      # exit status 1 if any kernel fails to compile

Must run without TRITON_INTERPRET (tests/test_triton_compiles.py starts it in a subprocess).
"""

from __future__ import annotations

import sys

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
_LAUNCH_OPTIONS = ("num_warps", "num_stages")


def _record_launches() -> list[tuple[JITFunction, tuple, dict]]:
    """Makes every ``kernel[grid](...)`` append (kernel, args, constexpr kwargs) instead of running,
    and the launchers choose what they would choose on a GPU (block sizes, dot dtype, precision)."""
    launches: list[tuple[JITFunction, tuple, dict]] = []

    def record(self, *args, grid, warmup, **kwargs):
        launches.append((self, args, kwargs))

    JITFunction.run = record
    gemm_blocks, elementwise_blocks = gen_cell._gemm_blocks, gen_cell._elementwise_blocks
    dw_tiles, dw_chunk = dwconv_stage._tiles, dwconv_stage._chunk
    gen_cell._gemm_blocks = lambda device, K, NOUT: gemm_blocks(_GPU, K, NOUT)
    gen_cell._elementwise_blocks = lambda device, C, rows: elementwise_blocks(_GPU, C, rows)
    dwconv_stage._tiles = lambda C, rows, cols, up, device: dw_tiles(C, rows, cols, up, _GPU)
    dwconv_stage._chunk = lambda halo, tile, device: dw_chunk(halo, tile, _GPU)
    gen_cell.dot_dtype = lambda t: common._TL_DTYPES[t.dtype]
    gen_cell.dot_precision = lambda t: "tf32" if t.dtype == torch.float32 else "ieee"
    return launches


def _launch_everything(dtype: torch.dtype, k: int, upsample: bool, stride2: bool, kl: bool) -> None:
    """Calls every launcher once (the KL's only with ``kl``), with shapes that do not divide the
    block sizes."""
    N, Cin, H, W, E = 2, 20, 6, 5, 6
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


def _signature(fn: JITFunction, args: tuple, kwargs: dict) -> tuple[dict, dict]:
    signature, constexprs = {}, {}
    values = iter(args)
    for param in fn.params:
        if param.is_constexpr:
            signature[param.name], constexprs[param.name] = "constexpr", kwargs[param.name]
            continue
        value = next(values)
        if value is None:    # an unused pointer: Triton specialises None as a constant
            signature[param.name], constexprs[param.name] = "constexpr", None
        elif isinstance(value, torch.Tensor):
            signature[param.name] = "*" + _TYPES[value.dtype]
        elif isinstance(value, float):
            signature[param.name] = "fp32"
        else:
            signature[param.name] = "i64" if abs(value) >= 2**31 else "i32"
    return signature, constexprs


def main(archs: list[int]) -> int:
    launches = _record_launches()
    _launch_everything(torch.bfloat16, 5, upsample=True, stride2=False, kl=True)
    _launch_everything(torch.float32, 3, upsample=False, stride2=True, kl=False)
    specialisations = {}
    for fn, args, kwargs in launches:
        signature, constexprs = _signature(fn, args, kwargs)
        options = {k: v for k, v in kwargs.items() if k in _LAUNCH_OPTIONS}
        key = (fn.__name__, tuple(signature.items()), tuple((k, str(v)) for k, v in constexprs.items()),
               tuple(options.items()))
        specialisations[key] = (fn, signature, constexprs, options)
    failures = 0
    for arch in archs:
        for fn, signature, constexprs, options in specialisations.values():
            try:
                compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                                          target=GPUTarget("cuda", arch, 32), options=options)
                shared, limit = compiled.metadata.shared, _SHARED_LIMIT.get(arch)
                if limit is not None and shared > limit:
                    raise RuntimeError(f"needs {shared} B of shared memory, sm_{arch} allows {limit} B per block")
            except Exception as err:  # report every failing kernel, then fail
                failures += 1
                print(f"sm_{arch} {fn.__name__} {constexprs} {options}: {err}", file=sys.stderr)
    print(f"{len(specialisations)} kernel specialisations, sm_{'/'.join(map(str, archs))}: {failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main([int(a) for a in sys.argv[1:]] or [80, 90]))
