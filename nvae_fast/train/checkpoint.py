"""Training checkpoints: written atomically, read with clear errors, carrying the RNG states.

A checkpoint is a dict (``torch.save``) with ``format`` = ``FORMAT`` and the whole training
state: ``model``, ``optimizer``, ``scheduler``, ``scaler`` (state_dicts), ``ema`` (or None),
``step`` (global step = optimizer steps attempted), ``epoch`` and ``epoch_step`` (position in
the data), ``config`` (plain dict of the run's options), ``rng`` (``rng_states()``) and
``guard`` (bad-step counters). Everything in it is plain data, so it loads with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nvae_fast.compat.loading import load_error_reason
from nvae_fast.train.errors import InputError, MissingPathError
from nvae_fast.train.outputs import write_atomic

FORMAT = "nvae_fast.train/1"


def rng_states() -> dict[str, Any]:
    """Python, numpy, torch CPU and (if present) CUDA generator states of this process, as plain
    data (loadable with ``weights_only=True``)."""
    version, py_state, gauss = random.getstate()
    _, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": {"version": version, "state": list(py_state), "gauss": gauss},
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached": float(cached)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_states(states: dict[str, Any]) -> None:
    """Restores what ``rng_states`` captured (CUDA states only where devices exist)."""
    py = states["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    n = states["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"][:torch.cuda.device_count()])


def save_atomic(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)`` that never leaves a partial file: it writes a temporary file in
    the same directory, flushes it to disk and renames it over ``path`` (``outputs.write_atomic``:
    the file gets the permissions of any new file; temporaries of interrupted writes are removed)."""
    write_atomic(path, lambda f: torch.save(obj, f))


# What a file written by torch.save starts with: a zip archive, or a pickle (the legacy format).
_TORCH_MAGIC = (b"PK\x03\x04", b"\x80")


def load_file(path: str | os.PathLike, *, mmap: bool = False) -> Any:
    """``torch.load(weights_only=True)`` on the CPU with one clear ``InputError`` for a missing or
    corrupt file; ``mmap`` maps tensors lazily instead of reading them."""
    path = Path(path)
    if not path.is_file():
        raise MissingPathError(f"{path}: checkpoint does not exist")
    with open(path, "rb") as f:
        head = f.read(4)
    if not head.startswith(_TORCH_MAGIC):
        raise InputError(f"{path}: not a readable checkpoint (not a file written by torch.save: "
                         f"{'it is empty' if not head else 'neither a zip archive nor a pickle'})")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and head.startswith(b"PK"))
    except Exception as e:  # torch.load raises anything from IndexError to UnpicklingError on a corrupt file
        raise InputError(f"{path}: not a readable checkpoint ({load_error_reason(e)})") from e


def load_checkpoint(path: str | os.PathLike, mmap: bool = False) -> dict[str, Any]:
    """A training checkpoint written by ``save_atomic`` of this package's state, validated."""
    ckpt = load_file(path, mmap=mmap)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise InputError(f"{path}: not an nvae_fast training checkpoint (expected format {FORMAT!r})")
    missing = [k for k in ("model", "optimizer", "scheduler", "step", "epoch", "epoch_step", "config", "rng")
               if k not in ckpt]
    if missing:
        raise InputError(f"{path}: checkpoint lacks {missing}")
    return ckpt
