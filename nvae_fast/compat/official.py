"""Official NVAE checkpoint files: read them safely, build the model they hold, write them.

The official ``train.py`` saves ``torch.save({'epoch', 'state_dict', 'optimizer', 'global_step',
'args', 'arch_instance', 'scheduler', 'grad_scalar'})`` with ``args`` an ``argparse.Namespace``.
``torch.load(weights_only=True)`` refuses the Namespace; these readers allow exactly that one class
beyond tensors and plain containers, so a checkpoint can never run code while loading.
"""

from __future__ import annotations

import argparse
import os
import pickle
from typing import Any

import torch

from nvae_fast.compat.loading import load_error_reason, load_state_dict_checked
from nvae_fast.config import NVAEConfig
from nvae_fast.model import NVAE

_WHAT = ("an official NVAE checkpoint is a dict saved by the official train.py with at least 'state_dict' "
         "(the model's parameters) and 'args' (its argparse.Namespace)")


def read_official_checkpoint(path: str | os.PathLike, map_location: torch.device | str = "cpu") -> dict[str, Any]:
    """The dict of an official checkpoint file, loaded with ``weights_only=True`` plus
    ``argparse.Namespace``.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file is not such a checkpoint (says why).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint file at {os.fspath(path)!r}")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as err:
        reason = load_error_reason(err)
        raise ValueError(f"{os.fspath(path)!r} cannot be read as an official NVAE checkpoint ({reason}); "
                         f"{_WHAT}, holding nothing but tensors, plain Python values and that Namespace") from err
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint or "args" not in checkpoint:
        found = sorted(checkpoint) if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise ValueError(f"{os.fspath(path)!r} is not an official NVAE checkpoint (found {found}); {_WHAT}")
    if not isinstance(checkpoint["args"], (argparse.Namespace, dict)):
        raise ValueError(f"{os.fspath(path)!r}: 'args' is a {type(checkpoint['args']).__name__}; {_WHAT}")
    return checkpoint


def load_official_checkpoint(path: str | os.PathLike, device: torch.device | str | None = None) -> NVAE:
    """The model of an official checkpoint: built from its ``args`` (options missing from older
    checkpoints take the official defaults), its ``state_dict`` loaded strictly, moved to ``device``
    and put in eval mode (call ``.train()`` to continue training). Weights that do not fit the
    model its ``args`` describe raise a ``ValueError`` naming the first missing or unexpected key
    and the first shape mismatch."""
    checkpoint = read_official_checkpoint(path)
    model = NVAE(NVAEConfig.from_namespace(checkpoint["args"]))
    load_state_dict_checked(model, checkpoint["state_dict"], f"{os.fspath(path)!r}")
    if device is not None:
        model.to(device)
    return model.eval()


def save_official_checkpoint(model: NVAE, path: str | os.PathLike, *, epoch: int = 0, global_step: int = 0,
                             optimizer: dict | None = None, scheduler: dict | None = None,
                             grad_scalar: dict | None = None, extra_args: dict[str, Any] | None = None) -> None:
    """Write ``model`` as the official ``train.py`` does, so the official code (and
    :func:`load_official_checkpoint`) can read it.

    ``args`` holds the model-shaping options of ``model.config`` plus ``extra_args`` (e.g. the
    official training options the official scripts read: batch_size, data, ...). ``optimizer``,
    ``scheduler`` and ``grad_scalar`` are state dicts (empty when not given).
    """
    args = model.config.to_namespace()
    for name, value in (extra_args or {}).items():
        setattr(args, name, value)
    arch_instance = {name: list(ops) for name, ops in model.config.arch_cells.items()}
    arch_instance["ar_nn"] = [""]
    torch.save({"epoch": epoch, "state_dict": model.state_dict(), "optimizer": optimizer or {},
                "global_step": global_step, "args": args, "arch_instance": arch_instance,
                "scheduler": scheduler or {}, "grad_scalar": grad_scalar or {}}, path)
