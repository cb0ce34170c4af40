"""Official NVAE checkpoint files: read them safely, build the model they hold, write them.

The official ``train.py`` saves ``torch.save({'epoch', 'state_dict', 'optimizer', 'global_step',
'args', 'arch_instance', 'scheduler', 'grad_scalar'})`` with ``args`` an ``argparse.Namespace``.
``torch.load(weights_only=True)`` refuses the Namespace; these readers allow exactly that one class
beyond tensors and plain containers, so a checkpoint can never run code while loading.
``save_official_checkpoint`` writes such a file with the complete ``args`` (every official option and
``distributed``) and the optimizer, scheduler and gradient-scaler states in the official formats, so
that the official ``evaluate.py`` and ``train.py --cont_training`` read it.
"""

from __future__ import annotations

import argparse
import os
import pickle
from typing import Any

import torch

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
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
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
    and put in eval mode (call ``.train()`` to continue training)."""
    checkpoint = read_official_checkpoint(path)
    model = NVAE(NVAEConfig.from_namespace(checkpoint["args"]))
    model.load_state_dict(checkpoint["state_dict"], strict=True)
    if device is not None:
        model.to(device)
    return model.eval()


# Every option of the official train.py with its default (what its argparse gives), and the two
# values its main block sets before training: ``distributed`` (True even for one process; the
# official loaders and test() read it) and ``save`` (ROOT/eval-SAVE).
OFFICIAL_TRAIN_DEFAULTS: dict[str, Any] = {
    "root": "/tmp/nasvae/expr", "save": "exp", "dataset": "mnist", "data": "/tmp/nasvae/data", "batch_size": 200,
    "learning_rate": 1e-2, "learning_rate_min": 1e-4, "weight_decay": 3e-4, "weight_decay_norm": 0.0,
    "weight_decay_norm_init": 10.0, "weight_decay_norm_anneal": False, "epochs": 200, "warmup_epochs": 5,
    "fast_adamax": False, "arch_instance": "res_mbconv", "kl_anneal_portion": 0.3, "kl_const_portion": 0.0001,
    "kl_const_coeff": 0.0001, "num_nf": 0, "num_x_bits": 8, "num_latent_scales": 1, "num_groups_per_scale": 10,
    "num_latent_per_group": 20, "ada_groups": False, "min_groups_per_scale": 1, "num_channels_enc": 32,
    "num_preprocess_blocks": 2, "num_preprocess_cells": 3, "num_cell_per_cond_enc": 1, "num_channels_dec": 32,
    "num_postprocess_blocks": 2, "num_postprocess_cells": 3, "num_cell_per_cond_dec": 1, "num_mixture_dec": 10,
    "use_se": False, "res_dist": False, "cont_training": False, "num_proc_node": 1, "node_rank": 0, "local_rank": 0,
    "global_rank": 0, "num_process_per_node": 1, "master_address": "127.0.0.1", "seed": 1, "distributed": True,
}

# The official GradScaler(2**10) before its first step (its state_dict format).
OFFICIAL_GRAD_SCALER_STATE: dict[str, Any] = {"scale": 2.0 ** 10, "growth_factor": 2.0, "backoff_factor": 0.5,
                                              "growth_interval": 2000, "_growth_tracker": 0}


def official_args(config: NVAEConfig, **options: Any) -> argparse.Namespace:
    """The complete ``args`` Namespace the official ``train.py`` saves in its checkpoints: every
    official option (official defaults), the model options of ``config``, then ``options`` (e.g.
    batch_size, data, epochs, save, num_total_iter)."""
    values = dict(OFFICIAL_TRAIN_DEFAULTS)
    values.update(vars(config.to_namespace()))
    values.update(options)
    return argparse.Namespace(**values)


def official_optimizer_state(model: NVAE, args: argparse.Namespace) -> dict[str, Any]:
    """The state_dict of the optimizer the official ``train.py`` builds for ``model`` before its
    first step: Adamax(lr=args.learning_rate, weight_decay=args.weight_decay, eps=1e-3)."""
    return torch.optim.Adamax(model.parameters(), args.learning_rate, weight_decay=args.weight_decay,
                              eps=1e-3).state_dict()


def official_scheduler_state(args: argparse.Namespace) -> dict[str, Any]:
    """The state_dict of the official ``CosineAnnealingLR(T_max = epochs - warmup_epochs - 1,
    eta_min = learning_rate_min)`` before its first step."""
    opt = torch.optim.Adamax([torch.nn.Parameter(torch.zeros(0))], args.learning_rate)
    t_max = float(args.epochs - args.warmup_epochs - 1)
    return torch.optim.lr_scheduler.CosineAnnealingLR(opt, t_max, eta_min=args.learning_rate_min).state_dict()


def save_official_checkpoint(model: NVAE, path: str | os.PathLike, *, epoch: int = 0, global_step: int = 0,
                             optimizer: dict | None = None, scheduler: dict | None = None,
                             grad_scalar: dict | None = None, extra_args: dict[str, Any] | None = None) -> None:
    """Write ``model`` as the official ``train.py`` does, so the official scripts (``evaluate.py``,
    ``train.py --cont_training``) and :func:`load_official_checkpoint` can read it.

    ``args`` is :func:`official_args` of ``model.config`` with ``extra_args`` (the training
    options: batch_size, data, learning_rate, epochs, ...). ``optimizer``, ``scheduler`` and
    ``grad_scalar`` are the state_dicts of the official Adamax, CosineAnnealingLR and GradScaler
    (parameters in ``model.parameters()`` order); those not given are the official ones before the
    first step (:func:`official_optimizer_state`, :func:`official_scheduler_state`,
    ``OFFICIAL_GRAD_SCALER_STATE``). The file holds only tensors, plain values and the Namespace.
    """
    args = official_args(model.config, **(extra_args or {}))
    torch.save({"epoch": epoch, "state_dict": model.state_dict(),
                "optimizer": optimizer if optimizer is not None else official_optimizer_state(model, args),
                "global_step": global_step, "args": args, "arch_instance": model.arch_instance,
                "scheduler": scheduler if scheduler is not None else official_scheduler_state(args),
                "grad_scalar": grad_scalar if grad_scalar is not None else dict(OFFICIAL_GRAD_SCALER_STATE)}, path)
