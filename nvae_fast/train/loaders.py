"""Data loaders: epoch-keyed sharded sampling, pinned-memory workers, num_x_bits quantisation.

The sampler is ``torch.utils.data.DistributedSampler`` (one replica without torch.distributed):
the order of an epoch depends only on (seed, its key), rank r takes every world-th index, and batch k
of all ranks together is the same set of images as batch k of one process with world times the
batch size. It yields ``(epoch, index)`` keys so that the datasets' random transforms are keyed
by epoch too, and it can start part-way into an epoch, which is how ``--resume`` continues
exactly where a checkpoint was written. Without drop_last (evaluation) DistributedSampler pads
the epoch with repeated indices to a multiple of the world size; EpochSampler leaves those out, so
the ranks' shards may differ in length by one but together hold every image exactly once.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler


def quantize(x: Tensor, num_bits: int) -> Tensor:
    """The official num_x_bits pre-processing of images in [0, 1] (8 bits: unchanged).

    x is reduced to ``2**num_bits`` levels, floor(x·255 / 2**(8−num_bits)) / (2**num_bits − 1).
    """
    if not 1 <= num_bits <= 8:
        raise ValueError(f"num_x_bits must be in 1..8, got {num_bits}")
    if num_bits == 8:
        return x
    return torch.floor(x * 255 / 2 ** (8 - num_bits)) / (2 ** num_bits - 1)


class EpochSampler(Sampler[tuple[int, int]]):
    """Yields ``(epoch, index)`` for this rank's share of one epoch, optionally skipping its first
    ``start`` samples (``set_position``)."""

    def __init__(self, dataset: Dataset, *, shuffle: bool, seed: int, rank: int = 0, world_size: int = 1,
                 drop_last: bool = False) -> None:
        self.inner = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed,
                                        drop_last=drop_last)
        self.epoch = 0
        self.start = 0
        # Rank r's i-th index sits at position r + i·world of the padded epoch; positions past the
        # dataset's end are padding.
        self.own = min(len(self.inner), len(range(rank, len(dataset), world_size)))

    def set_position(self, epoch: int, start: int = 0, order: int | None = None) -> None:
        """Next iteration covers ``epoch`` from this rank's ``start``-th sample on, in the
        shuffled order of key ``order`` (default ``epoch``; the training loop passes the global
        step at the epoch's start, as the official train.py keys its sampler)."""
        self.epoch, self.start = epoch, start
        self.inner.set_epoch(epoch if order is None else order)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for i, index in enumerate(self.inner):
            if self.start <= i < self.own:
                yield self.epoch, index

    def __len__(self) -> int:
        return max(0, self.own - self.start)


def make_loader(dataset: Dataset, batch_size: int, *, train: bool, seed: int, rank: int = 0, world_size: int = 1,
                num_workers: int = 0, pin_memory: bool = False) -> DataLoader:
    """A DataLoader over ``dataset`` with an ``EpochSampler`` (``loader.sampler``).

    Training loaders shuffle and drop the last incomplete batch (every step has the full batch,
    as BatchNorm and the KL balancer expect); evaluation loaders keep every sample in order.
    ``batch_size`` is per rank.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    sampler = EpochSampler(dataset, shuffle=train, seed=seed, rank=rank, world_size=world_size, drop_last=train)
    if train and len(sampler) < batch_size:
        raise ValueError(f"the training split gives each of {world_size} rank(s) {len(sampler)} images, fewer "
                         f"than one batch of {batch_size}; lower --batch_size")
    # A generator of its own: creating an iterator draws the workers' base seed from it, which
    # must not consume the global RNG that the model's noise comes from (exact resumption).
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=train, num_workers=num_workers,
                      pin_memory=pin_memory, persistent_workers=num_workers > 0,
                      generator=torch.Generator().manual_seed(seed))
