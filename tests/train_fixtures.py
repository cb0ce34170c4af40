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


def write_binary_mnist(root, n_train: int, n_test: int, seed: int = 0) -> None:
    """MNIST IDX files whose pixels are 0 or 255: dynamic binarisation then leaves them as they are,
    whatever random numbers it draws (the official run and nvae_fast draw different ones)."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("t10k", n_test)):
        arr = np.zeros((n, 28, 28), dtype=np.uint8)
        arr[:, 6:22, 8:20] = 255 * (rng.random((n, 16, 12)) < 0.5)
        (root / f"{split}-images-idx3-ubyte").write_bytes(idx_bytes(arr))


def write_symmetric_cifar10(root, n_per_batch: int, n_test: int, seed: int = 0) -> None:
    """CIFAR-10 python batches (``root/cifar-10-batches-py``) of left-right symmetric images: random
    horizontal flips leave them as they are, whatever random numbers they draw."""
    import pickle

    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    for name, n in [(f"data_batch_{i}", n_per_batch) for i in range(1, 6)] + [("test_batch", n_test)]:
        half = rng.integers(0, 256, (n, 3, 32, 16), dtype=np.uint8)
        images = np.concatenate([half, half[..., ::-1]], axis=-1)
        batch = {b"data": images.reshape(n, 3072), b"labels": [0] * n}
        (folder / name).write_bytes(pickle.dumps(batch))
