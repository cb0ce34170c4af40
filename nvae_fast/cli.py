"""The ``nvae-fast`` command (also ``python -m nvae_fast``).

Subcommands: ``train`` (the official recipe; official flags accepted, plus ``--preset``),
``evaluate`` (test NELBO and importance-weighted log-likelihood), ``sample`` (PNG grid and .npz),
``info`` (versions and backends). Under ``torchrun`` ``train`` and ``evaluate`` run on every rank.

Bad input (a missing path, an unknown format, a corrupt checkpoint, images of the wrong size, a
flag with a bad value) ends the command with exit status 2 and one line on stderr, no traceback;
a diverged run with status 3.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from nvae_fast.train.errors import InputError, TrainingDiverged

EXIT_INPUT, EXIT_DIVERGED, EXIT_INTERRUPTED = 2, 3, 130


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage block): ``nvae-fast train: error: ...``."""

    def error(self, message: str):
        self.exit(EXIT_INPUT, f"{self.prog}: error: {message} (see --help)\n")


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def _info(args: argparse.Namespace) -> int:
    import nvae_fast
    from nvae_fast import backend

    print(f"nvae_fast {nvae_fast.__version__}  torch {torch.__version__}  "
          f"CUDA devices visible to torch: {torch.cuda.device_count()}")
    for name, state in backend.status().items():
        print(f"  backend {name:<7} {state}")
    requested = backend.requested_backend()
    print(f"  requested backend: {requested or 'auto'} (NVAE_FAST_BACKEND or nvae_fast.set_backend)")
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
        try:
            torchrun([*launch, "-m", "nvae_fast", *args.argv])
        except ChildFailedError:
            print("nvae-fast train: error: a training process failed (its message is above)", file=sys.stderr)
            return 1
        return 0
    request = resolve_train(args)
    rt = init_runtime(request.device)
    try:
        result = run_training(request.model, request.train, request.run_dir, rt, resume=request.resume,
                              stop_after_step=request.stop_after_step, export_official=request.export_official,
                              export_safetensors=request.export_safetensors, compile=request.compile,
                              cuda_graphs=request.cuda_graphs)
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

    rt = init_runtime(args.device)
    try:
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
        result = evaluate(model, loader, rt, args.num_iw_samples, amp_dtype(args.amp, rt.device), monitor,
                          desc="evaluate")
    finally:
        shutdown(rt)
    if rt.is_main:
        split = "train" if args.eval_on_train else "test"
        print(f"{split} {result.summary()}")
        if args.output:
            Path(args.output).parent.mkdir(parents=True, exist_ok=True)
            Path(args.output).write_text(json.dumps({"checkpoint": str(args.checkpoint), "split": split,
                                                     **result.as_dict()}, indent=2) + "\n")
    return 0


def _sample(args: argparse.Namespace) -> int:
    from nvae_fast.train.runtime import init_runtime
    from nvae_fast.train.sample import generate, write_samples
    from nvae_fast.train.trainer import amp_dtype

    rt = init_runtime(args.device)
    if rt.distributed:
        raise InputError("sample runs in one process; launch it without torchrun")
    model, _ = _load(args, rt)
    torch.manual_seed(args.seed)
    if args.readjust_bn:
        print(f"re-estimating BatchNorm statistics on {args.readjust_bn_iters} sample batches at t={args.temp}")
        model.readjust_bn(num_samples=args.batch_size, t=args.temp, iterations=args.readjust_bn_iters)
    images = generate(model, args.num_samples, args.temp, args.batch_size, amp_dtype(args.amp, rt.device),
                      progress=True)
    out = Path(args.output)
    scale = max(1, 256 // (int(args.num_samples ** 0.5 + 0.999) * model.config.image_size))
    png, npz = write_samples(images, out.parent if out.suffix else out,
                             name=out.stem if out.suffix else "samples", scale=scale)
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
    info = sub.add_parser("info", help="show versions and which backends can run here")
    info.set_defaults(func=_info)

    train = sub.add_parser("train", help="train a model (official recipe and flags; --preset NAME)",
                           description="Train NVAE. Example: nvae-fast train --preset digits. Writes ROOT/eval-SAVE/"
                                       "{checkpoint.pt, log.txt, TensorBoard events, final_eval.json, samples.png, "
                                       "samples.npz}. Several processes: torchrun --nproc_per_node N -m nvae_fast "
                                       "train ...")
    add_train_arguments(train)
    train.set_defaults(func=_train)

    ev = sub.add_parser("evaluate", help="test NELBO and importance-weighted log-likelihood of a checkpoint")
    _add_load_args(ev)
    ev.add_argument("--data", default=None, help="data path (default: the one the checkpoint was trained on)")
    ev.add_argument("--data_format", default=None, help="data format (default: the training run's)")
    ev.add_argument("--num_iw_samples", type=positive_int, default=1000, help="importance samples per image")
    ev.add_argument("--batch_size", type=int, default=0, help="batch size (0: the training batch size)")
    ev.add_argument("--eval_on_train", action="store_true", help="evaluate on the training split")
    ev.add_argument("--num_workers", type=int, default=1, help="data-loader workers")
    ev.add_argument("--output", default=None, help="also write the results as JSON to this file")
    ev.set_defaults(func=_evaluate)

    sa = sub.add_parser("sample", help="draw images from a checkpoint: a PNG grid and an .npz")
    _add_load_args(sa)
    sa.add_argument("--num_samples", type=positive_int, default=64, help="number of images")
    sa.add_argument("--temp", type=positive_float, default=0.7, help="temperature of the prior")
    sa.add_argument("--batch_size", type=positive_int, default=64, help="images per forward pass")
    sa.add_argument("--readjust_bn", action="store_true",
                    help="re-estimate BatchNorm statistics on samples at this temperature first")
    sa.add_argument("--readjust_bn_iters", type=positive_int, default=500, help="sampling passes of --readjust_bn")
    sa.add_argument("--output", default="samples",
                    help="directory for samples.png and samples.npz, or a file name whose stem names both "
                         "(default: ./samples)")
    sa.set_defaults(func=_sample)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    prog = f"nvae-fast {args.command}"
    try:
        return args.func(args)
    except InputError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return EXIT_INPUT
    except TrainingDiverged as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return EXIT_DIVERGED
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
