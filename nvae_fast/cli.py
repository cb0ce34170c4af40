"""The ``nvae-fast`` command (also ``python -m nvae_fast``).

Subcommands: ``train`` (the official recipe; official flags accepted, plus ``--preset``),
``evaluate`` (test NELBO and importance-weighted log-likelihood), ``sample`` (PNG grid and .npz),
``info`` (versions and backends). Under ``torchrun`` ``train`` and ``evaluate`` run on every rank.

Expected failures end a command with one line on stderr and no traceback, through one mechanism
(``run_command``, with ``nvae_fast.train.errors.expected_failure`` deciding what is expected):
bad input - a missing path, an unknown format, a corrupt checkpoint, images of the wrong size, a
flag with a bad value, an output location that cannot be written, a backend that
``NVAE_FAST_BACKEND`` asks for and this machine cannot run - exits with status 2, a diverged run
with 3, Ctrl-C with 130. Every value and every output location is checked before any work.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from nvae_fast.train.errors import EXIT_INPUT, InputError, expected_failure
from nvae_fast.train.outputs import check_output_file, check_writable_dir, write_json


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage block): ``nvae-fast train: error: ...``."""

    def error(self, message: str):
        self.exit(EXIT_INPUT, f"{self.prog}: error: {message} (see --help)\n")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows every default in --help (flags without one, like ``train``'s, say theirs in the text)."""


def _integer(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    return _integer(text, 1)


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    return _integer(text, 0)


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {value}")
    return value


def run_command(prog: str, command: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Runs a subcommand; an expected failure becomes one line on stderr and its exit status.

    Every subcommand goes through here, so a new one gets the same behaviour by raising
    ``InputError`` (bad input, exit 2) or ``TrainingDiverged`` (exit 3); see
    ``nvae_fast.train.errors.expected_failure`` for the rest.
    """
    try:
        return command(args)
    except BaseException as e:
        failure = expected_failure(e)
        if failure is None:
            raise
        code, message = failure
        print(f"{prog}: {message}" if isinstance(e, KeyboardInterrupt) else f"{prog}: error: {message}",
              file=sys.stderr)
        return code


def requested_backend() -> str | None:
    """``NVAE_FAST_BACKEND`` (None: automatic), as an ``InputError`` when it names no backend."""
    from nvae_fast import backend

    try:
        return backend.requested_backend()
    except ValueError as e:
        raise InputError(str(e)) from e


def check_backend(device: torch.device) -> None:
    """Before any work: the backend ``NVAE_FAST_BACKEND`` asks for can run on ``device``."""
    from nvae_fast import backend

    requested = requested_backend()
    reason = backend.unavailable_reason(requested, device) if requested else None
    if reason is not None:
        raise InputError(f"NVAE_FAST_BACKEND={requested} cannot run on {device}: {reason} (unset it for the "
                         "automatic choice)")


def _cpu_threads(device: torch.device):
    """On the CPU, unless OMP_NUM_THREADS fixes it: as many intra-op threads as other processes
    leave cores free, re-checked as the command runs (``nvae_fast.train.threads``)."""
    from nvae_fast.train.threads import following_free_cores

    return following_free_cores() if device.type == "cpu" else contextlib.nullcontext()


def _info(args: argparse.Namespace) -> int:
    import nvae_fast
    from nvae_fast import backend

    print(f"nvae_fast {nvae_fast.__version__}  torch {torch.__version__}  "
          f"CUDA devices visible to torch: {torch.cuda.device_count()}")
    for name, state in backend.status().items():
        print(f"  backend {name:<7} {state}")
    try:
        requested, problem = requested_backend(), None
    except InputError as e:
        requested, problem = None, e
    shown = f"invalid: {problem}" if problem else requested or "auto"
    print(f"  requested backend: {shown} (NVAE_FAST_BACKEND or nvae_fast.set_backend)")
    sizing = ("fixed by OMP_NUM_THREADS" if "OMP_NUM_THREADS" in os.environ else
              "train, evaluate and sample use as many as other processes leave cores free")
    print(f"  CPU threads: {torch.get_num_threads()} intra-op ({sizing})")
    if problem is not None:
        raise problem
    return 0


def _train(args: argparse.Namespace) -> int:
    from nvae_fast.train.loop import run_training
    from nvae_fast.train.options import official_launch, resolve_train
    from nvae_fast.train.runtime import init_runtime, shutdown

    launch = official_launch(args)
    if launch is not None:
        from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
        from torch.distributed.run import main as torchrun

        resolve_train(args)  # report bad options once, here, rather than from every process
        requested_backend()
        try:
            torchrun([*launch, "-m", "nvae_fast", *args.argv])
        except ChildFailedError:
            print("nvae-fast train: error: a training process failed (its message is above)", file=sys.stderr)
            return 1
        return 0
    request = resolve_train(args)
    rt = init_runtime(request.device)
    try:
        check_backend(rt.device)
        with _cpu_threads(rt.device):
            result = run_training(request.model, request.train, request.run_dir, rt, resume=request.resume,
                                  overwrite=request.overwrite, stop_after_step=request.stop_after_step,
                                  export_official=request.export_official,
                                  export_safetensors=request.export_safetensors)
    finally:
        shutdown(rt)
    if rt.is_main and result.final is not None:
        print(f"test bits/dim: {result.final.bpd_log_p:.4f} (importance-weighted), "
              f"{result.final.bpd_elbo:.4f} (ELBO)"
              + (f"; untrained model: {result.untrained.bpd_elbo:.4f} (ELBO)" if result.untrained else ""))
        print(f"run directory: {result.run_dir}")
    return 0


def _load(args: argparse.Namespace, rt):
    from nvae_fast.train.weights import load_trained_model

    model, info = load_trained_model(args.checkpoint, use_ema=not args.no_ema)
    return model.to(rt.device), info


def _evaluate(args: argparse.Namespace) -> int:
    from nvae_fast.train.datasets import build_datasets, detect_format
    from nvae_fast.train.evaluate import evaluate
    from nvae_fast.train.loaders import make_loader
    from nvae_fast.train.monitor import Monitor
    from nvae_fast.train.runtime import init_runtime, shutdown
    from nvae_fast.train.trainer import amp_dtype

    if args.output:
        check_output_file(args.output, "--output")
    rt = init_runtime(args.device)
    try:
        check_backend(rt.device)
        model, info = _load(args, rt)
        cfg = model.config
        trained = info["train"]
        data = args.data if args.data is not None else trained.get("data")
        fmt = args.data_format or trained.get("data_format", "auto")
        if fmt == "auto":
            fmt = detect_format(cfg.dataset, data)
        seed = trained.get("seed", 1)
        train_set, test_set = build_datasets(fmt, data, image_size=cfg.image_size, channels=cfg.in_channels,
                                             seed=seed, dataset=cfg.dataset,
                                             binarize=cfg.output_distribution == "bernoulli")
        dataset = train_set if args.eval_on_train else test_set
        batch_size = args.batch_size or trained.get("batch_size", 64)
        loader = make_loader(dataset, batch_size, train=False, seed=seed, rank=rt.rank, world_size=rt.world_size,
                             num_workers=args.num_workers, pin_memory=rt.device.type == "cuda")
        torch.manual_seed(args.seed + rt.rank)
        monitor = Monitor(None, enabled=rt.is_main)
        with _cpu_threads(rt.device):
            result = evaluate(model, loader, rt, args.num_iw_samples, amp_dtype(args.amp, rt.device), monitor,
                              desc="evaluate")
    finally:
        shutdown(rt)
    if rt.is_main:
        split = "train" if args.eval_on_train else "test"
        print(f"{split} {result.summary()}")
        if args.output:
            write_json(args.output, {"checkpoint": str(args.checkpoint), "split": split, **result.as_dict()})
    return 0


def _sample_target(output: str) -> tuple[Path, str]:
    """(directory, file stem) of ``sample --output``: a directory (samples.png/.npz in it), or a
    file name whose stem names both files."""
    out = Path(output)
    if out.is_dir() or not out.suffix:
        return out, "samples"
    return out.parent, out.stem


def _sample(args: argparse.Namespace) -> int:
    from nvae_fast.train.runtime import init_runtime
    from nvae_fast.train.sample import generate, write_samples
    from nvae_fast.train.trainer import amp_dtype

    directory, name = _sample_target(args.output)
    check_writable_dir(directory, "--output")
    rt = init_runtime(args.device)
    if rt.distributed:
        raise InputError("sample runs in one process; launch it without torchrun")
    check_backend(rt.device)
    model, _ = _load(args, rt)
    torch.manual_seed(args.seed)
    with _cpu_threads(rt.device):
        if args.readjust_bn:
            print(f"re-estimating BatchNorm statistics on {args.readjust_bn_iters} sample batches at t={args.temp}")
            model.readjust_bn(num_samples=args.batch_size, t=args.temp, iterations=args.readjust_bn_iters)
        images = generate(model, args.num_samples, args.temp, args.batch_size, amp_dtype(args.amp, rt.device),
                          progress=True)
    scale = max(1, 256 // (int(args.num_samples ** 0.5 + 0.999) * model.config.image_size))
    png, npz = write_samples(images, directory, name=name, scale=scale)
    print(f"{args.num_samples} samples at t={args.temp}: {png} and {npz}")
    return 0


def _add_load_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True,
                   help="checkpoint.pt of nvae-fast train, an official NVAE checkpoint, or model.safetensors")
    p.add_argument("--no_ema", action="store_true", help="use the raw weights even if the checkpoint has EMA ones")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: this rank's GPU if any)")
    p.add_argument("--amp", default="auto", choices=("auto", "bf16", "fp16", "off"), help="mixed precision")
    p.add_argument("--seed", type=int, default=1, help="random seed")


def build_parser() -> argparse.ArgumentParser:
    from nvae_fast.train.options import add_train_arguments

    parser = _Parser(prog="nvae-fast", description="NVAE with fused CUDA and Triton kernels.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    info = sub.add_parser("info", help="show versions and which backends can run here",
                          description="Versions, the backends that can run here and the one NVAE_FAST_BACKEND "
                                      "asks for (exit status 2 if it names none).")
    info.set_defaults(func=_info)

    train = sub.add_parser("train", help="train a model (official recipe and flags; --preset NAME)",
                           description="Train NVAE. Example: nvae-fast train --preset digits. Writes ROOT/eval-SAVE/"
                                       "{checkpoint.pt, log.txt, TensorBoard events, final_eval.json, samples.png, "
                                       "samples.npz}; refuses a run directory that holds an earlier run (--resume, "
                                       "a new --save or --overwrite). Defaults shown are the official train.py's; a "
                                       "--preset replaces them with its recipe. Several processes: torchrun "
                                       "--nproc_per_node N -m nvae_fast train ...")
    add_train_arguments(train)
    train.set_defaults(func=_train)

    ev = sub.add_parser("evaluate", help="test NELBO and importance-weighted log-likelihood of a checkpoint",
                        formatter_class=_HelpFormatter)
    _add_load_args(ev)
    ev.add_argument("--data", default=None, help="data path (default: the one the checkpoint was trained on)")
    ev.add_argument("--data_format", default=None, help="data format (default: the training run's)")
    ev.add_argument("--num_iw_samples", type=positive_int, default=1000, help="importance samples per image")
    ev.add_argument("--batch_size", type=non_negative_int, default=0, help="batch size (0: the training batch size)")
    ev.add_argument("--eval_on_train", action="store_true", help="evaluate on the training split")
    ev.add_argument("--num_workers", type=non_negative_int, default=1, help="data-loader workers")
    ev.add_argument("--output", default=None, help="also write the results as JSON to this file")
    ev.set_defaults(func=_evaluate)

    sa = sub.add_parser("sample", help="draw images from a checkpoint: a PNG grid and an .npz",
                        formatter_class=_HelpFormatter)
    _add_load_args(sa)
    sa.add_argument("--num_samples", type=positive_int, default=64, help="number of images")
    sa.add_argument("--temp", type=positive_float, default=0.7, help="temperature of the prior")
    sa.add_argument("--batch_size", type=positive_int, default=64, help="images per forward pass")
    sa.add_argument("--readjust_bn", action="store_true",
                    help="re-estimate BatchNorm statistics on samples at this temperature first")
    sa.add_argument("--readjust_bn_iters", type=positive_int, default=500, help="sampling passes of --readjust_bn")
    sa.add_argument("--output", default="samples",
                    help="directory for samples.png and samples.npz, or a file name whose stem names both")
    sa.set_defaults(func=_sample)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return run_command(f"nvae-fast {args.command}", args.func, args)


if __name__ == "__main__":
    sys.exit(main())
