"""The cells of NVAE's towers: residual cells built from the official operations, their skips,
squeeze-and-excitation and the encoder/decoder combiners.

Attribute names follow the official modules (``_ops``, ``skip``, ``se``, ``conv_0``, ``bn_act``,
``conv``, ...), so state_dict keys equal the official model's. Every BatchNorm synchronises its
statistics across ranks in training when torch.distributed runs with more than one rank.

A cell changes resolution by its type: ``normal_*`` and combiners keep it, ``down_*`` halve it
(stride 2, channels x2), ``up_*`` double it (nearest upsampling in the branch, channels / 2).
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nvae_fast import backend
from nvae_fast.config import CHANNEL_MULT
from nvae_fast.nn.batchnorm import BatchNorm2d, BatchNormSwish
from nvae_fast.nn.conv import Conv2D
from nvae_fast.ops.dwconv_stage import KERNEL_SIZES
from nvae_fast.ops.gen_cell import GenCellParams, GenCellRunningStats, GenCellWeights, gen_cell, prepare_weights

BN_EPS = 1e-5
BN_MOMENTUM = 0.05
BRANCH_SCALE = 0.1  # out = skip(x) + 0.1 * branch(x): every cell starts close to its skip


def swish(x: Tensor) -> Tensor:
    return x * torch.sigmoid(x)


def resample_of(cell_type: str) -> str:
    """'same', 'down' or 'up': what a cell of ``cell_type`` does to the resolution."""
    if cell_type.startswith(("normal", "combiner")):
        return "same"
    if cell_type.startswith("down"):
        return "down"
    if cell_type.startswith("up"):
        return "up"
    raise ValueError(f"unknown cell type {cell_type!r}")


class BatchNorm(nn.Module):
    """A BatchNorm2d held as the child ``bn`` (the official ``SyncBatchNorm`` wrapper's key layout)."""

    def __init__(self, channels: int, eps: float = BN_EPS, momentum: float = BN_MOMENTUM) -> None:
        super().__init__()
        self.bn = BatchNorm2d(channels, eps=eps, momentum=momentum)

    def forward(self, x: Tensor) -> Tensor:
        return self.bn(x)


# ---------------------------------------------------------------------------------------------
# Operations a cell chains (the official OPS)
# ---------------------------------------------------------------------------------------------

class EluConv(nn.Module):
    """ELU -> (nearest x2 upsample) -> weight-normalised conv with data-dependent init."""

    def __init__(self, c_in: int, c_out: int, resample: str, kernel_size: int = 3, padding: int = 1,
                 dilation: int = 1) -> None:
        super().__init__()
        self.upsample = resample == "up"
        self.conv_0 = Conv2D(c_in, c_out, kernel_size, stride=2 if resample == "down" else 1, padding=padding,
                             dilation=dilation, bias=True, data_init=True)

    def forward(self, x: Tensor) -> Tensor:
        out = F.elu(x)
        if self.upsample:
            out = F.interpolate(out, scale_factor=2, mode="nearest")
        return self.conv_0(out)


class BnEluConv(nn.Module):
    """BatchNorm -> ELU -> (nearest x2 upsample) -> weight-normalised conv."""

    def __init__(self, c_in: int, c_out: int, resample: str, kernel_size: int = 3, padding: int = 1,
                 dilation: int = 1) -> None:
        super().__init__()
        self.upsample = resample == "up"
        self.bn = BatchNorm(c_in)
        self.conv_0 = Conv2D(c_in, c_out, kernel_size, stride=2 if resample == "down" else 1, padding=padding,
                             dilation=dilation, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        out = F.elu(self.bn(x))
        if self.upsample:
            out = F.interpolate(out, scale_factor=2, mode="nearest")
        return self.conv_0(out)


class BnSwishConv(nn.Module):
    """Fused BatchNorm + Swish -> (nearest x2 upsample) -> weight-normalised conv."""

    def __init__(self, c_in: int, c_out: int, resample: str, kernel_size: int = 3, padding: int = 1,
                 dilation: int = 1) -> None:
        super().__init__()
        self.upsample = resample == "up"
        self.bn_act = BatchNormSwish(c_in, eps=BN_EPS, momentum=BN_MOMENTUM)
        self.conv_0 = Conv2D(c_in, c_out, kernel_size, stride=2 if resample == "down" else 1, padding=padding,
                             dilation=dilation, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn_act(x)
        if self.upsample:
            out = F.interpolate(out, scale_factor=2, mode="nearest")
        return self.conv_0(out)


class ConvBnSwish(nn.Module):
    """Plain conv (no bias, no weight norm) -> fused BatchNorm + Swish, as ``conv = Sequential``."""

    def __init__(self, c_in: int, c_out: int, kernel_size: int = 1, stride: int = 1, groups: int = 1,
                 dilation: int = 1) -> None:
        super().__init__()
        padding = dilation * (kernel_size - 1) // 2
        self.conv = nn.Sequential(
            Conv2D(c_in, c_out, kernel_size, stride, padding, dilation=dilation, groups=groups, weight_norm=False),
            BatchNormSwish(c_out, eps=BN_EPS, momentum=BN_MOMENTUM),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class InvertedResidual(nn.Module):
    """The inverted-residual branch (MobileNetV2-style), with the official layer order:

    (nearest x2 upsample) -> BN0 -> 1x1 conv C->EC -> BN1+Swish -> k x k conv (depthwise, or
    ``groups`` groups) -> BN2+Swish -> 1x1 conv EC->C_out -> BN3.

    Held as ``conv = Sequential(...)``; the properties name its layers.
    """

    def __init__(self, c_in: int, c_out: int, resample: str, expansion: int, kernel_size: int,
                 groups: int = 0, dilation: int = 1) -> None:
        super().__init__()
        hidden = int(round(c_in * expansion))
        self.upsample = resample == "up"
        self.stride = 2 if resample == "down" else 1
        self.expansion, self.kernel_size = expansion, kernel_size
        layers: list[nn.Module] = [nn.UpsamplingNearest2d(scale_factor=2)] if self.upsample else []
        layers += [
            BatchNorm(c_in),
            ConvBnSwish(c_in, hidden, kernel_size=1),
            ConvBnSwish(hidden, hidden, kernel_size=kernel_size, stride=self.stride,
                        groups=hidden if groups == 0 else groups, dilation=dilation),
            Conv2D(hidden, c_out, 1, weight_norm=False),
            BatchNorm(c_out),
        ]
        self.conv = nn.Sequential(*layers)

    def _layer(self, i: int) -> nn.Module:
        return self.conv[i + 1 if self.upsample else i]

    @property
    def bn0(self) -> BatchNorm2d:
        return self._layer(0).bn

    @property
    def conv1(self) -> Conv2D:
        """The expanding 1x1 conv."""
        return self._layer(1).conv[0]

    @property
    def bn1(self) -> BatchNormSwish:
        return self._layer(1).conv[1]

    @property
    def conv_dw(self) -> Conv2D:
        """The k x k (depthwise) conv."""
        return self._layer(2).conv[0]

    @property
    def bn2(self) -> BatchNormSwish:
        return self._layer(2).conv[1]

    @property
    def conv2(self) -> Conv2D:
        """The projecting 1x1 conv."""
        return self._layer(3)

    @property
    def bn3(self) -> BatchNorm2d:
        return self._layer(4).bn

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


OpFactory = Callable[[int, int, str], nn.Module]

OPS: dict[str, OpFactory] = {
    "res_elu": lambda c_in, c_out, resample: EluConv(c_in, c_out, resample),
    "res_bnelu": lambda c_in, c_out, resample: BnEluConv(c_in, c_out, resample),
    "res_bnswish": lambda c_in, c_out, resample: BnSwishConv(c_in, c_out, resample),
    "res_bnswish5": lambda c_in, c_out, resample: BnSwishConv(c_in, c_out, resample, padding=2, dilation=2),
}
for _e, _k, _g in ((6, 5, 0), (3, 5, 0), (3, 5, 8), (6, 11, 0)):
    OPS[f"mconv_e{_e}k{_k}g{_g}"] = (lambda e, k, g: lambda c_in, c_out, resample:
                                     InvertedResidual(c_in, c_out, resample, e, k, g))(_e, _k, _g)

_DEPTHWISE_MBCONV = re.compile(r"mconv_e\d+k\d+g0")


# ---------------------------------------------------------------------------------------------
# Skips and squeeze-and-excitation
# ---------------------------------------------------------------------------------------------

class FactorizedReduce(nn.Module):
    """Down skip: Swish, then four stride-2 1x1 convs on the four pixel phases, concatenated."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        if c_out % 2:
            raise ValueError(f"FactorizedReduce needs an even number of output channels, got {c_out}")
        quarter = c_out // 4
        self.conv_1 = Conv2D(c_in, quarter, 1, stride=2, bias=True)
        self.conv_2 = Conv2D(c_in, quarter, 1, stride=2, bias=True)
        self.conv_3 = Conv2D(c_in, quarter, 1, stride=2, bias=True)
        self.conv_4 = Conv2D(c_in, c_out - 3 * quarter, 1, stride=2, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        out = swish(x)
        return torch.cat([self.conv_1(out), self.conv_2(out[:, :, 1:, 1:]), self.conv_3(out[:, :, :, 1:]),
                          self.conv_4(out[:, :, 1:, :])], dim=1)


class BilinearUpsample(nn.Module):
    """x2 bilinear upsampling with aligned corners."""

    def forward(self, x: Tensor) -> Tensor:
        return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)


def make_skip(channels: int, resample: str) -> nn.Module:
    """The skip path of a cell: identity, FactorizedReduce (down) or bilinear x2 + 1x1 conv (up)."""
    if resample == "same":
        return nn.Identity()
    if resample == "down":
        return FactorizedReduce(channels, CHANNEL_MULT * channels)
    return nn.Sequential(BilinearUpsample(), Conv2D(channels, channels // CHANNEL_MULT, 1))


class SqueezeExcitation(nn.Module):
    """Scales each channel by a gate computed from the per-channel means: C -> max(C/16, 4) -> C."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        hidden = max(channels // 16, 4)
        self.se = nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, channels),
                                nn.Sigmoid())

    def forward(self, x: Tensor) -> Tensor:
        gate = self.se(x.mean(dim=(2, 3)))
        return x * gate[:, :, None, None]


# ---------------------------------------------------------------------------------------------
# Cells
# ---------------------------------------------------------------------------------------------

class Cell(nn.Module):
    """``skip(x) + 0.1 * SE(op_n(...op_1(x)))``: the residual cell of every tower.

    Args:
        c_in, c_out: channels in and out (c_out is 2 c_in for down cells, c_in / 2 for up cells).
        cell_type: e.g. 'normal_enc', 'down_pre', 'up_dec' (sets the resolution change).
        ops: names of the operations in ``OPS``; the first one changes the resolution.
        use_se: squeeze-and-excitation on the branch.
    """

    def __init__(self, c_in: int, c_out: int, cell_type: str, ops: tuple[str, ...] | list[str],
                 use_se: bool) -> None:
        super().__init__()
        self.cell_type = cell_type
        self.resample = resample = resample_of(cell_type)
        self.skip = make_skip(c_in, resample)
        self._ops = nn.ModuleList(
            OPS[name](c_in if i == 0 else c_out, c_out, resample if i == 0 else "same") for i, name in enumerate(ops))
        self.use_se = use_se
        if use_se:
            self.se = SqueezeExcitation(c_out)

    def forward(self, x: Tensor) -> Tensor:
        branch = x
        for op in self._ops:
            branch = op(branch)
        if self.use_se:
            branch = self.se(branch)
        return self.skip(x) + BRANCH_SCALE * branch


class InvertedResidualCell(Cell):
    """A cell whose branch is one depthwise inverted-residual block (``mconv_e{E}k{K}g0``).

    The decoder's cells (cell types normal_dec, up_dec, normal_post, up_post) are the model's hot
    path; the mbconv architectures also use this class in the encoder (``resample == 'down'``
    there for down cells, whose skip is a FactorizedReduce). Parameters keep the official structure: ``skip``, ``_ops.0`` (an :class:`InvertedResidual`:
    BN0, expand 1x1 conv, BN1+Swish, depthwise conv, BN2+Swish, project 1x1 conv, BN3) and ``se``.

    Normal and up cells run the fused cell (:func:`nvae_fast.ops.gen_cell.gen_cell`) on CUDA tensors
    (or anywhere when the triton backend is requested); the eager composition of the modules is the
    reference it equals, and runs otherwise (CPU, the torch backend, down cells).
    """

    def __init__(self, c_in: int, c_out: int, cell_type: str, op: str, use_se: bool) -> None:
        if not _DEPTHWISE_MBCONV.fullmatch(op):
            raise ValueError(f"InvertedResidualCell takes one depthwise mconv_e*k*g0 operation, got {op!r}")
        super().__init__(c_in, c_out, cell_type, (op,), use_se)
        self._weights: GenCellWeights | None = None
        self._weights_key: tuple | None = None
        self._skip_weight: Tensor | None = None
        self._skip_weight_key: tuple | None = None

    @property
    def block(self) -> InvertedResidual:
        return self._ops[0]

    def forward(self, x: Tensor) -> Tensor:
        if self._runs_fused(x):
            return self._fused_forward(x)
        branch = self.block(x)
        if self.use_se:
            branch = self.se(branch)
        return self.skip(x) + BRANCH_SCALE * branch

    def _runs_fused(self, x: Tensor) -> bool:
        """Whether the fused cell (nvae_fast.ops.gen_cell) computes this forward: on CUDA tensors
        unless the torch backend is requested, on any tensors when triton is requested; for the
        stride-1 cells (normal and up) whose layers are as the official ones build them."""
        requested = backend.requested_backend()
        if not (requested == "triton" or (x.is_cuda and requested != "torch")):
            return False
        blk = self.block
        bns = (blk.bn0, blk.bn1, blk.bn2, blk.bn3)
        convs = (blk.conv1, blk.conv_dw, blk.conv2)
        return (blk.stride == 1 and x.dim() == 4
                and blk.conv_dw.kernel_size[0] in KERNEL_SIZES and blk.conv_dw.dilation == (1, 1)
                and all(conv.bias is None for conv in convs)
                and all(bn.affine and bn.track_running_stats and bn.momentum is not None
                        and bn.training == self.training for bn in bns)
                and len({(bn.momentum, bn.eps) for bn in bns}) == 1)

    def _fused_forward(self, x: Tensor) -> Tensor:
        blk = self.block
        bn0, bn1, bn2, bn3 = blk.bn0, blk.bn1, blk.bn2, blk.bn3
        se = (self.se.se[0].weight, self.se.se[0].bias, self.se.se[2].weight, self.se.se[2].bias) if self.use_se \
            else ()
        w1, w2 = blk.conv1.normalized_weight(), blk.conv2.normalized_weight()
        params = GenCellParams(bn0.weight, bn0.bias, w1, bn1.weight, bn1.bias, blk.conv_dw.normalized_weight(),
                               bn2.weight, bn2.bias, w2, bn3.weight, bn3.bias, *se)
        # the fused stages also count the training batches (num_batches_tracked), in their kernels
        running = GenCellRunningStats(bn0.running_mean, bn0.running_var, bn1.running_mean, bn1.running_var,
                                      bn2.running_mean, bn2.running_var, bn3.running_mean, bn3.running_var,
                                      bn0.num_batches_tracked, bn1.num_batches_tracked, bn2.num_batches_tracked,
                                      bn3.num_batches_tracked)
        skip = self._upsampled_skip(x) if blk.upsample else None
        if torch.is_autocast_enabled(x.device.type) and x.dtype == torch.float32:
            # The eager cell's convolutions would run in the autocast dtype: so do the fused
            # stages; the residual sum keeps the skip's dtype, as the eager cell's does.
            skip = x if skip is None else skip
            x = x.to(torch.get_autocast_dtype(x.device.type))
        return gen_cell(x, params, running, skip, upsample=blk.upsample, training=self.training,
                        momentum=bn0.momentum, eps=bn0.eps, process_group=bn0.process_group,
                        weights=self._kernel_weights(w1, w2, x.dtype))

    def _upsampled_skip(self, x: Tensor) -> Tensor:
        """The up-cell's skip ``conv1x1(bilinear_2x(x)) + bias``, computed as
        ``bilinear_2x(conv1x1(x) + bias)``: the same values (each output pixel of a bilinear
        upsampling with aligned corners is a convex combination of input pixels, so it commutes
        with a per-pixel affine map) for a quarter of the convolution's work and bytes. Without
        autograd (evaluation, sampling) the normalised weight is kept while its parameters are
        unchanged, like the fused stages' weights."""
        upsample, conv = self.skip
        if torch.is_grad_enabled() or torch.compiler.is_compiling():
            weight = conv.normalized_weight()
        else:
            params = [p for p in (conv.weight, conv.log_weight_norm) if p is not None]
            key = tuple((p.data_ptr(), p._version, p.dtype) for p in params)
            if self._skip_weight_key != key:
                self._skip_weight = conv.normalized_weight()
                self._skip_weight_key = key
            weight = self._skip_weight
        y = F.conv2d(x, weight, conv.bias)
        return upsample(y).to(y.dtype)

    def _kernel_weights(self, w1: Tensor, w2: Tensor, dtype: torch.dtype) -> GenCellWeights:
        """The 1x1 convolutions' weights as the fused stages read them (matrices in the activations'
        dtype), prepared once and kept while the parameters are unchanged: same tensors, same
        ``_version`` (an optimizer step or a load bumps it), same dtype. In fp32 they are views."""
        if torch.compiler.is_compiling():
            return prepare_weights(w1, w2, dtype)
        key = (dtype, w1.data_ptr(), w1._version, w2.data_ptr(), w2._version)
        if self._weights_key != key:
            self._weights = prepare_weights(w1, w2, dtype)
            self._weights_key = key
        return self._weights


def make_cell(c_in: int, c_out: int, cell_type: str, ops: tuple[str, ...] | list[str], use_se: bool) -> Cell:
    """An :class:`InvertedResidualCell` for a single depthwise mconv operation, else a :class:`Cell`."""
    unknown = [name for name in ops if name not in OPS]
    if unknown:
        raise ValueError(f"unknown cell operation(s) {unknown}; expected names from {', '.join(OPS)}")
    if len(ops) == 1 and _DEPTHWISE_MBCONV.fullmatch(ops[0]):
        return InvertedResidualCell(c_in, c_out, cell_type, ops[0], use_se)
    return Cell(c_in, c_out, cell_type, ops, use_se)


class EncCombinerCell(nn.Module):
    """Encoder combiner: ``x_enc + conv1x1(x_dec)`` (the decoder state conditions the posterior)."""

    cell_type = "combiner_enc"

    def __init__(self, c_enc: int, c_dec: int, c_out: int) -> None:
        super().__init__()
        self.conv = Conv2D(c_dec, c_out, 1, bias=True)

    def forward(self, x_enc: Tensor, x_dec: Tensor) -> Tensor:
        return x_enc + self.conv(x_dec)


class DecCombinerCell(nn.Module):
    """Decoder combiner: ``conv1x1(concat(state, z))`` brings a latent sample into the decoder."""

    cell_type = "combiner_dec"

    def __init__(self, c_state: int, c_latent: int, c_out: int) -> None:
        super().__init__()
        self.conv = Conv2D(c_state + c_latent, c_out, 1, bias=True)

    def forward(self, state: Tensor, z: Tensor) -> Tensor:
        return self.conv(torch.cat([state, z], dim=1))
