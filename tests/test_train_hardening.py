"""Hardening of the training commands: every bad input ends in one line and the right exit status,
before any work; no run is lost; nothing written is non-finite or unreadable.

``test_bad_input_ends_in_one_line`` is a table: each case is a command line (and environment) that
used to train, crash with a traceback, print a misleading message or write garbage, with the exit
status and the words its one line must now have.
"""

import json
import os
import shutil
import stat
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from nvae_fast import NVAE, NVAEConfig
from nvae_fast.cli import main
from nvae_fast.compat.official import save_official_checkpoint
from nvae_fast.train import checkpoint as ckpt_io
from nvae_fast.train.evaluate import EvalResult
from nvae_fast.train.loop import run_training
from nvae_fast.train.recipe import TrainConfig, train_preset
from nvae_fast.train.runtime import Runtime
from nvae_fast.train.schedules import WarmupCosineLR
from nvae_fast.train.trainer import Trainer
from train_fixtures import write_mnist

CPU = Runtime(torch.device("cpu"))
STOPPED_AT = 5  # the shared run: tiny_mnist, 32 images in batches of 8 (4 steps per epoch), stopped here


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One intra-op thread: tiny models gain nothing from more (see test_train_loop.py)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def mnist_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("mnist")
    write_mnist(root, n_train=32, n_test=8)
    return root


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory, mnist_dir):
    """A tiny_mnist run stopped at step 5 of 8 (checkpoint.pt, log.txt)."""
    run_dir = tmp_path_factory.mktemp("runs") / "eval-t"
    cfg = TrainConfig(**{**train_preset("tiny_mnist"), "data": str(mnist_dir), "num_samples": 4,
                         "num_iw_samples": 2})
    run_training(NVAEConfig.preset("tiny_mnist"), cfg, run_dir, CPU, stop_after_step=STOPPED_AT, tensorboard=False)
    return run_dir


@pytest.fixture
def run(stopped_run, tmp_path):
    """This test's copy of the stopped run, as ROOT/eval-t with ROOT = tmp_path / 'runs'."""
    copy = tmp_path / "runs" / "eval-t"
    shutil.copytree(stopped_run, copy)
    return copy


def _cli(args: list[str], capsys) -> tuple[int, str, str]:
    """Exit status, stderr and stdout of ``nvae-fast ARGS`` run in this process."""
    try:
        code = main([str(a) for a in args])
    except SystemExit as e:  # argparse exits on its own
        code = e.code
    captured = capsys.readouterr()
    return code, captured.err, captured.out


def _assert_one_line(code: int, err: str, expected_code: int, *needles: str) -> str:
    """The exit status is ``expected_code`` and stderr holds one line (besides the progress bars
    of work done before the failure, redrawn with carriage returns) with every needle."""
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip() and "%|" not in line]
    assert code == expected_code, (code, err)
    assert len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert "weights_only" not in lines[0] and "\x1b" not in lines[0], lines[0]
    return lines[0]


# ----------------------------------------------------------------------------- files for the cases

def _state_with_problems(state: dict) -> dict:
    """A model state_dict with a key removed, a key added and a tensor of the wrong shape."""
    state = dict(state)
    keys = list(state)
    del state[keys[3]]
    state["decoder.extra.weight"] = torch.zeros(1)
    state[keys[7]] = torch.zeros(*state[keys[7]].shape[:-1], state[keys[7]].shape[-1] + 1)
    return state


def _problem_needles(model: NVAE) -> tuple[str, ...]:
    keys = list(model.state_dict())
    return (f"missing key(s), the first {keys[3]!r}", "unexpected key(s), the first 'decoder.extra.weight'",
            f"shape mismatch(es), the first {keys[7]!r}")


def _files(tmp: Path, run: Path) -> dict[str, Path]:
    """Bad files of every kind a user might hand the commands."""
    files = {}
    files["random"] = tmp / "random.pt"
    files["random"].write_bytes(np.random.default_rng(0).bytes(4096))
    files["a file"] = tmp / "file.txt"
    files["a file"].write_text("a file, not a directory")

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {tmp / 'pwned'}",)

    model = NVAE(NVAEConfig.preset("tiny_mnist"))
    files["evil official"] = tmp / "evil_official.pt"
    torch.save({"state_dict": model.state_dict(), "args": Payload()}, files["evil official"])

    files["foreign official"] = tmp / "foreign_official.pt"  # a class torch's message prints in bold
    torch.save({"state_dict": model.state_dict(), "args": Path("/x")}, files["foreign official"])

    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    bad = dict(ckpt, model=_state_with_problems(ckpt["model"]))
    files["mismatched checkpoint"] = tmp / "mismatched.pt"
    torch.save(bad, files["mismatched checkpoint"])
    for kind, suffix in (("weights", "log_weight_norm"), ("statistics", "running_mean")):
        nan = dict(ckpt, model=dict(ckpt["model"]))
        key = next(k for k in nan["model"] if k.endswith(suffix))
        nan["model"][key] = torch.full_like(nan["model"][key], float("nan"))
        files[f"nan {kind}"] = tmp / f"nan_{kind}.pt"
        torch.save(nan, files[f"nan {kind}"])

    files["mismatched official"] = tmp / "mismatched_official.pt"
    save_official_checkpoint(model, files["mismatched official"])
    official = torch.load(files["mismatched official"], weights_only=False)
    official["state_dict"] = _state_with_problems(official["state_dict"])
    torch.save(official, files["mismatched official"])

    files["mismatched safetensors"] = tmp / "mismatched.safetensors"
    try:
        from safetensors.torch import save_file
    except ImportError:
        return files
    state = {k: v.clone().contiguous() for k, v in _state_with_problems(model.state_dict()).items()}
    save_file(state, str(files["mismatched safetensors"]),
              metadata={"nvae_fast.config": json.dumps({"model": ckpt["config"]["model"], "train": {}})})
    return files


# ----------------------------------------------------------------------------- the table

def _cases(tmp: Path, data: Path, run: Path, files: dict[str, Path], small: Path):
    """name -> (arguments, environment, exit status, words of the one line)."""
    root = run.parent
    fresh = ["train", "--preset", "tiny_mnist", "--data", data, "--root", tmp / "fresh"]
    resume = ["train", "--root", root, "--save", "t", "--resume"]
    ckpt = run / "checkpoint.pt"
    problems = _problem_needles(NVAE(NVAEConfig.preset("tiny_mnist")))
    return {
        # A run directory is never overwritten.
        "rerun over a checkpoint": (["train", "--preset", "tiny_mnist", "--data", data, "--root", root, "--save", "t"],
                                    {}, 2, ("holds an earlier run", f"checkpoint.pt at step {STOPPED_AT}", "--resume",
                                            "--save", "--overwrite")),
        "resume and overwrite": ([*resume, "--overwrite"], {}, 2, ("--resume", "--overwrite", "give one")),
        # --resume and flags.
        "resume with another preset": ([*resume, "--preset", "tiny_cifar10"], {}, 2,
                                       ("--preset tiny_cifar10 describes another model", "dataset cifar10 here")),
        "resume with fewer epochs than done": ([*resume, "--epochs", "1"], {}, 2,
                                               ("--epochs 1", f"at step {STOPPED_AT}", "--epochs 2 or more")),
        "resume with another batch size": ([*resume, "--batch_size", "4"], {}, 2,
                                           ("--batch_size 4 (the run has 8)", "new --save")),
        "resume with another seed": ([*resume, "--seed", "7"], {}, 2, ("--seed 7 (the run has 1)",)),
        "resume stopping in the past": ([*resume, "--stop_after_step", "3"], {}, 2,
                                        ("--stop_after_step 3", f"already at step {STOPPED_AT}")),
        "resume warm-up checked against the run's": ([*resume, "--epochs", "3", "--warmup_epochs", "3"], {}, 2,
                                                     ("--warmup_epochs (3) must be smaller than epochs (3)",)),
        "resume on data too small for a batch": ([*resume, "--data", small], {}, 2,
                                                 ("fewer than one batch of 8", "--batch_size")),
        # Numbers: finite and in range, before any work.
        "learning rate nan": ([*fresh, "--learning_rate", "nan"], {}, 2, ("--learning_rate", "finite")),
        "learning rate inf": ([*fresh, "--learning_rate", "inf"], {}, 2, ("--learning_rate", "finite")),
        "kl coefficient nan": ([*fresh, "--kl_const_coeff", "nan"], {}, 2, ("--kl_const_coeff", "finite")),
        "kl portion above 1": ([*fresh, "--kl_anneal_portion", "1.5"], {}, 2, ("--kl_anneal_portion", "[0, 1]")),
        "negative weight decay": ([*fresh, "--weight_decay", "-1"], {}, 2, ("--weight_decay must be >= 0",)),
        "train temperature nan": ([*fresh, "--temp", "nan"], {}, 2, ("--temp", "finite")),
        "ema decay nan": ([*fresh, "--ema_decay", "nan"], {}, 2, ("--ema_decay", "finite")),
        "stop after step 0": ([*fresh, "--stop_after_step", "0"], {}, 2, ("--stop_after_step must be >= 1",)),
        "sample temperature inf": (["sample", "--checkpoint", ckpt, "--temp", "inf"], {}, 2,
                                   ("--temp", "finite number")),
        "evaluate negative batch": (["evaluate", "--checkpoint", ckpt, "--batch_size", "-1"], {}, 2,
                                    ("--batch_size", ">= 0")),
        "evaluate negative workers": (["evaluate", "--checkpoint", ckpt, "--num_workers", "-1"], {}, 2,
                                      ("--num_workers", ">= 0")),
        "batch larger than the data": ([*fresh, "--batch_size", "64"], {}, 2, ("fewer than one batch of 64",)),
        # Output locations, checked before any work.
        "root is a file": (["train", "--preset", "tiny_mnist", "--data", data, "--root", files["a file"]], {}, 2,
                           ("run directory", "is a file, not a directory")),
        "root cannot be written": (["train", "--preset", "tiny_mnist", "--data", data, "--root", "/proc/self/runs"],
                                   {}, 2, ("run directory", "cannot write")),
        "evaluate output under a file": (["evaluate", "--checkpoint", ckpt, "--output", files["a file"] / "e.json"],
                                         {}, 2, ("--output", "is a file, not a directory")),
        "evaluate output is a directory": (["evaluate", "--checkpoint", ckpt, "--output", tmp], {}, 2,
                                           ("--output", "is a directory")),
        "sample output under a file": (["sample", "--checkpoint", ckpt, "--output", files["a file"] / "s"], {}, 2,
                                       ("--output", "is a file, not a directory")),
        # Backends the environment asks for.
        "backend bogus": (fresh, {"NVAE_FAST_BACKEND": "bogus"}, 2, ("NVAE_FAST_BACKEND", "'bogus'")),
        "backend cuda on a cpu": (["evaluate", "--checkpoint", ckpt], {"NVAE_FAST_BACKEND": "cuda"}, 2,
                                  ("NVAE_FAST_BACKEND=cuda cannot run on cpu",)),
        "backend triton on a cpu": (["sample", "--checkpoint", ckpt], {"NVAE_FAST_BACKEND": "triton",
                                                                        "TRITON_INTERPRET": None}, 2,
                                    ("NVAE_FAST_BACKEND=triton cannot run on cpu",)),
        "info with a bogus backend": (["info"], {"NVAE_FAST_BACKEND": "bogus"}, 2, ("NVAE_FAST_BACKEND", "'bogus'")),
        # Files and what they hold.
        "data that is a file": (["train", "--preset", "tiny_cifar10", "--data", files["a file"], "--data_format",
                                 "folder", "--root", tmp / "fresh"], {}, 2,
                                ("file.txt is a file", "directory of images")),
        "random checkpoint": (["evaluate", "--checkpoint", files["random"]], {}, 2,
                              ("random.pt", "not a file written by torch.save")),
        "malicious official checkpoint": (["sample", "--checkpoint", files["evil official"]], {}, 2,
                                          ("pickled posix.system", "refused without running it")),
        "official checkpoint holding another class": (["evaluate", "--checkpoint", files["foreign official"]], {}, 2,
                                                      ("foreign_official.pt", "pickled pathlib", "refused")),
        "mismatched checkpoint": (["evaluate", "--checkpoint", files["mismatched checkpoint"]], {}, 2,
                                  ("mismatched.pt: the weights do not fit the model", *problems)),
        "mismatched official checkpoint": (["sample", "--checkpoint", files["mismatched official"]], {}, 2,
                                           ("mismatched_official.pt", "do not fit the model", *problems)),
        "mismatched safetensors": (["sample", "--checkpoint", files["mismatched safetensors"]], {}, 2,
                                   ("mismatched.safetensors", "do not fit the model", *problems)),
        "checkpoint with NaN weights": (["evaluate", "--checkpoint", files["nan weights"]], {}, 2,
                                        ("nan_weights.pt", "parameter tensor(s) hold NaN/Inf", "log_weight_norm")),
        "checkpoint with NaN statistics": (["evaluate", "--checkpoint", files["nan statistics"]], {}, 2,
                                           ("statistics", "hold NaN/Inf", "running_mean", "--readjust_bn")),
    }


CASES = ["rerun over a checkpoint", "resume and overwrite", "resume with another preset",
         "resume with fewer epochs than done", "resume with another batch size", "resume with another seed",
         "resume stopping in the past", "resume warm-up checked against the run's",
         "resume on data too small for a batch", "learning rate nan", "learning rate inf", "kl coefficient nan",
         "kl portion above 1", "negative weight decay", "train temperature nan", "ema decay nan",
         "stop after step 0", "sample temperature inf", "evaluate negative batch", "evaluate negative workers",
         "batch larger than the data", "root is a file", "root cannot be written", "evaluate output under a file",
         "evaluate output is a directory", "sample output under a file", "backend bogus", "backend cuda on a cpu",
         "backend triton on a cpu", "info with a bogus backend", "data that is a file", "random checkpoint",
         "malicious official checkpoint", "official checkpoint holding another class", "mismatched checkpoint",
         "mismatched official checkpoint", "mismatched safetensors", "checkpoint with NaN weights",
         "checkpoint with NaN statistics"]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_ends_in_one_line(case, run, mnist_dir, tmp_path, monkeypatch, capsys):
    if case == "root cannot be written" and not Path("/proc/self").is_dir():
        pytest.skip("needs Linux's /proc, which nobody (root included) can write")
    if "safetensors" in case:
        pytest.importorskip("safetensors")
    monkeypatch.chdir(tmp_path)
    small = tmp_path / "small"
    small.mkdir()
    write_mnist(small, n_train=4, n_test=2)
    files = _files(tmp_path, run)
    args, env, code, needles = _cases(tmp_path, mnist_dir, run, files, small)[case]
    for name, value in env.items():
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    before = (run / "checkpoint.pt").read_bytes()
    got, err, out = _cli(args, capsys)
    _assert_one_line(got, err, code, *needles)
    assert (run / "checkpoint.pt").read_bytes() == before
    assert not (tmp_path / "pwned").exists()
    assert not (tmp_path / "fresh").exists()  # no run directory for a run that never started
    if args[0] != "info":  # refused before any work: nothing computed, nothing written
        assert "NELBO" not in out and "samples at" not in out, out
    else:
        assert "backend cuda" in out and "requested backend: invalid" in out and "CPU threads" in out, out


# ----------------------------------------------------------------------------- runs are never lost

def test_rerunning_a_run_refuses_until_resume_or_overwrite(run, mnist_dir, capsys):
    root = run.parent
    (run / "samples.png").write_bytes(b"an earlier run's samples")
    before = (run / "checkpoint.pt").read_bytes()
    again = ["train", "--preset", "tiny_mnist", "--data", mnist_dir, "--root", root, "--save", "t",
             "--stop_after_step", "1"]
    _assert_one_line(*_cli(again, capsys)[:2], 2, "holds an earlier run")
    assert (run / "checkpoint.pt").read_bytes() == before
    code, err, out = _cli([*again, "--overwrite"], capsys)
    assert code == 0, err
    assert torch.load(run / "checkpoint.pt", weights_only=True)["step"] == 1
    assert not (run / "samples.png").exists()  # nothing of the earlier run stays beside the new one
    log = (run / "log.txt").read_text()
    assert "removed the earlier run's checkpoint.pt" in log and f"at step {STOPPED_AT}" not in log


def test_digits_demo_twice_refuses_the_second_time(tmp_path, capsys):
    first = _cli(["train", "--preset", "digits", "--root", tmp_path, "--stop_after_step", "1"], capsys)
    assert first[0] == 0, first[1]
    code, err, _ = _cli(["train", "--preset", "digits", "--root", tmp_path], capsys)
    _assert_one_line(code, err, 2, "eval-digits holds an earlier run", "--resume", "--save", "--overwrite")


def test_resume_applies_changed_flags_to_the_whole_schedule(run, capsys):
    # --epochs 3 without --preset used to be checked against the default warm-up (5), not the run's (1).
    code, err, _ = _cli(["train", "--root", run.parent, "--save", "t", "--resume", "--epochs", "3",
                         "--learning_rate", "0.005", "--stop_after_step", str(STOPPED_AT + 1)], capsys)
    assert code == 0, err
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == STOPPED_AT + 1
    assert ckpt["config"]["train"]["epochs"] == 3 and ckpt["config"]["train"]["learning_rate"] == 0.005
    # The optimizer's learning rate is the one a run started with these options has at this step.
    reference = torch.optim.Adamax([torch.zeros(1, requires_grad=True)], lr=0.005)
    schedule = WarmupCosineLR(reference, 4, 3, 1, ckpt["config"]["train"]["learning_rate_min"])
    for _ in range(STOPPED_AT + 1):
        reference.step()
        schedule.step()
    group = ckpt["optimizer"]["param_groups"][0]
    assert group["initial_lr"] == 0.005 and group["lr"] == reference.param_groups[0]["lr"]
    assert "options changed: --learning_rate 0.01 -> 0.005, --epochs 2 -> 3" in (run / "log.txt").read_text()
    # The run's own --preset is accepted, and its recipe does not undo the options the run now has.
    code, err, _ = _cli(["train", "--preset", "tiny_mnist", "--root", run.parent, "--save", "t", "--resume",
                         "--stop_after_step", str(STOPPED_AT + 2)], capsys)
    assert code == 0, err
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == STOPPED_AT + 2 and ckpt["config"]["train"]["epochs"] == 3
    assert ckpt["optimizer"]["param_groups"][0]["initial_lr"] == 0.005


# ----------------------------------------------------------------------------- nothing non-finite is kept

def test_non_finite_weights_are_never_checkpointed(mnist_dir, tmp_path, monkeypatch, capsys):
    step = Trainer.train_step

    def poisoned(self, x, *args, **kwargs):
        stats = step(self, x, *args, **kwargs)
        if self.step == 3:  # a NaN the step's guard does not see (here: planted in a running mean)
            next(b for n, b in self.model.named_buffers() if n.endswith("running_mean")).fill_(float("nan"))
        return stats

    monkeypatch.setattr(Trainer, "train_step", poisoned)
    run = tmp_path / "eval-n"
    code, err, _ = _cli(["train", "--preset", "tiny_mnist", "--data", mnist_dir, "--root", tmp_path, "--save", "n",
                         "--epochs", "1", "--warmup_epochs", "0", "--checkpoint_every", "2"], capsys)
    line = _assert_one_line(code, err, 3, "after step 4, 1 tensor(s) hold NaN/Inf", "running_mean",
                            "the last good checkpoint", "(step 2), is kept")
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 2 and all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    assert not (run / "final_eval.json").exists() and not (run / "samples.png").exists()
    assert line.split("error: ", 1)[1] in (run / "log.txt").read_text()


def test_a_diverging_run_ends_with_status_3_and_one_line(mnist_dir, tmp_path, capsys):
    # A Bernoulli output (MNIST) used to raise on its NaN logits before the step's guard saw them.
    code, err, _ = _cli(["train", "--preset", "tiny_mnist", "--data", mnist_dir, "--root", tmp_path,
                         "--learning_rate", "1e6", "--max_bad_steps", "2"], capsys)
    line = _assert_one_line(code, err, 3, "consecutive steps", "NaN/Inf", "checkpoint")
    assert line.split("error: ", 1)[1] in (tmp_path / "eval-tiny_mnist" / "log.txt").read_text()


def test_json_results_write_non_finite_numbers_as_null(run, tmp_path, monkeypatch, capsys):
    nan = float("nan")
    monkeypatch.setattr(sys.modules["nvae_fast.train.evaluate"], "evaluate",
                        lambda *args, **kwargs: EvalResult(nan, float("inf"), nan, nan, 1, 8))
    out = tmp_path / "eval.json"
    code, err, _ = _cli(["evaluate", "--checkpoint", run / "checkpoint.pt", "--output", out], capsys)
    assert code == 0, err

    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    result = json.loads(out.read_text(), parse_constant=refuse)
    assert result["nelbo"] is None and result["neg_log_p"] is None and result["images"] == 8


# ----------------------------------------------------------------------------- leftovers and logs

def test_checkpoint_writes_clean_up_and_get_ordinary_permissions(tmp_path):
    path = tmp_path / "checkpoint.pt"
    stale = [tmp_path / "checkpoint.pt.a1b2.tmp", tmp_path / "checkpoint.pt.zz9.tmp"]
    for p in stale:
        p.write_bytes(b"left by a killed write")
    (tmp_path / "other.pt.x.tmp").write_bytes(b"not ours")
    ckpt_io.save_atomic({"step": 3}, path)
    assert not any(p.exists() for p in stale) and (tmp_path / "other.pt.x.tmp").exists()
    (tmp_path / "reference").write_text("")
    assert stat.S_IMODE(path.stat().st_mode) == stat.S_IMODE((tmp_path / "reference").stat().st_mode)
    assert torch.load(path, weights_only=True) == {"step": 3}


def test_a_failed_run_leaves_nothing_or_records_its_error(run, tmp_path, capsys):
    # Found while reading the data: the run directory is not even created.
    code, err, _ = _cli(["train", "--preset", "tiny_mnist", "--data_format", "digits", "--root", tmp_path], capsys)
    _assert_one_line(code, err, 2, "(1, 8, 8)")
    assert not (tmp_path / "eval-tiny_mnist").exists()
    # In a run directory that exists, log.txt records why the run stopped.
    small = tmp_path / "small"
    small.mkdir()
    write_mnist(small, n_train=4, n_test=2)
    code, err, _ = _cli(["train", "--root", run.parent, "--save", "t", "--resume", "--data", small], capsys)
    line = _assert_one_line(code, err, 2, "fewer than one batch")
    assert "error: " + line.split("error: ", 1)[1] in (run / "log.txt").read_text()


def test_help_shows_defaults(capsys):
    _, _, out = _cli(["train", "--help"], capsys)
    out = " ".join(out.split())
    for text in ("--learning_rate LEARNING_RATE", "(default: 0.01)", "(default: 200)", "(default: res_mbconv)",
                 "--overwrite"):
        assert text in out, text
    _, _, out = _cli(["evaluate", "--help"], capsys)
    assert "(default: 1000)" in " ".join(out.split())
    _, _, out = _cli(["sample", "--help"], capsys)
    assert "(default: 0.7)" in " ".join(out.split()) and "(default: samples)" in " ".join(out.split())
