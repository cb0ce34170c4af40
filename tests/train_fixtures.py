"""Small data files for the training tests (written in the official formats)."""

import gzip

import numpy as np


def idx_bytes(images: np.ndarray) -> bytes:
    """An unsigned-byte IDX file holding ``images``."""
    header = bytes([0, 0, 0x08, images.ndim]) + np.asarray(images.shape, dtype=">u4").tobytes()
    return header + images.astype(np.uint8).tobytes()


def write_mnist(root, n_train: int = 6, n_test: int = 3, gz: bool = True, seed: int = 0) -> dict[str, np.ndarray]:
    """MNIST-like IDX files (random 28x28 digits: a blob of ink on a blank page) in ``root``."""
    rng = np.random.default_rng(seed)
    images = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        arr = np.zeros((n, 28, 28), dtype=np.uint8)
        arr[:, 6:22, 8:20] = rng.integers(0, 256, (n, 16, 12))
        images[split] = arr
        name = f"{split}-images-idx3-ubyte"
        data = idx_bytes(arr)
        if gz:
            (root / (name + ".gz")).write_bytes(gzip.compress(data))
        else:
            (root / name).write_bytes(data)
    return images
