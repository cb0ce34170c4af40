"""BatchNorm modules that run on the fused ops and keep the official NVAE state_dict layout."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm

from nvae_fast.distributed import ProcessGroup, all_gather_moments, all_reduce_sum, group_size
from nvae_fast.ops.bn_swish import bn_swish


class _RankAwareBatchNorm(_BatchNorm):
    """A 2-d BatchNorm that knows its process group (SyncBatchNorm semantics across its ranks)."""

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
            raise ValueError(f"{type(self).__name__} expects 4-D input (N, C, H, W), got {input.dim()}-D")

    def _training_step_factor(self) -> float:
        """Counts a training batch and returns the running-statistics factor, as BatchNorm2d does."""
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average
                factor = 1.0 / float(self.num_batches_tracked)
        return factor


class BatchNormSwish(_RankAwareBatchNorm):
    """``swish(BatchNorm2d(x))`` in one fused op: drop-in for the official ``SyncBatchNormSwish``.

    Parameters and buffers are those of ``torch.nn.BatchNorm2d`` (weight, bias, running_mean,
    running_var, num_batches_tracked), so official checkpoints load unchanged. In training with
    torch.distributed initialised and more than one rank in ``process_group`` (default: WORLD),
    batch statistics are synchronised across ranks, as ``torch.nn.SyncBatchNorm`` does.

    Input: (N, C, H, W) float32/float16/bfloat16 (float64 on CPU or the torch backend), NCHW or
    channels-last. Output: same shape, dtype and memory format. Backward recomputes the
    normalised value from the saved input instead of saving the output.
    """

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        factor = self._training_step_factor()
        use_batch_stats = self.training or self.running_mean is None
        track = not self.training or self.track_running_stats
        return bn_swish(
            input, self.weight, self.bias,
            self.running_mean if track else None, self.running_var if track else None,
            training=use_batch_stats, momentum=factor, eps=self.eps, process_group=self.process_group,
        )


class BatchNorm2d(_RankAwareBatchNorm):
    """``torch.nn.BatchNorm2d`` that synchronises batch statistics across ranks (SyncBatchNorm
    semantics) in training when torch.distributed has more than one rank in ``process_group``,
    on any device (``torch.nn.SyncBatchNorm`` needs CUDA). Same parameters, buffers and numbers
    as ``torch.nn.BatchNorm2d``; single-process calls go straight to ``F.batch_norm``.
    """

    def forward(self, input: Tensor) -> Tensor:
        if not (self.training and group_size(self.process_group) > 1):
            return super().forward(input)
        self._check_input_dim(input)
        factor = self._training_step_factor()
        C = input.shape[1]
        weight = self.weight if self.weight is not None else input.new_ones(C, dtype=torch.float32)
        bias = self.bias if self.bias is not None else input.new_zeros(C, dtype=torch.float32)
        return _SyncBatchNorm.apply(input, weight, bias, self.running_mean if self.track_running_stats else None,
                                    self.running_var if self.track_running_stats else None, factor, self.eps,
                                    self.process_group)


class _SyncBatchNorm(torch.autograd.Function):
    """BatchNorm over the joined batch of all ranks; parameter gradients stay local (DDP averages)."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momentum, eps, process_group):
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        xf = x.to(acc)
        var, mean = torch.var_mean(xf, dim=(0, 2, 3), unbiased=False)
        mean, var, count = all_gather_moments(mean, var, x.numel() // x.shape[1], process_group)
        if running_mean is not None:
            with torch.no_grad():
                running_mean.lerp_(mean.to(running_mean.dtype), momentum)
                running_var.lerp_((var * count / max(count - 1, 1)).to(running_var.dtype), momentum)
        invstd = torch.rsqrt(var + eps)
        xhat = (xf - mean.view(1, -1, 1, 1)) * invstd.view(1, -1, 1, 1)
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.count, ctx.process_group = count, process_group
        return (xhat * weight.to(acc).view(1, -1, 1, 1) + bias.to(acc).view(1, -1, 1, 1)).to(x.dtype)

    @staticmethod
    def backward(ctx, dy):
        x, weight, mean, invstd = ctx.saved_tensors
        acc = mean.dtype
        xhat = (x.to(acc) - mean.view(1, -1, 1, 1)) * invstd.view(1, -1, 1, 1)
        g = dy.to(acc)
        sum_g, sum_gxhat = g.sum(dim=(0, 2, 3)), (g * xhat).sum(dim=(0, 2, 3))
        dweight, dbias = sum_gxhat.to(weight.dtype), sum_g.to(weight.dtype)
        sum_g, sum_gxhat = all_reduce_sum([sum_g, sum_gxhat], ctx.process_group)
        scale = (weight.to(acc) * invstd).view(1, -1, 1, 1)
        dx = scale * (g - (sum_g / ctx.count).view(1, -1, 1, 1) - xhat * (sum_gxhat / ctx.count).view(1, -1, 1, 1))
        return dx.to(x.dtype), dweight, dbias, None, None, None, None, None
