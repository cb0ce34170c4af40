"""PyTorch's CPU threads sized to the cores other processes leave free, re-checked as a run goes.

A small model runs thousands of tiny operations per step, each split across the intra-op
threads, and each waits for its slowest thread. When another process keeps a core busy, the
thread that shares that core waits for the scheduler at every operation: on a 2-core machine
the digits demo measured 13.7 s per step with two threads against 0.33 s with one (0.23 s with
two on an idle machine). ``following_free_cores`` turns on a governor that measures, from
``/proc/stat``, how much of this process's CPUs other processes used over the last few seconds
and sets ``torch.set_num_threads`` to the cores left (at least one, at most the starting count).
The training, evaluation and sampling loops call ``adjust()`` once per batch: a clock read,
and every ``interval_s`` a read of ``/proc/stat``.

Linux only (elsewhere ``following_free_cores`` does nothing). The thread count is per process, so
the governor is the CLI's choice; a library caller decides for itself.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

_STAT = "/proc/stat"


def _busy_seconds(cpus: set[int]) -> float | None:
    """CPU seconds spent busy (anything but idle and I/O wait; stolen time counts as busy) on
    ``cpus`` since boot, by every process; None where ``/proc/stat`` cannot be read."""
    try:
        with open(_STAT, encoding="ascii") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    ticks = 0
    for line in lines:
        name, _, rest = line.partition(" ")
        if not name.startswith("cpu") or name == "cpu" or int(name[3:]) not in cpus:
            continue
        fields = [int(v) for v in rest.split()]
        ticks += sum(fields[:8]) - fields[3] - fields[4]  # user nice system idle iowait irq softirq steal
    return ticks / os.sysconf("SC_CLK_TCK")


@dataclass
class _Sample:
    wall: float
    busy: float
    own: float


class ThreadGovernor:
    """Sets the intra-op thread count to the cores of this process's CPU set that other
    processes left free over the last ``interval_s`` seconds, between 1 and ``max_threads``."""

    def __init__(self, max_threads: int, interval_s: float = 2.0) -> None:
        self.cpus = os.sched_getaffinity(0)
        self.max_threads = max(1, min(max_threads, len(self.cpus)))
        self.interval_s = interval_s
        self.threads = torch.get_num_threads()
        self._last = self._sample()

    def _sample(self) -> _Sample | None:
        busy = _busy_seconds(self.cpus)
        return None if busy is None else _Sample(time.monotonic(), busy, time.process_time())

    def others(self, since: _Sample, now: _Sample) -> float:
        """Cores other processes kept busy between two samples."""
        wall = max(now.wall - since.wall, 1e-9)
        return max(0.0, (now.busy - since.busy) - (now.own - since.own)) / wall

    def adjust(self, force: bool = False) -> int:
        """Re-measures if ``interval_s`` has passed (or ``force``) and sets the thread count;
        returns the count in force."""
        if self._last is None or (not force and time.monotonic() - self._last.wall < self.interval_s):
            return self.threads
        now = self._sample()
        if now is None:
            return self.threads
        free = len(self.cpus) - self.others(self._last, now)
        self._last = now
        # A quarter core of slack: a busy core shared with our own threads shows as ~2/3 busy.
        wanted = int(min(self.max_threads, max(1.0, free + 0.25)))
        if wanted != self.threads:
            torch.set_num_threads(wanted)
            self.threads = wanted
        return self.threads


_governor: ThreadGovernor | None = None


@contextlib.contextmanager
def following_free_cores(interval_s: float = 2.0, first_look_s: float = 0.2) -> Iterator[ThreadGovernor | None]:
    """Within the block, sizes this process's intra-op threads to the free cores (see the module
    docstring): a first measurement over ``first_look_s`` seconds on entry, then every
    ``interval_s`` seconds at ``adjust()``; on exit the thread count is restored. Does nothing
    (yields None) where ``OMP_NUM_THREADS`` fixes the count or ``/proc/stat`` is missing."""
    global _governor
    if "OMP_NUM_THREADS" in os.environ or not hasattr(os, "sched_getaffinity") or _busy_seconds({0}) is None:
        yield None
        return
    threads, previous = torch.get_num_threads(), _governor
    _governor = ThreadGovernor(threads, interval_s)
    try:
        time.sleep(first_look_s)
        _governor.adjust(force=True)
        yield _governor
    finally:
        _governor = previous
        torch.set_num_threads(threads)


def adjust() -> None:
    """Called by the loops once per batch: lets the governor, if on, re-size the threads."""
    if _governor is not None:
        _governor.adjust()
