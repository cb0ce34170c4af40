"""CUDA kernels of the depthwise stage (csrc/dwconv_stage*, nvae_fast/kernels/cuda/dwconv_stage.py).

Kernel results are compared with the contract's references on a GPU, or in the CPU emulation of
csrc/ (see cuda_targets.py); argument errors are checked on the CPU, before any launch.
"""

import os
import random

import pytest
import torch
import torch.nn.functional as F

from nvae_fast.kernels.cuda import common
from nvae_fast.kernels.cuda import dwconv_stage as dw
from nvae_fast.ops.dwconv_stage import dwconv_stage_backward_ref, dwconv_stage_forward_ref

from conftest import requires_cuda
from cuda_targets import kernel_device  # noqa: F401  (fixture)
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
