"""The training run: data, epochs, evaluation, logs, checkpoints, final test and samples.

``run_training`` is what ``nvae-fast train`` calls. Files in ``run_dir`` (written by rank 0):
``checkpoint.pt`` (the whole training state, after every epoch and every ``checkpoint_every``
steps), ``log.txt``, TensorBoard event files, ``final_eval.json``, ``samples.png`` and
``samples.npz``, and on request ``checkpoint_official.pt`` and ``model.safetensors``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from nvae_fast.compat.loading import first_non_finite
from nvae_fast.train import checkpoint as ckpt_io
from nvae_fast.train import threads
from nvae_fast.train.datasets import build_datasets, detect_format
from nvae_fast.train.errors import InputError, MissingPathError, TrainingDiverged
from nvae_fast.train.evaluate import EvalResult, evaluate
from nvae_fast.train.images import tile
from nvae_fast.train.loaders import make_loader
from nvae_fast.train.monitor import Monitor
from nvae_fast.train.outputs import check_writable_dir, remove_stale_temporaries, write_json
from nvae_fast.train.recipe import TrainConfig
from nvae_fast.train.runtime import Runtime, all_reduce_mean, gather_objects
from nvae_fast.train.sample import decoded_images, generate, nonfinite_message, write_samples
from nvae_fast.train.schedules import WarmupCosineLR
from nvae_fast.train.trainer import StepStats, Trainer

CHECKPOINT_NAME = "checkpoint.pt"
# Files that hold what a run produced: a new run never replaces them unless asked to (overwrite).
RESULT_FILES = (CHECKPOINT_NAME, "final_eval.json", "checkpoint_official.pt", "model.safetensors")
# Everything a run writes, removed before an overwriting run starts (with the TensorBoard events).
RUN_FILES = (*RESULT_FILES, "samples.png", "samples.npz", "log.txt")


@dataclass
class TrainResult:
    """What a run did: per-step global losses of the steps it ran (index = global step),
    evaluations, where it wrote, whether it finished."""

    losses: dict[int, float] = field(default_factory=dict)
    untrained: EvalResult | None = None
    final: EvalResult | None = None
    skipped_steps: int = 0
    finished: bool = False
    run_dir: Path | None = None


def _build_model(model_cfg):
    from nvae_fast import NVAE

    return NVAE(model_cfg)


def _loaders(model_cfg, cfg: TrainConfig, rt: Runtime):
    fmt = detect_format(model_cfg.dataset, cfg.data) if cfg.data_format == "auto" else cfg.data_format
    train_set, test_set = build_datasets(fmt, cfg.data, image_size=model_cfg.image_size,
                                         channels=model_cfg.in_channels, seed=cfg.seed, dataset=model_cfg.dataset,
                                         binarize=model_cfg.output_distribution == "bernoulli")
    pin = rt.device.type == "cuda"
    train = make_loader(train_set, cfg.batch_size, train=True, seed=cfg.seed, rank=rt.rank,
                        world_size=rt.world_size, num_workers=cfg.num_workers, pin_memory=pin)
    test = make_loader(test_set, cfg.batch_size, train=False, seed=cfg.seed, rank=rt.rank,
                       world_size=rt.world_size, num_workers=min(cfg.num_workers, 1), pin_memory=pin)
    return fmt, train, test


def run_config(model_cfg, cfg: TrainConfig) -> dict:
    """The plain-data record of a run's configuration stored in checkpoints."""
    return {"model": dataclasses.asdict(model_cfg), "train": dataclasses.asdict(cfg)}


def _check_finite(trainer: Trainer) -> None:
    """Raises ``TrainingDiverged`` if the weights, the EMA or the optimizer state hold NaN/Inf
    (a NaN the step's guard cannot see, say one that reached a BatchNorm's running statistics).
    One device sync; every rank checks (their states are equal), so all stop together."""
    tensors = {**{f"model {k}": v for k, v in trainer.model.state_dict().items()},
               **{f"EMA {k}": v for k, v in (trainer.ema.state_dict() if trainer.ema is not None else {}).items()},
               **{f"optimizer {k}": v for k, v in _optimizer_tensors(trainer.optimizer.state_dict()).items()}}
    bad = first_non_finite(tensors)
    if bad is not None:
        raise TrainingDiverged(f"after step {trainer.step}, {bad[1]} tensor(s) hold NaN/Inf, the first {bad[0]}")


def _save(trainer: Trainer, model_cfg, cfg: TrainConfig, run_dir: Path, rt: Runtime) -> None:
    """Writes the checkpoint, unless the state holds NaN/Inf: then the last good checkpoint stays
    and the run stops (``_check_finite``)."""
    _check_finite(trainer)
    # Every rank's RNG state, so that every rank resumes exactly (a collective: all ranks call it).
    rngs = gather_objects(ckpt_io.rng_states(), rt)
    if rt.is_main:
        state = trainer.state_dict()
        state.update(format=ckpt_io.FORMAT, config=run_config(model_cfg, cfg), rng=rngs,
                     steps_per_epoch=trainer.steps_per_epoch)
        ckpt_io.save_atomic(state, run_dir / CHECKPOINT_NAME)


def _optimizer_tensors(optimizer_state: dict) -> dict[str, torch.Tensor]:
    return {f"{i}.{k}": v for i, per_param in optimizer_state["state"].items() for k, v in per_param.items()
            if isinstance(v, torch.Tensor)}


def _checkpoint_step(path: Path) -> int | None:
    """The global step of the checkpoint at ``path``, or None if there is no readable one."""
    try:
        return int(ckpt_io.load_file(path, mmap=True)["step"])
    except (InputError, KeyError, TypeError, ValueError):
        return None


def _kept_checkpoint(run_dir: Path) -> str:
    path = run_dir / CHECKPOINT_NAME
    step = _checkpoint_step(path)
    return "no checkpoint was written" if step is None else f"the last good checkpoint, {path} (step {step}), is kept"


def check_run_dir(run_dir: str | Path, *, resume: bool, overwrite: bool) -> None:
    """What ``run_training`` checks before any work: ``run_dir`` is (or can be created as) a
    writable directory; a resumed run has its checkpoint there; a new run does not replace the
    results of an earlier one unless ``overwrite``.

    Raises:
        InputError / MissingPathError: with one line naming ``--resume``, ``--save`` and
            ``--overwrite`` where they are the way out.
    """
    run_dir = Path(run_dir)
    if resume and overwrite:
        raise InputError("--resume continues the run in the run directory, --overwrite replaces it: give one")
    check_writable_dir(run_dir, "run directory")
    if resume:
        if not (run_dir / CHECKPOINT_NAME).is_file():
            raise MissingPathError(f"{run_dir / CHECKPOINT_NAME}: checkpoint does not exist, nothing to --resume")
        return
    found = [name for name in RESULT_FILES if (run_dir / name).exists()]
    if found and not overwrite:
        what = found[0]
        step = _checkpoint_step(run_dir / what) if what == CHECKPOINT_NAME else None
        what += f" at step {step}" if step is not None else ""
        raise InputError(f"{run_dir} holds an earlier run ({what}); continue it with --resume, or choose a new --save "
                         "(--overwrite replaces it)")


def _clear_run_dir(run_dir: Path) -> list[str]:
    """Removes what an earlier run wrote in ``run_dir`` (``RUN_FILES``, TensorBoard events and
    stale temporaries); returns the names removed."""
    removed = [p for p in (run_dir / name for name in RUN_FILES) if p.is_file()]
    removed += sorted(run_dir.glob("events.out.tfevents.*"))
    for p in removed:
        p.unlink()
    for name in RESULT_FILES:
        removed += remove_stale_temporaries(run_dir / name)
    return [p.name for p in removed]


def _apply_options(trainer: Trainer, cfg: TrainConfig, state: dict) -> list[str]:
    """After loading a checkpoint: makes the optimizer and the learning-rate schedule follow
    ``cfg`` (a resumed run continues as if it had been started with these options); returns the
    options that differ from the checkpoint's, as ``--name old -> new``.

    The schedules are functions of the global step and the options: the KL warm-up and the
    spectral coefficient read ``cfg`` at every step, the optimizer's weight decay and the
    learning-rate scheduler are rebuilt here at the checkpoint's step.
    """
    recorded = state["config"]["train"]
    steps_per_epoch = state.get("steps_per_epoch", state["scheduler"].get("steps_per_epoch", trainer.steps_per_epoch))
    if steps_per_epoch != trainer.steps_per_epoch:
        raise InputError(f"the data gives {trainer.steps_per_epoch} steps per epoch of {cfg.batch_size} images, the "
                         f"run being resumed had {steps_per_epoch}; resume it with the data it was trained on")
    for group in trainer.optimizer.param_groups:
        group["initial_lr"] = cfg.learning_rate
        group["weight_decay"] = cfg.weight_decay
    # Rebuilt at step - 1: building a scheduler takes one step, to the checkpoint's step.
    trainer.scheduler = WarmupCosineLR(trainer.optimizer, trainer.steps_per_epoch, cfg.epochs, cfg.warmup_epochs,
                                       cfg.learning_rate_min, last_epoch=trainer.step - 1, schedule=cfg.lr_schedule)
    now = dataclasses.asdict(cfg)
    return [f"--{k} {recorded[k]} -> {now[k]}" for k in now if k in recorded and recorded[k] != now[k]]


def _log_step(monitor: Monitor, trainer: Trainer, stats: StepStats) -> None:
    """TensorBoard scalars of a log step, from the values the step read (global means)."""
    v = stats.logged
    values = {"train/loss": v["loss"], "train/nelbo_iter": v["nelbo"], "train/recon_iter": v["recon"],
              "train/kl_iter": v["kl"], "train/lr": stats.lr, "train/norm_loss": v["norm_loss"],
              "train/bn_loss": v["bn_loss"], "train/norm_coeff": stats.norm_coeff, "train/grad_norm": v["grad_norm"],
              "kl_coeff/coeff": stats.kl_coeff, "kl/total_active": sum(v["active_units"]),
              "train/skipped_steps": v["total_bad"]}
    for g, (kl, weight, active) in enumerate(zip(v["kl_per_group"], v["kl_weights"], v["active_units"])):
        values[f"kl_vals/layer_{g}"] = kl
        values[f"kl_coeff/layer_{g}"] = weight
        values[f"kl/active_{g}"] = active
    monitor.scalars(values, trainer.step)


class _EpochLosses:
    """The global loss and the guard's verdict of every step of an epoch, kept on the device and
    read in one transfer (one all-reduce) when the epoch ends or the run stops."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.steps: list[int] = []
        self.losses: list[torch.Tensor] = []
        self.oks: list[torch.Tensor] = []

    def add(self, step: int, stats: StepStats) -> None:
        self.steps.append(step)
        self.losses.append(stats.loss.float())
        self.oks.append(stats.ok)

    def read(self) -> tuple[dict[int, float], float]:
        """({step: global loss}, mean global loss over the good steps)."""
        if not self.steps:
            return {}, 0.0
        losses = all_reduce_mean(torch.stack(self.losses), self.rt)
        values = torch.cat([losses, torch.stack(self.oks).float()]).tolist()
        n = len(self.steps)
        good = [loss for loss, ok in zip(values[:n], values[n:]) if ok]
        return dict(zip(self.steps, values[:n])), sum(good) / max(len(good), 1)


GRID_TEMPERATURES = (0.7, 0.8, 0.9, 1.0)  # the official train.py's sample grids after an epoch


def _forked_rng(trainer: Trainer, isolate: bool = True):
    """A copy of the random state for work that must not change the training's random stream
    (a no-op context when ``isolate`` is False)."""
    if not isolate:
        return contextlib.nullcontext()
    return torch.random.fork_rng(devices=[trainer.rt.device] if trainer.rt.device.type == "cuda" else [])


def _draw_loader_seed() -> None:
    # The official DataLoader draws its workers' base seed (one int64) from the global generator
    # each time an epoch's iterator is made; nvae_fast's loaders use a generator of their own, so
    # the draw is made here to keep the official random stream.
    torch.empty((), dtype=torch.int64).random_()


OFFICIAL_RECONSTRUCTION_EVERY = 1000


def _draw_reconstruction_noise(trainer: Trainer, batch_size: int) -> None:
    # Every 1000 steps the official train.py samples the step's output distribution for a
    # TensorBoard reconstruction (a Bernoulli output shows its mean: nothing drawn). nvae_fast logs
    # reconstructions at evaluations instead; it draws the same numbers here, from an output
    # distribution of the same shape, so that the random stream stays the official one.
    c = trainer.model.config
    if c.output_distribution == "bernoulli":
        return
    logits = torch.zeros(batch_size, c.output_channels, c.image_size, c.image_size, device=trainer.rt.device)
    trainer.model.decoder_output(logits).sample()


def _sample_grids(monitor: Monitor, trainer: Trainer, step: int) -> None:
    """16 prior samples at each of ``GRID_TEMPERATURES``, decoded at that temperature (on every
    rank, as the official code, so that every rank consumes the same random numbers)."""
    model = trainer.eval_model.eval()
    for t in GRID_TEMPERATURES:
        monitor.image(f"generated_{t:.1f}", tile(generate(model, 16, t, amp=trainer.dtype), 4), step)


def _log_reconstructions(monitor: Monitor, trainer: Trainer, x: torch.Tensor, step: int) -> None:
    model = trainer.eval_model.eval()
    with torch.no_grad(), _forked_rng(trainer):
        n = min(len(x), 16)
        x = x[:n].to(trainer.rt.device)
        logits = model(x)[0]
        recon = decoded_images(model.decoder_output(logits.float())).float()
        monitor.image("reconstruction", torch.cat([tile(x.float().cpu(), 4), tile(recon.cpu(), 4)], dim=2), step)


def _evaluate(trainer: Trainer, loader, monitor: Monitor, num_iw_samples: int, desc: str,
              isolate: bool = True) -> EvalResult:
    """The test NELBO and log-likelihood; with ``isolate`` from a copy of the random state (the
    training's random stream is left as it was), else from the training's stream as the
    official periodic validation."""
    with _forked_rng(trainer, isolate):
        _draw_loader_seed()
        return evaluate(trainer.eval_model, loader, trainer.rt, num_iw_samples, trainer.dtype, monitor, desc)


def _should_evaluate(epoch: int, cfg: TrainConfig) -> bool:
    every = cfg.eval_every or (1 if cfg.epochs <= 50 else 20)
    return epoch % every == 0 or epoch == cfg.epochs - 1


def run_training(model_cfg, cfg: TrainConfig, run_dir: str | Path, rt: Runtime, *, resume: bool = False,
                 overwrite: bool = False, stop_after_step: int | None = None, export_official: bool = False,
                 export_safetensors: bool = False, tensorboard: bool = True, compile: bool = False,
                 cuda_graphs: bool = False) -> TrainResult:
    """Trains an ``NVAE(model_cfg)`` with ``cfg`` on ``rt``, writing into ``run_dir``.

    Args:
        resume: continue from ``run_dir/checkpoint.pt``: its model, its training state, and ``cfg``
            from here on (the schedules follow ``cfg`` as if the run had started with it; the
            caller makes ``cfg`` the checkpoint's options plus the changes wanted, see
            ``nvae_fast.train.options``).
        overwrite: start afresh in a ``run_dir`` that holds an earlier run, removing its files;
            without it such a directory is refused (``check_run_dir``).
        stop_after_step: stop after this global step, with a checkpoint, as if interrupted; the
            schedules still follow ``cfg.epochs``, so ``resume`` continues the same run.
        export_official, export_safetensors: at the end, also write the weights in the official
            checkpoint format and as safetensors.
        compile, cuda_graphs: the training step under ``torch.compile`` / replayed as a CUDA graph
            (see :class:`nvae_fast.train.trainer.Trainer`).
    Raises:
        InputError: bad data, run directory or checkpoint (before training where it can be known).
        TrainingDiverged: ``cfg.max_bad_steps`` NaN/Inf steps in a row, or NaN/Inf weights at a
            checkpoint (which is then not written: the last good one stays).
    """
    run_dir = Path(run_dir)
    check_run_dir(run_dir, resume=resume, overwrite=overwrite)
    # Writes nothing until the data and the model are built (a bad --data leaves no run directory).
    monitor = Monitor(run_dir, enabled=rt.is_main, tensorboard=tensorboard)
    result = TrainResult(run_dir=run_dir)
    try:
        state = None
        if resume:
            state = ckpt_io.load_checkpoint(run_dir / CHECKPOINT_NAME)
            bad = first_non_finite(state["model"])
            if bad is not None:
                raise InputError(f"{run_dir / CHECKPOINT_NAME}: {bad[1]} tensor(s) of the model hold NaN/Inf, the "
                                 f"first {bad[0]!r}; this checkpoint cannot be resumed")
        # The official random stream: every generator seeded before the data and the model are
        # made (the same seed on every rank), the model's initialisation drawn first.
        torch.manual_seed(cfg.seed)
        np.random.seed(cfg.seed)
        fmt, train_loader, test_loader = _loaders(model_cfg, cfg, rt)
        model = _build_model(model_cfg)
        steps_per_epoch = len(train_loader)
        trainer = Trainer(model, cfg, rt, steps_per_epoch, compile=compile, cuda_graphs=cuda_graphs)
        if overwrite and rt.is_main and run_dir.is_dir():
            removed = _clear_run_dir(run_dir)
            if removed:
                monitor.info(f"--overwrite: removed the earlier run's {', '.join(removed)}")
        n_params = sum(p.numel() for p in model.parameters())
        monitor.info(f"run directory {run_dir}; {rt.world_size} process(es) on {rt.device}; "
                     f"data {fmt} ({len(train_loader.dataset)} train / {len(test_loader.dataset)} test images); "
                     f"{n_params / 1e6:.3f}M parameters; {steps_per_epoch} steps/epoch x {cfg.epochs} epochs; "
                     f"amp {trainer.dtype or 'off'}")
        if state is not None:
            trainer.load_state_dict(state)
            changed = _apply_options(trainer, cfg, state)
            rngs = state["rng"]
            ckpt_io.set_rng_states(rngs[rt.rank] if len(rngs) == rt.world_size else rngs[0])
            monitor.info(f"resumed from {run_dir / CHECKPOINT_NAME} at step {trainer.step} "
                         f"(epoch {trainer.epoch}, step {trainer.epoch_step} of it)"
                         + (f"; options changed: {', '.join(changed)}" if changed else ""))
        elif cfg.eval_untrained:
            result.untrained = _evaluate(trainer, test_loader, monitor, 1, "eval untrained")
            monitor.info(f"untrained model: test {result.untrained.summary()}")
            monitor.scalars({"val/bpd_elbo": result.untrained.bpd_elbo}, 0)

        stopped = False
        while trainer.step < trainer.total_steps and not stopped:
            trainer.begin_epoch()
            epoch = trainer.epoch
            # The official order of an epoch's images: keyed by the global step at its start.
            train_loader.sampler.set_position(epoch, trainer.epoch_step * cfg.batch_size,
                                              order=epoch * steps_per_epoch)
            if trainer.epoch_step == 0:
                _draw_loader_seed()
            started, epoch_losses = time.time(), _EpochLosses(rt)
            x = None
            bar = monitor.progress(train_loader, total=len(train_loader), desc=f"epoch {epoch + 1}/{cfg.epochs}")
            for x in bar:
                threads.adjust()
                # Only log steps read values from the device; the others leave the GPU's queue full.
                stats = trainer.train_step(x)
                if trainer.step % OFFICIAL_RECONSTRUCTION_EVERY == 0 and not cfg.isolate_eval_rng:
                    _draw_reconstruction_noise(trainer, len(x))
                epoch_losses.add(trainer.step - 1, stats)
                if stats.logged is not None:
                    _log_step(monitor, trainer, stats)
                    if hasattr(bar, "set_postfix"):
                        bar.set_postfix(loss=f"{stats.logged['loss']:.2f}", refresh=False)
                if stop_after_step is not None and trainer.step >= stop_after_step:
                    stopped = True
                    break
                if cfg.checkpoint_every and trainer.step % cfg.checkpoint_every == 0 \
                        and trainer.epoch_step < steps_per_epoch:
                    _save(trainer, model_cfg, cfg, run_dir, rt)
            step_losses, train_loss = epoch_losses.read()
            result.losses.update(step_losses)
            trainer.guard.check()
            line = (f"epoch {epoch + 1}/{cfg.epochs}  train loss {train_loss:.3f}  lr {trainer.last_lr:.2e}  "
                    f"kl coeff {trainer.last_kl_coeff:.3f}  skipped steps {trainer.guard.total}  "
                    f"{time.time() - started:.1f}s")
            epoch_done = trainer.epoch_step >= steps_per_epoch
            if epoch_done:
                monitor.scalars({"train/nelbo": train_loss}, trainer.step)
                _check_finite(trainer)  # before evaluating: NaN weights make the output distributions raise
                if _should_evaluate(epoch, cfg):
                    # As the official train.py: sample grids, then the validation, both drawing from
                    # the training's random stream unless --isolate_eval_rng.
                    with torch.no_grad(), _forked_rng(trainer, cfg.isolate_eval_rng):
                        _sample_grids(monitor, trainer, trainer.step)
                    valid = _evaluate(trainer, test_loader, monitor, cfg.eval_iw_samples, "eval",
                                      isolate=cfg.isolate_eval_rng)
                    line += (f"  test NELBO {valid.nelbo:.3f} ({valid.bpd_elbo:.4f} bits/dim), -log p(x) "
                             f"{valid.neg_log_p:.3f} ({valid.bpd_log_p:.4f} bits/dim)")
                    monitor.scalars({"val/nelbo": valid.nelbo, "val/bpd_elbo": valid.bpd_elbo,
                                     "val/neg_log_p": valid.neg_log_p, "val/bpd_log_p": valid.bpd_log_p},
                                    trainer.step)
                    if rt.is_main and x is not None:
                        _log_reconstructions(monitor, trainer, x, trainer.step)
            monitor.info(line)
            _save(trainer, model_cfg, cfg, run_dir, rt)

        result.skipped_steps = trainer.guard.total
        if stopped:
            monitor.info(f"stopped after step {trainer.step}; continue with --resume")
            return result

        result.final = _evaluate(trainer, test_loader, monitor, cfg.num_iw_samples, "final eval")
        monitor.info(f"final test {result.final.summary()}")
        monitor.scalars({"val/nelbo": result.final.nelbo, "val/neg_log_p": result.final.neg_log_p,
                         "val/bpd_elbo": result.final.bpd_elbo, "val/bpd_log_p": result.final.bpd_log_p},
                        trainer.step)
        if rt.is_main:
            report = {"final": result.final.as_dict(), "step": trainer.step, "skipped_steps": result.skipped_steps}
            if result.untrained is not None:
                report["untrained"] = result.untrained.as_dict()
            write_json(run_dir / "final_eval.json", report)
            with torch.random.fork_rng(devices=[rt.device] if rt.device.type == "cuda" else []):
                images = generate(trainer.eval_model.eval(), cfg.num_samples, cfg.temp, amp=trainer.dtype,
                                  decoder_temp=1.0)
            if len(images) < cfg.num_samples:
                monitor.info(f"warning: {nonfinite_message(cfg.num_samples - len(images), cfg.num_samples, cfg.temp)}"
                             "; they are left out of samples.png/npz")
            if len(images):
                scale = max(1, 256 // (math.ceil(math.sqrt(cfg.num_samples)) * model_cfg.image_size))
                paths = write_samples(images, run_dir, scale=scale)
                monitor.info(f"samples (t={cfg.temp}): {paths[0]} and {paths[1]}")
            _export(trainer, model_cfg, cfg, run_dir, monitor, export_official, export_safetensors)
        result.finished = True
        return result
    except TrainingDiverged as e:
        diverged = TrainingDiverged(f"{e}; {_kept_checkpoint(run_dir)}")
        monitor.error(diverged)
        raise diverged from e
    except BaseException as e:
        monitor.error(e)
        raise
    finally:
        monitor.close()


def _export(trainer: Trainer, model_cfg, cfg: TrainConfig, run_dir: Path, monitor: Monitor, official: bool,
            safetensors: bool) -> None:
    from nvae_fast.train.weights import export_official, export_safetensors

    model = trainer.eval_model
    if official:
        path = export_official(model, run_dir / "checkpoint_official.pt", cfg, epoch=trainer.epoch + 1,
                               global_step=trainer.step, steps_per_epoch=trainer.steps_per_epoch,
                               optimizer_state=trainer.optimizer.state_dict(),
                               scaler_state=trainer.scaler.state_dict(), run_dir=run_dir)
        monitor.info(f"official checkpoint: {path}")
    if safetensors:
        path = export_safetensors(model, run_dir / "model.safetensors", run_config(model_cfg, cfg))
        monitor.info(f"safetensors weights: {path}")
