"""benchmarks/launch_count.py counts what a GPU run would launch and where it would wait for the
device: checked here on operations whose counts are known."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest
import torch

from nvae_fast import backend

BENCH_DIR = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def launch_count(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH_DIR))
    return importlib.import_module("launch_count")


def test_counts_kernels_not_views_or_allocations(launch_count):
    a = torch.randn(4, 4)

    def work():
        b = a + 1                      # 1 launch
        b.view(16), b.t(), b[1:]       # views: none
        torch.empty(3)                 # allocation: none
        torch._foreach_add_([a, b], 1.0)   # one foreach op: 1 launch
        return b.sum()                 # 1 launch

    counts = launch_count.count(work)
    assert dict(counts.aten) == {"add": 1, "_foreach_add_": 1, "sum": 1}
    assert counts.launches == 3 and not counts.syncs


def test_counts_host_synchronisations(launch_count):
    a = torch.randn(8)

    def work():
        a.sum().item()                 # sum, then a read on the host
        if (a > 0).any():              # gt, any, then bool(): a read on the host
            pass
        a[a > 0]                       # boolean-mask indexing: the output size needs the mask's values
        a.tolist()

    counts = launch_count.count(work)
    assert counts.syncs["_local_scalar_dense"] == 2
    assert counts.syncs["index with a boolean mask"] == 1
    assert counts.syncs["Tensor.tolist"] == 1
    assert sum(counts.syncs.values()) == 4
    assert "_local_scalar_dense" not in counts.aten


def test_host_tensors_are_neither_launches_nor_syncs(launch_count):
    step = torch.tensor(3.0)
    counts = launch_count.count(lambda: step.item(), host_tensors=[step])
    assert counts.launches == 0 and not counts.syncs


def test_follows_custom_ops_into_their_implementation(launch_count):
    """A custom op is one call whose own ATen ops are what launches (torch backend here)."""
    from nvae_fast.ops.normal_kl import normal_sample

    mu, log_sigma, eps = torch.randn(3, 2, 3, 4, 4).unbind(0)
    with backend.use_backend("torch"):
        counts = launch_count.count(lambda: normal_sample(mu, log_sigma, eps))
    assert dict(counts.custom_ops) == {"nvae_fast::normal_sample": 1}
    assert counts.launches == counts.inside["nvae_fast::normal_sample"] > 0 and not counts.triton


@pytest.mark.gpu   # on the GPU where there is one
@pytest.mark.skipif(not (backend.triton_interpreted() or torch.cuda.is_available()),
                    reason="Triton needs a GPU or TRITON_INTERPRET=1")
def test_counts_triton_launches_and_nothing_inside_them(launch_count):
    """The interpreter copies arguments with torch ops: those are not launches."""
    from nvae_fast.ops.bn_swish import bn_swish

    device = "cuda" if torch.cuda.is_available() else "cpu"
    x = torch.randn(2, 3, 4, 4, device=device)
    weight, bias = torch.ones(3, device=device), torch.zeros(3, device=device)
    mean, var = torch.zeros(3, device=device), torch.ones(3, device=device)
    with backend.use_backend("triton"):
        counts = launch_count.count(lambda: bn_swish(x, weight, bias, mean, var, training=False))
    assert sum(counts.triton.values()) >= 1
    assert counts.launches == sum(counts.triton.values()) + sum(counts.aten.values())
    assert not counts.syncs


def test_cli_prints_the_cell_counts_as_json(launch_count, capsys, tmp_path):
    out = tmp_path / "counts.json"
    assert launch_count.main(["--workloads", "cell", "--backend", "torch", "--output", str(out)]) == 0
    captured = capsys.readouterr()
    printed = json.loads(captured.out)
    assert printed == json.loads(out.read_text())
    cells = {c["cell_type"]: c for c in printed["cells"]}
    assert set(cells) == {"normal_dec", "up_dec"}
    for cell in cells.values():
        for phase in ("train_forward_backward", "eval_forward"):
            assert cell[phase]["launches"] == cell[phase]["aten_launches"] > 0
            assert cell[phase]["syncs"] == 0
            # the torch backend is the eager reference: no fused-cell budget is claimed for it
            summary = printed["summary"][cell["cell_type"]][phase]
            assert summary["launches"] == cell[phase]["launches"] and "budget" not in summary
    assert printed["summary"]["up_dec"]["train_forward_backward"]["of_which_skip_weight_norm"] > 0
    assert "normal_dec: " in captured.err and "up_dec: " in captured.err


def test_cli_rejects_unknown_workloads(launch_count, capsys):
    with pytest.raises(SystemExit) as err:
        launch_count.main(["--workloads", "cell,bogus"])
    assert err.value.code == 2
    assert "bogus" in capsys.readouterr().err



@torch.library.custom_op("launch_count_test::double_plus_one", mutates_args=())
def _double_plus_one(x: torch.Tensor) -> torch.Tensor:
    return x * 2 + 1


def test_attributes_launches_to_the_outermost_custom_op(launch_count):
    x = torch.randn(5)

    def work():
        torch.relu(x)
        _double_plus_one(x)

    counts = launch_count.count(work)
    assert dict(counts.aten) == {"relu": 1, "mul": 1, "add": 1}
    assert dict(counts.custom_ops) == {"launch_count_test::double_plus_one": 1}
    assert dict(counts.inside) == {"launch_count_test::double_plus_one": 2}


# One training step of tiny_cifar10 on the triton backend (batch 4): kernels a GPU run launches
# (950 when this was written). The official code's step launches about 7,600 and synchronises 79 times.
STEP_LAUNCH_BUDGET = 1600


@pytest.mark.skipif(not backend.triton_interpreted(), reason="counted under TRITON_INTERPRET=1")
def test_training_step_budget(launch_count):
    """No host synchronisation in a training step (not a log step), and at most the budget's
    launches: counted without running the Triton kernels, which gives the same count as long as
    the step never synchronises (train_step_counts checks that first)."""
    report = launch_count.train_step_counts("tiny_cifar10", batch=4, backend="triton", skip_triton=True)
    counts = report["train_step"]
    assert counts["syncs"] == 0, counts["syncs_by_reason"]
    assert counts["launches"] <= STEP_LAUNCH_BUDGET, (counts["launches"], counts["launches_inside_custom_ops"])
