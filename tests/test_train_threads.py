"""The CPU thread governor: intra-op threads follow the cores other processes leave free."""

import pytest
import torch

from nvae_fast.train import threads


class _Clock:
    """Stands for /proc/stat, the wall clock and this process's CPU time: ``run(seconds, others,
    ours)`` advances them as if other processes kept ``others`` cores busy and this one ``ours``."""

    def __init__(self):
        self.wall = self.busy = self.own = 100.0

    def run(self, seconds: float, others: float, ours: float) -> None:
        self.wall += seconds
        self.own += seconds * ours
        self.busy += seconds * (others + ours)


@pytest.fixture
def clock(monkeypatch):
    c = _Clock()
    monkeypatch.setattr(threads, "_busy_seconds", lambda cpus: c.busy)
    monkeypatch.setattr(threads.time, "monotonic", lambda: c.wall)
    monkeypatch.setattr(threads.time, "process_time", lambda: c.own)
    monkeypatch.setattr(threads.time, "sleep", lambda s: c.run(s, 0.0, 0.0))
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    yield c
    torch.set_num_threads(before)


def test_threads_follow_the_free_cores(clock):
    torch.set_num_threads(2)
    governor = threads.ThreadGovernor(max_threads=2, interval_s=2.0)
    clock.run(2.0, others=0.05, ours=2.0)       # idle machine: both cores
    assert governor.adjust() == 2 and torch.get_num_threads() == 2
    clock.run(2.0, others=0.7, ours=1.3)        # a busy loop appears; our two threads share its core
    assert governor.adjust() == 1 and torch.get_num_threads() == 1
    clock.run(2.0, others=1.0, ours=1.0)        # with one thread each has a core: stay at one
    assert governor.adjust() == 1
    clock.run(1.0, others=0.0, ours=1.0)        # within interval_s: no new measurement
    assert governor.adjust() == 1
    clock.run(2.0, others=0.0, ours=1.0)        # the other process ended
    assert governor.adjust() == 2 and torch.get_num_threads() == 2


def test_never_more_than_the_starting_count(clock):
    torch.set_num_threads(1)
    governor = threads.ThreadGovernor(max_threads=1)
    clock.run(3.0, others=0.0, ours=1.0)
    assert governor.adjust() == 1 and torch.get_num_threads() == 1


def test_the_commands_governor_is_scoped_and_respects_omp_num_threads(clock, monkeypatch):
    torch.set_num_threads(2)
    with threads.following_free_cores() as governor:
        assert governor is not None and threads._governor is governor
        clock.run(2.0, others=1.0, ours=1.0)
        threads.adjust()
        assert torch.get_num_threads() == 1
    assert threads._governor is None and torch.get_num_threads() == 2
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    with threads.following_free_cores() as governor:
        assert governor is None
