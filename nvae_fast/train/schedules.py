"""The schedules of the official NVAE recipe, as pure functions of the training position.

* learning rate: linear warm-up over ``warmup_epochs``, then cosine annealing per epoch down to
  ``learning_rate_min`` at the last epoch (``WarmupCosineLR``, stepped once per iteration), either
  as the official ``train.py`` produces it (``"official"``) or as the textbook formula
  (``"textbook"``), see ``learning_rate``;
* KL coefficient: 0 (held at ``kl_const_coeff``) for the first ``kl_const_portion`` of the steps,
  then a linear ramp to 1 over ``kl_anneal_portion`` of the steps (``kl_coefficient``);
* spectral-regularisation λ: constant ``weight_decay_norm``, or a log-linear interpolation from
  ``weight_decay_norm_init`` to it that follows the KL coefficient (``spectral_coefficient``).

Every value depends only on the global step, so a resumed run sees exactly the same schedule.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch.optim.lr_scheduler import LRScheduler


def kl_coefficient(step: int, total_steps: int, anneal_portion: float, const_portion: float,
                   const_coeff: float) -> float:
    """KL warm-up coefficient in [const_coeff, 1] at ``step`` of ``total_steps``.

    Held at ``const_coeff`` for the first ``const_portion * total_steps`` steps, then rises
    linearly and reaches 1 after another ``anneal_portion * total_steps`` steps.
    """
    const_steps = const_portion * total_steps
    anneal_steps = anneal_portion * total_steps
    if anneal_steps <= 0:
        ramp = 1.0 if step >= const_steps else 0.0
    else:
        ramp = min((step - const_steps) / anneal_steps, 1.0)
    return max(ramp, const_coeff)


def spectral_coefficient(kl_coeff: float, weight_decay_norm: float, weight_decay_norm_init: float,
                         anneal: bool) -> float:
    """λ of the spectral and BN-scale regularisers.

    Without annealing it is ``weight_decay_norm``; with it, log λ moves linearly from
    log ``weight_decay_norm_init`` (kl_coeff = 0) to log ``weight_decay_norm`` (kl_coeff = 1).
    """
    if not anneal:
        return weight_decay_norm
    if weight_decay_norm_init <= 0 or weight_decay_norm <= 0:
        raise ValueError("annealing the spectral coefficient needs weight_decay_norm_init > 0 and "
                         f"weight_decay_norm > 0, got {weight_decay_norm_init} and {weight_decay_norm}")
    log_lambda = (1.0 - kl_coeff) * math.log(weight_decay_norm_init) + kl_coeff * math.log(weight_decay_norm)
    return math.exp(log_lambda)


LR_SCHEDULES = ("official", "textbook")


def learning_rate(step: int, steps_per_epoch: int, epochs: int, warmup_epochs: int, lr: float,
                  lr_min: float, schedule: str = "official") -> float:
    """Learning rate at global ``step`` (0-based).

    During the first W = ``steps_per_epoch * warmup_epochs`` steps it rises linearly from 0
    (lr·step/W). From then on it follows a cosine per epoch down to ``lr_min`` at the last epoch:

    * ``"textbook"``: ``lr_min + (lr - lr_min)(1 + cos(π k / T)) / 2`` at the k-th epoch after
      warm-up, T = epochs - warmup_epochs - 1.
    * ``"official"``: what the official ``train.py`` produces. Its warm-up writes lr·step/W into
      the optimizer and never resets it, and its per-epoch ``CosineAnnealingLR`` (stepped from
      epoch ``warmup_epochs + 1`` on) scales the value it finds there recursively. The cosine thus
      starts from the last warm-up value lr·(W-1)/W instead of lr: the textbook curve with lr
      replaced by lr·(W-1)/W, for the whole run (1.03e-3 relative for the CIFAR-10 recipe, 25%
      for a 4-step warm-up). Computed with the scheduler's own recursion, so the values are the
      official ones to the last bit.
    """
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"schedule must be one of {', '.join(LR_SCHEDULES)}, got {schedule!r}")
    warmup_steps = steps_per_epoch * warmup_epochs
    if step < warmup_steps:
        return lr * float(step) / warmup_steps
    epoch = min(step // steps_per_epoch, epochs - 1)
    span = epochs - warmup_epochs - 1
    if schedule == "textbook":
        t = min(max(epoch - warmup_epochs, 0), max(span, 1))
        return lr_min + (lr - lr_min) * 0.5 * (1.0 + math.cos(math.pi * t / max(span, 1)))
    value = lr * float(warmup_steps - 1) / warmup_steps if warmup_steps > 0 else lr
    t_max = float(span)
    for k in range(1, epoch - warmup_epochs + 1):
        value = ((1 + math.cos(math.pi * k / t_max)) / (1 + math.cos(math.pi * (k - 1) / t_max))
                 * (value - lr_min) + lr_min)
    return value


def official_scheduler_state(steps_per_epoch: int, epochs: int, warmup_epochs: int, lr: float, lr_min: float,
                             epochs_done: int) -> tuple[dict[str, Any], float]:
    """What the official ``train.py`` holds after ``epochs_done`` epochs: the state_dict of its
    ``CosineAnnealingLR`` (stepped at the start of every epoch after ``warmup_epochs``) and the
    learning rate its optimizer then has (the official sequence of ``learning_rate``). A checkpoint
    carrying them continues with ``train.py --cont_training`` as the official run would."""
    opt = torch.optim.Adamax([torch.nn.Parameter(torch.zeros(0))], lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, float(epochs - warmup_epochs - 1), eta_min=lr_min)
    warmup_steps = steps_per_epoch * warmup_epochs
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)`")
        for epoch in range(epochs_done):
            if epoch > warmup_epochs:
                sched.step()
            last = (epoch + 1) * steps_per_epoch - 1
            if last < warmup_steps:  # the warm-up writes its value into the optimizer
                opt.param_groups[0]["lr"] = learning_rate(last, steps_per_epoch, epochs, warmup_epochs, lr, lr_min)
    return sched.state_dict(), opt.param_groups[0]["lr"]


class WarmupCosineLR(LRScheduler):
    """``learning_rate`` (``schedule``) as a PyTorch scheduler, stepped once per iteration (after
    optimizer.step).

    Its state (``last_epoch`` = iterations done) goes into checkpoints with ``state_dict()``.
    Each param group anneals from its own initial learning rate to ``lr_min``.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, steps_per_epoch: int, epochs: int, warmup_epochs: int,
                 lr_min: float, last_epoch: int = -1, schedule: str = "official") -> None:
        if steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
        if epochs < 1 or warmup_epochs < 0:
            raise ValueError(f"need epochs >= 1 and warmup_epochs >= 0, got {epochs} and {warmup_epochs}")
        self.steps_per_epoch = steps_per_epoch
        self.epochs = epochs
        self.warmup_epochs = warmup_epochs
        self.lr_min = lr_min
        if schedule not in LR_SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(LR_SCHEDULES)}, got {schedule!r}")
        self.schedule = schedule
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        step = self.last_epoch
        return [learning_rate(step, self.steps_per_epoch, self.epochs, self.warmup_epochs, base, self.lr_min,
                              self.schedule) for base in self.base_lrs]
