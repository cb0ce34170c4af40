"""Depthwise stage of the fused cell: the Triton kernels against the reference."""

import pytest
import torch
import torch.nn.functional as F

import nvae_fast
from nvae_fast.kernels.triton import dwconv_stage as triton_stage
from nvae_fast.ops.dwconv_stage import (
    dwconv_stage_backward, dwconv_stage_backward_ref, dwconv_stage_forward, dwconv_stage_forward_ref,
)

from conftest import HAS_CUDA, requires_cuda
from tolerances import assert_close

DEVICE = "cuda" if HAS_CUDA else "cpu"


def _inputs(N, C, H, W, k, dtype=torch.float32, layout="channels_last", device=DEVICE):
    g = torch.Generator().manual_seed(N * 1000 + C * 10 + k)
    a = (torch.randn(N, C, H, W, generator=g) * 1.5 + 0.2).to(device, dtype)
    a = a.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else a.contiguous()
    scale = (torch.rand(C, generator=g) + 0.5).to(device)
    shift = (torch.randn(C, generator=g) * 0.3).to(device)
    weight = (torch.randn(C, 1, k, k, generator=g) / k).to(device)
    mean_a = torch.randn(C, generator=g).to(device)
    return a, scale, shift, weight, mean_a


def _check(N, C, H, W, k, stride, upsample, dtype=torch.float32, layout="channels_last"):
    a, scale, shift, weight, mean_a = _inputs(N, C, H, W, k, dtype, layout)
    where = f"{(N, C, H, W)} k={k} stride={stride} upsample={upsample} {dtype} {layout}"
    expected = dwconv_stage_forward_ref(a, scale, shift, weight, stride, upsample)
    with nvae_fast.use_backend("triton"):
        got = dwconv_stage_forward(a, scale, shift, weight, stride, upsample)
    assert got[0].shape == expected[0].shape and got[0].dtype == dtype
    assert got[0].is_contiguous(memory_format=torch.channels_last)
    assert_close(got[0], expected[0], dtype, msg=f"c, {where}")
    # Statistics are fp32 sums over N*Ho*Wo terms of the same fp32 values.
    for name, x, y in (("mean_c", got[1], expected[1]), ("var_c", got[2], expected[2])):
        assert_close(x, y, torch.float32, scale=5, msg=f"{name}, {where}")

    dc = torch.randn(expected[0].shape, device=DEVICE).to(dtype).contiguous(memory_format=torch.channels_last)
    expected = dwconv_stage_backward_ref(dc, a, scale, shift, mean_a, weight, stride, upsample)
    with nvae_fast.use_backend("triton"):
        got = dwconv_stage_backward(dc, a, scale, shift, mean_a, weight, stride, upsample)
    assert got[0].dtype == dtype and got[0].is_contiguous(memory_format=torch.channels_last)
    assert_close(got[0], expected[0], dtype, scale=2, msg=f"g, {where}")
    for name, x, y in zip(("sum_g", "sum_gxmu", "dweight"), got[1:], expected[1:]):
        assert x.dtype == torch.float32
        assert_close(x, y, torch.float32, scale=10, msg=f"{name}, {where}")


CASES = [
    # (N, C, H, W, k, stride, upsample)
    (2, 20, 5, 7, 5, 1, False),
    (1, 3, 1, 1, 5, 1, False),
    (3, 36, 4, 4, 5, 1, True),
    (1, 18, 1, 1, 5, 1, True),
    (2, 5, 7, 6, 3, 2, False),
    (2, 6, 9, 9, 7, 2, False),
    (1, 4, 3, 5, 11, 1, True),
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c)))
def test_triton_matches_reference(case):
    _check(*case)


@pytest.mark.gpu
def test_triton_nchw_input():
    _check(2, 20, 5, 7, 5, 1, False, layout="nchw")
    _check(2, 6, 4, 3, 5, 1, True, layout="nchw")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_half_precision(dtype):
    _check(2, 20, 5, 7, 5, 1, True, dtype=dtype)


@pytest.mark.gpu
def test_triton_small_tiles(monkeypatch):
    """GPU-sized tiles: several pixel tiles per image, several channel blocks and reduction chunks."""
    monkeypatch.setattr(triton_stage, "_blocks", lambda C, pixels, device: (16, 16))
    monkeypatch.setattr(triton_stage, "reduction_programs", lambda device, others: 3)
    _check(2, 40, 5, 6, 3, 1, False)
    _check(1, 20, 3, 4, 3, 1, True)
    _check(2, 17, 6, 5, 3, 2, False)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape,upsample", [((32, 1536, 16, 16), False), ((4, 360, 64, 64), False),
                                            ((8, 768, 8, 8), True)])
def test_triton_large_shapes_on_gpu(shape, upsample, dtype):
    _check(*shape, 5, 1, upsample, dtype=dtype)


def test_reference_matches_official_layers():
    """The reference stage is BN1+Swish -> (nearest 2x) -> depthwise conv, as the official cell."""
    a, scale, shift, weight, _ = _inputs(2, 6, 4, 5, 5, torch.float64, device="cpu")
    scale, shift, weight = scale.double(), shift.double(), weight.double()
    b = F.silu(a * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1))
    b = F.interpolate(b, scale_factor=2, mode="nearest")
    c = F.conv2d(b, weight, padding=2, groups=6)
    got, mean, var = dwconv_stage_forward_ref(a, scale, shift, weight, 1, True)
    assert_close(got, c)
    assert_close(mean, c.mean(dim=(0, 2, 3)))
    assert_close(var, c.var(dim=(0, 2, 3), unbiased=False))


@pytest.mark.parametrize("stride,upsample", [(1, False), (2, False), (1, True)])
def test_torch_backend_backward_matches_reference(stride, upsample):
    """The explicit formulas of the torch backend against the reference's autograd, in float64."""
    a, scale, shift, weight, mean_a = (t.double() for t in _inputs(2, 5, 5, 7, 5, device="cpu"))
    c, _, _ = dwconv_stage_forward_ref(a, scale, shift, weight, stride, upsample)
    dc = torch.randn_like(c)
    with nvae_fast.use_backend("torch"):
        got = dwconv_stage_backward(dc, a, scale, shift, mean_a, weight, stride, upsample)
    for x, y in zip(got, dwconv_stage_backward_ref(dc, a, scale, shift, mean_a, weight, stride, upsample)):
        assert_close(x, y)


def test_opcheck():
    a, scale, shift, weight, mean_a = _inputs(2, 5, 4, 3, 3, device="cpu")
    torch.library.opcheck(torch.ops.nvae_fast.dwconv_stage_forward.default, (a, scale, shift, weight, 1, True))
    dc = torch.randn(2, 5, 8, 6).contiguous(memory_format=torch.channels_last)
    torch.library.opcheck(torch.ops.nvae_fast.dwconv_stage_backward.default,
                          (dc, a, scale, shift, mean_a, weight, 1, True))


def test_bad_inputs_raise_clear_errors():
    a, scale, shift, weight, mean_a = _inputs(2, 5, 4, 3, 5, device="cpu")
    with pytest.raises(ValueError, match=r"weight must have shape \(5, 1, k, k\)"):
        dwconv_stage_forward(a, scale, shift, torch.randn(5, 1, 4, 4))
    with pytest.raises(ValueError, match="stride must be 1 or 2"):
        dwconv_stage_forward(a, scale, shift, weight, stride=3)
    with pytest.raises(ValueError, match="upsample needs stride 1"):
        dwconv_stage_forward(a, scale, shift, weight, stride=2, upsample=True)
    with pytest.raises(ValueError, match="scale must be a contiguous float32"):
        dwconv_stage_forward(a, scale[:4], shift, weight)
    with pytest.raises(ValueError, match=r"dc must have shape \(2, 5, 8, 6\)"):
        dwconv_stage_backward(torch.randn(2, 5, 4, 3), a, scale, shift, mean_a, weight, upsample=True)
    with pytest.raises(ValueError, match="4-D"):
        dwconv_stage_forward(a[0], scale, shift, weight)
