"""Readers of the datasets the official NVAE code trains on in their own file layouts: stacked
MNIST (made from MNIST), OMNIGLOT (``chardata.mat``) and LSUN scenes (their LMDB folders).

Each gives raw uint8 images; ``nvae_fast.train.datasets`` turns them into datasets with the
official pre-processing:

* stacked MNIST: 2 x N RGB images per split whose channels are three MNIST digits, each channel
  running through two random permutations of the split (the official ``StackedMNIST``); padded
  to 32x32, not binarised. The permutations come from a fixed seed (the official code draws
  them afresh in every run), so every run and every loader worker sees the same images.
* OMNIGLOT: ``chardata.mat`` (the file of the IWAE code the official code downloads) holds
  ``data`` and ``testdata``, (784, N) arrays in [0, 1] with each 28x28 image stored column by
  column (MATLAB order); scaled to 0..255 by truncation, padded to 32x32 and dynamically
  binarised, as the official code does.
* LSUN: ``<category>_train_lmdb`` and ``<category>_val_lmdb`` folders (as LSUN distributes them and
  torchvision reads them) whose values are encoded images (WebP, JPEG or PNG) under arbitrary
  keys, taken in key order. Each image is resized so that its shorter side is the model's size
  (bilinear); ``datasets`` then crops it square, at random in training and at the centre for
  testing, and flips it at random in training, as the official LSUN transforms do.
"""

from __future__ import annotations

import importlib.util
import io
import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from nvae_fast.train.errors import InputError, MissingPathError

STACKED_MNIST_SEEDS = {"train": 0, "test": 1}
OMNIGLOT_FILE = "chardata.mat"
# lsun_<name>_<size> dataset names of the official code -> LSUN category.
LSUN_CATEGORIES = {"bedroom": "bedroom", "church": "church_outdoor", "tower": "tower"}


# ----------------------------------------------------------------------------- stacked MNIST

class StackedMNISTReader:
    """Image i (3, 28, 28) of a stacked-MNIST split: channel c is MNIST digit ``index[i, c]``."""

    def __init__(self, digits: Tensor, seed: int) -> None:
        if digits.dim() != 4 or digits.shape[1] != 1:
            raise ValueError(f"digits must be (N, 1, H, W) uint8, got shape {tuple(digits.shape)}")
        self.digits = digits[:, 0]
        self.index = torch.from_numpy(stacked_mnist_index(len(digits), seed))

    def __len__(self) -> int:
        return len(self.index)

    def __call__(self, i: int) -> Tensor:
        return self.digits[self.index[i]]


def stacked_mnist_index(num_digits: int, seed: int) -> np.ndarray:
    """(2 num_digits, 3) int64: for each channel, two random permutations of the digits joined."""
    rng = np.random.default_rng(seed)
    return np.stack([np.concatenate([rng.permutation(num_digits), rng.permutation(num_digits)])
                     for _ in range(3)], axis=1)


# ----------------------------------------------------------------------------- OMNIGLOT

def find_omniglot(root: str | os.PathLike) -> Path:
    """``root`` itself if it is a file, else ``root/chardata.mat``."""
    root = Path(root)
    path = root if root.is_file() else root / OMNIGLOT_FILE
    if not path.is_file():
        raise MissingPathError(f"{root}: no {OMNIGLOT_FILE} (the OMNIGLOT file the official code reads, from the IWAE "
                               "code's datasets/OMNIGLOT)")
    return path


def load_omniglot_images(root: str | os.PathLike) -> tuple[Tensor, Tensor]:
    """OMNIGLOT from ``chardata.mat`` as uint8 (N, 1, 28, 28) in 0..255: (train, test)."""
    path = find_omniglot(root)
    try:
        from scipy.io import loadmat
        from scipy.io.matlab import MatReadError
    except ImportError as e:  # scikit-learn depends on scipy; only a broken install gets here
        raise InputError("reading OMNIGLOT needs scipy (pip install scipy)") from e
    try:
        mat = loadmat(str(path), variable_names=["data", "testdata"])
    except (MatReadError, ValueError, TypeError, OSError, NotImplementedError) as e:  # corrupt, or MATLAB v7.3
        raise InputError(f"{path}: not a readable MATLAB file ({e})") from e
    out = []
    for key in ("data", "testdata"):
        if key not in mat:
            raise InputError(f"{path}: has no '{key}' array (expected the IWAE chardata.mat layout: data, testdata)")
        values = np.asarray(mat[key])
        if values.ndim != 2 or values.shape[0] != 28 * 28 or not np.issubdtype(values.dtype, np.number):
            raise InputError(f"{path}: '{key}' must be a numeric (784, N) array of 28x28 images, got {values.dtype} "
                             f"{values.shape}")
        values = values.astype(np.float32)
        if values.size and (values.min() < 0 or values.max() > 1):
            raise InputError(f"{path}: '{key}' must hold values in [0, 1], got [{values.min():g}, {values.max():g}]")
        images = (255 * values).astype(np.uint8).reshape(28, 28, -1).transpose(2, 1, 0)
        out.append(torch.from_numpy(np.ascontiguousarray(images)).unsqueeze(1))
    return out[0], out[1]


# ----------------------------------------------------------------------------- LSUN

def lsun_category(root: Path, dataset: str) -> str:
    """The LSUN category of dataset ``lsun_<name>_<size>``; for another dataset name, the one
    category whose training folder ``root`` holds."""
    parts = dataset.split("_")
    if len(parts) == 3 and parts[0] == "lsun":
        if parts[1] not in LSUN_CATEGORIES:
            raise InputError(f"dataset {dataset!r}: unknown LSUN category {parts[1]!r} (the official code reads "
                             f"{', '.join(LSUN_CATEGORIES)})")
        return LSUN_CATEGORIES[parts[1]]
    found = sorted(p.name[:-len("_train_lmdb")] for p in root.glob("*_train_lmdb") if p.is_dir())
    if len(found) != 1:
        raise InputError(f"{root}: name the LSUN category with --dataset lsun_<category>_<size> (found "
                         f"{len(found)} *_train_lmdb folders)")
    return found[0]


def lsun_split_paths(root: str | os.PathLike, dataset: str) -> tuple[Path, Path]:
    """(train, validation) LMDB folders of the LSUN category of ``dataset`` under ``root``."""
    root = Path(root)
    if not root.is_dir():
        raise MissingPathError(f"{root}: LSUN data directory does not exist")
    category = lsun_category(root, dataset)
    paths = (root / f"{category}_train_lmdb", root / f"{category}_val_lmdb")
    for path in paths:
        if not path.is_dir():
            raise MissingPathError(f"{root}: no {path.name} folder (LSUN's layout: {category}_train_lmdb and "
                                   f"{category}_val_lmdb)")
    if importlib.util.find_spec("lmdb") is None:
        raise InputError("reading LSUN needs the lmdb package (pip install lmdb)")
    return paths


class LMDBRecords:
    """Read-only access to one LMDB database that opens it lazily in each process: an LMDB
    handle must not cross a fork into loader workers, so pickling drops it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._env = None

    def _open(self):
        import lmdb

        try:
            return lmdb.open(str(self.path), readonly=True, lock=False, readahead=False, meminit=False,
                             max_readers=1)
        except lmdb.Error as e:
            raise InputError(f"{self.path}: not a readable LMDB database ({e})") from e

    def entries(self) -> int:
        """The number of records (read with a handle closed at once)."""
        env = self._open()
        try:
            return env.stat()["entries"]
        finally:
            env.close()

    def keys(self) -> list[bytes]:
        """Every key, in the database's order (read with a handle closed at once)."""
        env = self._open()
        try:
            with env.begin(write=False) as txn:
                return list(txn.cursor().iternext(keys=True, values=False))
        finally:
            env.close()

    def get(self, key: bytes) -> bytes | None:
        if self._env is None:
            self._env = self._open()
        with self._env.begin(write=False) as txn:
            return txn.get(key)

    def __getstate__(self):
        return {**self.__dict__, "_env": None}


class LSUNReader(LMDBRecords):
    """Images of one LSUN LMDB folder, in key order, resized to shorter side ``size``: uint8
    (channels, H, W) with min(H, W) = size."""

    def __init__(self, path: Path, size: int, channels: int) -> None:
        super().__init__(path)
        self.size, self.channels = size, channels
        self.record_keys = self.keys()
        if not self.record_keys:
            raise InputError(f"{path}: the database is empty")

    def __len__(self) -> int:
        return len(self.record_keys)

    def __call__(self, i: int) -> Tensor:
        from PIL import Image, UnidentifiedImageError

        key = self.record_keys[i]
        data = self.get(key)
        name = f"{self.path}[{key.decode(errors='replace')}]"
        try:
            img = Image.open(io.BytesIO(data))
            img = img.convert("RGB" if self.channels == 3 else "L")
        except (UnidentifiedImageError, OSError) as e:
            raise InputError(f"{name}: not a readable image ({e})") from e
        return resize_shorter_side(img, self.size)


def resize_shorter_side(img, size: int) -> Tensor:
    """A PIL image resized (bilinear) so that its shorter side is ``size``, the longer one in
    proportion (rounded down), as uint8 (C, H, W)."""
    from PIL import Image

    w, h = img.size
    if min(w, h) != size:
        scale = size / min(w, h)
        img = img.resize((size if w <= h else int(w * scale), size if h <= w else int(h * scale)),
                         Image.Resampling.BILINEAR)
    arr = np.asarray(img, dtype=np.uint8)
    arr = arr[:, :, None] if arr.ndim == 2 else arr
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()
