"""Image datasets for NVAE, read without torchvision.

Formats (``--data_format``):

* ``digits``: scikit-learn's bundled 8x8 handwritten digits (17 grey levels, 1797 images; a fixed
  split of 1497 train / 300 test). Needs no download.
* ``idx``: MNIST's IDX files (``train-images-idx3-ubyte`` and ``t10k-images-idx3-ubyte``, ``.gz`` or
  not) in the data directory or its ``MNIST/raw``; padded to 32x32.
* ``cifar``: CIFAR-10's python batches (``cifar-10-batches-py/data_batch_{1..5}``, ``test_batch``),
  the directory or the ``cifar-10-python.tar.gz`` archive; random horizontal flips in training.
* ``folder``: PNG, JPEG, BMP, TIFF or WebP files under ``train/`` and ``test/`` (or ``val/``,
  ``validation/``) subdirectories, or, without them, all images with a fixed 90/10 split;
  centre-cropped to a square and resized to the model's input size; random horizontal flips in
  training. 16-bit images are scaled to 8 bits (65535 -> 255); float and 32-bit integer images,
  whose range no file states, are refused.
* ``lmdb``: the official layout, ``train.lmdb`` and ``validation.lmdb`` whose keys are
  ``b"0"``, ``b"1"``, ... and whose values are encoded images (PNG/JPEG) or raw RGB bytes of a
  square image; centre-cropped and resized like ``folder`` (CelebA 64 gets the official crop).
* ``stacked_mnist``, ``omniglot``, ``lsun``: the official stacked MNIST (made from MNIST's IDX
  files), OMNIGLOT (``chardata.mat``) and LSUN (``<category>_train_lmdb``/``_val_lmdb``)
  datasets with the official pre-processing; see ``nvae_fast.train.official_data``.

Models with a Bernoulli output (the official MNIST model) get every format dynamically binarised
(``binarize``). Every dataset yields float32 tensors (C, H, W) in [0, 1]. Random transforms draw from a
generator seeded by (seed, epoch, index), so a sample is the same whatever the number of
loader workers or ranks, and a resumed run sees exactly the data it would have seen.
"""

from __future__ import annotations

import gzip
import importlib.util
import io
import os
import pickle
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from nvae_fast.train import official_data
from nvae_fast.train.errors import InputError, MissingPathError

FORMATS = ("digits", "idx", "cifar", "folder", "lmdb", "stacked_mnist", "omniglot", "lsun")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
# CelebA 64: the official crop box (left, upper, right, lower) of the 178x218 aligned faces.
_CELEBA64_BOX = (15, 40, 178 - 15, 218 - 30)
_DIGITS_TEST = 300


@dataclass(frozen=True)
class Augment:
    """Per-sample pre-processing of a raw uint8 image.

    pad: zero padding on each side (MNIST: 28 -> 32). crop: cut a crop x crop square, at a random
    place if random_crop (training) else at the centre (LSUN). flip: random horizontal flip
    (training). binarize: replace each pixel p in [0, 1] by a Bernoulli(p) draw (dynamic
    binarisation).
    """

    pad: int = 0
    crop: int = 0
    random_crop: bool = False
    flip: bool = False
    binarize: bool = False


def sample_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """The generator of one sample's random transforms: a pure function of its arguments."""
    mixed = np.random.SeedSequence([seed & 0xFFFFFFFF, epoch & 0xFFFFFFFF, index]).generate_state(2, np.uint64)[0]
    return torch.Generator().manual_seed(int(mixed) & 0x7FFF_FFFF_FFFF_FFFF)


class ImageDataset(Dataset):
    """Images from ``read(i) -> uint8 (C, H, W)`` with values in [0, max_value], augmented.

    Indexing with an int gives the epoch-0 version of a sample; indexing with ``(epoch, i)``
    (what ``nvae_fast.train.loaders.EpochSampler`` yields) gives that epoch's version.
    """

    def __init__(self, read: Callable[[int], Tensor], length: int, max_value: int, augment: Augment,
                 seed: int = 0) -> None:
        self.read = read
        self.length = length
        self.max_value = max_value
        self.augment = augment
        self.seed = seed

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, key: int | tuple[int, int]) -> Tensor:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for a dataset of {self.length} images")
        x = self.read(index).float() / self.max_value
        aug = self.augment
        if aug.pad:
            x = F.pad(x, (aug.pad,) * 4)
        if aug.crop and not aug.random_crop:
            x = _crop(x, aug.crop, round((x.shape[-2] - aug.crop) / 2), round((x.shape[-1] - aug.crop) / 2))
        if aug.flip or aug.binarize or aug.random_crop:
            g = sample_generator(self.seed, epoch, index)
            if aug.random_crop:
                top, left = (int(torch.randint(n - aug.crop + 1, (), generator=g)) for n in x.shape[-2:])
                x = _crop(x, aug.crop, top, left)
            if aug.flip and torch.rand((), generator=g) < 0.5:
                x = x.flip(-1)
            if aug.binarize:
                x = torch.bernoulli(x, generator=g)
        return x

    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the samples this dataset yields."""
        return tuple(self[0].shape)


def _crop(x: Tensor, size: int, top: int, left: int) -> Tensor:
    if min(x.shape[-2:]) < size:
        raise InputError(f"cannot crop {size}x{size} from an image of {tuple(x.shape[-2:])} pixels")
    return x[..., top:top + size, left:left + size]


def _tensor_reader(images: Tensor) -> Callable[[int], Tensor]:
    return images.__getitem__


# ----------------------------------------------------------------------------- digits

def load_digits_images() -> tuple[Tensor, Tensor]:
    """scikit-learn's 8x8 digits as uint8 (N, 1, 8, 8) in [0, 16]: (train, test), fixed split."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # a dependency of the package; only a broken install gets here
        raise InputError("the 'digits' dataset needs scikit-learn (pip install scikit-learn)") from e
    images = torch.from_numpy(load_digits().images.astype(np.uint8)).unsqueeze(1)
    # A fixed permutation (not --seed): the test split is the same for every run.
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    return images[order[:-_DIGITS_TEST]].contiguous(), images[order[-_DIGITS_TEST:]].contiguous()


# ----------------------------------------------------------------------------- MNIST IDX

_IDX_DTYPES = {0x08: np.uint8}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """An IDX file (``.gz`` or not) as a numpy array; only unsigned-byte data (MNIST's)."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise InputError(f"{path}: cannot read IDX file ({e})") from e
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise InputError(f"{path}: not an unsigned-byte IDX file (bad magic number)")
    ndim = data[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(data) < header:
        raise InputError(f"{path}: truncated IDX header")
    shape = tuple(int(d) for d in np.frombuffer(data[4:header], dtype=">u4"))
    count = int(np.prod(shape))
    if len(data) - header != count:
        raise InputError(f"{path}: IDX header promises {count} bytes of data for shape {shape}, "
                         f"the file has {len(data) - header}")
    return np.frombuffer(data, dtype=_IDX_DTYPES[data[2]], offset=header).reshape(shape)


def _find_idx(root: Path, stem: str) -> Path:
    for folder in (root, root / "MNIST" / "raw", root / "raw"):
        for name in (stem, stem + ".gz"):
            if (folder / name).is_file():
                return folder / name
    raise MissingPathError(f"{root}: no MNIST file {stem}[.gz] (looked in it, MNIST/raw/ and raw/)")


def load_mnist_images(root: str | os.PathLike) -> tuple[Tensor, Tensor]:
    """MNIST from its IDX files as uint8 (N, 1, 28, 28): (train, test)."""
    root = Path(root)
    out = []
    for stem in ("train-images-idx3-ubyte", "t10k-images-idx3-ubyte"):
        path = _find_idx(root, stem)
        images = read_idx(path)
        if images.ndim != 3:
            raise InputError(f"{path}: expected a 3-D IDX array of images, got shape {images.shape}")
        out.append(torch.from_numpy(images.copy()).unsqueeze(1))
    return out[0], out[1]


# ----------------------------------------------------------------------------- CIFAR-10

_CIFAR_TRAIN = [f"data_batch_{i}" for i in range(1, 6)]
_CIFAR_TEST = ["test_batch"]


def _latin1_encode(text: str, encoding: str) -> bytes:
    # Python 3 pickles bytes at protocol 2 as _codecs.encode(text, "latin1"); admit only that codec.
    if encoding != "latin1" or not isinstance(text, str):
        raise pickle.UnpicklingError(f"refused _codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


# The only callables a CIFAR-10 batch needs: numpy's array reconstruction (the official files are
# Python 2 pickles naming numpy.core; numpy 2 names numpy._core) and, for batches re-pickled under
# Python 3, bytes. The functions are numpy's own pickling helpers, taken from an array's reduction.
_NP_RECONSTRUCT = np.zeros(1, np.uint8).__reduce__()[0]
_NP_FROMBUFFER = np.zeros(1, np.uint8).__reduce_ex__(5)[0]
_CIFAR_GLOBALS = {
    **{(f"numpy.{core}.multiarray", "_reconstruct"): _NP_RECONSTRUCT for core in ("core", "_core")},
    **{(f"numpy.{core}.numeric", "_frombuffer"): _NP_FROMBUFFER for core in ("core", "_core")},
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_encode,
}


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles a CIFAR-10 python batch without running anything the file names.

    A batch is a dict of bytes, lists of ints or bytes and one uint8 numpy array; pickle builds
    objects by calling whatever functions the file names, so this unpickler resolves only numpy's
    array constructors (``_CIFAR_GLOBALS``) and refuses every other name before calling it.
    """

    def find_class(self, module: str, name: str):
        found = _CIFAR_GLOBALS.get((module, name))
        if found is None:
            raise pickle.UnpicklingError(f"it names {module}.{name}, which a CIFAR-10 batch never holds "
                                         "(refused without running it)")
        return found

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("it holds a persistent reference, which a CIFAR-10 batch never holds")


def _cifar_batch(raw: bytes, name: str) -> Tensor:
    """uint8 (N, 3, 32, 32) from the bytes of one python batch, read by ``_CifarUnpickler``."""
    try:
        batch = _CifarUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Exception as e:  # a corrupt pickle raises anything from EOFError to MemoryError
        reason = str(e).strip() or type(e).__name__
        raise InputError(f"{name}: not a CIFAR-10 python batch ({reason})") from e
    if not isinstance(batch, dict):
        raise InputError(f"{name}: not a CIFAR-10 python batch (a {type(batch).__name__}, not a dict)")
    data = batch.get(b"data", batch.get("data"))
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8:
        kind = f"a {data.dtype} array" if isinstance(data, np.ndarray) else f"a {type(data).__name__}"
        raise InputError(f"{name}: not a CIFAR-10 python batch (its 'data' is {kind}, expected a uint8 array)")
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise InputError(f"{name}: expected CIFAR-10 rows of 3072 bytes, got an array of shape {data.shape}")
    return torch.from_numpy(data.reshape(-1, 3, 32, 32).copy())


def load_cifar10_images(root: str | os.PathLike) -> tuple[Tensor, Tensor]:
    """CIFAR-10 from its python pickle batches as uint8 (N, 3, 32, 32): (train, test).

    ``root`` is the ``cifar-10-batches-py`` directory, a directory that contains it, or the
    ``cifar-10-python.tar.gz`` archive (directly or inside ``root``). The batches are pickles,
    read by an unpickler that admits nothing but the dict, bytes, lists and numpy array the format
    holds, so a batch from anyone is safe to read.
    """
    root = Path(root)
    archive = root if root.is_file() else root / "cifar-10-python.tar.gz"
    for folder in (root, root / "cifar-10-batches-py"):
        if folder.is_dir() and all((folder / n).is_file() for n in _CIFAR_TRAIN + _CIFAR_TEST):
            splits = [[_cifar_batch((folder / n).read_bytes(), str(folder / n)) for n in names]
                      for names in (_CIFAR_TRAIN, _CIFAR_TEST)]
            return torch.cat(splits[0]), torch.cat(splits[1])
    if archive.is_file():
        try:
            with tarfile.open(archive, "r:*") as tar:
                members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
                missing = [n for n in _CIFAR_TRAIN + _CIFAR_TEST if n not in members]
                if missing:
                    raise InputError(f"{archive}: archive lacks CIFAR-10 batches {missing}")
                splits = [[_cifar_batch(tar.extractfile(members[n]).read(), f"{archive}:{n}") for n in names]
                          for names in (_CIFAR_TRAIN, _CIFAR_TEST)]
        except tarfile.TarError as e:
            raise InputError(f"{archive}: not a readable tar archive ({e})") from e
        return torch.cat(splits[0]), torch.cat(splits[1])
    raise MissingPathError(f"{root}: no CIFAR-10 python batches (data_batch_1..5, test_batch) in it or in "
                           "cifar-10-batches-py/, and no cifar-10-python.tar.gz")


# ----------------------------------------------------------------------------- PIL images

def _to_8_bit(img, name: str):
    """``img`` with 8 bits per channel, its values scaled rather than clipped.

    PIL opens 16-bit greyscale PNG/TIFF as mode ``I;16`` (values up to 65535), and its conversion
    to ``L`` clips them at 255, which makes almost every pixel white; such images are scaled here.
    (16-bit RGB PNGs open as 8-bit ``RGB`` already.) Float (``F``) and 32-bit integer (``I``)
    images carry no range: refused.
    """
    from PIL import Image

    if img.mode.startswith("I;16") or (img.mode == "I" and img.format == "PNG"):  # older PIL: 16-bit PNG as I
        values = np.asarray(img).astype(np.float32)
        return Image.fromarray(np.clip(np.round(values / 257.0), 0, 255).astype(np.uint8), mode="L")
    if img.mode in ("F", "I"):
        kind = "32-bit float" if img.mode == "F" else "32-bit integer"
        raise InputError(f"{name}: a {kind} image (PIL mode {img.mode}), whose value range no file states; "
                         "save the data as 8- or 16-bit PNG")
    return img


def _to_model_image(img, size: int, channels: int, box: tuple[int, int, int, int] | None = None,
                    name: str = "image") -> Tensor:
    """A PIL image as uint8 (channels, size, size): 8 bits, optional crop box, centre square, resize."""
    from PIL import Image

    img = _to_8_bit(img, name).convert("RGB" if channels == 3 else "L")
    if box is not None:
        img = img.crop(box)
    w, h = img.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    img = img.crop((left, top, left + side, top + side))
    if side != size:
        img = img.resize((size, size), Image.Resampling.BILINEAR)
    arr = np.asarray(img, dtype=np.uint8)
    arr = arr[:, :, None] if arr.ndim == 2 else arr
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def _open_image(data: bytes | Path, name: str):
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(io.BytesIO(data) if isinstance(data, bytes) else data)
        img.load()
    except (UnidentifiedImageError, OSError) as e:
        raise InputError(f"{name}: not a readable image ({e})") from e
    return img


def _list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def folder_splits(root: str | os.PathLike) -> tuple[list[Path], list[Path]]:
    """(train, test) image paths of an image folder (see the module docstring for the layout)."""
    root = Path(root)
    if root.is_file():
        raise InputError(f"{root} is a file; the folder format reads a directory of images (with train/ and test/, "
                         "or all images split 90/10)")
    if not root.is_dir():
        raise MissingPathError(f"{root}: image folder does not exist")
    if (root / "train").is_dir():
        for name in ("test", "val", "validation"):
            if (root / name).is_dir():
                train, test = _list_images(root / "train"), _list_images(root / name)
                break
        else:
            raise InputError(f"{root}: has train/ but no test/, val/ or validation/ folder")
    else:
        images = _list_images(root)
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0)).tolist()
        n_test = max(1, len(images) // 10)
        train = sorted(images[i] for i in order[n_test:])
        test = sorted(images[i] for i in order[:n_test])
    if not train or not test:
        raise InputError(f"{root}: found {len(train)} training and {len(test)} test images "
                         f"({'/'.join(IMAGE_SUFFIXES)}); need at least one of each")
    return train, test


class _FolderReader:
    def __init__(self, paths: list[Path], size: int, channels: int) -> None:
        self.paths, self.size, self.channels = paths, size, channels

    def __call__(self, i: int) -> Tensor:
        name = str(self.paths[i])
        return _to_model_image(_open_image(self.paths[i], name), self.size, self.channels, name=name)


class _LMDBReader(official_data.LMDBRecords):
    """Reads one split of the official LMDB layout (records keyed "0", "1", ...)."""

    def __init__(self, path: Path, size: int, channels: int, box: tuple[int, int, int, int] | None) -> None:
        super().__init__(path)
        self.size, self.channels, self.box = size, channels, box
        self.length = self.entries()

    def __call__(self, i: int) -> Tensor:
        from PIL import Image

        data = self.get(str(i).encode())
        name = f"{self.path}[{i}]"
        if data is None:
            raise InputError(f"{name}: key {i} missing (keys must be 0..{self.length - 1})")
        if data[:8] == b"\x89PNG\r\n\x1a\n" or data[:2] == b"\xff\xd8":
            img = _open_image(data, name)
        else:
            side = int(round((len(data) / 3) ** 0.5))
            if 3 * side * side != len(data):
                raise InputError(f"{name}: {len(data)} bytes is neither a PNG/JPEG nor a square raw RGB image")
            img = Image.fromarray(np.frombuffer(data, np.uint8).reshape(side, side, 3), mode="RGB")
        return _to_model_image(img, self.size, self.channels, self.box, name=name)


def _lmdb_split(root: Path, name: str, size: int, channels: int, box) -> _LMDBReader:
    path = root / name
    if not path.exists():
        raise MissingPathError(f"{root}: no {name} (the official LMDB layout has train.lmdb and validation.lmdb)")
    if importlib.util.find_spec("lmdb") is None:
        raise InputError("reading LMDB datasets needs the lmdb package (pip install lmdb)")
    reader = _LMDBReader(path, size, channels, box)
    if reader.length == 0:
        raise InputError(f"{path}: the database is empty")
    return reader


# ----------------------------------------------------------------------------- entry point

def detect_format(dataset: str, data: str | os.PathLike | None) -> str:
    """The data format implied by the dataset name and what is in ``data``."""
    if dataset == "digits":
        return "digits"
    if dataset == "mnist":
        return "idx"
    if dataset == "cifar10":
        return "cifar"
    if dataset in ("stacked_mnist", "omniglot"):
        return dataset
    if dataset.startswith("lsun_"):
        return "lsun"
    if data is None:
        raise InputError(f"dataset {dataset!r} needs --data (a directory)")
    root = Path(data)
    if not root.exists():
        raise MissingPathError(f"{root}: data path does not exist")
    if (root / "train.lmdb").exists():
        return "lmdb"
    if root.is_dir():
        return "folder"
    raise InputError(f"{root}: cannot tell the data format; pass --data_format ({', '.join(FORMATS)})")


def build_datasets(fmt: str, data: str | os.PathLike | None, *, image_size: int, channels: int, seed: int,
                   dataset: str = "", binarize: bool = False) -> tuple[ImageDataset, ImageDataset]:
    """(train, test) datasets of images (channels, image_size, image_size) in [0, 1].

    Args:
        fmt: one of ``FORMATS`` (see the module docstring).
        data: the data path (ignored for ``digits``).
        image_size, channels: what the model takes. Fixed-size formats (digits, idx, cifar) must
            match it; folder and LMDB images are cropped and resized to it.
        seed: seeds the random transforms (with the epoch and the sample index).
        dataset: the official dataset name, for dataset-specific pre-processing (celeba_64 crop).
        binarize: binarise every image dynamically (each pixel's intensity is its probability of
            being 1, drawn afresh every epoch): what a model with a Bernoulli output needs, as the
            official MNIST pipeline does.
    Raises:
        InputError / MissingPathError on a missing path, an unknown format, an unreadable file
        or images whose size does not fit the model.
    """
    if fmt not in FORMATS:
        raise InputError(f"unknown data format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if fmt != "digits":
        if data is None:
            raise InputError(f"data format {fmt!r} needs --data (a path)")
        if not Path(data).exists():
            raise MissingPathError(f"{data}: data path does not exist")
    # no flips for digits and characters: a mirrored 2 is no digit
    pad, flip = 0, fmt not in ("digits", "idx", "stacked_mnist", "omniglot")
    if fmt == "digits":
        train, test = load_digits_images()
        max_value = 16
    elif fmt == "idx":
        train, test = load_mnist_images(data)
        max_value = 255
        pad = 2
    elif fmt == "cifar":
        train, test = load_cifar10_images(data)
        max_value = 255
    elif fmt == "omniglot":
        train, test = official_data.load_omniglot_images(data)
        max_value, pad = 255, 2
    elif fmt == "stacked_mnist":
        pad = 2
    crop = image_size if fmt == "lsun" else 0
    train_aug = Augment(pad=pad, crop=crop, random_crop=bool(crop), flip=flip, binarize=binarize)
    test_aug = Augment(pad=pad, crop=crop, binarize=binarize)
    if fmt in ("digits", "idx", "cifar", "omniglot"):
        datasets = (ImageDataset(_tensor_reader(train), len(train), max_value, train_aug, seed),
                    ImageDataset(_tensor_reader(test), len(test), max_value, test_aug, seed + 1))
    elif fmt == "stacked_mnist":
        readers = [official_data.StackedMNISTReader(digits, official_data.STACKED_MNIST_SEEDS[split])
                   for digits, split in zip(load_mnist_images(data), ("train", "test"))]
        datasets = (ImageDataset(readers[0], len(readers[0]), 255, train_aug, seed),
                    ImageDataset(readers[1], len(readers[1]), 255, test_aug, seed + 1))
    elif fmt == "lsun":
        readers = [official_data.LSUNReader(path, image_size, channels)
                   for path in official_data.lsun_split_paths(data, dataset)]
        datasets = (ImageDataset(readers[0], len(readers[0]), 255, train_aug, seed),
                    ImageDataset(readers[1], len(readers[1]), 255, test_aug, seed + 1))
    else:
        if fmt == "folder":
            paths = folder_splits(data)
            readers = [_FolderReader(p, image_size, channels) for p in paths]
            lengths = [len(p) for p in paths]
        else:
            box = _CELEBA64_BOX if dataset == "celeba_64" else None
            readers = [_lmdb_split(Path(data), n, image_size, channels, box) for n in ("train.lmdb", "validation.lmdb")]
            lengths = [r.length for r in readers]
        datasets = (ImageDataset(readers[0], lengths[0], 255, train_aug, seed),
                    ImageDataset(readers[1], lengths[1], 255, test_aug, seed + 1))
    got = datasets[0].image_shape()
    if got != (channels, image_size, image_size):
        raise InputError(f"the {fmt} data gives images of shape {got} (C, H, W) but the model takes "
                         f"{(channels, image_size, image_size)}; pick the preset for this dataset")
    return datasets
