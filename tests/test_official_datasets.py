"""The official code's other datasets, read from small files the tests write: stacked MNIST,
OMNIGLOT's chardata.mat, LSUN's LMDB folders; their presets."""

import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nvae_fast.config import NVAEConfig
from nvae_fast.train.datasets import build_datasets, detect_format
from nvae_fast.train.errors import InputError, MissingPathError
from nvae_fast.train.loaders import make_loader
from nvae_fast.train.official_data import stacked_mnist_index
from nvae_fast.train.recipe import train_preset
from train_fixtures import write_mnist


# ----------------------------------------------------------------------------- stacked MNIST

def test_stacked_mnist_stacks_three_permuted_digits(tmp_path):
    digits = write_mnist(tmp_path, n_train=6, n_test=3)
    assert detect_format("stacked_mnist", tmp_path) == "stacked_mnist"
    train, test = build_datasets("stacked_mnist", tmp_path, image_size=32, channels=3, seed=0)
    assert (len(train), len(test)) == (12, 6)  # two passes over the digits, as the official StackedMNIST
    for dataset, split, seed in ((train, "train", 0), (test, "t10k", 1)):
        index = stacked_mnist_index(len(digits[split]), seed)
        for channel in range(3):  # each channel runs through every digit twice
            assert sorted(index[:, channel].tolist()) == sorted(2 * list(range(len(digits[split]))))
        for i in range(len(dataset)):
            x = dataset[(3, i)]
            assert x.shape == (3, 32, 32) and torch.equal(x, dataset[(0, i)])  # no flips, no binarisation
            expected = torch.from_numpy(digits[split][index[i]]).float() / 255
            assert torch.equal(x, F.pad(expected, (2, 2, 2, 2)))
    again, _ = build_datasets("stacked_mnist", tmp_path, image_size=32, channels=3, seed=5)
    assert all(torch.equal(again[i], train[i]) for i in range(len(train)))  # a fixed stacking
    assert NVAEConfig(dataset="stacked_mnist").crop_output  # the loss counts the central 28x28


# ----------------------------------------------------------------------------- OMNIGLOT

def _write_chardata(path, n_train=5, n_test=2, **override):
    from scipy.io import savemat

    rng = np.random.default_rng(0)
    arrays = {"data": rng.random((784, n_train)), "testdata": rng.random((784, n_test)),
              "target": np.zeros((50, n_train)), **override}
    savemat(str(path), arrays)
    return arrays


def test_omniglot_chardata_layout(tmp_path):
    arrays = _write_chardata(tmp_path / "chardata.mat")
    assert detect_format("omniglot", tmp_path) == "omniglot"
    cfg = NVAEConfig(dataset="omniglot")
    assert cfg.output_distribution == "bernoulli" and cfg.crop_output
    train, test = build_datasets("omniglot", tmp_path, image_size=32, channels=1, seed=0)
    assert (len(train), len(test)) == (5, 2)
    # The images are stored column by column; intensities scale to 0..255 by truncation.
    for n in range(5):
        expected = np.floor(255 * arrays["data"][:, n].astype(np.float32)).reshape(28, 28).T
        assert torch.equal(train.read(n)[0], torch.from_numpy(expected.astype(np.uint8)))
    x = train[(0, 0)]
    assert x.shape == (1, 32, 32) and x[:, :2].abs().sum() == 0
    binary, _ = build_datasets("omniglot", tmp_path / "chardata.mat", image_size=32, channels=1, seed=0,
                               binarize=True)
    first, second = binary[(0, 1)], binary[(1, 1)]
    assert set(first.unique().tolist()) <= {0.0, 1.0} and not torch.equal(first, second)  # drawn every epoch


def test_omniglot_errors(tmp_path):
    with pytest.raises(MissingPathError, match="no chardata.mat"):
        build_datasets("omniglot", tmp_path, image_size=32, channels=1, seed=0)
    (tmp_path / "chardata.mat").write_bytes(b"not a MATLAB file")
    with pytest.raises(InputError, match="not a readable MATLAB file"):
        build_datasets("omniglot", tmp_path, image_size=32, channels=1, seed=0)
    from scipy.io import savemat

    savemat(str(tmp_path / "chardata.mat"), {"data": np.zeros((784, 2))})
    with pytest.raises(InputError, match="no 'testdata' array"):
        build_datasets("omniglot", tmp_path, image_size=32, channels=1, seed=0)
    _write_chardata(tmp_path / "chardata.mat", data=np.full((784, 2), 3.0))
    with pytest.raises(InputError, match=r"values in \[0, 1\]"):
        build_datasets("omniglot", tmp_path, image_size=32, channels=1, seed=0)
    _write_chardata(tmp_path / "chardata.mat", data=np.zeros((28, 2)))
    with pytest.raises(InputError, match=r"\(784, N\)"):
        build_datasets("omniglot", tmp_path, image_size=32, channels=1, seed=0)


# ----------------------------------------------------------------------------- LSUN

def _encode(image: np.ndarray, fmt: str) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format=fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    return buf.getvalue()


def _write_lsun(root, category="church_outdoor"):
    lmdb = pytest.importorskip("lmdb")
    rng = np.random.default_rng(0)
    images = {"train": [rng.integers(0, 256, (12, 16, 3), dtype=np.uint8),   # landscape
                        rng.integers(0, 256, (20, 8, 3), dtype=np.uint8)],   # portrait
              "val": [rng.integers(0, 256, (8, 11, 3), dtype=np.uint8)]}
    for split, arrays in images.items():
        env = lmdb.open(str(root / f"{category}_{split}_lmdb"), map_size=1 << 20)
        with env.begin(write=True) as txn:  # LSUN's keys are hashes; the order is the keys' order
            for key, (arr, fmt) in zip((b"f00d", b"0bad"), zip(arrays, ("WEBP", "JPEG"))):
                txn.put(key, _encode(arr, fmt))
        env.close()
    return images


def _reference(image: np.ndarray, size: int) -> torch.Tensor:
    """Resize to shorter side ``size`` (bilinear), as uint8 (C, H, W)."""
    from PIL import Image

    pil = Image.fromarray(image)
    w, h = pil.size
    scale = size / min(w, h)
    pil = pil.resize((size if w <= h else int(w * scale), size if h <= w else int(h * scale)),
                     Image.Resampling.BILINEAR)
    return torch.from_numpy(np.asarray(pil).copy()).permute(2, 0, 1)


def test_lsun_folders_resize_and_crop_like_the_official_transforms(tmp_path):
    from PIL import Image

    images = _write_lsun(tmp_path)
    assert detect_format("lsun_church_64", tmp_path) == "lsun"
    train, test = build_datasets("lsun", tmp_path, image_size=8, channels=3, seed=0, dataset="lsun_church_64")
    assert (len(train), len(test)) == (2, 1)
    # Key order: b"0bad" (the JPEG, portrait) before b"f00d" (the lossless WebP, landscape).
    webp = _reference(images["train"][0], 8)
    assert webp.shape == (3, 8, 10) and torch.equal(train.read(1), webp)
    jpeg = Image.open(io.BytesIO(_encode(images["train"][1], "JPEG")))
    assert train.read(0).shape == (3, 20, 8) and torch.equal(train.read(0), _reference(np.asarray(jpeg), 8))

    # Training: random crops of the resized image (and random flips); testing: the centre crop.
    crops = {tuple(train[(epoch, 1)].flatten().tolist()) for epoch in range(12)}
    windows = [webp[:, :, left:left + 8].float() / 255 for left in range(3)]
    candidates = {tuple(v.flatten().tolist()) for w in windows for v in (w, w.flip(-1))}
    assert crops <= candidates and len(crops) > 2
    val = Image.open(io.BytesIO(_encode(images["val"][0], "WEBP")))
    resized = _reference(np.asarray(val), 8)
    assert torch.equal(test[0], resized[:, :, 2:10].float() / 255)  # (11 * 8 / 8 = 11) - 8 = 3 -> offset round(1.5) = 2
    loader = make_loader(train, 2, train=True, seed=0, num_workers=1)  # workers open their own handle
    assert next(iter(loader)).shape == (2, 3, 8, 8)


def test_lsun_errors(tmp_path):
    pytest.importorskip("lmdb")
    with pytest.raises(MissingPathError, match="church_outdoor_train_lmdb"):
        build_datasets("lsun", tmp_path, image_size=8, channels=3, seed=0, dataset="lsun_church_64")
    _write_lsun(tmp_path, category="tower")
    with pytest.raises(MissingPathError, match="no church_outdoor_train_lmdb folder"):
        build_datasets("lsun", tmp_path, image_size=8, channels=3, seed=0, dataset="lsun_church_64")
    with pytest.raises(InputError, match="unknown LSUN category 'kitchen'"):
        build_datasets("lsun", tmp_path, image_size=8, channels=3, seed=0, dataset="lsun_kitchen_64")
    train, _ = build_datasets("lsun", tmp_path, image_size=8, channels=3, seed=0)  # the one category there
    assert len(train) == 2


def test_presets_of_the_published_commands():
    church, omniglot = NVAEConfig.preset("lsun_church_64"), NVAEConfig.preset("omniglot")
    assert (church.image_size, church.output_distribution, church.num_groups_per_scale) == (64, "normal", 5)
    assert (omniglot.image_size, omniglot.output_distribution, omniglot.num_cell_per_cond_dec) == (32, "bernoulli", 3)
    assert train_preset("lsun_church_64")["epochs"] == 60 and train_preset("omniglot")["batch_size"] == 64
    assert NVAEConfig(dataset="lsun_church_256").image_size == 256
