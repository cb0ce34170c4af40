"""Data formats read from small files the tests write, the epoch-keyed sampler, num_x_bits."""

import io
import os
import pickle
import struct
import subprocess
import tarfile

import numpy as np
import pytest
import torch

from nvae_fast.train.datasets import build_datasets, detect_format, read_idx
from nvae_fast.train.errors import InputError, MissingPathError
from nvae_fast.train.loaders import EpochSampler, make_loader, quantize
from train_fixtures import idx_bytes, write_mnist


def _rng():
    return np.random.default_rng(0)


# ----------------------------------------------------------------------------- MNIST IDX

@pytest.mark.parametrize("gz", [True, False])
def test_mnist_idx_is_padded_and_binarised(tmp_path, gz):
    imgs = write_mnist(tmp_path, gz=gz)
    train, test = build_datasets("idx", tmp_path, image_size=32, channels=1, seed=3, binarize=True)
    assert (len(train), len(test)) == (6, 3)
    x = train[(0, 2)]
    assert x.shape == (1, 32, 32) and x.dtype == torch.float32
    assert set(x.unique().tolist()) <= {0.0, 1.0}
    assert x[:, :2].abs().sum() == 0 and x[:, :, -2:].abs().sum() == 0  # padding
    # Same (epoch, index): same draw; another epoch: a fresh one.
    assert torch.equal(x, train[(0, 2)])
    assert not torch.equal(x, train[(1, 2)])
    # The draws follow the pixel intensities: average many epochs.
    mean = torch.stack([train[(e, 2)] for e in range(400)]).mean(0)[0, 2:30, 2:30]
    expected = torch.from_numpy(imgs["train"][2] / 255).float()
    assert (mean - expected).abs().max() < 0.1 and (mean - expected).abs().mean() < 0.02


def test_read_idx_rejects_bad_files(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x00\x00\x09\x03" + b"\x00" * 12)
    with pytest.raises(InputError, match="magic"):
        read_idx(tmp_path / "bad")
    good = idx_bytes(np.zeros((2, 28, 28)))
    (tmp_path / "short").write_bytes(good[:-5])
    with pytest.raises(InputError, match="promises"):
        read_idx(tmp_path / "short")
    (tmp_path / "bad.gz").write_bytes(b"not gzip")
    with pytest.raises(InputError, match="cannot read"):
        read_idx(tmp_path / "bad.gz")


def test_mnist_missing_file(tmp_path):
    with pytest.raises(MissingPathError, match="train-images-idx3-ubyte"):
        build_datasets("idx", tmp_path, image_size=32, channels=1, seed=0)


# ----------------------------------------------------------------------------- CIFAR-10

def _cifar_batches(n=4):
    rng = _rng()
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    return {name: rng.integers(0, 256, (n, 3072), dtype=np.uint8) for name in names}


def _pickled(data):
    return pickle.dumps({b"data": data, b"labels": [0] * len(data)})


@pytest.mark.parametrize("layout", ["dir", "parent", "tar"])
def test_cifar10_pickle_batches(tmp_path, layout):
    batches = _cifar_batches()
    if layout == "tar":
        root = tmp_path / "cifar-10-python.tar.gz"
        with tarfile.open(root, "w:gz") as tar:
            for name, data in batches.items():
                raw = _pickled(data)
                info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
                info.size = len(raw)
                tar.addfile(info, io.BytesIO(raw))
    else:
        folder = tmp_path / "cifar-10-batches-py" if layout == "parent" else tmp_path
        folder.mkdir(exist_ok=True)
        for name, data in batches.items():
            (folder / name).write_bytes(_pickled(data))
        root = tmp_path
    train, test = build_datasets("cifar", root, image_size=32, channels=3, seed=0)
    assert (len(train), len(test)) == (20, 4)
    expected = torch.from_numpy(batches["test_batch"][1].reshape(3, 32, 32) / 255).float()
    torch.testing.assert_close(test[1], expected)
    # Training images are flipped horizontally at random, per epoch.
    original = torch.from_numpy(batches["data_batch_2"][0].reshape(3, 32, 32) / 255).float()
    seen = {torch.equal(train[(e, 4)], original.flip(-1)) for e in range(20)}
    assert all(torch.equal(train[(e, 4)], original) or torch.equal(train[(e, 4)], original.flip(-1))
               for e in range(20))
    assert seen == {True, False}


def test_cifar10_corrupt_batch(tmp_path):
    for name in _cifar_batches():
        (tmp_path / name).write_bytes(b"garbage")
    with pytest.raises(InputError, match="not a CIFAR-10 python batch"):
        build_datasets("cifar", tmp_path, image_size=32, channels=3, seed=0)


class _Python2Pickler(pickle._Pickler):
    """Writes bytes as Python 2 str opcodes, as the official CIFAR-10 batches (made with Python 2's
    cPickle) hold them, instead of Python 3's _codecs.encode calls at protocol 2."""

    def save_bytes(self, obj):
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch = {**pickle._Pickler.dispatch, bytes: save_bytes}


def _official_style(obj) -> bytes:
    out = io.BytesIO()
    _Python2Pickler(out, protocol=2).dump(obj)
    # numpy 1 (what the official files name) spells the module numpy.core.
    return out.getvalue().replace(b"numpy._core.multiarray", b"numpy.core.multiarray")


@pytest.mark.parametrize("style", ["python2", "protocol2", "protocol4", "protocol5"])
def test_cifar10_batches_of_every_pickle_protocol_load(tmp_path, style):
    batches = _cifar_batches(n=3)
    for name, data in batches.items():
        batch = {b"batch_label": b"training batch 1 of 5", b"labels": [3, 1, 4], b"data": data,
                 b"filenames": [b"a.png", b"b.png", b"c.png"]}
        raw = _official_style(batch) if style == "python2" else pickle.dumps(batch, protocol=int(style[-1]))
        (tmp_path / name).write_bytes(raw)
    if style == "python2":
        assert b"cnumpy.core.multiarray\n_reconstruct" in raw and b"_codecs" not in raw
    train, test = build_datasets("cifar", tmp_path, image_size=32, channels=3, seed=0)
    expected = torch.from_numpy(batches["test_batch"][2].reshape(3, 32, 32) / 255).float()
    torch.testing.assert_close(test[2], expected)
    assert len(train) == 15


class _Payload:
    """Pickles as a call of ``func(*args)``: what a malicious pickle does when it is loaded."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _payloads(marker):
    return {
        "os.system": _Payload(os.system, f"touch {marker}"),
        "subprocess": _Payload(subprocess.Popen, ["touch", str(marker)]),
        "open": _Payload(open, str(marker), "w"),
        "exec": _Payload(exec, f"open({str(marker)!r}, 'w').close()"),
        "numpy.load": _Payload(np.load, str(marker) + ".npy", None, True),
    }


@pytest.mark.parametrize("payload", ["os.system", "subprocess", "open", "exec", "numpy.load"])
@pytest.mark.parametrize("layout", ["dir", "tar"])
def test_cifar10_batch_that_would_run_code_is_refused_without_running_it(tmp_path, payload, layout):
    marker = tmp_path / "pwned"
    batches = {name: _pickled(data) for name, data in _cifar_batches().items()}
    evil = {b"data": _cifar_batches()["data_batch_1"], b"labels": _payloads(marker)[payload]}
    batches["data_batch_3"] = pickle.dumps(evil, protocol=2)
    root = tmp_path / "c"
    root.mkdir()
    if layout == "tar":
        root = root / "cifar-10-python.tar.gz"
        with tarfile.open(root, "w:gz") as tar:
            for name, raw in batches.items():
                info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
                info.size = len(raw)
                tar.addfile(info, io.BytesIO(raw))
    else:
        for name, raw in batches.items():
            (root / name).write_bytes(raw)
    with pytest.raises(InputError, match=r"data_batch_3: not a CIFAR-10 python batch \(it names .*refused without "
                                         r"running it\)") as err:
        build_datasets("cifar", root, image_size=32, channels=3, seed=0)
    assert not marker.exists() and not list(tmp_path.glob("pwned*"))
    assert "\n" not in str(err.value)


def test_cifar10_batch_with_other_contents(tmp_path):
    for name, data in _cifar_batches().items():
        (tmp_path / name).write_bytes(pickle.dumps({b"data": data.astype(np.float32)}))
    with pytest.raises(InputError, match="its 'data' is a float32 array, expected a uint8 array"):
        build_datasets("cifar", tmp_path, image_size=32, channels=3, seed=0)
    for name, data in _cifar_batches().items():
        (tmp_path / name).write_bytes(pickle.dumps([data]))
    with pytest.raises(InputError, match="a list, not a dict"):
        build_datasets("cifar", tmp_path, image_size=32, channels=3, seed=0)


# ----------------------------------------------------------------------------- image folder

def _save(path, arr, fmt):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, format=fmt)


def test_image_folder_with_splits_crops_and_resizes(tmp_path):
    rng = _rng()
    # A 24x16 (w x h) image whose centre 16x16 square is known exactly: no resize needed.
    wide = rng.integers(0, 256, (16, 24, 3), dtype=np.uint8)
    _save(tmp_path / "train" / "a.png", wide, "PNG")
    _save(tmp_path / "train" / "sub" / "b.jpg", rng.integers(0, 256, (40, 30, 3), dtype=np.uint8), "JPEG")
    _save(tmp_path / "test" / "c.png", rng.integers(0, 256, (16, 16, 3), dtype=np.uint8), "PNG")
    (tmp_path / "train" / "notes.txt").write_text("ignored")
    train, test = build_datasets("folder", tmp_path, image_size=16, channels=3, seed=0)
    assert (len(train), len(test)) == (2, 1)
    a = train.read(0)
    assert a.shape == (3, 16, 16) and a.dtype == torch.uint8
    assert torch.equal(a, torch.from_numpy(wide[:, 4:20].copy()).permute(2, 0, 1))
    assert train[(0, 1)].shape == (3, 16, 16)


def test_image_folder_without_splits(tmp_path):
    rng = _rng()
    for i in range(12):
        _save(tmp_path / f"{i:02d}.png", rng.integers(0, 256, (8, 8), dtype=np.uint8), "PNG")
    train, test = build_datasets("folder", tmp_path, image_size=4, channels=1, seed=0)
    assert (len(train), len(test)) == (11, 1)
    assert train[0].shape == (1, 4, 4)
    assert set(train.read.paths).isdisjoint(test.read.paths)


def test_image_folder_errors(tmp_path):
    with pytest.raises(MissingPathError):
        build_datasets("folder", tmp_path / "nope", image_size=8, channels=3, seed=0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="need at least one"):
        build_datasets("folder", tmp_path / "empty", image_size=8, channels=3, seed=0)
    (tmp_path / "bad" / "train").mkdir(parents=True)
    (tmp_path / "bad" / "test").mkdir()
    (tmp_path / "bad" / "train" / "x.png").write_bytes(b"not a png")
    (tmp_path / "bad" / "test" / "y.png").write_bytes(b"not a png")
    with pytest.raises(InputError, match="not a readable image"):
        build_datasets("folder", tmp_path / "bad", image_size=8, channels=3, seed=0)


@pytest.mark.parametrize("fmt, suffix", [("PNG", "png"), ("TIFF", "tif")])
@pytest.mark.parametrize("channels", [1, 3])
def test_16_bit_images_are_scaled_not_clipped(tmp_path, fmt, suffix, channels):
    from PIL import Image

    levels = _rng().integers(0, 256, (2, 8, 8), dtype=np.uint16)
    for split, img in zip(("train", "test"), levels):
        (tmp_path / split).mkdir()
        Image.fromarray(img * 257).save(tmp_path / split / f"a.{suffix}", format=fmt)  # 255 -> 65535
    assert Image.open(tmp_path / "train" / f"a.{suffix}").mode.startswith("I;16")
    _, test = build_datasets("folder", tmp_path, image_size=8, channels=channels, seed=0)
    expected = torch.from_numpy(levels[1] / 255).float().expand(channels, 8, 8)
    torch.testing.assert_close(test[0], expected, rtol=0, atol=0)


@pytest.mark.parametrize("array, kind", [(np.full((8, 8), 0.5, np.float32), "32-bit float"),
                                         (np.full((8, 8), 70000, np.int32), "32-bit integer")])
def test_images_without_a_stated_range_are_refused(tmp_path, array, kind):
    from PIL import Image

    for split in ("train", "test"):
        (tmp_path / split).mkdir()
        Image.fromarray(array).save(tmp_path / split / "a.tif", format="TIFF")
    with pytest.raises(InputError, match=f"a.tif: a {kind} image .*8- or 16-bit PNG"):
        build_datasets("folder", tmp_path, image_size=8, channels=1, seed=0)


def test_image_folder_that_is_a_file(tmp_path):
    (tmp_path / "x.png").write_bytes(b"")
    with pytest.raises(InputError, match="x.png is a file; the folder format reads a directory"):
        build_datasets("folder", tmp_path / "x.png", image_size=8, channels=3, seed=0)


# ----------------------------------------------------------------------------- LMDB

def test_official_lmdb_layout(tmp_path):
    lmdb = pytest.importorskip("lmdb")
    from PIL import Image

    rng = _rng()
    raw = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    encoded = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    png = io.BytesIO()
    Image.fromarray(encoded).save(png, format="PNG")
    for name, values in (("train.lmdb", [raw.tobytes(), png.getvalue()]), ("validation.lmdb", [raw.tobytes()])):
        env = lmdb.open(str(tmp_path / name), map_size=1 << 20)
        with env.begin(write=True) as txn:
            for i, v in enumerate(values):
                txn.put(str(i).encode(), v)
        env.close()
    assert detect_format("celeba_256", tmp_path) == "lmdb"
    train, test = build_datasets("lmdb", tmp_path, image_size=8, channels=3, seed=0)
    assert (len(train), len(test)) == (2, 1)
    assert torch.equal(train.read(0), torch.from_numpy(raw).permute(2, 0, 1))
    assert torch.equal(train.read(1), torch.from_numpy(encoded).permute(2, 0, 1))
    # Loader workers open their own LMDB handle.
    loader = make_loader(train, 2, train=True, seed=0, num_workers=1)
    (batch,) = list(loader)
    assert batch.shape == (2, 3, 8, 8)


def test_lmdb_missing_split(tmp_path):
    pytest.importorskip("lmdb")
    with pytest.raises(MissingPathError, match="train.lmdb"):
        build_datasets("lmdb", tmp_path, image_size=8, channels=3, seed=0)


# ----------------------------------------------------------------------------- digits, formats, sizes

def test_digits_embedded_dataset():
    train, test = build_datasets("digits", None, image_size=8, channels=1, seed=0)
    assert (len(train), len(test)) == (1497, 300)
    x = train[(0, 5)]
    assert x.shape == (1, 8, 8) and torch.equal(x, train[(1, 5)])  # no random transform
    assert set((x * 16).unique().tolist()) <= set(range(17)) and x.max() > 0.5
    binary, _ = build_datasets("digits", None, image_size=8, channels=1, seed=0, binarize=True)
    assert set(binary[(0, 5)].unique().tolist()) <= {0.0, 1.0}


def test_unknown_format_and_wrong_size(tmp_path):
    with pytest.raises(InputError, match="unknown data format"):
        build_datasets("tfrecord", tmp_path, image_size=8, channels=1, seed=0)
    write_mnist(tmp_path)
    with pytest.raises(InputError, match=r"\(1, 32, 32\).*\(1, 16, 16\)"):
        build_datasets("idx", tmp_path, image_size=16, channels=1, seed=0)
    with pytest.raises(MissingPathError):
        detect_format("celeba_64", tmp_path / "missing")


# ----------------------------------------------------------------------------- sampler, loader, bits

def test_sampler_ranks_partition_the_joined_batches():
    data = list(range(23))
    world, batch = 2, 3
    single = EpochSampler(data, shuffle=True, seed=5, drop_last=True)
    ranks = [EpochSampler(data, shuffle=True, seed=5, rank=r, world_size=world, drop_last=True) for r in range(world)]
    for s in [single, *ranks]:
        s.set_position(epoch=4)
    joined = [i for _, i in single]
    per_rank = [[i for _, i in s] for s in ranks]
    for k in range(len(per_rank[0]) // batch):
        union = sorted(sum((p[k * batch:(k + 1) * batch] for p in per_rank), []))
        assert union == sorted(joined[k * world * batch:(k + 1) * world * batch])
    # Epoch keys and resumption part-way into an epoch.
    ranks[1].set_position(epoch=4, start=3)
    assert [k for k in ranks[1]] == [(4, i) for i in per_rank[1][3:]]
    assert len(ranks[1]) == len(per_rank[1]) - 3


@pytest.mark.parametrize("size, world", [(10, 3), (23, 2), (2, 3), (12, 4)])
def test_evaluation_shards_hold_every_image_once(size, world):
    ranks = [EpochSampler(list(range(size)), shuffle=False, seed=0, rank=r, world_size=world) for r in range(world)]
    shards = [[i for _, i in s] for s in ranks]
    assert sorted(sum(shards, [])) == list(range(size))
    assert [len(s) for s in ranks] == [len(shard) for shard in shards]
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_loader_order_depends_only_on_seed_and_epoch():
    train, _ = build_datasets("digits", None, image_size=8, channels=1, seed=0)

    def first_batch(epoch, workers):
        loader = make_loader(train, 4, train=True, seed=1, num_workers=workers)
        loader.sampler.set_position(epoch)
        return next(iter(loader))

    assert torch.equal(first_batch(2, 0), first_batch(2, 2))
    assert not torch.equal(first_batch(2, 0), first_batch(3, 0))
    with pytest.raises(ValueError, match="fewer than one batch"):
        make_loader(train, 5000, train=True, seed=0)


def test_quantize_num_x_bits():
    x = torch.arange(256.0) / 255
    assert torch.equal(quantize(x, 8), x)
    q = quantize(x, 5)
    assert q.unique().numel() == 32 and q.min() == 0 and q.max() == 1
    torch.testing.assert_close(q[8:16], torch.full((8,), 1 / 31))
    with pytest.raises(ValueError, match="num_x_bits"):
        quantize(x, 9)
