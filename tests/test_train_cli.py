"""``nvae-fast`` on bad input: a non-zero exit and one clear line on stderr, never a traceback."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from nvae_fast.cli import main
from train_fixtures import write_mnist

ROOT = Path(__file__).resolve().parent.parent


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "nvae_fast", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


def _main(args: list[str], capsys) -> tuple[int, str, str]:
    """Exit status, stderr and stdout of ``nvae-fast ARGS`` run in this process."""
    try:
        code = main(args)
    except SystemExit as e:  # argparse exits on its own
        code = e.code
    captured = capsys.readouterr()
    return code, captured.err, captured.out


def _assert_one_line_error(code: int, stderr: str, stdout: str, *needles: str) -> None:
    assert code == 2, (code, stderr)
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def _bad_inputs(tmp: Path) -> dict[str, tuple[list[str], tuple[str, ...]]]:
    (tmp / "corrupt.pt").write_bytes(b"this is not a checkpoint")
    (tmp / "mnist").mkdir()
    write_mnist(tmp / "mnist")
    return {
        "missing data path": (["train", "--preset", "tiny_mnist", "--data", str(tmp / "nope")], ("nope", "not exist")),
        "unknown format": (["train", "--preset", "tiny_mnist", "--data", str(tmp), "--data_format", "tfrecord"],
                           ("unknown data format", "tfrecord")),
        "wrong image size": (["train", "--preset", "tiny_mnist", "--data_format", "digits"],
                             ("(1, 8, 8)", "(1, 32, 32)")),
        "wrong channels": (["train", "--preset", "tiny_cifar10", "--data", str(tmp / "mnist"), "--data_format",
                            "idx"], ("(1, 32, 32)", "(3, 32, 32)")),
        "unknown preset": (["train", "--preset", "imagenet_1024"], ("unknown preset",)),
        "bad option value": (["train", "--preset", "tiny_mnist", "--batch_size", "0"], ("batch_size",)),
        "corrupt checkpoint": (["evaluate", "--checkpoint", str(tmp / "corrupt.pt")], ("corrupt.pt",)),
        "missing checkpoint": (["sample", "--checkpoint", str(tmp / "none.pt")], ("none.pt", "does not exist")),
        "nothing to resume": (["train", "--preset", "tiny_mnist", "--root", str(tmp / "runs"), "--resume"],
                              ("checkpoint.pt", "does not exist")),
        "bad flag value": (["sample", "--checkpoint", "x.pt", "--temp", "-1"], ("--temp",)),
        "cuda graphs on the cpu": (["train", "--preset", "tiny_mnist", "--data", str(tmp / "mnist"), "--device", "cpu",
                                    "--cuda_graphs", "--batch_size", "2", "--root", str(tmp / "runs")],
                                   ("--cuda_graphs", "CUDA")),
    }


@pytest.mark.parametrize("case", ["missing data path", "unknown format", "wrong image size", "wrong channels",
                                  "unknown preset", "bad option value", "corrupt checkpoint", "missing checkpoint",
                                  "nothing to resume", "bad flag value", "cuda graphs on the cpu"])
def test_bad_input_exits_with_one_line(tmp_path, monkeypatch, capsys, case):
    monkeypatch.chdir(tmp_path)
    args, needles = _bad_inputs(tmp_path)[case]
    _assert_one_line_error(*_main(args, capsys), *needles)


def test_console_entry_point_reports_bad_input_without_traceback(tmp_path):
    proc = _run("evaluate", "--checkpoint", str(tmp_path / "missing.pt"), cwd=tmp_path)
    _assert_one_line_error(proc.returncode, proc.stderr, proc.stdout, "missing.pt", "does not exist")


def test_help_lists_the_subcommands_and_official_flags(capsys):
    code, _, out = _main(["--help"], capsys)
    assert code == 0 and all(c in out for c in ("train", "evaluate", "sample", "info"))
    code, _, out = _main(["train", "--help"], capsys)
    assert code == 0
    for flag in ("--preset", "--num_latent_scales", "--weight_decay_norm_anneal", "--kl_anneal_portion", "--amp",
                 "--cont_training", "--num_x_bits", "--ema_decay", "--max_bad_steps"):
        assert flag in out, flag
