"""Weight-normalised convolution: the official NVAE ``Conv2D``, same parameters and state_dict;
and :class:`ConvWeightBank`, which normalises the weights of many convolutions in one op.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nvae_fast import distributed
from nvae_fast.ops.weight_norm import WEIGHT_NORM_EPS, weight_norm


def normalize_weight(weight: Tensor, log_weight_norm: Tensor) -> Tensor:
    """``exp(log_weight_norm) * weight / (||weight|| + 1e-5)``, the norm taken per output channel.

    Args:
        weight: (C_out, C_in / groups, kH, kW).
        log_weight_norm: (C_out, 1, 1, 1), the log of each output channel's norm.
    """
    norm = torch.linalg.vector_norm(weight, dim=(1, 2, 3), keepdim=True)
    return torch.exp(log_weight_norm) * weight / (norm + WEIGHT_NORM_EPS)


def initial_weight_norm(weight: Tensor) -> Tensor:
    """Each output channel's norm (C_out, 1, 1, 1) of ``weight`` (C_out, ...), summed as the
    official model sums it at initialisation, so that a seed gives its initial weights bit for bit."""
    return torch.sqrt(torch.sum(weight * weight, dim=(1, 2, 3), keepdim=True))


class Conv2D(nn.Conv2d):
    """``nn.Conv2d`` whose weight is reparametrised as direction times ``exp(log_weight_norm)``.

    Parameters: ``weight`` (the direction), ``bias`` (optional) and, with ``weight_norm``,
    ``log_weight_norm`` (C_out, 1, 1, 1), initialised to the log of the initial weight's norm
    (+0.01). Without ``weight_norm`` the official model also lists the weight a second time as
    ``weight_normalized`` in its state_dict; so does this one (written on save, checked and dropped
    on load, optional, since older official checkpoints lack it).

    ``data_init`` (the official ELU cells) sets bias and log_weight_norm from the first batch seen,
    so that the output starts with zero mean and standard deviation 0.2 per channel (statistics
    averaged over ranks when torch.distributed runs). Loading a state_dict marks that init done.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int], stride: int = 1,
                 padding: int = 0, dilation: int = 1, groups: int = 1, bias: bool = False, data_init: bool = False,
                 weight_norm: bool = True) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias)
        self.weight_norm = weight_norm
        if weight_norm:
            with torch.no_grad():
                init = initial_weight_norm(self.weight)
            self.log_weight_norm = nn.Parameter(torch.log(init + 1e-2))
        else:
            self.register_parameter("log_weight_norm", None)
            self.register_state_dict_post_hook(_save_weight_alias)
            self.register_load_state_dict_pre_hook(_load_weight_alias)
        self.data_init = data_init
        self.init_done = False
        self.bank_slot: tuple[ConvWeightBank, int] | None = None
        self.register_load_state_dict_post_hook(_mark_init_done)

    def normalized_weight(self) -> Tensor:
        """The weight the convolution applies (the official ``weight_normalized``): from its
        :class:`ConvWeightBank` while the bank holds weights, else computed here."""
        banked = bank_weight(self)
        if banked is not None:
            return banked
        if self.log_weight_norm is None:
            return self.weight
        return normalize_weight(self.weight, self.log_weight_norm)

    def forward(self, x: Tensor) -> Tensor:
        if self.data_init and not self.init_done:
            self._initialize_from(x)
        return F.conv2d(x, self.normalized_weight(), self.bias, self.stride, self.padding, self.dilation,
                        self.groups)

    @torch.no_grad()
    def _initialize_from(self, x: Tensor) -> None:
        direction = self.weight / (torch.linalg.vector_norm(self.weight, dim=(1, 2, 3), keepdim=True)
                                   + WEIGHT_NORM_EPS)
        out = F.conv2d(x, direction, None, self.stride, self.padding, self.dilation, self.groups)
        mean = out.mean(dim=(0, 2, 3))
        scale = 5 * out.std(dim=(0, 2, 3))
        world = distributed.group_size()
        if world > 1:
            mean, scale = (t / world for t in distributed.all_reduce_sum([mean, scale], None))
        if self.bias is not None:
            self.bias.copy_(-mean / (scale + WEIGHT_NORM_EPS))
        if self.log_weight_norm is not None:
            self.log_weight_norm.copy_(-torch.log(scale + WEIGHT_NORM_EPS).view(-1, 1, 1, 1))
        self.init_done = True


def _save_weight_alias(module: Conv2D, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    state_dict[prefix + "weight_normalized"] = state_dict[prefix + "weight"]


def _load_weight_alias(module: Conv2D, state_dict: dict, prefix: str, local_metadata: dict, strict: bool,
                       missing_keys: list, unexpected_keys: list, error_msgs: list) -> None:
    alias = state_dict.pop(prefix + "weight_normalized", None)
    weight = state_dict.get(prefix + "weight")
    if alias is not None and weight is not None and not torch.equal(alias, weight):
        error_msgs.append(f"{prefix}weight_normalized must equal {prefix}weight (it is the same parameter in the "
                          "official model)")


def _mark_init_done(module: Conv2D, incompatible_keys) -> None:
    module.init_done = True


# ---------------------------------------------------------------------------------------------
# Many convolutions at once
# ---------------------------------------------------------------------------------------------

def bank_weight(conv: nn.Module) -> Tensor | None:
    """The weight ``conv``'s bank holds for it now, or None."""
    slot = conv.bank_slot
    if slot is None:
        return None
    weights = slot[0].weights
    return None if weights is None else weights[slot[1]]


@dataclass
class _FlatLayout:
    """Where each convolution's weight lives in the flat buffer of one device and dtype.

    The flat order puts convolutions without weight normalisation first, then the normalised
    ones, and the masked (autoregressive) ones last, so that ``weight_norm`` sees one plain region,
    one normalised region and one masked region.
    """

    order: list[int]               # flat position -> index into the bank's convolutions
    plain: list[int]               # bank indices of convolutions without weight normalisation
    sizes: list[int]               # numel of each weight, in flat order
    offsets: list[int]             # start of each bank convolution's weight in the flat buffer
    row_ptr: Tensor                # (R + 1,) int64
    first_wn_row: int
    mask: Tensor                   # masks of the masked region, or a (1,) placeholder
    mask_start: int


class ConvWeightBank:
    """Normalises the weights of a list of convolutions (:class:`Conv2D` and the flows' masked
    ``ARConv2d``) in one op, :func:`nvae_fast.ops.weight_norm.weight_norm`, instead of a few
    launches per convolution.

    :meth:`attach` gives each convolution a slot; while :attr:`weights` is set (by the owner, for
    one forward pass), an attached convolution applies ``weights[slot]`` instead of normalising
    its own weight. The bank holds no reference to the modules (the owner passes them), so copies
    of a model (``copy.deepcopy``, EMA) get their own bank.
    """

    def __init__(self) -> None:
        self.weights: list[Tensor] | None = None
        self._layouts: dict[tuple[torch.device, torch.dtype], _FlatLayout] = {}

    def attach(self, convs: Sequence[nn.Module]) -> None:
        for i, conv in enumerate(convs):
            conv.bank_slot = (self, i)

    def __deepcopy__(self, memo: dict) -> ConvWeightBank:
        return ConvWeightBank()

    def __getstate__(self) -> dict:
        return {"weights": None, "_layouts": {}}

    def layout(self, convs: Sequence[nn.Module]) -> _FlatLayout:
        """The flat layout of ``convs`` on their device and dtype (built once)."""
        first = convs[0].weight
        key = (first.device, first.dtype)
        layout = self._layouts.get(key)
        if layout is None:
            layout = self._layouts[key] = self._build_layout(convs)
        return layout

    @staticmethod
    def _build_layout(convs: Sequence[nn.Module]) -> _FlatLayout:
        weight = convs[0].weight
        plain = [i for i, c in enumerate(convs) if c.log_weight_norm is None]
        masked = [i for i, c in enumerate(convs) if c.log_weight_norm is not None and getattr(c, "mask", None)
                  is not None]
        normed = [i for i, c in enumerate(convs) if c.log_weight_norm is not None and i not in masked]
        order = plain + normed + masked
        sizes = [convs[i].weight.numel() for i in order]
        row_lengths = [length for i in order for length in [convs[i].weight[0].numel()] * convs[i].weight.shape[0]]
        row_ptr = torch.tensor([0] + row_lengths, dtype=torch.int64).cumsum(0)
        offsets = [0] * len(convs)
        start = 0
        for i, size in zip(order, sizes):
            offsets[i] = start
            start += size
        mask_start = sum(sizes[:len(plain) + len(normed)])
        mask = (torch.cat([convs[i].mask.reshape(-1) for i in masked]) if masked else weight.new_ones(1))
        return _FlatLayout(order=order, plain=plain, sizes=sizes, offsets=offsets,
                           row_ptr=row_ptr.to(weight.device),
                           first_wn_row=sum(convs[i].weight.shape[0] for i in plain),
                           mask=mask.to(weight.device, weight.dtype), mask_start=mask_start)

    def inputs(self, convs: Sequence[nn.Module]) -> tuple[Tensor, Tensor]:
        """The flat weights (T,) and log norms (rows of normalised convolutions,) of ``convs``:
        two concatenations, differentiable in every parameter."""
        layout = self.layout(convs)
        w = torch.cat([convs[i].weight.reshape(-1) for i in layout.order])
        g = torch.cat([convs[i].log_weight_norm.reshape(-1) for i in layout.order[len(layout.plain):]])
        return w, g

    def normalize(self, convs: Sequence[nn.Module], w: Tensor, g: Tensor) -> Tensor:
        """The weights every convolution applies, flat (T,) (one op)."""
        layout = self.layout(convs)
        return weight_norm(w, g, layout.row_ptr, layout.first_wn_row, layout.mask, layout.mask_start)

    def split(self, convs: Sequence[nn.Module], flat: Tensor) -> list[Tensor]:
        """Per-convolution views of ``flat`` shaped as their weights, in the order of ``convs``."""
        layout = self.layout(convs)
        pieces = flat.split(layout.sizes)
        weights: list[Tensor | None] = [None] * len(convs)
        for i, piece in zip(layout.order, pieces):
            weights[i] = piece.view(convs[i].weight.shape)
        return weights
