"""One NVAE training step and the state around it (optimizer, schedules, scaler, EMA, guard).

``Trainer.train_step(x)`` does what one iteration of the official ``train.py`` does - the
negative ELBO with the warmed-up, balanced KL, plus λ·(spectral norm + BN scale) - and adds the
stability guard: a step whose loss or gradient is NaN/Inf on any rank is skipped (no optimizer
step, BatchNorm statistics and other buffers restored, EMA untouched) and counted;
``max_bad_steps`` bad steps in a row raise ``TrainingDiverged``.

The step never makes the host wait for the device: the guard decides on the device (a flag that
cancels the optimizer and EMA updates and selects the buffers' snapshot), and its counters, like
the step's statistics, are read only on the steps that log (every ``log_every``), once. So the CPU
runs ahead of the GPU, and the whole step can be captured as a CUDA graph (``cuda_graphs``).
``compile`` runs the forward and the losses through ``torch.compile`` (the custom ops stay
opaque, inductor fuses the rest; the backward is compiled with them).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel

from nvae_fast.distributions import reconstruction_loss
from nvae_fast.train.errors import InputError, TrainingDiverged
from nvae_fast.train.loaders import quantize
from nvae_fast.train.losses import balanced_kl, kl_balance_alphas
from nvae_fast.train.optim import GuardedAdamax, update_ema
from nvae_fast.train.recipe import TrainConfig
from nvae_fast.train.runtime import Runtime, all_ranks_all, all_reduce_mean, wrap_model
from nvae_fast.train.schedules import WarmupCosineLR, kl_coefficient, learning_rate, spectral_coefficient

ACTIVE_UNIT_NATS = 0.1  # a latent channel whose mean KL exceeds this is "active" (official threshold)
CUDA_GRAPH_WARMUP_STEPS = 3  # eager steps (on a side stream) before the step is captured


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
    """What one step computed, as device tensors: reading one makes the host wait for the step,
    so the training loop reads them only on the steps that log (:meth:`read`, one transfer).

    Scalars are this rank's batch means; ``ok`` is global (every rank skipped, or none).
    ``kl_coeff``, ``norm_coeff`` and ``lr`` are the schedules' host values.
    """

    ok: Tensor              # 0-d bool: the update was applied
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
    logged: dict[str, float] | None = field(default=None)   # host values, on log steps (global means)

    _SCALARS = ("loss", "nelbo", "recon", "kl", "grad_norm", "norm_loss", "bn_loss")

    def read(self, rt: Runtime, guard: BadStepGuard) -> dict[str, float]:
        """Every value as a Python number, averaged over the ranks (one all-reduce, one transfer);
        also refreshes ``guard``'s host counters. Keys: the scalar fields, ``ok``,
        ``kl_per_group``, ``kl_weights``, ``active_units`` (lists) and ``consecutive_bad``,
        ``total_bad``."""
        G = self.kl_per_group.numel()
        mean = torch.cat([torch.stack([getattr(self, name).float() for name in self._SCALARS]),
                          self.kl_per_group.float(), self.active_units.float()])
        mean = all_reduce_mean(mean, rt)
        local = torch.cat([self.kl_weights.float(), self.ok.float().reshape(1), guard.counters().float()])
        values = torch.cat([mean, local]).tolist()
        out: dict[str, float] = dict(zip(self._SCALARS, values))
        i = len(self._SCALARS)
        out["kl_per_group"], out["active_units"] = values[i:i + G], values[i + G:i + 2 * G]
        i += 2 * G
        out["kl_weights"], out["ok"] = values[i:i + G], values[i + G]
        guard.observe(int(values[i + G + 1]), int(values[i + G + 2]))
        out["consecutive_bad"], out["total_bad"] = guard.consecutive, guard.total
        return out


class BadStepGuard:
    """Counts NaN/Inf steps on the device; :meth:`check` reads the counters (a host
    synchronisation) and raises ``TrainingDiverged`` once ``max_consecutive`` steps in a row
    were bad."""

    def __init__(self, max_consecutive: int, device: torch.device | str = "cpu") -> None:
        self.max_consecutive = max_consecutive
        self._consecutive = torch.zeros((), dtype=torch.int64, device=device)
        self._total = torch.zeros((), dtype=torch.int64, device=device)
        self.consecutive = 0   # host values as of the last read
        self.total = 0
        self.last_step = 0

    def record(self, ok: Tensor, step: int) -> None:
        """Counts one step (device-side; ``ok`` is a 0-d bool tensor)."""
        bad = torch.logical_not(ok)
        self._consecutive.add_(1).mul_(bad)
        self._total.add_(bad)
        self.last_step = step

    def counters(self) -> Tensor:
        """(consecutive, total) bad steps as a device tensor."""
        return torch.stack([self._consecutive, self._total])

    def observe(self, consecutive: int, total: int) -> None:
        self.consecutive, self.total = consecutive, total

    def check(self) -> None:
        """Reads the counters; raises ``TrainingDiverged`` after too many bad steps in a row."""
        self.observe(*self.counters().tolist())
        self.raise_if_diverged()

    def raise_if_diverged(self) -> None:
        if self.consecutive >= self.max_consecutive:
            raise TrainingDiverged(f"{self.consecutive} consecutive steps up to step {self.last_step} had a NaN/Inf "
                                   "loss or gradient; training stopped (lower --learning_rate, raise "
                                   "--weight_decay_norm, or use --amp bf16/off)")

    def state_dict(self) -> dict[str, int]:
        self.observe(*self.counters().tolist())
        return {"consecutive": self.consecutive, "total": self.total}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.observe(int(state["consecutive"]), int(state["total"]))
        self._consecutive.fill_(self.consecutive)
        self._total.fill_(self.total)


class BufferSnapshot:
    """The persistent buffers of a model (BatchNorm running statistics and batch counters)
    copied into one flat tensor per dtype before a step, and put back after it when the step was
    bad: a concatenation per dtype to take, a concatenation, a select and a multi-tensor copy per
    dtype to restore, whatever the number of buffers."""

    def __init__(self, model: nn.Module) -> None:
        non_persistent = {f"{name}.{b}" if name else b for name, module in model.named_modules()
                          for b in module._non_persistent_buffers_set}
        groups: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
        for name, buf in model.named_buffers():
            if name not in non_persistent:
                groups.setdefault((buf.device, buf.dtype), []).append(buf)
        self.groups = list(groups.values())

    def take(self) -> list[Tensor]:
        with torch.no_grad():
            return [torch.cat([b.reshape(-1) for b in group]) for group in self.groups]

    def restore_unless(self, ok: Tensor, saved: list[Tensor]) -> None:
        """Where ``ok`` is false, every buffer gets its saved value back (device-side select)."""
        with torch.no_grad():
            for group, before in zip(self.groups, saved):
                now = torch.cat([b.reshape(-1) for b in group])
                chosen = torch.where(ok, now, before)
                torch._foreach_copy_(group, [piece.view_as(b) for piece, b in
                                             zip(chosen.split([b.numel() for b in group]), group)])


class Trainer:
    """Owns the model on its device (DDP-wrapped with several ranks) and the optimisation state.

    Args:
        model: an ``nvae_fast.NVAE``; moved to ``rt.device``.
        cfg: the training options.
        rt: the runtime (device, ranks).
        steps_per_epoch: optimizer steps per epoch (per rank), for the schedules.
        compile: run the forward and the losses under ``torch.compile`` (backward compiled too).
        cuda_graphs: after ``CUDA_GRAPH_WARMUP_STEPS`` eager steps, capture the whole step
            (forward, backward, guard, optimizer, EMA) as a CUDA graph and replay it (CUDA, one
            process, no fp16 gradient scaler).
    """

    def __init__(self, model: nn.Module, cfg: TrainConfig, rt: Runtime, steps_per_epoch: int, *,
                 compile: bool = False, cuda_graphs: bool = False) -> None:
        self.cfg, self.rt = cfg, rt
        self.model = model.to(rt.device)
        self.net = wrap_model(self.model, rt)
        self.steps_per_epoch = steps_per_epoch
        self.total_steps = steps_per_epoch * cfg.epochs
        self.dtype = amp_dtype(cfg.amp, rt.device)
        if cuda_graphs:
            _check_cuda_graphs(rt, self.dtype)
        # A tensor learning rate keeps a captured step following the schedule (filled in place).
        lr = torch.tensor(cfg.learning_rate, device=rt.device) if cuda_graphs else cfg.learning_rate
        self.optimizer = GuardedAdamax(self.model.parameters(), lr=lr, weight_decay=cfg.weight_decay, eps=1e-3)
        self.scheduler = WarmupCosineLR(self.optimizer, steps_per_epoch, cfg.epochs, cfg.warmup_epochs,
                                        cfg.learning_rate_min, schedule=cfg.lr_schedule)
        # The official recipe's fp16 scaler starts at 2**10.
        self.scaler = torch.amp.GradScaler(rt.device.type, init_scale=2.0 ** 10,
                                           enabled=self.dtype == torch.float16)
        self.ema = (AveragedModel(self.model, device=rt.device, use_buffers=False) if cfg.ema_decay > 0 else None)
        self.alphas = kl_balance_alphas(self.model.config.groups_per_scale).to(rt.device)
        self.guard = BadStepGuard(cfg.max_bad_steps, rt.device)
        self.buffers = BufferSnapshot(self.model)
        self.compile, self.cuda_graphs = compile, cuda_graphs
        self._losses: Callable = torch.compile(self._forward_losses) if compile else self._forward_losses
        self._coeffs = torch.zeros(2, device=rt.device)   # KL and λ coefficients, for compiled/captured steps
        self._graph: _CapturedStep | None = None
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

    def is_log_step(self, step: int | None = None) -> bool:
        """Whether global step ``step`` (default: the next one) logs, i.e. reads its values."""
        return ((self.step if step is None else step) + 1) % self.cfg.log_every == 0

    def train_step(self, x: Tensor, deterministic: bool = False) -> StepStats:
        """One optimisation step on this rank's batch ``x`` (N, C, H, W) in [0, 1].

        ``deterministic`` uses the posterior means instead of samples (the model's deterministic
        forward): the step is then a function of the batch and the state alone, for checks.
        On a log step (``cfg.log_every``) the returned stats carry their host values
        (``stats.logged``) and the guard may raise ``TrainingDiverged``; other steps read nothing.
        """
        cfg = self.cfg
        x = quantize(x.to(self.rt.device, non_blocking=True), self.model.config.num_x_bits)
        kl_coeff = kl_coefficient(self.step, self.total_steps, cfg.kl_anneal_portion, cfg.kl_const_portion,
                                  cfg.kl_const_coeff)
        norm_coeff = spectral_coefficient(kl_coeff, cfg.weight_decay_norm, cfg.weight_decay_norm_init,
                                          cfg.weight_decay_norm_anneal)
        lr = self.optimizer.param_groups[0]["lr"]
        if isinstance(lr, Tensor):   # the schedule's value, without reading the tensor
            lr = learning_rate(self.step, self.steps_per_epoch, cfg.epochs, cfg.warmup_epochs, cfg.learning_rate,
                               cfg.learning_rate_min, cfg.lr_schedule)
        self.last_lr, self.last_kl_coeff = lr, kl_coeff
        if self.compile or self.cuda_graphs:
            # Device tensors, so that the schedules' values neither recompile nor recapture the step.
            self._coeffs[0].fill_(kl_coeff)
            self._coeffs[1].fill_(norm_coeff)
            coeffs = (self._coeffs[0], self._coeffs[1])
        else:
            coeffs = (kl_coeff, norm_coeff)
        if self.cuda_graphs:
            if self._graph is None or self._graph.deterministic != deterministic:
                self._graph = _CapturedStep(self, deterministic)
            values = self._graph.run(x, *coeffs)
        else:
            values = self._device_step(x, *coeffs, deterministic)
        with warnings.catch_warnings():
            # The schedule follows the global step, skipped steps included; PyTorch warns when the
            # first optimizer step was one of them.
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)`")
            self.scheduler.step()
        self.step += 1
        self.epoch_step += 1
        stats = StepStats(kl_coeff=kl_coeff, norm_coeff=norm_coeff, lr=lr, **values)
        if (self.step % cfg.log_every) == 0:
            stats.logged = stats.read(self.rt, self.guard)
            self.guard.raise_if_diverged()
        return stats

    def _forward_losses(self, x: Tensor, kl_coeff: float | Tensor, norm_coeff: float | Tensor,
                        deterministic: bool) -> dict[str, Tensor]:
        model = self.model
        with autocast(self.rt.device, self.dtype):
            logits, log_q, log_p, kl_all, kl_diag = self.net(x, deterministic=deterministic)
            recon = reconstruction_loss(model.decoder_output(logits), x, model.config.crop_output)
            global_balance = self.rt.distributed and self.cfg.kl_balance_scope == "global"
            kl, kl_weights, kl_per_group = balanced_kl(kl_all, kl_coeff, self.alphas,
                                                       self._mean_over_batch if global_balance else None)
            nelbo = (recon + kl).mean()
            norm_loss = model.spectral_norm_parallel()
            bn_loss = model.batchnorm_loss()
            loss = nelbo + norm_coeff * (norm_loss + bn_loss)
        return {"loss": loss, "nelbo": nelbo, "recon": recon, "kl_per_group": kl_per_group,
                "kl_weights": kl_weights, "kl_diag": torch.stack(kl_diag), "norm_loss": norm_loss, "bn_loss": bn_loss}

    def _device_step(self, x: Tensor, kl_coeff: float | Tensor, norm_coeff: float | Tensor,
                     deterministic: bool) -> dict[str, Tensor]:
        """Forward, backward, guard and update, all decided on the device (no host read)."""
        model = self.model
        saved = self.buffers.take()
        if not model.training:
            model.train()
        self.optimizer.zero_grad(set_to_none=True)
        out = self._losses(x, kl_coeff, norm_coeff, deterministic)
        loss = out["loss"]
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        grad_norm = torch.nn.utils.get_total_norm(grads, foreach=True)
        ok = all_ranks_all(torch.isfinite(loss.detach()) & torch.isfinite(grad_norm), self.rt)
        self.optimizer.step(ok=ok)
        if self.ema is not None:
            update_ema(self.ema, model, self.cfg.ema_decay, ok)
        self.buffers.restore_unless(ok, saved)
        self.scaler.update()
        self.guard.record(ok, self.step)
        with torch.no_grad():
            active = (out["kl_diag"].detach().float() > ACTIVE_UNIT_NATS).sum(dim=1)
        return {"ok": ok, "loss": loss.detach(), "nelbo": out["nelbo"].detach(), "recon": out["recon"].detach().mean(),
                "kl": out["kl_per_group"].sum(), "norm_loss": torch.as_tensor(out["norm_loss"]).detach(),
                "bn_loss": torch.as_tensor(out["bn_loss"]).detach(), "grad_norm": grad_norm.detach(),
                "kl_per_group": out["kl_per_group"], "kl_weights": out["kl_weights"].detach(), "active_units": active}

    def _mean_over_batch(self, t: Tensor) -> Tensor:
        return all_reduce_mean(t, self.rt)

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
        self._graph = None


def _check_cuda_graphs(rt: Runtime, dtype: torch.dtype | None) -> None:
    if rt.device.type != "cuda":
        raise InputError(f"--cuda_graphs needs a CUDA device, got {rt.device}")
    if rt.distributed:
        raise InputError("--cuda_graphs runs one process; drop it under torchrun (several ranks)")
    if dtype == torch.float16:
        raise InputError("--cuda_graphs does not capture fp16's gradient scaler; use --amp bf16 or off")


class _CapturedStep:
    """The training step as a CUDA graph: ``CUDA_GRAPH_WARMUP_STEPS`` eager steps on a side
    stream (Triton kernels compile and every state tensor exists), then one capture, then a
    replay per step. The batch enters through a static tensor, the schedules' coefficients
    through the trainer's coefficient tensor and the learning rate through the optimizer's
    tensor, which the scheduler fills in place."""

    def __init__(self, trainer: Trainer, deterministic: bool) -> None:
        self.trainer, self.deterministic = trainer, deterministic
        self.graph: torch.cuda.CUDAGraph | None = None
        self.warmup_left = CUDA_GRAPH_WARMUP_STEPS
        self.x: Tensor | None = None
        self.outputs: dict[str, Tensor] | None = None

    def run(self, x: Tensor, kl_coeff: Tensor, norm_coeff: Tensor) -> dict[str, Tensor]:
        if self.x is None or self.x.shape != x.shape or self.x.dtype != x.dtype:
            if self.graph is not None:
                raise InputError(f"--cuda_graphs replays a step captured for batches of shape {tuple(self.x.shape)}; "
                                 f"got {tuple(x.shape)}")
            self.x = torch.empty_like(x)
        self.x.copy_(x)
        step = self.trainer._device_step
        if self.graph is None and self.warmup_left > 0:
            self.warmup_left -= 1
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                out = step(self.x, kl_coeff, norm_coeff, self.deterministic)
            torch.cuda.current_stream().wait_stream(stream)
            return out
        if self.graph is None:
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.outputs = step(self.x, kl_coeff, norm_coeff, self.deterministic)
        self.graph.replay()
        # The graph's outputs are overwritten by the next replay.
        return {k: v.clone() for k, v in self.outputs.items()}
