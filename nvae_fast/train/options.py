"""Command-line options of ``nvae-fast train``: the official ``train.py`` flags plus ours.

Every flag defaults to "not given", so the configuration resolves as: official defaults, then the
``--preset`` (model and training recipe), then the flags given on the command line. With
``--resume`` it resolves as: the checkpoint's options, then the flags given (the model flags and
``--preset`` must describe the checkpoint's model; ``--batch_size`` and ``--seed`` cannot change).
Every value is checked (type, finiteness, range) here, before any work.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
from pathlib import Path
from typing import Any

from nvae_fast.train.datasets import FORMATS
from nvae_fast.train.errors import InputError, MissingPathError
from nvae_fast.train.recipe import AMP_MODES, KL_BALANCE_SCOPES, LR_SCHEDULES, TrainConfig, train_preset

_S = argparse.SUPPRESS

# (flag, type, help) of the official options that shape the model (NVAEConfig fields).
_MODEL_FLAGS: list[tuple[str, Any, str]] = [
    ("dataset", str, "dataset name (mnist, cifar10, celeba_64, imagenet_32, celeba_256, ffhq, ... or digits)"),
    ("arch_instance", str, "cell architecture"),
    ("num_nf", int, "normalising-flow cells per latent group (0: none)"),
    ("num_x_bits", int, "bits per colour channel"),
    ("num_latent_scales", int, "number of latent scales"),
    ("num_groups_per_scale", int, "latent groups per scale"),
    ("num_latent_per_group", int, "channels per latent group"),
    ("min_groups_per_scale", int, "minimum groups per scale with --ada_groups"),
    ("num_channels_enc", int, "encoder channels"),
    ("num_preprocess_blocks", int, "pre-processing blocks"),
    ("num_preprocess_cells", int, "cells per pre-processing block"),
    ("num_cell_per_cond_enc", int, "encoder cells per latent group"),
    ("num_channels_dec", int, "decoder channels"),
    ("num_postprocess_blocks", int, "post-processing blocks"),
    ("num_postprocess_cells", int, "cells per post-processing block"),
    ("num_cell_per_cond_dec", int, "decoder cells per latent group"),
    ("num_mixture_dec", int, "logistic mixture components of the output (1: normal)"),
    ("image_size", int, "image height = width, for datasets the official code does not know"),
    ("in_channels", int, "image channels, for datasets the official code does not know"),
    ("output_distribution", str, "p(x|z): bernoulli, normal or logistic_mixture (default: as the official code "
                                 "derives it from the dataset and --num_mixture_dec)"),
]
_MODEL_SWITCHES = [("ada_groups", "halve the groups at each larger scale"),
                   ("use_se", "squeeze-and-excitation in every cell"),
                   ("res_dist", "residual posterior parametrisation")]

# Official training flags, then ours (TrainConfig fields).
_TRAIN_FLAGS: list[tuple[str, Any, str]] = [
    ("data", str, "data directory or file (not needed for --dataset digits)"),
    ("batch_size", int, "batch size per process"),
    ("learning_rate", float, "peak learning rate"),
    ("learning_rate_min", float, "final learning rate of the cosine schedule"),
    ("weight_decay", float, "Adamax weight decay"),
    ("weight_decay_norm", float, "λ of the spectral and BN-scale regularisers"),
    ("weight_decay_norm_init", float, "initial λ with --weight_decay_norm_anneal"),
    ("epochs", int, "training epochs"),
    ("warmup_epochs", int, "epochs of linear learning-rate warm-up"),
    ("kl_anneal_portion", float, "portion of the steps over which the KL coefficient rises to 1"),
    ("kl_const_portion", float, "portion of the steps at the constant minimal KL coefficient"),
    ("kl_const_coeff", float, "the minimal KL coefficient"),
    ("seed", int, "random seed"),
    ("data_format", str, f"data format: auto or one of {', '.join(FORMATS)}"),
    ("amp", str, f"mixed precision: {', '.join(AMP_MODES)} (the official recipe: fp16)"),
    ("lr_schedule", str, f"learning-rate schedule: {', '.join(LR_SCHEDULES)} (official: the official train.py's "
                         "values, whose cosine starts from the last warm-up value; textbook: from the peak)"),
    ("kl_balance_scope", str, f"KL-balancing statistics over: {', '.join(KL_BALANCE_SCOPES)} (global: the batches "
                              "of all ranks, default; rank: each rank's own, as the official code)"),
    ("ema_decay", float, "keep an exponential moving average of the weights with this decay for "
                         "evaluation and sampling (0: off)"),
    ("max_bad_steps", int, "stop after this many consecutive NaN/Inf steps"),
    ("num_workers", int, "data-loader workers per process"),
    ("log_every", int, "steps between TensorBoard scalars"),
    ("eval_every", int, "epochs between test evaluations (0: every epoch up to 50 epochs, else every 20)"),
    ("eval_iw_samples", int, "importance samples of those evaluations (as the official code)"),
    ("checkpoint_every", int, "steps between mid-epoch checkpoints (0: at epoch ends only)"),
    ("num_iw_samples", int, "importance samples of the final test log-likelihood"),
    ("num_samples", int, "images in the final samples.png / samples.npz"),
    ("temp", float, "temperature of the final samples"),
]
_TRAIN_SWITCHES = [("weight_decay_norm_anneal", "anneal λ log-linearly from --weight_decay_norm_init"),
                   ("isolate_eval_rng", "evaluations, sample grids and logged images during training draw from a "
                                        "copy of the random state, so that they never change the training "
                                        "(official: they draw from its random stream)"),
                   ("eval_untrained", "evaluate the test NELBO before training, as a baseline")]

# Official flags about launching processes (see official_launch); local_rank and global_rank are
# set by the launcher, accepted and ignored.
_LAUNCH_FLAGS = [("num_proc_node", int, "machines"), ("node_rank", int, "index of this machine"),
                 ("num_process_per_node", int, "processes (GPUs) per machine"),
                 ("master_address", str, "address of machine 0"),
                 ("local_rank", int, argparse.SUPPRESS), ("global_rank", int, argparse.SUPPRESS)]


# Training options a resumed run keeps: they fix which images make up each step and which random
# numbers it draws, so changing them would make a run that no single command could have started.
_FIXED_ON_RESUME = ("batch_size", "seed")


def _with_default(text: str, cls, name: str) -> str:
    """``text`` plus the dataclass field's default, as --help shows it."""
    default = {f.name: f.default for f in dataclasses.fields(cls)}[name]
    if default is None or default is dataclasses.MISSING:
        return text
    return f"{text} (default: {default})"


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    from nvae_fast.config import PRESETS, NVAEConfig

    p.add_argument("--preset", default=_S, help=f"model and training recipe: {', '.join(PRESETS)}; its values "
                                                "replace the defaults shown, flags given replace both")
    run = p.add_argument_group("run")
    run.add_argument("--root", default=_S, help="directory of all runs (default: runs)")
    run.add_argument("--save", default=_S, help="run name: the run directory is ROOT/eval-SAVE, as in the "
                                                "official code (default: the preset or dataset name)")
    run.add_argument("--resume", "--cont_training", dest="resume", action="store_true", default=_S,
                     help="continue from the run directory's checkpoint.pt with its options; training flags "
                          "given apply from here on as if the run had started with them")
    run.add_argument("--overwrite", action="store_true", default=_S,
                     help="start afresh in a run directory that holds an earlier run, deleting its files "
                          "(without it such a directory is refused)")
    run.add_argument("--stop_after_step", type=int, default=_S,
                     help="stop (with a checkpoint) after this global step; --resume continues")
    run.add_argument("--export_official", action="store_true", default=_S,
                     help="also write checkpoint_official.pt (the official NVAE checkpoint format)")
    run.add_argument("--export_safetensors", action="store_true", default=_S,
                     help="also write model.safetensors (weights and the configuration)")
    run.add_argument("--device", default=_S, help="cpu, cuda, cuda:N (default: the GPU of this rank if any)")
    run.add_argument("--fast_adamax", action="store_true", default=_S,
                     help="accepted for compatibility: Adamax always runs multi-tensor (foreach)")
    run.add_argument("--compile", action="store_true", default=_S,
                     help="run the forward pass and the losses under torch.compile (the backward is compiled "
                          "with them; the first steps take longer)")
    run.add_argument("--cuda_graphs", action="store_true", default=_S,
                     help="CUDA only, one process: after three warm-up steps, capture the whole training step as "
                          "a CUDA graph and replay it (with --compile: the compiled step)")
    train = p.add_argument_group("training (official flags and additions)")
    for name, kind, text in _TRAIN_FLAGS:
        train.add_argument(f"--{name}", type=kind, default=_S, help=_with_default(text, TrainConfig, name))
    for name, text in _TRAIN_SWITCHES:
        train.add_argument(f"--{name}", action="store_true", default=_S, help=text)
    model = p.add_argument_group("model (official flags)")
    for name, kind, text in _MODEL_FLAGS:
        model.add_argument(f"--{name}", type=kind, default=_S, help=_with_default(text, NVAEConfig, name))
    for name, text in _MODEL_SWITCHES:
        model.add_argument(f"--{name}", action="store_true", default=_S, help=text)
    launch = p.add_argument_group("official launch flags (nvae-fast starts the processes through torchrun)")
    for name, kind, text in _LAUNCH_FLAGS:
        launch.add_argument(f"--{name}", type=kind, default=_S, help=text)


@dataclasses.dataclass(frozen=True)
class TrainRequest:
    """A resolved ``nvae-fast train`` command."""

    model: Any            # NVAEConfig
    train: TrainConfig
    run_dir: Path
    resume: bool
    overwrite: bool
    stop_after_step: int | None
    export_official: bool
    export_safetensors: bool
    device: str | None
    compile: bool = False
    cuda_graphs: bool = False


def official_launch(args: argparse.Namespace) -> list[str] | None:
    """torchrun's arguments for the processes the official launch flags ask for, or None.

    The official ``train.py`` starts ``--num_process_per_node`` processes itself (on node
    ``--node_rank`` of ``--num_proc_node``, master ``--master_address``, port 6020); when those
    flags ask for more than one process and this process was not started by torchrun, ``nvae-fast``
    hands the same command to torchrun with these arguments.
    """
    given = vars(args)
    per_node, nodes = given.get("num_process_per_node", 1), given.get("num_proc_node", 1)
    if per_node * nodes <= 1 or "WORLD_SIZE" in os.environ:
        return None
    if per_node < 1 or nodes < 1:
        raise InputError(f"--num_process_per_node and --num_proc_node must be >= 1, got {per_node} and {nodes}")
    return ["--nproc_per_node", str(per_node), "--nnodes", str(nodes), "--node_rank", str(given.get("node_rank", 0)),
            "--master_addr", given.get("master_address", "127.0.0.1"),
            "--master_port", os.environ.get("MASTER_PORT", "6020")]


def _option_error(err: Exception, fields: set[str]) -> InputError:
    """A configuration's ValueError as an InputError naming the flag (``--name``)."""
    message = str(err)
    return InputError(f"--{message}" if message.split(" ", 1)[0] in fields else message)


def _first_difference(a, b) -> str | None:
    for f in dataclasses.fields(a):
        if getattr(a, f.name) != getattr(b, f.name):
            return f"{f.name} {getattr(a, f.name)} here, {getattr(b, f.name)} in the checkpoint"
    return None


def _resumed_config(run_dir: Path, preset: str | None, model_given: dict[str, Any], train_given: dict[str, Any],
                    stop_after_step: int | None):
    """The configuration of the run being resumed: its checkpoint's, with the training flags given
    now on top, checked against where the run is; model flags and ``--preset`` must describe the
    checkpoint's model."""
    from nvae_fast.config import NVAEConfig
    from nvae_fast.train.checkpoint import load_checkpoint
    from nvae_fast.train.loop import CHECKPOINT_NAME

    path = run_dir / CHECKPOINT_NAME
    if not path.is_file():
        raise MissingPathError(f"{path}: checkpoint does not exist, nothing to --resume")
    ckpt = load_checkpoint(path, mmap=True)
    recorded = ckpt["config"]
    try:
        model = NVAEConfig(**recorded["model"])
    except (ValueError, TypeError, KeyError) as e:
        raise InputError(f"{path}: the checkpoint records no valid model ({e})") from e
    if preset is not None:
        try:
            difference = _first_difference(NVAEConfig.preset(preset, **model_given), model)
        except (ValueError, TypeError) as e:
            raise InputError(str(e)) from e
        if difference:
            raise InputError(f"--resume: --preset {preset} describes another model than the run's ({difference}); "
                             "drop --preset to continue the run, or choose a new --save")
    changed = [k for k, v in model_given.items() if getattr(model, k) != v]
    if changed:
        raise InputError(f"--resume: {', '.join('--' + k for k in changed)} differ from the checkpoint's model; "
                         "a run keeps its architecture")
    kept = recorded["train"]
    fixed = [k for k in _FIXED_ON_RESUME if k in train_given and train_given[k] != kept.get(k)]
    if fixed:
        changes = ", ".join(f"--{k} {train_given[k]} (the run has {kept.get(k)})" for k in fixed)
        raise InputError(f"--resume: {changes}; these fix the images of every step, so a run keeps them: start a new "
                         "--save to change them")
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    try:
        train = TrainConfig(**{**{k: v for k, v in kept.items() if k in train_fields}, **train_given})
    except (ValueError, TypeError) as e:
        raise _option_error(e, train_fields) from e
    step = int(ckpt["step"])
    steps_per_epoch = ckpt.get("steps_per_epoch") or ckpt["scheduler"].get("steps_per_epoch")
    if steps_per_epoch and train.epochs * steps_per_epoch < step:
        raise InputError(f"--epochs {train.epochs}: the run being resumed is at step {step} ({steps_per_epoch} steps "
                         f"per epoch); give --epochs {math.ceil(step / steps_per_epoch)} or more")
    if stop_after_step is not None and stop_after_step <= step:
        raise InputError(f"--stop_after_step {stop_after_step}: the run being resumed is already at step {step}")
    return model, train


def resolve_train(args: argparse.Namespace) -> TrainRequest:
    """Official defaults < preset < given flags, for the model and the training options; with
    ``--resume``, the checkpoint's options < given flags. Checks every value and the run
    directory (see ``nvae_fast.train.loop.check_run_dir``) before returning."""
    from nvae_fast.config import PRESETS, NVAEConfig
    from nvae_fast.train.loop import check_run_dir

    given = vars(args)
    model_fields = {f.name for f in dataclasses.fields(NVAEConfig)}
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    model_given = {k: v for k, v in given.items() if k in model_fields}
    train_given = {k: v for k, v in given.items() if k in train_fields}
    preset = given.get("preset")
    resume, overwrite = bool(given.get("resume", False)), bool(given.get("overwrite", False))
    stop_after_step = given.get("stop_after_step")
    if preset is not None and preset not in PRESETS:
        raise InputError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    if stop_after_step is not None and stop_after_step < 1:
        raise InputError(f"--stop_after_step must be >= 1, got {stop_after_step}")
    if preset is not None and "dataset" in model_given and model_given["dataset"] != NVAEConfig.preset(preset).dataset:
        raise InputError(f"--dataset {model_given['dataset']} conflicts with --preset {preset} "
                         f"(dataset {NVAEConfig.preset(preset).dataset}); drop one of them")
    name = given.get("save") or preset or model_given.get("dataset") or NVAEConfig().dataset
    run_dir = Path(given.get("root", "runs")) / f"eval-{name}"
    check_run_dir(run_dir, resume=resume, overwrite=overwrite)
    if resume:
        model, train = _resumed_config(run_dir, preset, model_given, train_given, stop_after_step)
    else:
        try:
            model = NVAEConfig.preset(preset, **model_given) if preset is not None else NVAEConfig(**model_given)
        except (ValueError, TypeError) as e:
            raise InputError(str(e)) from e
        try:
            train = TrainConfig(**{**(train_preset(preset) if preset else {}), **train_given})
        except (ValueError, TypeError) as e:
            raise _option_error(e, train_fields) from e
    return TrainRequest(model=model, train=train, run_dir=run_dir, resume=resume, overwrite=overwrite,
                        stop_after_step=stop_after_step,
                        export_official=bool(given.get("export_official", False)),
                        export_safetensors=bool(given.get("export_safetensors", False)),
                        device=given.get("device"), compile=bool(given.get("compile", False)),
                        cuda_graphs=bool(given.get("cuda_graphs", False)))
