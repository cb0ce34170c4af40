"""Trained weights in and out: load a model for evaluation or sampling, export it.

``load_trained_model`` reads any of: an nvae_fast training checkpoint (``checkpoint.pt``; its EMA
weights when it has them, unless ``use_ema=False``), an official NVAE checkpoint, or a
``.safetensors`` file written by ``export_safetensors`` (weights + configuration in its metadata).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nvae_fast.train import checkpoint as ckpt_io
from nvae_fast.train.errors import InputError, MissingPathError

_EMA_PREFIX = "module."


def _model_state_of(ckpt: dict[str, Any], use_ema: bool) -> tuple[dict[str, torch.Tensor], bool]:
    ema = ckpt.get("ema")
    if use_ema and ema is not None:
        return {k[len(_EMA_PREFIX):]: v for k, v in ema.items() if k.startswith(_EMA_PREFIX)}, True
    return ckpt["model"], False


def load_trained_model(path: str | os.PathLike, use_ema: bool = True) -> tuple[nn.Module, dict[str, Any]]:
    """(model in eval mode on the CPU, info) from a checkpoint or safetensors file.

    ``info`` has ``kind`` ('nvae_fast', 'official' or 'safetensors'), ``train`` (the training
    options recorded, possibly empty) and ``ema`` (whether EMA weights were loaded).
    Raises MissingPathError / InputError for a missing, unreadable or foreign file.
    """
    from nvae_fast import NVAE, NVAEConfig

    path = Path(path)
    if not path.is_file():
        raise MissingPathError(f"{path}: checkpoint does not exist")
    if path.suffix == ".safetensors":
        return _load_safetensors(path)
    try:
        raw = ckpt_io.load_file(path)
    except InputError as ours:
        from nvae_fast.compat.official import load_official_checkpoint

        try:
            model = load_official_checkpoint(path)
        except Exception as official:  # a corrupt file can make torch.load raise anything
            raise InputError(f"{path}: neither an nvae_fast nor an official NVAE checkpoint "
                             f"({str(official).splitlines()[0]})") from ours
        return model, {"kind": "official", "train": {}, "ema": False}
    if not isinstance(raw, dict) or raw.get("format") != ckpt_io.FORMAT:
        raise InputError(f"{path}: not an nvae_fast training checkpoint (expected format {ckpt_io.FORMAT!r})")
    try:
        config = NVAEConfig(**raw["config"]["model"])
        model = NVAE(config)
        state, ema = _model_state_of(raw, use_ema)
        model.load_state_dict(state)
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise InputError(f"{path}: checkpoint does not hold a consistent model ({str(e).splitlines()[0]})") from e
    return model.eval(), {"kind": "nvae_fast", "train": raw["config"].get("train", {}), "ema": ema}


def export_safetensors(model: nn.Module, path: str | os.PathLike, config: dict[str, Any]) -> Path:
    """Writes ``model``'s state_dict as safetensors with the run configuration (JSON) in its
    metadata under ``nvae_fast.config``; ``load_trained_model`` reads it back."""
    from safetensors.torch import save_file

    path = Path(path)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    # The official weight_normalized alias shares storage with weight; safetensors refuses shared
    # tensors, and loading re-creates the alias.
    state = {k: v.clone() for k, v in state.items()}
    save_file(state, str(path), metadata={"nvae_fast.config": json.dumps(config)})
    return path


def _load_safetensors(path: Path) -> tuple[nn.Module, dict[str, Any]]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    from nvae_fast import NVAE, NVAEConfig

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        state = load_file(str(path))
        config = json.loads(meta["nvae_fast.config"])
        model = NVAE(NVAEConfig(**config["model"]))
        model.load_state_dict(state)
    except (SafetensorError, KeyError, json.JSONDecodeError, TypeError, ValueError, RuntimeError) as e:
        raise InputError(f"{path}: not an nvae_fast safetensors export ({str(e).splitlines()[0]})") from e
    return model.eval(), {"kind": "safetensors", "train": config.get("train", {}), "ema": False}


def export_official(model: nn.Module, path: str | os.PathLike, train_config, *, epoch: int, global_step: int,
                    steps_per_epoch: int, optimizer_state: dict | None = None, scaler_state: dict | None = None,
                    run_dir: str | os.PathLike | None = None) -> Path:
    """Writes ``model`` as the official ``train.py`` writes its checkpoint after ``epoch`` epochs
    (``global_step`` steps of ``steps_per_epoch``), for the official ``evaluate.py`` and
    ``train.py --cont_training``.

    ``args`` is complete (every official option, ``distributed``, ``save``, ``num_total_iter``),
    with the official training options of ``train_config``. ``optimizer_state`` (the run's Adamax
    state_dict, parameters in ``model.parameters()`` order) gets the learning rate of the last step
    taken, beside the official scheduler's state after ``epoch`` epochs; ``scaler_state`` is the
    fp16 gradient scaler's (the official initial one when empty or not given). The write is atomic.
    """
    from nvae_fast.compat.official import OFFICIAL_GRAD_SCALER_STATE, save_official_checkpoint
    from nvae_fast.train.schedules import learning_rate, official_scheduler_state

    official_train = ("batch_size", "learning_rate", "learning_rate_min", "weight_decay", "weight_decay_norm",
                      "weight_decay_norm_init", "weight_decay_norm_anneal", "epochs", "warmup_epochs",
                      "kl_anneal_portion", "kl_const_portion", "kl_const_coeff", "seed", "data")
    cfg = train_config
    extra = {k: v for k, v in dataclasses.asdict(cfg).items() if k in official_train}
    extra["num_total_iter"] = steps_per_epoch * cfg.epochs
    if run_dir is not None:
        extra.update(root=str(Path(run_dir).parent), save=str(run_dir))
    scheduler, _ = official_scheduler_state(steps_per_epoch, cfg.epochs, cfg.warmup_epochs, cfg.learning_rate,
                                            cfg.learning_rate_min, epoch)
    if optimizer_state is not None:
        lr = learning_rate(max(global_step - 1, 0), steps_per_epoch, cfg.epochs, cfg.warmup_epochs,
                           cfg.learning_rate, cfg.learning_rate_min, cfg.lr_schedule)
        for group in optimizer_state["param_groups"]:
            group["lr"] = lr
            group["initial_lr"] = cfg.learning_rate
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_official_checkpoint(model, tmp, epoch=epoch, global_step=global_step, optimizer=optimizer_state,
                             scheduler=scheduler, grad_scalar=scaler_state or dict(OFFICIAL_GRAD_SCALER_STATE),
                             extra_args=extra)
    os.replace(tmp, path)
    return path
