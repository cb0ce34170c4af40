"""The csrc/ BatchNorm + Swish kernels through their launchers (nvae_fast/kernels/cuda/bn_swish.py),
against the formulas of the contract (nvae_fast/ops/bn_swish.py), on a GPU or in the CPU emulation
of csrc/ (see cuda_targets.py). The op-level tests are in test_bn_swish.py."""

import itertools

import pytest
import torch

from nvae_fast.kernels.cuda import bn_swish as kernels

from cuda_targets import kernel_device  # noqa: F401  (fixture)
from tolerances import assert_close

SHAPES = [(2, 20, 5, 7), (3, 96, 4, 4), (1, 3, 17, 33), (4, 1, 1, 1), (2, 40, 3, 3)]
LAYOUTS = ("nchw", "channels_last", "strided")


def _x(shape, dtype, layout, device, g):
    if layout == "strided":
        full = torch.randn(*shape[:3], 2 * shape[3], generator=g) * 1.5 + 3.0
        return full.to(dtype).to(device)[..., ::2]
    x = (torch.randn(shape, generator=g) * 1.5 + 3.0).to(dtype).to(device)
    return x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x


def _cases():
    for i, (shape, layout) in enumerate(itertools.product(SHAPES, LAYOUTS)):
        dtype = (torch.float32, torch.bfloat16, torch.float16)[i % 3]
        yield pytest.param(shape, layout, dtype, id=f"{'x'.join(map(str, shape))}-{layout}-{str(dtype)[6:]}")


@pytest.mark.parametrize("shape,layout,dtype", list(_cases()))
def test_kernels_match_the_formulas(shape, layout, dtype, kernel_device):
    g = torch.Generator().manual_seed(sum(shape))
    C = shape[1]
    x = _x(shape, dtype, layout, kernel_device, g)
    dy = _x(shape, dtype, layout, kernel_device, g)
    scale = (torch.rand(C, generator=g) + 0.5).to(kernel_device)
    shift = torch.randn(C, generator=g).to(kernel_device)
    where = f"{shape} {layout} {dtype}"
    per_channel = (1, -1, 1, 1)
    xf = x.float()

    mean, var = kernels.bn_stats(x)
    var_ref, mean_ref = torch.var_mean(xf, dim=(0, 2, 3), unbiased=False)
    assert_close(mean, mean_ref, torch.float32, scale=10, msg=f"mean, {where}")
    assert_close(var, var_ref, torch.float32, scale=10, msg=f"var, {where}")

    z = xf * scale.view(per_channel) + shift.view(per_channel)
    s = torch.sigmoid(z)
    y = kernels.bn_swish_forward(x, scale, shift, torch.empty_like(x))
    assert_close(y, (z * s).to(dtype), dtype, msg=f"y, {where}")

    gz = dy.float() * s * (1 + z * (1 - s))
    sum_g, sum_gxmu = kernels.bn_swish_backward_reduce(dy, x, scale, shift, mean)
    assert_close(sum_g, gz.sum(dim=(0, 2, 3)), torch.float32, scale=10, msg=f"sum_g, {where}")
    assert_close(sum_gxmu, (gz * (xf - mean.view(per_channel))).sum(dim=(0, 2, 3)), torch.float32, scale=10,
                 msg=f"sum_gxmu, {where}")

    coef_xmu = torch.randn(C, generator=g).to(kernel_device)
    coef_const = torch.randn(C, generator=g).to(kernel_device)
    dx = kernels.bn_swish_backward_apply(dy, x, scale, shift, mean, coef_xmu, coef_const, torch.empty_like(x))
    dx_ref = scale.view(per_channel) * gz + coef_xmu.view(per_channel) * (xf - mean.view(per_channel)) \
        + coef_const.view(per_channel)
    assert_close(dx, dx_ref.to(dtype), dtype, msg=f"dx, {where}")


def test_bad_arguments_raise_before_any_launch(monkeypatch):
    from nvae_fast.kernels.cuda import common

    def no_launch():
        raise AssertionError("a kernel was launched with bad arguments")

    # The checks are device-independent: CPU tensors stand in, and nothing may reach the extension.
    monkeypatch.setattr(common, "require_cuda", lambda name, x: None)
    monkeypatch.setattr(kernels, "ext", no_launch)
    x = torch.randn(2, 4, 3, 3)
    scale, shift = torch.ones(4), torch.zeros(4)
    with pytest.raises(ValueError, match=r"out must match x in dtype and shape"):
        kernels.bn_swish_forward(x, scale, shift, torch.empty(1, 4, 3, 3))
    with pytest.raises(ValueError, match=r"out must match x in dtype and shape"):
        kernels.bn_swish_forward(x, scale, shift, torch.empty_like(x, dtype=torch.float16))
    with pytest.raises(ValueError, match=r"scale must have shape \(4,\)"):
        kernels.bn_swish_forward(x, torch.ones(3), shift, torch.empty_like(x))
    with pytest.raises(TypeError, match="shift must be a contiguous float32 tensor"):
        kernels.bn_swish_forward(x, scale, shift.double(), torch.empty_like(x))
    with pytest.raises(ValueError, match=r"coef_const must have shape \(4,\)"):
        kernels.bn_swish_backward_apply(x, x, scale, shift, shift, shift, torch.zeros(8), torch.empty_like(x))
    with pytest.raises(ValueError, match=r"dy must match x in dtype and shape"):
        kernels.bn_swish_backward_reduce(x[:1], x, scale, shift, shift)
