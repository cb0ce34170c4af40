"""Depthwise stage of the fused cell: the Triton kernels against the reference."""

import pytest
import torch
import torch.nn.functional as F

import nvae_fast
from nvae_fast.kernels.triton import dwconv_stage as triton_stage
from nvae_fast.ops.dwconv_stage import (
    dwconv_stage_backward, dwconv_stage_backward_fused_ref, dwconv_stage_backward_ref, dwconv_stage_forward,
    dwconv_stage_forward_fused_ref, dwconv_stage_forward_ref, fused_kernels_for,
)
from nvae_fast.ops.stage_args import BatchNormArgs, BatchNormGrad, RunningUpdate

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
    monkeypatch.setattr(triton_stage, "_tiles", lambda C, rows, cols, up, device, budget: (2, 4, 16))
    monkeypatch.setattr(triton_stage, "_programs", lambda device, channel_blocks, items: min(items, 3))
    _check(2, 40, 5, 6, 3, 1, False)
    _check(1, 20, 3, 4, 3, 1, True)
    _check(2, 17, 6, 5, 3, 2, False)


def _fused_inputs(N, C, H, W, k, stride, upsample, dtype, seed=3):
    g = torch.Generator().manual_seed(seed)

    def vec(scale=1.0, offset=0.0):
        return (torch.randn(C, generator=g) * scale + offset).to(DEVICE)

    def act(h, w):
        return (torch.randn(N, C, h, w, generator=g) * 1.5 + 0.2).to(DEVICE, dtype).contiguous(
            memory_format=torch.channels_last)

    a = act(H, W)
    bn1 = BatchNormArgs(vec(0.2, 1.0), vec(0.2), vec(0.5), vec().abs() + 0.5, 1e-5)
    weight = (torch.randn(C, 1, k, k, generator=g) / k).to(DEVICE)
    Ho = ((2 * H if upsample else H) + 2 * (k // 2) - k) // stride + 1
    Wo = ((2 * W if upsample else W) + 2 * (k // 2) - k) // stride + 1
    dz, z = act(Ho, Wo), act(Ho, Wo)
    bn2 = BatchNormArgs(vec(0.2, 1.0), vec(0.2), vec(0.5), vec().abs() + 0.5, 1e-5)
    sums2 = torch.randn(2, C, generator=g).to(DEVICE) * N * Ho * Wo
    return a, bn1, weight, dz, z, bn2, sums2, N * Ho * Wo


def _run_fused(forward, backward, inputs, stride, upsample, training):
    a, bn1, weight, dz, z, bn2, sums2, count = inputs
    C = a.shape[1]
    stats = torch.empty(2, C, device=DEVICE) if training else None
    running = RunningUpdate(bn1.mean.clone(), bn1.var.clone(), torch.tensor(7, device=DEVICE), 0.05, 1.01) \
        if training else None
    c = forward(a, bn1, weight, stride, upsample, stats, running)
    sums, bn_grads = torch.empty(2, C, device=DEVICE), (torch.empty(C, device=DEVICE), torch.empty(C, device=DEVICE))
    dweight = torch.empty_like(weight)
    g = backward(dz, z, bn2, BatchNormGrad(sums2, count, training), a, bn1, weight, stride, upsample, sums, bn_grads,
                 dweight)
    return [c, g, sums, *bn_grads, dweight] + ([stats, running.mean, running.var, running.num_batches_tracked]
                                               if training else [])


@pytest.mark.parametrize("case", [(2, 20, 5, 7, 5, 1, False, True), (3, 12, 4, 4, 5, 1, True, True),
                                  (2, 6, 9, 9, 3, 2, False, True), (2, 20, 5, 7, 5, 1, True, False)],
                         ids=lambda c: "x".join(map(str, c)))
def test_triton_fused_contract_matches_reference(case):
    """The fused contract (BN1 from its statistics, BN2's backward applied in the prologue, the
    statistics, running update, sums and BN1's gradients written in place) against its reference."""
    N, C, H, W, k, stride, upsample, training = case
    inputs = _fused_inputs(N, C, H, W, k, stride, upsample, torch.float32)
    expected = _run_fused(dwconv_stage_forward_fused_ref, dwconv_stage_backward_fused_ref, inputs, stride, upsample,
                          training)
    with nvae_fast.use_backend("triton"):
        fused = fused_kernels_for(inputs[0])
    assert fused.dwconv_stage_forward_fused is triton_stage.dwconv_stage_forward_fused
    got = _run_fused(fused.dwconv_stage_forward_fused, fused.dwconv_stage_backward_fused, inputs, stride, upsample,
                     training)
    names = ["c", "g", "sums", "bn1 weight grad", "bn1 bias grad", "dweight", "stats", "running mean",
             "running var", "num_batches_tracked"]
    for name, x, y in zip(names, got, expected):
        if name == "num_batches_tracked":
            assert x.item() == y.item() == 8
        else:
            scale = 10 * max(1.0, y.abs().max().item()) if name in ("sums", "dweight", "bn1 weight grad",
                                                                    "bn1 bias grad") else 5
            assert_close(x, y, torch.float32, scale=scale, msg=f"{name}, {case}")


def test_plain_backends_get_the_fused_contract_composed(monkeypatch):
    """A backend with only the plain contract (the cuda one today) runs the fused contract through
    torch ops around its kernels: the same results as the reference."""
    from types import SimpleNamespace

    import nvae_fast.ops.dwconv_stage as ops_stage

    inputs = _fused_inputs(2, 8, 4, 5, 5, 1, True, torch.float32)
    plain = SimpleNamespace(dwconv_stage_forward=dwconv_stage_forward_ref,
                            dwconv_stage_backward=dwconv_stage_backward_ref)
    monkeypatch.setattr(ops_stage, "kernels_for", lambda a: plain)
    composed = fused_kernels_for(inputs[0])
    got = _run_fused(composed.dwconv_stage_forward_fused, composed.dwconv_stage_backward_fused, inputs, 1, True, True)
    expected = _run_fused(dwconv_stage_forward_fused_ref, dwconv_stage_backward_fused_ref, inputs, 1, True, True)
    for x, y in zip(got, expected):
        torch.testing.assert_close(x, y)


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
