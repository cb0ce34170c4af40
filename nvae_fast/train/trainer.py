"""One NVAE training step and the state around it (optimizer, schedules, scaler, EMA, guard).

``Trainer.train_step(x)`` does what one iteration of the official ``train.py`` does - the
negative ELBO with the warmed-up, balanced KL, plus λ·(spectral norm + BN scale) - and adds the
stability guard: a step whose loss or gradient is NaN/Inf on any rank is skipped (no optimizer
step, BatchNorm statistics and other buffers restored, EMA untouched) and counted;
``max_bad_steps`` bad steps in a row raise ``TrainingDiverged``.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from nvae_fast.train.errors import TrainingDiverged
from nvae_fast.train.loaders import quantize
from nvae_fast.distributions import reconstruction_loss
from nvae_fast.train.losses import balanced_kl, kl_balance_alphas
from nvae_fast.train.recipe import TrainConfig
from nvae_fast.train.runtime import Runtime, all_ranks_true, all_reduce_mean, wrap_model
from nvae_fast.train.schedules import WarmupCosineLR, kl_coefficient, spectral_coefficient

ACTIVE_UNIT_NATS = 0.1  # a latent channel whose mean KL exceeds this is "active" (official threshold)


def amp_dtype(mode: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``--amp mode`` on ``device`` (None: full precision)."""
    if mode == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[mode]


def autocast(device: torch.device, dtype: torch.dtype | None):
    """An autocast context for ``dtype`` on ``device`` (a no-op context for full precision)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


@dataclass
class StepStats:
    """What one step computed. Scalars are this rank's batch means; ``ok`` is global."""

    ok: bool
    loss: Tensor            # the minimised objective (NELBO with warm-up + regularisers)
    nelbo: Tensor           # reconstruction + balanced, warmed-up KL
    recon: Tensor
    kl: Tensor              # the plain KL (no warm-up, no balancing)
    norm_loss: Tensor
    bn_loss: Tensor
    grad_norm: Tensor
    kl_coeff: float
    norm_coeff: float
    lr: float
    kl_per_group: Tensor    # (G,)
    kl_weights: Tensor      # (G,) balancing weights γ
    active_units: Tensor    # (G,) latent channels with mean KL > 0.1 nats


class BadStepGuard:
    """Counts NaN/Inf steps; ``max_consecutive`` in a row raise ``TrainingDiverged``."""

    def __init__(self, max_consecutive: int) -> None:
        self.max_consecutive = max_consecutive
        self.consecutive = 0
        self.total = 0

    def record(self, ok: bool, step: int) -> None:
        if ok:
            self.consecutive = 0
            return
        self.consecutive += 1
        self.total += 1
        if self.consecutive >= self.max_consecutive:
            raise TrainingDiverged(f"{self.consecutive} consecutive steps up to step {step} had a NaN/Inf loss or "
                                   "gradient; training stopped (lower --learning_rate, raise --weight_decay_norm, "
                                   "or use --amp bf16/off)")

    def state_dict(self) -> dict[str, int]:
        return {"consecutive": self.consecutive, "total": self.total}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.consecutive, self.total = int(state["consecutive"]), int(state["total"])


class Trainer:
    """Owns the model on its device (DDP-wrapped with several ranks) and the optimisation state.

    Args:
        model: an ``nvae_fast.NVAE``; moved to ``rt.device``.
        cfg: the training options.
        rt: the runtime (device, ranks).
        steps_per_epoch: optimizer steps per epoch (per rank), for the schedules.
    """

    def __init__(self, model: nn.Module, cfg: TrainConfig, rt: Runtime, steps_per_epoch: int) -> None:
        self.cfg, self.rt = cfg, rt
        self.model = model.to(rt.device)
        self.net = wrap_model(self.model, rt)
        self.steps_per_epoch = steps_per_epoch
        self.total_steps = steps_per_epoch * cfg.epochs
        self.optimizer = torch.optim.Adamax(self.model.parameters(), lr=cfg.learning_rate,
                                            weight_decay=cfg.weight_decay, eps=1e-3, foreach=True)
        self.scheduler = WarmupCosineLR(self.optimizer, steps_per_epoch, cfg.epochs, cfg.warmup_epochs,
                                        cfg.learning_rate_min, schedule=cfg.lr_schedule)
        self.dtype = amp_dtype(cfg.amp, rt.device)
        # The official recipe's fp16 scaler starts at 2**10.
        self.scaler = torch.amp.GradScaler(rt.device.type, init_scale=2.0 ** 10,
                                           enabled=self.dtype == torch.float16)
        self.ema = (AveragedModel(self.model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay), use_buffers=False)
                    if cfg.ema_decay > 0 else None)
        self.alphas = kl_balance_alphas(self.model.config.groups_per_scale).to(rt.device)
        self.guard = BadStepGuard(cfg.max_bad_steps)
        # Nothing here draws random numbers: the spectral regulariser's start vectors are drawn by
        # its first call, in step 0 after the forward's noise, as in the official train.py.
        self.last_lr = cfg.learning_rate
        self.last_kl_coeff = 0.0
        self.step = 0          # global step: optimizer steps attempted (skipped ones included)
        self.epoch = 0
        self.epoch_step = 0    # steps done in the current epoch

    @property
    def eval_model(self) -> nn.Module:
        """The weights to evaluate and sample with: the EMA when enabled."""
        return self.ema.module if self.ema is not None else self.model

    def _mean_over_batch(self, t: Tensor) -> Tensor:
        return all_reduce_mean(t, self.rt)

    def train_step(self, x: Tensor, deterministic: bool = False) -> StepStats:
        """One optimisation step on this rank's batch ``x`` (N, C, H, W) in [0, 1].

        ``deterministic`` uses the posterior means instead of samples (the model's deterministic
        forward): the step is then a function of the batch and the state alone, for checks.
        """
        cfg, model = self.cfg, self.model
        x = quantize(x.to(self.rt.device, non_blocking=True), model.config.num_x_bits)
        kl_coeff = kl_coefficient(self.step, self.total_steps, cfg.kl_anneal_portion, cfg.kl_const_portion,
                                  cfg.kl_const_coeff)
        norm_coeff = spectral_coefficient(kl_coeff, cfg.weight_decay_norm, cfg.weight_decay_norm_init,
                                          cfg.weight_decay_norm_anneal)
        lr = self.last_lr = self.optimizer.param_groups[0]["lr"]
        self.last_kl_coeff = kl_coeff
        buffers = [b.detach().clone() for b in model.buffers()]
        model.train()
        self.optimizer.zero_grad(set_to_none=True)
        with autocast(self.rt.device, self.dtype):
            logits, log_q, log_p, kl_all, kl_diag = self.net(x, deterministic=deterministic)
            recon = reconstruction_loss(model.decoder_output(logits), x, model.config.crop_output)
            global_balance = self.rt.distributed and cfg.kl_balance_scope == "global"
            kl, kl_weights, kl_per_group = balanced_kl(kl_all, kl_coeff, self.alphas,
                                                       self._mean_over_batch if global_balance else None)
            nelbo = (recon + kl).mean()
            norm_loss = model.spectral_norm_parallel()
            bn_loss = model.batchnorm_loss()
            loss = nelbo + norm_coeff * (norm_loss + bn_loss)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        grad_norm = torch.nn.utils.get_total_norm(grads, foreach=True)
        ok = all_ranks_true(bool(torch.isfinite(loss.detach()) & torch.isfinite(grad_norm)), self.rt)
        if ok:
            self.scaler.step(self.optimizer)
            if self.ema is not None:
                self.ema.update_parameters(model)
        else:
            with torch.no_grad():
                for b, saved in zip(model.buffers(), buffers):
                    b.copy_(saved)
        self.scaler.update()
        with warnings.catch_warnings():
            # The schedule follows the global step, skipped steps included; PyTorch warns when the
            # first optimizer step was one of them.
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)`")
            self.scheduler.step()
        self.guard.record(ok, self.step)
        self.step += 1
        self.epoch_step += 1
        with torch.no_grad():
            active = torch.stack([(d.detach().float() > ACTIVE_UNIT_NATS).sum() for d in kl_diag])
        return StepStats(ok=ok, loss=loss.detach(), nelbo=nelbo.detach(), recon=recon.detach().mean(),
                         kl=torch.stack([k.detach() for k in kl_all], 1).sum(1).mean(),
                         norm_loss=torch.as_tensor(norm_loss).detach(), bn_loss=torch.as_tensor(bn_loss).detach(),
                         grad_norm=grad_norm.detach(), kl_coeff=kl_coeff, norm_coeff=norm_coeff, lr=lr,
                         kl_per_group=kl_per_group, kl_weights=kl_weights.detach(), active_units=active)

    def begin_epoch(self) -> None:
        """Moves to the next epoch once the current one is complete."""
        if self.epoch_step >= self.steps_per_epoch:
            self.epoch += 1
            self.epoch_step = 0

    def state_dict(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "guard": self.guard.state_dict(),
            "spectral": self.model.spectral_state(),
            "step": self.step,
            "epoch": self.epoch,
            "epoch_step": self.epoch_step,
        }

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None and state.get("ema") is not None:
            self.ema.load_state_dict(state["ema"])
        self.guard.load_state_dict(state["guard"])
        self.model.load_spectral_state(state.get("spectral", []))
        self.step, self.epoch, self.epoch_step = int(state["step"]), int(state["epoch"]), int(state["epoch_step"])


