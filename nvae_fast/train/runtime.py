"""Where a run executes: device, torchrun's ranks, the process group, DDP.

Launch with ``torchrun --nproc_per_node N -m nvae_fast train ...`` (or ``nvae-fast`` as the
torchrun script): torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT and
``init_runtime`` joins the group (NCCL on GPUs, gloo on CPUs). Without torchrun the run is one
process. Only rank 0 writes logs and checkpoints (``Runtime.is_main``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor, nn

from nvae_fast import distributed
from nvae_fast.train.errors import InputError


@dataclass(frozen=True)
class Runtime:
    """rank / world_size: this process among all; local_rank: among those on this machine."""

    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError as e:
        raise InputError(f"environment variable {name}={value!r} is not an integer") from e


def init_runtime(device: str | None = None, timeout_s: float = 1800.0) -> Runtime:
    """Sets up this process: the device (``device``, or cuda:LOCAL_RANK when CUDA is available,
    else cpu) and, when WORLD_SIZE > 1, the default process group."""
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    if device is None:
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise InputError(f"--device {device!r} is not a device name (cpu, cuda, cuda:1, ...)") from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"--device {device}: no CUDA device is visible")
        if dev.index is None:
            dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s),
                                device_id=dev if dev.type == "cuda" else None)
    return Runtime(device=dev, rank=rank, world_size=world, local_rank=local_rank)


def shutdown(rt: Runtime) -> None:
    """Leaves the process group (if this process joined one)."""
    if rt.distributed and dist.is_initialized():
        dist.destroy_process_group()


def wrap_model(model: nn.Module, rt: Runtime) -> nn.Module:
    """DistributedDataParallel around ``model`` when there is more than one rank, else ``model``.

    Batch statistics need no conversion: every BatchNorm of nvae_fast synchronises itself across
    the ranks of the default group (SyncBatchNorm semantics).
    """
    if not rt.distributed:
        return model
    device_ids = [rt.device.index] if rt.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def all_reduce_sum(t: Tensor, rt: Runtime) -> Tensor:
    """Sum of ``t`` over the ranks (``t`` itself with one rank; ``t`` is never modified)."""
    if not rt.distributed:
        return t
    return distributed.all_reduce_sum([t], None)[0].view_as(t)


def all_reduce_mean(t: Tensor, rt: Runtime) -> Tensor:
    """Mean of ``t`` over the ranks (``t`` itself with one rank)."""
    return all_reduce_sum(t, rt) / rt.world_size if rt.distributed else t


def all_ranks_all(flag: Tensor, rt: Runtime) -> Tensor:
    """A 0-d bool tensor, true only where ``flag`` (0-d bool) is true on every rank: a collective
    every rank must call, decided on the device (the host reads nothing)."""
    if not rt.distributed:
        return flag
    t = flag.to(torch.float32).reshape(1)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return t[0] > 0.5


def gather_objects(obj, rt: Runtime) -> list:
    """Every rank's ``obj`` in rank order, on every rank (picklable objects)."""
    if not rt.distributed:
        return [obj]
    out = [None] * rt.world_size
    dist.all_gather_object(out, obj)
    return out
