"""``TrainConfig``: the options of a training run that do not shape the model, with presets.

Field names and defaults are those of the official ``train.py`` where it has the option (so an
official command line keeps its meaning); the rest are nvae_fast's additions. ``TRAIN_PRESETS``
holds, for each model preset of ``nvae_fast.config.PRESETS``, the training flags of the
corresponding official README command (or a small recipe for the tiny and demo models).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from nvae_fast.train.schedules import LR_SCHEDULES

AMP_MODES = ("auto", "bf16", "fp16", "off")
KL_BALANCE_SCOPES = ("global", "rank")


@dataclass(frozen=True)
class TrainConfig:
    """How to train (the model itself is an ``NVAEConfig``).

    Official options: data, batch_size (per process), learning_rate, learning_rate_min,
    weight_decay, weight_decay_norm (spectral-regularisation λ), weight_decay_norm_init,
    weight_decay_norm_anneal, epochs, warmup_epochs, kl_anneal_portion, kl_const_portion,
    kl_const_coeff, seed.

    Additions:
        data_format: 'auto' or a format of ``nvae_fast.train.datasets.FORMATS``.
        amp: mixed precision, 'bf16', 'fp16' (with a gradient scaler), 'off', or 'auto' (bf16 on
            GPUs that support it, else fp16 on GPUs, off on CPUs).
        ema_decay: decay of an exponential moving average of the weights used for evaluation and
            sampling (0: none).
        max_bad_steps: stop after this many consecutive steps with a NaN/Inf loss or gradient.
        num_workers: data-loader worker processes per rank.
        log_every: steps between TensorBoard scalars.
        lr_schedule: 'official' (the learning rates the official train.py produces, see
            ``nvae_fast.train.schedules.learning_rate``) or 'textbook' (the cosine from the peak
            learning rate).
        kl_balance_scope: 'global' (the KL-balancing weights use the mean over the batches of all
            ranks, so N ranks compute what one process computes on the joined batch) or 'rank'
            (each rank uses its own batch, as the official code).
        eval_every: epochs between test-set evaluations (0: the official rule, every epoch up to
            50 epochs, else every 20) - the last epoch is always evaluated.
        eval_iw_samples: importance samples of those periodic evaluations (official: 10).
        isolate_eval_rng: periodic evaluations, sample grids and logged images draw from a copy
            of the random state, so how often a run evaluates or logs never changes its training
            (official: they draw from the training's random stream).
        checkpoint_every: steps between mid-epoch checkpoints (0: only at epoch ends).
        num_iw_samples: importance samples of the final test log-likelihood.
        eval_untrained: evaluate the test NELBO before training, as a baseline.
        num_samples, temp: the final sample grid (samples.png, samples.npz); temp 0 decodes the
            prior means.
    """

    data: str | None = None
    data_format: str = "auto"
    batch_size: int = 200
    learning_rate: float = 1e-2
    learning_rate_min: float = 1e-4
    weight_decay: float = 3e-4
    weight_decay_norm: float = 0.0
    weight_decay_norm_init: float = 10.0
    weight_decay_norm_anneal: bool = False
    epochs: int = 200
    warmup_epochs: int = 5
    kl_anneal_portion: float = 0.3
    kl_const_portion: float = 0.0001
    kl_const_coeff: float = 0.0001
    seed: int = 1
    amp: str = "auto"
    ema_decay: float = 0.0
    max_bad_steps: int = 20
    num_workers: int = 2
    log_every: int = 100
    eval_every: int = 0
    eval_iw_samples: int = 10
    isolate_eval_rng: bool = False
    lr_schedule: str = "official"
    kl_balance_scope: str = "global"
    checkpoint_every: int = 0
    num_iw_samples: int = 1000
    eval_untrained: bool = False
    num_samples: int = 64
    temp: float = 0.7

    def __post_init__(self) -> None:
        positive = ("batch_size", "epochs", "max_bad_steps", "log_every", "num_iw_samples", "eval_iw_samples",
                "num_samples")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_epochs", "num_workers", "eval_every", "checkpoint_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.warmup_epochs >= self.epochs and self.epochs > 1:
            raise ValueError(f"warmup_epochs ({self.warmup_epochs}) must be smaller than epochs ({self.epochs})")
        if self.learning_rate <= 0 or self.learning_rate_min < 0:
            raise ValueError("learning_rate must be > 0 and learning_rate_min >= 0")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.amp not in AMP_MODES:
            raise ValueError(f"amp must be one of {', '.join(AMP_MODES)}, got {self.amp!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {self.lr_schedule!r}")
        if self.kl_balance_scope not in KL_BALANCE_SCOPES:
            raise ValueError(f"kl_balance_scope must be one of {', '.join(KL_BALANCE_SCOPES)}, "
                             f"got {self.kl_balance_scope!r}")
        if not 0 <= self.temp < float("inf"):
            raise ValueError(f"temp must be >= 0 (0: the prior means), got {self.temp}")
        if self.weight_decay_norm_anneal and (self.weight_decay_norm <= 0 or self.weight_decay_norm_init <= 0):
            raise ValueError("weight_decay_norm_anneal needs weight_decay_norm > 0 and weight_decay_norm_init > 0")

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)


TRAIN_PRESETS: dict[str, dict[str, Any]] = {
    # The official README's training commands (batch size per GPU; their GPU counts: 2, 8, 8,
    # 24, 24, 24).
    "mnist": dict(batch_size=200, epochs=400, weight_decay_norm=1e-2),
    "cifar10": dict(batch_size=32, epochs=400, weight_decay_norm=1e-2),
    "celeba_64": dict(batch_size=16, epochs=90, weight_decay_norm=1e-1),
    "imagenet_32": dict(batch_size=24, epochs=45, warmup_epochs=1, weight_decay_norm=1e-2,
                        weight_decay_norm_anneal=True, weight_decay_norm_init=1.0),
    "celeba_256": dict(batch_size=4, epochs=300, weight_decay_norm=1e-2, weight_decay_norm_anneal=True,
                       weight_decay_norm_init=1.0),
    "ffhq": dict(batch_size=4, epochs=200, weight_decay_norm=1e-1, weight_decay_norm_anneal=True,
                 weight_decay_norm_init=1.0, learning_rate=8e-3),
    # LSUN Church 64 (NVlabs/VAEBM's NVAE command, 8 GPUs) and OMNIGLOT (NVlabs/LSGM's NVAE stage, 2 GPUs).
    "lsun_church_64": dict(batch_size=32, epochs=60, warmup_epochs=1, weight_decay_norm=1e-1),
    "omniglot": dict(batch_size=64, epochs=200, weight_decay_norm=1e-2, kl_anneal_portion=1.0),
    # The embedded demo: sized to train, evaluate and sample in a few minutes on 2 CPU cores
    # (23 steps of 64 images per epoch; the digits live in memory, so no loader workers).
    "digits": dict(batch_size=64, epochs=40, warmup_epochs=2, weight_decay_norm=1e-2, num_workers=0, log_every=23,
                   eval_every=5, num_iw_samples=100, eval_untrained=True, num_samples=64),
    # Tests and quick checks.
    "tiny_mnist": dict(batch_size=8, epochs=2, warmup_epochs=1, weight_decay_norm=1e-2, num_workers=0,
                       log_every=10, num_iw_samples=4, num_samples=16),
    "tiny_cifar10": dict(batch_size=8, epochs=2, warmup_epochs=1, weight_decay_norm=1e-2, num_workers=0,
                         log_every=10, num_iw_samples=4, num_samples=16),
}


def train_preset(name: str) -> dict[str, Any]:
    """The training options of preset ``name`` (empty for a preset without a training recipe)."""
    return dict(TRAIN_PRESETS.get(name, {}))
