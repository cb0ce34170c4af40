"""``nvae-fast reconstruct``, ``interpolate`` and ``fid`` end to end on a tiny digits checkpoint
(FID through the pytorch-fid stand-in of tests/fid_fixtures.py), and their bad input."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from nvae_fast.cli import main
from nvae_fast.train.datasets import build_datasets
from nvae_fast.train.loaders import quantize

import fid_fixtures
from sampling_fixtures import tiny_digits_model, write_checkpoint

pytestmark = pytest.mark.usefixtures("small_cpu_convs")


def _run(args, capsys):
    try:
        code = main([str(a) for a in args])
    except SystemExit as e:  # argparse
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def _one_line_error(code, err, *needles):
    lines = [line for line in err.splitlines() if "error" in line]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], lines[0]


def _tiles(png, size, rows, cols):
    """The (rows, cols) tiles of a grid written by images.tile (1-pixel gaps), at scale 1."""
    arr = np.asarray(Image.open(png))
    scale = arr.shape[1] // (cols * (size + 1) + 1)
    arr = arr[::scale, ::scale]
    return [[arr[1 + r * (size + 1):1 + r * (size + 1) + size, 1 + c * (size + 1):1 + c * (size + 1) + size]
             for c in range(cols)] for r in range(rows)]


def _to_uint8(x):
    return (x.clamp(0, 1) * 255).round().to(torch.uint8).numpy()


@pytest.fixture
def checkpoint(tmp_path):
    return write_checkpoint(tiny_digits_model(), tmp_path / "model.safetensors")


def test_reconstruct_writes_inputs_beside_reconstructions(checkpoint, tmp_path, capsys):
    out = tmp_path / "grid.png"
    code, stdout, _ = _run(["reconstruct", "--checkpoint", checkpoint, "--num_images", 8, "--output", out], capsys)
    assert code == 0 and "8 test images, each followed by its reconstruction" in stdout and out.is_file()
    tiles = _tiles(out, 8, rows=2, cols=8)  # 8 pairs: four per row
    _, test = build_datasets("digits", None, image_size=8, channels=1, seed=1)
    model = tiny_digits_model()
    x = quantize(torch.stack([test[i] for i in range(8)]), model.config.num_x_bits)
    with torch.no_grad():
        recon = model.reconstruct(x)
    for i in range(8):
        row, col = divmod(2 * i, 8)
        assert np.array_equal(tiles[row][col], _to_uint8(x[i, 0]))
        assert np.abs(tiles[row][col + 1].astype(int) - _to_uint8(recon[i, 0]).astype(int)).max() <= 1


def test_interpolate_writes_one_row_per_pair(checkpoint, tmp_path, capsys):
    out = tmp_path / "strip.png"
    code, stdout, _ = _run(["interpolate", "--checkpoint", checkpoint, "--indices", "3,9,4,2", "--steps", 4,
                            "--groups", 2, "--output", out], capsys)
    assert code == 0 and "2 interpolations of 4 steps through the first 2 of 4 latent groups" in stdout
    tiles = _tiles(out, 8, rows=2, cols=6)
    _, test = build_datasets("digits", None, image_size=8, channels=1, seed=1)
    model = tiny_digits_model()
    x = quantize(torch.stack([test[i] for i in (3, 9, 4, 2)]), model.config.num_x_bits)
    with torch.no_grad():
        strip = model.interpolate(x[0::2], x[1::2], steps=4, groups=2)
    for row, (start, end) in enumerate(((0, 1), (2, 3))):
        assert np.array_equal(tiles[row][0], _to_uint8(x[start, 0])) and np.array_equal(tiles[row][5],
                                                                                        _to_uint8(x[end, 0]))
        for step in range(4):
            assert np.abs(tiles[row][1 + step].astype(int) - _to_uint8(strip[row, step, 0]).astype(int)).max() <= 1


def test_latent_commands_reject_bad_input(checkpoint, tmp_path, capsys):
    base = ["--checkpoint", checkpoint]
    _one_line_error(*_run(["reconstruct", *base, "--output", tmp_path / "grid.jpg"], capsys)[::2], ".png")
    _one_line_error(*_run(["reconstruct", *base, "--indices", "1,400", "--output", tmp_path / "g.png"], capsys)[::2],
                    "--indices 400 is out of range", "300 images")
    _one_line_error(*_run(["interpolate", *base, "--indices", "1,2,3", "--output", tmp_path / "s.png"], capsys)[::2],
                    "even count")
    _one_line_error(*_run(["interpolate", *base, "--groups", 5, "--output", tmp_path / "s.png"], capsys)[::2],
                    "--groups must be between 1 and 4")
    _one_line_error(*_run(["interpolate", *base, "--steps", 1], capsys)[::2], "--steps")
    # A dataset folder without the files its format needs.
    (tmp_path / "empty").mkdir()
    _one_line_error(*_run(["reconstruct", *base, "--data", tmp_path / "empty", "--data_format", "omniglot",
                           "--output", tmp_path / "g.png"], capsys)[::2], "no chardata.mat")
    # Images of another size than the model's.
    other = write_checkpoint(tiny_digits_model(), tmp_path / "other.safetensors")
    (tmp_path / "mnist").mkdir()
    from train_fixtures import write_mnist

    write_mnist(tmp_path / "mnist")
    _one_line_error(*_run(["reconstruct", "--checkpoint", other, "--data", tmp_path / "mnist", "--data_format", "idx",
                           "--output", tmp_path / "g.png"], capsys)[::2], "(1, 32, 32)", "(1, 8, 8)")
    assert not list(tmp_path.glob("*.png"))


def test_fid_command_end_to_end_with_the_library_stand_in(checkpoint, tmp_path, capsys, monkeypatch):
    fid_fixtures.install(monkeypatch, tmp_path / "hub")
    args = ["fid", "--checkpoint", checkpoint, "--num_samples", 40, "--batch_size", 20, "--num_ref", 60,
            "--fid_dir", tmp_path / "stats", "--num_workers", 0]
    code, stdout, _ = _run([*args, "--output", tmp_path / "fid.json"], capsys)
    assert code == 0 and "computed FID reference statistics of 60 digits images" in stdout
    result = json.loads((tmp_path / "fid.json").read_text())
    assert result["fid"] > 0 and result["num_samples"] == 40 and result["temperature"] == 1.0
    assert f"FID {result['fid']:.4f} (40 samples at t=1 against" in stdout
    # Same seed, cached reference statistics: the same number, without reading the data.
    code, stdout, _ = _run(args, capsys)
    assert code == 0 and "cached FID reference statistics" in stdout and f"FID {result['fid']:.4f}" in stdout

    # BatchNorm statistics re-estimated at --bn_temp are saved and reused.
    code, stdout, _ = _run([*args, "--readjust_bn", "--bn_temp", 0.6, "--readjust_bn_iters", 2], capsys)
    assert code == 0 and "re-estimated at t=0.6 (2 passes of 16 samples)" in stdout
    code, stdout, _ = _run([*args, "--bn_temp", 0.6], capsys)
    assert code == 0 and "re-estimated at t=0.6 (2 passes of 16 samples), cached in" in stdout

    _one_line_error(*_run([*args[:3], "--num_samples", 1], capsys)[::2], "--num_samples", ">= 2")
    (tmp_path / "empty").mkdir()
    _one_line_error(*_run([*args, "--data", tmp_path / "empty", "--data_format", "omniglot"], capsys)[::2],
                    "no chardata.mat")
    _one_line_error(*_run([*args, "--ref_stats", tmp_path / "missing.npz"], capsys)[::2], "missing.npz",
                    "does not exist")
    monkeypatch.setitem(__import__("sys").modules, "pytorch_fid.inception", None)
    _one_line_error(*_run(args, capsys)[::2], "pip install 'nvae_fast[fid]'")
