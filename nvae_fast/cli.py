"""The ``nvae-fast`` command (also ``python -m nvae_fast``).

Subcommands: ``train`` (the official recipe; official flags accepted, plus ``--preset``),
``evaluate`` (test NELBO and importance-weighted log-likelihood), ``sample`` (PNG grid and .npz),
``reconstruct`` and ``interpolate`` (latent-space PNGs), ``fid`` (Fréchet Inception Distance),
``info`` (versions and backends). Under ``torchrun`` ``train`` and ``evaluate`` run on every rank.

Expected failures end a command with one line on stderr and no traceback, through one mechanism
(``run_command``, with ``nvae_fast.train.errors.expected_failure`` deciding what is expected):
bad input - a missing path, an unknown format, a corrupt checkpoint, images of the wrong size, a
flag with a bad value, an output location that cannot be written, a backend that
``NVAE_FAST_BACKEND`` asks for and this machine cannot run - exits with status 2, a diverged run
(or samples that are all NaN/Inf) with 3, Ctrl-C with 130. Every value and every output location
is checked before any work.
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

from nvae_fast.train.errors import EXIT_INPUT, InputError, NonFiniteSamples, expected_failure
from nvae_fast.train.outputs import check_output_file, check_writable_dir, write_json


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows every default in --help, except where the text already says it (``train``'s flags
    default to "not given" and say theirs in the text), where there is none (None) and for
    switches (off unless given)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default is None or action.nargs == 0 or "default" in text:
            return text
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage block): ``nvae-fast train: error: ...``, and every
    default in --help."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(EXIT_INPUT, f"{self.prog}: error: {message} (see --help)\n")


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
        with _cpu_threads(rt.device):
            _prepare_bn(args, model, args.bn_temp, write_cache=rt.is_main,
                        log=print if rt.is_main else lambda _: None)
            _check_statistics(model)
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
    from nvae_fast.train.sample import generate, nonfinite_message, write_samples
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
        _prepare_bn(args, model, args.temp)
        images = generate(model, args.num_samples, args.temp, args.batch_size, amp_dtype(args.amp, rt.device),
                          progress=True, decoder_temp=args.decoder_temp)
    if len(images) == 0:
        raise NonFiniteSamples(nonfinite_message(args.num_samples, args.num_samples, args.temp) + "; nothing written")
    if len(images) < args.num_samples:
        dropped = nonfinite_message(args.num_samples - len(images), args.num_samples, args.temp)
        print(f"nvae-fast sample: warning: {dropped}; they are left out of the files", file=sys.stderr)
    scale = max(1, 256 // (int(args.num_samples ** 0.5 + 0.999) * model.config.image_size))
    png, npz = write_samples(images, directory, name=name, scale=scale)
    print(f"{len(images)} samples at t={args.temp}: {png} and {npz}")
    return 0


def _checkpoint_datasets(args: argparse.Namespace, model, info: dict, binarize: bool):
    """(train, test, format, data path) of the data the checkpoint was trained on, or of --data /
    --data_format."""
    from nvae_fast.train.datasets import build_datasets, detect_format

    cfg = model.config
    trained = info["train"]
    data = args.data if args.data is not None else trained.get("data")
    fmt = args.data_format or trained.get("data_format", "auto")
    if fmt == "auto":
        fmt = detect_format(cfg.dataset, data)
    train, test = build_datasets(fmt, data, image_size=cfg.image_size, channels=cfg.in_channels,
                                 seed=trained.get("seed", 1), dataset=cfg.dataset, binarize=binarize)
    return train, test, fmt, data


def _check_png_output(output: str) -> Path:
    path = Path(output)
    if path.is_dir() or path.suffix.lower() != ".png":
        raise InputError(f"--output {output}: expected a .png file name")
    check_output_file(path, "--output")
    return path


def _save_grid(images, nrow: int, path: Path) -> None:
    from nvae_fast.train.images import save_png, tile

    grid = tile(images, nrow=nrow)
    save_png(grid, path, scale=max(1, 512 // grid.shape[-1]))


def _latent_command_setup(args: argparse.Namespace):
    """Model (eval mode) and the split's dataset for reconstruct / interpolate."""
    from nvae_fast.train.runtime import init_runtime

    _check_png_output(args.output)
    rt = init_runtime(args.device)
    if rt.distributed:
        raise InputError(f"{args.command} runs in one process; launch it without torchrun")
    check_backend(rt.device)
    model, info = _load(args, rt)
    train, test, _, _ = _checkpoint_datasets(args, model, info, model.config.output_distribution == "bernoulli")
    torch.manual_seed(args.seed)
    return rt, model, train if args.split == "train" else test


def _reconstruct(args: argparse.Namespace) -> int:
    from nvae_fast.train.latents import pick_images, reconstruction_pairs
    from nvae_fast.train.trainer import amp_dtype

    rt, model, dataset = _latent_command_setup(args)
    images = pick_images(dataset, args.num_images, args.indices)
    pairs, mse = reconstruction_pairs(model, images, amp_dtype(args.amp, rt.device))
    _save_grid(pairs, 2 * math.ceil(math.sqrt(2 * len(images))), Path(args.output))  # wider than tall
    print(f"{len(images)} {args.split} images, each followed by its reconstruction (posterior means): {args.output} "
          f"(mean squared error per pixel {mse:.4g})")
    return 0


def _interpolate(args: argparse.Namespace) -> int:
    from nvae_fast.train.latents import interpolation_rows, pick_images
    from nvae_fast.train.trainer import amp_dtype

    if args.indices and len(args.indices) % 2:
        raise InputError(f"--indices needs pairs of images (an even count), got {len(args.indices)}")
    rt, model, dataset = _latent_command_setup(args)
    if args.groups is not None and not 1 <= args.groups <= model.num_latent_groups:
        raise InputError(f"--groups must be between 1 and {model.num_latent_groups} (the model's latent groups), "
                         f"got {args.groups}")
    images = pick_images(dataset, 2 * args.pairs, args.indices)
    if len(images) < 2:
        raise InputError(f"the {args.split} split holds {len(images)} image; interpolation needs two")
    images = images[:len(images) // 2 * 2]
    rows = interpolation_rows(model, images[0::2], images[1::2], args.steps, args.groups,
                              amp_dtype(args.amp, rt.device))
    _save_grid(rows, args.steps + 2, Path(args.output))
    moving = "all latent groups" if args.groups is None else f"the first {args.groups} of {model.num_latent_groups} " \
                                                             "latent groups"
    print(f"{len(images) // 2} interpolations of {args.steps} steps through {moving}, one per row between its two "
          f"{args.split} images: {args.output}")
    return 0


def _fid(args: argparse.Namespace) -> int:
    from nvae_fast.train import fid
    from nvae_fast.train.runtime import init_runtime
    from nvae_fast.train.trainer import amp_dtype

    if args.output:
        check_output_file(args.output, "--output")
    rt = init_runtime(args.device)
    if rt.distributed:
        raise InputError("fid runs in one process; launch it without torchrun")
    check_backend(rt.device)
    library = fid.load_library()
    model, info = _load(args, rt)
    train = test = fmt = data = None
    if args.ref_stats:
        fid.load_statistics(args.ref_stats)
    else:
        train, test, fmt, data = _checkpoint_datasets(args, model, info, binarize=False)
    features = fid.InceptionFeatures(rt.device, library)
    torch.manual_seed(args.seed)
    with _cpu_threads(rt.device):
        _prepare_bn(args, model, args.bn_temp if args.bn_temp is not None else args.temp)
        result = fid.evaluate_fid(model, train, test, dataset=model.config.dataset, data_format=fmt, data=data,
                                  features=features, library=library,
                                  fid_dir=Path(args.fid_dir) if args.fid_dir else fid.default_fid_dir(),
                                  num_samples=args.num_samples, temp=args.temp, num_reference=args.num_ref,
                                  batch_size=args.batch_size, amp=amp_dtype(args.amp, rt.device),
                                  num_workers=args.num_workers, reference_file=args.ref_stats)
    print(f"FID {result.fid:.4f} ({result.num_samples} samples at t={result.temperature:g} against {result.reference})")
    if args.output:
        write_json(args.output, {"checkpoint": str(args.checkpoint), **result.as_dict()})
    return 0


def _check_statistics(model) -> None:
    """Before evaluating: BatchNorm statistics with NaN/Inf (say, from an fp16 re-estimation) would
    make every number NaN."""
    from nvae_fast.compat.loading import first_non_finite

    bad = first_non_finite(dict(model.named_buffers()))
    if bad is not None:
        raise InputError(f"{bad[1]} BatchNorm statistics tensor(s) in use hold NaN/Inf, the first {bad[0]!r}; "
                         "re-estimate them with --readjust_bn --temp T, or evaluate another checkpoint")


def _prepare_bn(args: argparse.Namespace, model, temperature: float | None, write_cache: bool = True, log=print):
    """The BatchNorm statistics a command samples or evaluates with (see nvae_fast.train.bn_stats)."""
    from nvae_fast.train.bn_stats import prepare_bn

    stats = prepare_bn(model, args.checkpoint, temperature, readjust=args.readjust_bn,
                       iterations=args.readjust_bn_iters, batch_size=args.readjust_bn_batch_size,
                       use_cache=not args.no_bn_cache, write_cache=write_cache, log=log)
    log(f"using {stats.describe()}")
    return stats


def _add_bn_args(p: argparse.ArgumentParser, temp_flag: str) -> None:
    p.add_argument("--readjust_bn", action="store_true",
                   help=f"re-estimate the BatchNorm statistics on samples at {temp_flag} (fp32) and save them beside "
                        "the checkpoint (<stem>.bn_stats.safetensors); without it, statistics saved there for this "
                        f"{temp_flag} are reused, else the checkpoint's are used")
    p.add_argument("--readjust_bn_iters", type=positive_int, default=500, help="sampling passes of --readjust_bn")
    p.add_argument("--readjust_bn_batch_size", type=positive_int, default=16,
                   help="samples per pass of --readjust_bn (as the official evaluate.py)")
    p.add_argument("--no_bn_cache", action="store_true",
                   help="neither reuse nor save re-estimated BatchNorm statistics")


def non_negative_float(text: str) -> float:
    """argparse type: a finite number >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {value}")
    return value


def _add_load_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True,
                   help="checkpoint.pt of nvae-fast train, an official NVAE checkpoint, or model.safetensors")
    p.add_argument("--no_ema", action="store_true", help="use the raw weights even if the checkpoint has EMA ones")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: this rank's GPU if any)")
    p.add_argument("--amp", default="auto", choices=("auto", "bf16", "fp16", "off"), help="mixed precision")
    p.add_argument("--seed", type=int, default=1, help="random seed")


def at_least_two(text: str) -> int:
    """argparse type: an integer >= 2 (a covariance needs two samples)."""
    value = positive_int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"must be >= 2 (FID needs a covariance), got {value}")
    return value


def index_list(text: str) -> list[int]:
    """argparse type: comma-separated image indices."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    if not values:
        raise argparse.ArgumentTypeError("no index given")
    return values


def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default=None, help="data path (default: the one the checkpoint was trained on)")
    p.add_argument("--data_format", default=None, help="data format (default: the training run's)")


def _add_latent_parsers(sub) -> None:
    re = sub.add_parser("reconstruct", help="reconstruct dataset images: a PNG of inputs beside reconstructions",
                        description="Encode images of the test split (posterior means) and decode them; writes a "
                                    "grid where each input is followed by its reconstruction. Example: nvae-fast "
                                    "reconstruct --checkpoint runs/eval-digits/checkpoint.pt --output grid.png")
    _add_load_args(re)
    _add_data_args(re)
    re.add_argument("--split", choices=("test", "train"), default="test", help="images of this split")
    re.add_argument("--num_images", type=positive_int, default=32, help="the first N images of the split")
    re.add_argument("--indices", type=index_list, default=None, help="these images instead (e.g. 0,5,9)")
    re.add_argument("--output", default="reconstructions.png", help="the PNG file to write")
    re.set_defaults(func=_reconstruct)

    it = sub.add_parser("interpolate", help="interpolate in latent space between pairs of images: a PNG strip",
                        description="For each pair of images, decode the line between their posterior means in "
                                    "latent space: one row per pair (start image, STEPS decoded images, end image). "
                                    "--groups K moves only the first K (coarsest) latent groups and keeps the "
                                    "others at the start image's. Example: nvae-fast interpolate --checkpoint "
                                    "runs/eval-digits/checkpoint.pt --output strip.png")
    _add_load_args(it)
    _add_data_args(it)
    it.add_argument("--split", choices=("test", "train"), default="test", help="images of this split")
    it.add_argument("--pairs", type=positive_int, default=4, help="pairs of images: the first 2 x PAIRS of the split")
    it.add_argument("--indices", type=index_list, default=None,
                    help="these images instead, taken two by two (e.g. 0,7,3,12)")
    it.add_argument("--steps", type=at_least_two, default=8, help="decoded images per pair, ends included")
    it.add_argument("--groups", type=positive_int, default=None,
                    help="move only the first GROUPS latent groups in decoder order (default: all)")
    it.add_argument("--output", default="interpolations.png", help="the PNG file to write")
    it.set_defaults(func=_interpolate)

    fd = sub.add_parser("fid", help="Frechet Inception Distance of a checkpoint's samples (needs the [fid] extra)",
                        description="FID as the official evaluate.py --eval_mode evaluate_fid: NUM_SAMPLES samples "
                                    "at --temp (official: 1), each the mean of p(x|z), against the Inception "
                                    "statistics of the training data (cached in --fid_dir). The official command "
                                    "--temp 0.6 --readjust_bn re-estimates BatchNorm at 0.6 and samples at 1: here "
                                    "--readjust_bn --bn_temp 0.6. Needs pip install 'nvae_fast[fid]'.")
    _add_load_args(fd)
    _add_data_args(fd)
    fd.add_argument("--num_samples", type=at_least_two, default=50_000, help="samples to score (official: 50,000)")
    fd.add_argument("--temp", type=positive_float, default=1.0, help="temperature of the samples")
    fd.add_argument("--bn_temp", type=non_negative_float, default=None,
                    help="temperature of the BatchNorm statistics (re-estimated with --readjust_bn, or cached); "
                         "default: --temp")
    _add_bn_args(fd, "--bn_temp")
    fd.add_argument("--batch_size", type=positive_int, default=100, help="images per generation and Inception pass")
    fd.add_argument("--fid_dir", default=None, help="where the reference statistics are cached (default: "
                                                    "~/.cache/nvae_fast/fid)")
    fd.add_argument("--ref_stats", default=None,
                    help="use this statistics file (mu, sigma; e.g. the official precompute_fid_statistics.py's) "
                         "instead of the dataset")
    fd.add_argument("--num_ref", type=at_least_two, default=50_000,
                    help="at most this many dataset images for the reference statistics (official: 50,000)")
    fd.add_argument("--num_workers", type=non_negative_int, default=2,
                    help="data-loader workers for the reference statistics")
    fd.add_argument("--output", default=None, help="also write the result as JSON to this file")
    fd.set_defaults(func=_fid)


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

    ev = sub.add_parser("evaluate", help="test NELBO and importance-weighted log-likelihood of a checkpoint")
    _add_load_args(ev)
    ev.add_argument("--data", default=None, help="data path (default: the one the checkpoint was trained on)")
    ev.add_argument("--data_format", default=None, help="data format (default: the training run's)")
    ev.add_argument("--num_iw_samples", type=positive_int, default=1000, help="importance samples per image")
    ev.add_argument("--batch_size", type=non_negative_int, default=0, help="batch size (0: the training batch size)")
    ev.add_argument("--eval_on_train", action="store_true", help="evaluate on the training split")
    ev.add_argument("--num_workers", type=non_negative_int, default=1, help="data-loader workers")
    ev.add_argument("--output", default=None, help="also write the results as JSON to this file")
    ev.add_argument("--temp", dest="bn_temp", type=non_negative_float, default=None,
                    help="evaluate with the BatchNorm statistics re-estimated at this temperature (cached, or "
                         "computed with --readjust_bn); default: the checkpoint's")
    _add_bn_args(ev, "--temp")
    ev.set_defaults(func=_evaluate)

    sa = sub.add_parser("sample", help="draw images from a checkpoint: a PNG grid and an .npz")
    _add_load_args(sa)
    sa.add_argument("--num_samples", type=positive_int, default=64, help="number of images")
    sa.add_argument("--temp", type=non_negative_float, default=0.7,
                    help="temperature of the prior (0: decode the prior means)")
    sa.add_argument("--decoder_temp", type=positive_float, default=1.0,
                    help="temperature of the output distribution's sample (as the official "
                         "evaluate.py; give --temp's value to sample it at the prior's temperature)")
    sa.add_argument("--batch_size", type=positive_int, default=64, help="images per forward pass")
    _add_bn_args(sa, "--temp")
    sa.add_argument("--output", default="samples",
                    help="directory for samples.png and samples.npz, or a file name whose stem names both")
    sa.set_defaults(func=_sample)
    _add_latent_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return run_command(f"nvae-fast {args.command}", args.func, args)


if __name__ == "__main__":
    sys.exit(main())
