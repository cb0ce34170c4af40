"""CUDA kernels of the depthwise stage (csrc/dwconv_stage*, nvae_fast/kernels/cuda/dwconv_stage.py).

Kernel results are compared with the contract's references on a GPU, or in the CPU emulation of
csrc/ (see cuda_targets.py); argument errors are checked on the CPU, before any launch.
"""

import importlib
import json
import math
import os
import random
import re
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from nvae_fast.kernels.cuda import common
from nvae_fast.kernels.cuda import dwconv_stage as dw
from nvae_fast.ops.dwconv_stage import (dwconv_stage_backward_fused_ref, dwconv_stage_backward_ref,
                                        dwconv_stage_forward_fused_ref, dwconv_stage_forward_ref)
from nvae_fast.ops.stage_args import BatchNormArgs, BatchNormGrad, RunningUpdate

from conftest import HAS_CUDA, requires_cuda
from cuda_targets import kernel_device, use_emulation  # noqa: F401  (fixture)
from tolerances import assert_close

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MODES = ((1, False), (2, False), (1, True))  # (stride, upsample)


def _inputs(shape, k, dtype, device, seed):
    N, C, H, W = shape
    g = torch.Generator().manual_seed(seed)
    a = (torch.randn(shape, generator=g) * 1.5 + 0.2).to(dtype)
    scale = torch.rand(C, generator=g) + 0.5
    shift = torch.randn(C, generator=g) * 0.3
    weight = torch.randn(C, 1, k, k, generator=g) / k
    a = a.to(device).contiguous(memory_format=torch.channels_last)
    return a, scale.to(device), shift.to(device), weight.to(device), g


def _check_against_reference(shape, k, stride, upsample, dtype, device, seed=0):
    a, scale, shift, weight, g = _inputs(shape, k, dtype, device, seed)
    where = f"{shape} k={k} stride={stride} upsample={upsample} {dtype}"

    c, mean_c, var_c = dw.dwconv_stage_forward(a, scale, shift, weight, stride, upsample)
    c_ref, mean_ref, var_ref = dwconv_stage_forward_ref(a, scale, shift, weight, stride, upsample)
    assert c.dtype == dtype and c.shape == c_ref.shape, where
    assert c.is_contiguous(memory_format=torch.channels_last), where
    assert_close(c, c_ref, dtype, msg=f"c, {where}")
    # Statistics are fp32 over N*Ho*Wo values in both: summation order only.
    assert_close(mean_c, mean_ref, torch.float32, scale=10, msg=f"mean_c, {where}")
    assert_close(var_c, var_ref, torch.float32, scale=10, msg=f"var_c, {where}")

    dc = torch.randn(c_ref.shape, generator=g).to(dtype).to(device).contiguous(memory_format=torch.channels_last)
    mean_a = a.float().mean(dim=(0, 2, 3))
    g_out, sum_g, sum_gxmu, dweight = dw.dwconv_stage_backward(dc, a, scale, shift, mean_a, weight, stride, upsample)
    g_ref, sum_g_ref, sum_gxmu_ref, dweight_ref = dwconv_stage_backward_ref(dc, a, scale, shift, mean_a, weight,
                                                                            stride, upsample)
    assert g_out.dtype == dtype and g_out.shape == a.shape, where
    assert g_out.is_contiguous(memory_format=torch.channels_last), where
    assert dweight.dtype == torch.float32 and dweight.shape == weight.shape, where
    assert_close(g_out, g_ref, dtype, msg=f"g, {where}")
    assert_close(sum_g, sum_g_ref, torch.float32, scale=10, msg=f"sum_g, {where}")
    assert_close(sum_gxmu, sum_gxmu_ref, torch.float32, scale=10, msg=f"sum_gxmu, {where}")
    assert_close(dweight, dweight_ref, torch.float32, scale=10, msg=f"dweight, {where}")


def _fuzz_cases():
    """Every kernel size x mode, twice, with seeded shapes: N = 1..3, C on and off the vector width
    (1, 3, 20, 33, 40, 64, 70), H and W from 1 to beyond one tile; dtypes rotate through the cases."""
    rng = random.Random(2024)
    cases = []
    for k in dw.KERNEL_SIZES:
        for stride, upsample in MODES:
            for rep in range(2):
                N = rng.choice([1, 2, 3])
                C = rng.choice([1, 3, 20, 33, 40, 64, 70])
                H, W = rng.choice([1, 2, 5, 9, 17, 35]), rng.choice([1, 3, 4, 7, 16, 19, 40])
                if upsample:
                    H, W = (H + 1) // 2, (W + 1) // 2
                dtype = DTYPES[len(cases) % 3]
                case_id = f"k{k}-s{stride}{'-up' if upsample else ''}-{N}x{C}x{H}x{W}-{str(dtype)[6:]}"
                cases.append(pytest.param((N, C, H, W), k, stride, upsample, dtype, id=case_id))
    return cases


@pytest.mark.parametrize("shape,k,stride,upsample,dtype", _fuzz_cases())
def test_matches_reference(shape, k, stride, upsample, dtype, kernel_device):
    _check_against_reference(shape, k, stride, upsample, dtype, kernel_device)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("stride,upsample", MODES)
def test_all_dtypes_vector_and_scalar_channels(dtype, stride, upsample, kernel_device):
    """C = 40 takes the 16-byte vector path in every dtype, C = 12 the scalar path in half precision."""
    for C in (40, 12):
        _check_against_reference((2, C, 6, 7), 5, stride, upsample, dtype, kernel_device, seed=C)


def test_reductions_are_deterministic(kernel_device):
    a, scale, shift, weight, g = _inputs((3, 40, 19, 17), 5, torch.float32, kernel_device, seed=3)
    first = dw.dwconv_stage_forward(a, scale, shift, weight)
    dc = torch.randn(first[0].shape, generator=g).to(kernel_device).contiguous(memory_format=torch.channels_last)
    mean_a = a.mean(dim=(0, 2, 3))
    first_bwd = dw.dwconv_stage_backward(dc, a, scale, shift, mean_a, weight)
    for x, y in zip(first + first_bwd, dw.dwconv_stage_forward(a, scale, shift, weight)
                    + dw.dwconv_stage_backward(dc, a, scale, shift, mean_a, weight)):
        assert torch.equal(x, y)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape,upsample", [((32, 1536, 16, 16), False), ((32, 384, 32, 32), False),
                                            ((4, 360, 128, 128), False), ((8, 96, 32, 32), True)])
def test_cuda_model_shapes(shape, upsample, dtype):
    """The decoder's shapes (and an up-cell), where tiles, chunks and partial counts are large."""
    _check_against_reference(shape, 5, 1, upsample, dtype, "cuda")


# ---------------------------------------------------------------------------------------------
# The fused contract: BatchNorms folded, running statistics and parameter gradients in the kernels
# ---------------------------------------------------------------------------------------------

def _batchnorm(C, param_dtype, device, g, eps=1e-5):
    weight = (torch.rand(C, generator=g) + 0.5).to(param_dtype)
    bias = (torch.randn(C, generator=g) * 0.3).to(param_dtype)
    mean, var = torch.randn(C, generator=g) * 0.5, torch.rand(C, generator=g) + 0.3
    return BatchNormArgs(*(t.to(device) for t in (weight, bias, mean, var)), eps)


def _running(C, dtype, device, g, count):
    mean, var = torch.randn(C, generator=g).to(dtype), (torch.rand(C, generator=g) + 0.5).to(dtype)
    return RunningUpdate(mean.to(device), var.to(device), torch.tensor(7, device=device), 0.05, count / (count - 1))


def _clone(nt):
    return type(nt)(*(t.clone() if isinstance(t, torch.Tensor) else t for t in nt))


FUSED_CASES = [  # shape, k, stride, upsample, activation dtype, parameter dtype, training
    pytest.param((2, 40, 9, 7), 5, 1, False, torch.float32, torch.float32, True, id="k5-fp32"),
    pytest.param((1, 33, 6, 5), 3, 1, True, torch.bfloat16, torch.bfloat16, True, id="k3-up-bf16-params-bf16"),
    pytest.param((2, 24, 9, 10), 7, 2, False, torch.float16, torch.float32, True, id="k7-s2-fp16"),
    pytest.param((1, 16, 7, 12), 11, 1, False, torch.bfloat16, torch.float32, True, id="k11-bf16"),
    pytest.param((3, 20, 5, 6), 5, 1, False, torch.float32, torch.float16, False, id="k5-eval-params-fp16"),
]


@pytest.mark.parametrize("shape,k,stride,upsample,dtype,param_dtype,training", FUSED_CASES)
def test_fused_contract_matches_its_reference(shape, k, stride, upsample, dtype, param_dtype, training,
                                              kernel_device):
    N, C, H, W = shape
    dev = kernel_device
    g = torch.Generator().manual_seed(sum(shape) + k)
    a = (torch.randn(shape, generator=g) * 1.5 + 0.2).to(dtype).to(dev).contiguous(memory_format=torch.channels_last)
    weight = (torch.randn(C, 1, k, k, generator=g) / k).to(param_dtype).to(dev)
    bn1 = _batchnorm(C, param_dtype, dev, g)
    Ho, Wo = dw.output_size(H, W, k, stride, upsample)
    count = N * Ho * Wo
    where = f"{shape} k={k} stride={stride} upsample={upsample} {dtype} params {param_dtype} training={training}"

    # Forward: statistics and BN2's running update in training, neither in eval.
    stats, stats_ref = (torch.full((2, C), float("nan"), device=dev) for _ in range(2)) if training else (None, None)
    running = _running(C, param_dtype, dev, g, count) if training else None
    running_ref = _clone(running) if training else None
    c = dw.dwconv_stage_forward_fused(a, bn1, weight, stride, upsample, stats, running)
    c_ref = dwconv_stage_forward_fused_ref(a, bn1, weight, stride, upsample, stats_ref, running_ref)
    assert c.dtype == dtype and c.is_contiguous(memory_format=torch.channels_last), where
    assert_close(c, c_ref, dtype, msg=f"c, {where}")
    if training:
        assert_close(stats, stats_ref, torch.float32, scale=10, msg=f"stats, {where}")
        for name in ("mean", "var"):
            assert_close(getattr(running, name), getattr(running_ref, name), param_dtype, scale=10,
                         msg=f"running {name}, {where}")
        assert running.num_batches_tracked.item() == running_ref.num_batches_tracked.item() == 8, where

    # Backward: dc rebuilt from dz and z (= c) with BN2's backward.
    dz = torch.randn(c.shape, generator=g).to(dtype).to(dev).contiguous(memory_format=torch.channels_last)
    bn_z = _batchnorm(C, param_dtype, dev, g)
    grad_z = BatchNormGrad((torch.randn(2, C, generator=g) * count ** 0.5).to(dev), count, training)
    outs = [(torch.full((2, C), float("nan"), device=dev), tuple(torch.empty_like(bn1.weight) for _ in range(2)),
             torch.empty_like(weight)) for _ in range(2)]
    g_out = dw.dwconv_stage_backward_fused(dz, c, bn_z, grad_z, a, bn1, weight, stride, upsample, *outs[0])
    g_ref = dwconv_stage_backward_fused_ref(dz, c, bn_z, grad_z, a, bn1, weight, stride, upsample, *outs[1])
    assert g_out.dtype == dtype and g_out.is_contiguous(memory_format=torch.channels_last), where
    assert_close(g_out, g_ref, dtype, msg=f"g, {where}")
    (sums, grads, dweight), (sums_ref, grads_ref, dweight_ref) = outs
    assert_close(sums, sums_ref, torch.float32, scale=10, msg=f"sums, {where}")
    for name, x, y in (("grad bn1.weight", grads[0], grads_ref[0]), ("grad bn1.bias", grads[1], grads_ref[1]),
                       ("dweight", dweight, dweight_ref)):
        assert x.dtype == param_dtype, where
        assert_close(x, y, param_dtype if param_dtype != torch.float32 else torch.float32, scale=10,
                     msg=f"{name}, {where}")


def test_fused_contract_is_deterministic(kernel_device):
    dev = kernel_device
    g = torch.Generator().manual_seed(11)
    a = torch.randn(2, 40, 13, 11, generator=g).to(dev).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(40, 1, 5, 5, generator=g).to(dev)
    bn1, bn_z = _batchnorm(40, torch.float32, dev, g), _batchnorm(40, torch.float32, dev, g)
    runs = []
    for _ in range(2):
        stats = torch.empty(2, 40, device=dev)
        running = _running(40, torch.float32, dev, torch.Generator().manual_seed(1), 2 * 13 * 11)
        c = dw.dwconv_stage_forward_fused(a, bn1, weight, 1, False, stats, running)
        dz = torch.randn(c.shape, generator=torch.Generator().manual_seed(2)).to(dev)
        dz = dz.contiguous(memory_format=torch.channels_last)
        sums, dweight = torch.empty(2, 40, device=dev), torch.empty_like(weight)
        grads = (torch.empty(40, device=dev), torch.empty(40, device=dev))
        grad_z = BatchNormGrad(torch.randn(2, 40, generator=torch.Generator().manual_seed(3)).to(dev) * 30,
                               2 * 13 * 11, True)
        g_out = dw.dwconv_stage_backward_fused(dz, c, bn_z, grad_z, a, bn1, weight, 1, False, sums, grads, dweight)
        runs.append([c, stats, running.mean, running.var, g_out, sums, *grads, dweight])
    for x, y in zip(*runs):
        assert torch.equal(x, y)


def test_fused_contract_bad_arguments_raise_before_launch(monkeypatch):
    """Every check runs on the CPU, with CPU tensors standing in for CUDA ones."""
    monkeypatch.setattr(common, "require_cuda", lambda name, x: None)
    monkeypatch.setattr(common, "ext", lambda: pytest.fail("a kernel was launched with bad arguments"))
    g = torch.Generator().manual_seed(0)
    a = torch.randn(2, 4, 6, 6, generator=g).contiguous(memory_format=torch.channels_last)
    weight, bn = torch.randn(4, 1, 3, 3, generator=g), _batchnorm(4, torch.float32, "cpu", g)
    stats = torch.empty(2, 4)
    with pytest.raises(TypeError, match="bn1 must be a BatchNormArgs"):
        dw.dwconv_stage_forward_fused(a, (1, 2), weight, 1, False, stats)
    with pytest.raises(ValueError, match=r"bn1.mean must have shape \(4,\)"):
        dw.dwconv_stage_forward_fused(a, bn._replace(mean=torch.zeros(3)), weight, 1, False, stats)
    with pytest.raises(TypeError, match="bn1.var must be float32"):
        dw.dwconv_stage_forward_fused(a, bn._replace(var=bn.var.double()), weight, 1, False, stats)
    with pytest.raises(TypeError, match="bn1.bias must be float32"):
        dw.dwconv_stage_forward_fused(a, bn._replace(bias=bn.bias.half()), weight, 1, False, stats)
    with pytest.raises(TypeError, match="weight must be a contiguous float32, float16 or bfloat16"):
        dw.dwconv_stage_forward_fused(a, bn, weight.double(), 1, False, stats)
    with pytest.raises(ValueError, match=r"stats must be a contiguous float32 tensor of shape \(2, 4\)"):
        dw.dwconv_stage_forward_fused(a, bn, weight, 1, False, torch.empty(4, 2).t())
    with pytest.raises(ValueError, match="running needs stats"):
        dw.dwconv_stage_forward_fused(a, bn, weight, 1, False, None, _running(4, torch.float32, "cpu", g, 72))
    with pytest.raises(TypeError, match="num_batches_tracked must be an int64 tensor"):
        run = _running(4, torch.float32, "cpu", g, 72)._replace(num_batches_tracked=torch.zeros(1))
        dw.dwconv_stage_forward_fused(a, bn, weight, 1, False, stats, run)
    dz = torch.randn(2, 4, 6, 6, generator=g).contiguous(memory_format=torch.channels_last)
    grad = BatchNormGrad(torch.zeros(2, 4), 72, True)
    outs = (torch.empty(2, 4), (torch.empty(4), torch.empty(4)), torch.empty_like(weight))
    with pytest.raises(ValueError, match="z must be dense channels-last"):
        dw.dwconv_stage_backward_fused(dz, dz.contiguous(), bn, grad, a, bn, weight, 1, False, *outs)
    with pytest.raises(ValueError, match=r"dz must have shape \(2, 4, 3, 3\)"):
        dw.dwconv_stage_backward_fused(dz, dz, bn, grad, a, bn, weight, 2, False, *outs)
    with pytest.raises(ValueError, match="grad_z.count must be a positive int"):
        dw.dwconv_stage_backward_fused(dz, dz, bn, grad._replace(count=0), a, bn, weight, 1, False, *outs)
    with pytest.raises(TypeError, match=r"bn1_grads\[1\] must be float32"):
        dw.dwconv_stage_backward_fused(dz, dz, bn, grad, a, bn, weight, 1, False, outs[0],
                                       (torch.empty(4), torch.empty(4, dtype=torch.bfloat16)), outs[2])
    with pytest.raises(ValueError, match="dweight must be a contiguous tensor like weight"):
        dw.dwconv_stage_backward_fused(dz, dz, bn, grad, a, bn, weight, 1, False, outs[0], outs[1], weight.half())


# ---------------------------------------------------------------------------------------------
# Launch plans at the presets' shapes (host code only: counted, not timed)
# ---------------------------------------------------------------------------------------------

H200_SMS = 132
H200 = dict(sms=H200_SMS, smem_per_block=228 * 1024 // 2 - 1024)  # two blocks per multiprocessor
A100 = dict(sms=108, smem_per_block=164 * 1024 // 2 - 1024)
PRESETS = ("cifar10", "celeba_64", "imagenet_32", "celeba_256", "ffhq", "mnist")


PRESET_SHAPES = Path(__file__).resolve().parent / "fixtures" / "dwconv_stage_preset_shapes.json"


def _preset_stage_shapes(presets=PRESETS):
    """(preset, (N, C, H, W), k, upsample) of the depthwise stage of every fused cell of the presets,
    read off the models by benchmarks/preset_shapes.py (seconds per preset on the meta device; built
    without the latent samplers' normalizing flows, which hold no cells and take most of that time)."""
    bench = str(Path(__file__).resolve().parents[1] / "benchmarks")
    sys.path.insert(0, bench)
    try:
        preset_shapes = importlib.import_module("preset_shapes")
    finally:
        sys.path.remove(bench)
    from nvae_fast import NVAEConfig

    shapes = set()
    for preset in presets:
        config = NVAEConfig.preset(preset, num_nf=0)
        cells, _ = preset_shapes.model_shapes(config, preset_shapes.PRESET_BATCH[preset])
        for cell in cells:
            for op in cell.ops:
                m = re.fullmatch(r"mconv_e(\d+)k(\d+)g0", op)
                if m:
                    shape = (cell.batch, cell.c_in * int(m.group(1)), cell.height, cell.width)
                    shapes.add((preset, shape, int(m.group(2)), cell.cell_type.startswith("up")))
    return sorted(shapes)


def _fixture_stage_shapes():
    """The same list for every preset, as stored in tests/fixtures (regenerate with
    ``_preset_stage_shapes()`` when the presets change; the mnist entries are checked live)."""
    presets = json.loads(PRESET_SHAPES.read_text())["presets"]
    return sorted((p, tuple(e["a"]), e["k"], e["upsample"]) for p, entries in presets.items() for e in entries)


def test_preset_shapes_fixture_matches_the_models():
    assert set(p for p, *_ in _fixture_stage_shapes()) == set(PRESETS)
    assert [s for s in _fixture_stage_shapes() if s[0] == "mnist"] == _preset_stage_shapes(("mnist",))


@pytest.fixture
def plan_ext(monkeypatch):
    """The launch plans come from host code: the GPU build where there is one, else the emulated build."""
    if not HAS_CUDA:
        use_emulation(monkeypatch)


def test_launch_plans_fill_an_h200_at_every_preset_shape(plan_ext):
    """Every kernel of the stage launches at least one block per multiprocessor of an H200 at every
    preset's shapes; the weight grad sums all K * K taps in one block (no grid dimension over taps);
    BN1 + Swish is evaluated at most twice per element of a (once, plus the halos the tiles share);
    no merge walks more than a handful of partials one after another."""
    shapes = _fixture_stage_shapes()
    assert len(shapes) > 20
    for preset, shape, k, upsample in shapes:
        plan = dw.launch_plan(shape, k, 1, upsample, **H200)
        where = f"{preset} {shape} k={k} upsample={upsample}: {plan}"
        cblocks = math.ceil(shape[1] / 32)
        for name in ("forward", "input_grad", "weight_grad"):
            p = plan[name]
            assert p["blocks"] >= H200_SMS, where
            assert p["blocks"] == cblocks * math.ceil(p["tiles"] / p["tiles_per_block"]), where
            assert p["smem_bytes"] <= H200["smem_per_block"], where
            assert p["merge"]["serial_loads"] <= 12, where
        assert plan["input_grad"]["evaluations_per_element"] == 1.0, where
        assert plan["forward"]["evaluations_per_element"] < 2.0, where
        assert plan["weight_grad"]["evaluations_per_element"] < 2.0, where
        assert plan["forward"]["merge"]["parts"] == plan["forward"]["tiles"], where
        assert plan["weight_grad"]["merge"]["parts"] == plan["weight_grad"]["blocks"] // cblocks, where


@pytest.mark.parametrize("k", dw.KERNEL_SIZES)
def test_weight_grad_fills_the_device_on_small_problems(k, plan_ext):
    """A batch of one small image still spreads the weight grad over the device (smaller tiles),
    and an 11 x 11 filter still takes all 121 taps in one block."""
    plan = dw.launch_plan((1, 64, 16, 16), k, **H200)["weight_grad"]
    assert plan["blocks"] >= 16 * 2, plan
    assert plan["blocks"] == 2 * math.ceil(plan["tiles"] / plan["tiles_per_block"]), plan


def test_merges_scale_with_the_number_of_partials(plan_ext):
    """Thousands of partials per channel merge in two levels of about sqrt(P) each."""
    plan = dw.launch_plan((64, 32, 256, 256), 5, **H200)["forward"]
    merge = plan["merge"]
    assert merge["parts"] == plan["tiles"] > 10_000
    assert merge["segments"] * merge["seg_len"] >= merge["parts"] > (merge["segments"] - 1) * merge["seg_len"]
    assert merge["serial_loads"] <= 2 * math.ceil(math.sqrt(merge["parts"]) / 8) + 2
    assert dw.launch_plan((1, 32, 4, 4), 3, **H200)["forward"]["merge"]["segments"] == 1


def test_launch_plan_arguments(plan_ext):
    with pytest.raises(ValueError, match="sms must be a positive int"):
        dw.launch_plan((1, 4, 4, 4), 3, sms=0, smem_per_block=49152)
    with pytest.raises(ValueError, match="smem_per_block must be an int of at least 48 KiB"):
        dw.launch_plan((1, 4, 4, 4), 3, sms=1, smem_per_block=1024)
    with pytest.raises(ValueError, match="k must be one of"):
        dw.launch_plan((1, 4, 4, 4), 4, **H200)
    with pytest.raises(ValueError, match="shape must be 4 positive ints"):
        dw.launch_plan((1, 4, 4), 3, **H200)


# ---------------------------------------------------------------------------------------------
# Arguments (CPU: every check runs before any launch)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("h,w", [(1, 1), (5, 7), (16, 16), (9, 2)])
@pytest.mark.parametrize("k", dw.KERNEL_SIZES)
@pytest.mark.parametrize("stride,upsample", MODES)
def test_output_size_matches_conv2d(h, w, k, stride, upsample):
    x = torch.zeros(1, 1, h * (2 if upsample else 1), w * (2 if upsample else 1))
    expected = F.conv2d(x, torch.zeros(1, 1, k, k), stride=stride, padding=k // 2).shape[2:]
    assert dw.output_size(h, w, k, stride, upsample) == tuple(expected)


def _valid_cpu_args(C=4, k=5):
    a = torch.randn(2, C, 6, 6).contiguous(memory_format=torch.channels_last)
    return a, torch.ones(C), torch.zeros(C), torch.randn(C, 1, k, k)


def test_bad_arguments_raise_before_launch():
    a, scale, shift, weight = _valid_cpu_args()
    with pytest.raises(ValueError, match="a must be dense channels-last"):
        dw.dwconv_stage_forward(a.contiguous(), scale, shift, weight)
    with pytest.raises(ValueError, match="a must be dense channels-last"):
        dw.dwconv_stage_forward(a[:, :, :, ::2], scale, shift, weight[:, :, :, :])
    with pytest.raises(ValueError, match="4-D"):
        dw.dwconv_stage_forward(a[0], scale, shift, weight)
    with pytest.raises(TypeError, match="a must be float32, float16 or bfloat16"):
        dw.dwconv_stage_forward(a.double(), scale, shift, weight)
    with pytest.raises(ValueError, match=r"scale must have shape \(4,\)"):
        dw.dwconv_stage_forward(a, torch.ones(3), shift, weight)
    with pytest.raises(ValueError, match=r"weight must have shape \(4, 1, K, K\) with K in"):
        dw.dwconv_stage_forward(a, scale, shift, torch.randn(4, 1, 4, 4))
    with pytest.raises(ValueError, match=r"weight must have shape"):
        dw.dwconv_stage_forward(a, scale, shift, torch.randn(4, 1, 5, 3))
    with pytest.raises(TypeError, match="weight must be a floating-point tensor"):
        dw.dwconv_stage_forward(a, scale, shift, torch.ones(4, 1, 3, 3, dtype=torch.int32))
    with pytest.raises(ValueError, match="stride must be 1 or 2"):
        dw.dwconv_stage_forward(a, scale, shift, weight, stride=3)
    with pytest.raises(ValueError, match="upsample requires stride 1"):
        dw.dwconv_stage_forward(a, scale, shift, weight, stride=2, upsample=True)
    with pytest.raises(ValueError, match="must not be empty"):
        dw.dwconv_stage_forward(a[:0], scale, shift, weight)


def test_bad_backward_arguments_raise_before_launch():
    a, scale, shift, weight = _valid_cpu_args()
    mean_a = torch.zeros(4)
    dc = torch.randn(2, 4, 6, 6).contiguous(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match="dc must be dense channels-last"):
        dw.dwconv_stage_backward(dc.contiguous(), a, scale, shift, mean_a, weight)
    with pytest.raises(TypeError, match="dc must have a's dtype"):
        dw.dwconv_stage_backward(dc.half(), a, scale, shift, mean_a, weight)
    with pytest.raises(ValueError, match=r"dc must have shape \(2, 4, 3, 3\)"):
        dw.dwconv_stage_backward(dc, a, scale, shift, mean_a, weight, stride=2)
    with pytest.raises(ValueError, match=r"mean_a must have shape \(4,\)"):
        dw.dwconv_stage_backward(dc, a, scale, shift, torch.zeros(2), weight)


def test_cpu_tensors_are_refused():
    a, scale, shift, weight = _valid_cpu_args()
    with pytest.raises(ValueError, match="a must be a CUDA tensor for the cuda backend"):
        dw.dwconv_stage_forward(a, scale, shift, weight)


def test_device_and_parameter_mismatches_are_refused(monkeypatch):
    """The checks past the CUDA-device test, reached on the CPU by waiving that test."""
    monkeypatch.setattr(common, "require_cuda", lambda name, x: None)
    a, scale, shift, weight = _valid_cpu_args()
    with pytest.raises(ValueError, match="scale is on meta but a is on cpu"):
        dw.dwconv_stage_forward(a, scale.to("meta"), shift, weight)
    with pytest.raises(ValueError, match="weight is on meta but a is on cpu"):
        dw.dwconv_stage_forward(a, scale, shift, weight.to("meta"))
    with pytest.raises(TypeError, match="shift must be a contiguous float32 tensor"):
        dw.dwconv_stage_forward(a, scale, shift.double(), weight)
    dc = torch.randn(2, 4, 6, 6, device="meta").contiguous(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match="dc is on meta but a is on cpu"):
        dw.dwconv_stage_backward(dc, a, scale, shift, torch.zeros(4), weight)


@requires_cuda
def test_cuda_device_mismatch_is_refused():
    a, scale, shift, weight = _valid_cpu_args()
    with pytest.raises(ValueError, match="scale is on cpu but a is on cuda"):
        dw.dwconv_stage_forward(a.cuda(), scale, shift.cuda(), weight.cuda())


@pytest.mark.gpu   # checks the build the GPU check makes
@pytest.mark.skipif(os.environ.get("NVAE_FAST_EXPECT_EXT") != "1",
                    reason="set NVAE_FAST_EXPECT_EXT=1 where the install built nvae_fast._C (CI does)")
def test_extension_exposes_the_stage():
    from nvae_fast import _C

    for name in ("dwconv_stage_forward", "dwconv_stage_backward", "dwconv_stage_forward_workspace_bytes",
                 "dwconv_stage_backward_workspace_bytes"):
        assert callable(getattr(_C, name)), name
