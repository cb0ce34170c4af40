"""BatchNorm modules that run on the fused ops and keep the official NVAE state_dict layout."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm

from nvae_fast.distributed import ProcessGroup
from nvae_fast.ops.bn_swish import bn_swish


class BatchNormSwish(_BatchNorm):
    """``swish(BatchNorm2d(x))`` in one fused op: drop-in for the official ``SyncBatchNormSwish``.

    Parameters and buffers are those of ``torch.nn.BatchNorm2d`` (weight, bias, running_mean,
    running_var, num_batches_tracked), so official checkpoints load unchanged. In training with
    torch.distributed initialised and more than one rank in ``process_group`` (default: WORLD),
    batch statistics are synchronised across ranks, as ``torch.nn.SyncBatchNorm`` does.

    Input: (N, C, H, W) float32/float16/bfloat16 (float64 on CPU or the torch backend), NCHW or
    channels-last. Output: same shape, dtype and memory format. Backward recomputes the
    normalised value from the saved input instead of saving the output.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: ProcessGroup | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self.process_group = process_group

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() != 4:
            raise ValueError(f"BatchNormSwish expects 4-D input (N, C, H, W), got {input.dim()}-D")

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average
                factor = 1.0 / float(self.num_batches_tracked)
        use_batch_stats = self.training or self.running_mean is None
        track = not self.training or self.track_running_stats
        return bn_swish(
            input, self.weight, self.bias,
            self.running_mean if track else None, self.running_var if track else None,
            training=use_batch_stats, momentum=factor, eps=self.eps, process_group=self.process_group,
        )
