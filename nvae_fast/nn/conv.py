"""Weight-normalised convolution: the official NVAE ``Conv2D``, same parameters and state_dict."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nvae_fast import distributed

WEIGHT_NORM_EPS = 1e-5


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
        self.register_load_state_dict_post_hook(_mark_init_done)

    def normalized_weight(self) -> Tensor:
        """The weight the convolution applies (the official ``weight_normalized``)."""
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
