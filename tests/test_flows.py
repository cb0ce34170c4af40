"""Autoregressive flow cells: the masks make the shift strictly triangular in raster order."""

import pytest
import torch

from nvae_fast.nn.flows import ARFlowCell, PairedARFlow, channel_mask


def _jacobian(f, z):
    return torch.autograd.functional.jacobian(f, z).reshape(z.numel(), z.numel())


def _raster_order(C, H, W, mirror):
    """Index of each (c, h, w) element in the cell's order: positions row-major, then channels."""
    c, h, w = torch.meshgrid(torch.arange(C), torch.arange(H), torch.arange(W), indexing="ij")
    position = h * W + w
    if mirror:
        position = H * W - 1 - position
    return (position * C + c).flatten()


@pytest.mark.parametrize("mirror", [False, True])
def test_shift_depends_only_on_earlier_variables(mirror):
    torch.manual_seed(0)
    C, H, W = 3, 4, 5
    cell = ARFlowCell(C, mirror=mirror).double()
    z = torch.randn(1, C, H, W, dtype=torch.float64)
    jac = _jacobian(lambda t: t - cell(t), z)  # d mu / d z, since cell(z) = z - mu(z)
    order = _raster_order(C, H, W, mirror)
    later_or_same = order[None, :] >= order[:, None]  # [i, j]: input j is not earlier than output i
    assert jac[later_or_same].abs().max() == 0
    assert jac[~later_or_same].abs().max() > 0


def test_paired_flow_has_unit_jacobian_determinant():
    torch.manual_seed(1)
    flow = PairedARFlow(2).double()
    z = torch.randn(1, 2, 3, 3, dtype=torch.float64)
    jac = _jacobian(lambda t: flow(t)[0], z)
    assert abs(torch.linalg.det(jac).item() - 1) < 1e-10
    assert torch.equal(flow(z)[1], torch.zeros_like(z))


def test_channel_mask():
    # 2 inputs -> 4 outputs: outputs 0, 1 belong to input 0, outputs 2, 3 to input 1
    assert channel_mask(2, 4, 1, zero_diag=True).tolist() == [[0, 0], [0, 0], [1, 0], [1, 0]]
    assert channel_mask(2, 4, 1, zero_diag=False).tolist() == [[1, 0], [1, 0], [1, 1], [1, 1]]
    # 4 inputs -> 2 outputs: inputs 0, 1 belong to output 0
    assert channel_mask(4, 2, 1, zero_diag=False).tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    assert channel_mask(4, 2, 1, zero_diag=True).tolist() == [[0, 0, 0, 0], [1, 1, 0, 0]]
    assert channel_mask(3, 3, 3, zero_diag=False).tolist() == [[1], [1], [1]]
    with pytest.raises(ValueError, match="divide"):
        channel_mask(3, 4, 1, zero_diag=False)
