"""Same seed, same run: ``nvae-fast train`` reproduces runs of the official NVAE train.py.

``fixtures/official_run/official_runs.json`` holds what the official train.py did (one process, fp32, on
the CPU) for a few tiny configurations: its initial weights, and the loss and learning rate of each
optimizer step. Here ``nvae-fast train`` runs with the same flags, seed and data and must give the
same initial weights and the same losses to 1e-6 relative. The 50-step case crosses five epoch ends
(sample grids and a 10-sample validation drawing from the training's random stream, the sampler's
reshuffles) and the end of the learning-rate warm-up. The data are written so that the random
transforms of the two codes cannot differ: binary MNIST pixels (dynamic binarisation keeps them) and
left-right symmetric CIFAR-10 images (flips keep them).
"""

import json
from pathlib import Path

import pytest
import torch

from nvae_fast.cli import build_parser
from nvae_fast.train import loop
from nvae_fast.train.options import resolve_train
from nvae_fast.train.runtime import Runtime
from nvae_fast.train.trainer import Trainer
from train_fixtures import write_binary_mnist, write_symmetric_cifar10

FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "official_run" / "official_runs.json").read_text())
CASES = {case["name"]: case for case in FIXTURE["cases"]}
LOSS_RTOL = 1e-6


def _write_data(spec: dict, root: Path) -> None:
    root.mkdir()
    if spec["kind"] == "binary_mnist":
        write_binary_mnist(root, spec["n_train"], spec["n_test"])
    else:
        write_symmetric_cifar10(root, spec["n_per_batch"], spec["n_test"])


def _run(case: dict, tmp_path: Path, monkeypatch) -> dict:
    """``nvae-fast train`` with the case's official flags, stopped after its recorded steps; returns
    the initial weights, and every step's loss and learning rate."""
    _write_data(case["data"], tmp_path / "data")
    seen = {"lr": []}
    build = loop._build_model

    def recording_build(cfg):
        model = build(cfg)
        seen["initial"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return model

    step = Trainer.train_step

    def recording_step(self, x, **kwargs):
        stats = step(self, x, **kwargs)
        seen["lr"].append(stats.lr)
        return stats

    monkeypatch.setattr(loop, "_build_model", recording_build)
    monkeypatch.setattr(Trainer, "train_step", recording_step)
    argv = ["train", *case["argv"], "--data", str(tmp_path / "data"), "--root", str(tmp_path / "runs"),
            "--num_workers", "0"]
    request = resolve_train(build_parser().parse_args(argv))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the recorded run
    try:
        result = loop.run_training(request.model, request.train, request.run_dir, Runtime(torch.device("cpu")),
                                   stop_after_step=case["steps"], tensorboard=False)
    finally:
        torch.set_num_threads(threads)
    seen["loss"] = [result.losses[i] for i in range(case["steps"])]
    return seen


def _check_initial_weights(case: dict, initial: dict[str, torch.Tensor]) -> None:
    totals = [sum(v.double().sum().item() for v in initial.values()),
              sum(v.double().abs().sum().item() for v in initial.values())]
    assert totals == pytest.approx(case["initial_weights_total"], rel=1e-6)
    for name, (total, magnitude) in case.get("initial_weights", {}).items():
        value = initial[name].double()
        got = [value.sum().item(), value.abs().sum().item()]
        assert got == pytest.approx([total, magnitude], rel=1e-6, abs=1e-6), name
    if "initial_weights" in case:
        assert sorted(initial) == sorted(case["initial_weights"])


def _check_losses(case: dict, got: list[float]) -> None:
    worst = max(abs(a - b) / abs(b) for a, b in zip(got, case["loss"]))
    assert worst <= LOSS_RTOL, (f"{case['name']}: losses differ from the official run by up to {worst:.3g} relative\n"
                                f"nvae_fast {got}\nofficial  {case['loss']}")


def test_fifty_steps_follow_the_official_run(tmp_path, monkeypatch):
    case = CASES["mnist_50_steps"]
    got = _run(case, tmp_path, monkeypatch)
    _check_initial_weights(case, got["initial"])
    assert got["lr"] == case["lr"]  # the official warm-up and cosine, bit for bit
    _check_losses(case, got["loss"])


@pytest.mark.parametrize("name", [n for n in CASES if n != "mnist_50_steps"])
def test_first_steps_follow_the_official_run(name, tmp_path, monkeypatch):
    case = CASES[name]
    got = _run(case, tmp_path, monkeypatch)
    _check_initial_weights(case, got["initial"])
    assert got["lr"] == case["lr"]
    _check_losses(case, got["loss"])
