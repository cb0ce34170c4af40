"""The few collectives the fused ops need for SyncBatchNorm semantics.

With more than one rank in the process group, batch statistics are combined across ranks before
they are used, and the two backward sums are all-reduced, so N ranks of batch B compute exactly
what one process computes on the joined batch of N*B.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

ProcessGroup = dist.ProcessGroup if dist.is_available() else object


def group_size(process_group: ProcessGroup | None = None) -> int:
    """World size of ``process_group`` (default: WORLD); 1 when torch.distributed is not initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(process_group)


def combine_moments(
    mean: torch.Tensor, var: torch.Tensor, count: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Merges per-part statistics into one (Chan et al.'s parallel formula).

    Args:
        mean, var: (P, C) per-part mean and biased variance.
        count: (P,) number of values each part reduced over.
    Returns:
        (mean (C,), biased var (C,), total count (scalar tensor)).
    """
    total = count.sum()
    weights = (count / total).unsqueeze(1)
    merged_mean = (weights * mean).sum(0)
    merged_var = (weights * (var + (mean - merged_mean) ** 2)).sum(0)
    return merged_mean, merged_var, total


def all_gather_moments(
    mean: torch.Tensor, var: torch.Tensor, count: int, process_group: ProcessGroup | None
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Global (mean, biased var, count) from every rank's local ones; mean, var are (C,) fp32/fp64.

    The merge weighs each rank by the count it sent, on the device. The returned count stays on
    the host, ``count * world size``: every rank must normalise the same number of values per
    channel (training batches of one size, as the loaders' ``drop_last`` gives), which a
    device-side assert checks without making the host wait.
    """
    world = group_size(process_group)
    local = torch.cat([mean, var, mean.new_full((1,), float(count))])
    parts = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(parts, local, group=process_group)  # gloo has no all_gather_into_tensor
    gathered = torch.stack(parts)
    C = mean.numel()
    counts = gathered[:, 2 * C]
    merged_mean, merged_var, _ = combine_moments(gathered[:, :C], gathered[:, C:2 * C], counts)
    assert_on_device((counts == float(count)).all(), "SyncBatchNorm: every rank must normalise the same number of "
                     f"values per channel ({count} on this rank); use batches of one size on every rank")
    return merged_mean, merged_var, count * world


def assert_on_device(condition: torch.Tensor, message: str) -> None:
    """Raises (RuntimeError with ``message``) unless the 0-d bool ``condition`` holds, without
    making the host wait for a GPU: on the CPU it is checked at once, on a GPU (and in compiled
    code) by a device-side assert that fails at the next synchronisation."""
    torch._assert_async(condition, message)


def all_reduce_sum(tensors: list[torch.Tensor], process_group: ProcessGroup | None) -> list[torch.Tensor]:
    """Sums each tensor over the ranks of ``process_group`` (one collective for all of them)."""
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=process_group)
    return list(flat.split([t.numel() for t in tensors]))
