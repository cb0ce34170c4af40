"""The ``nvae-fast`` command. Subcommands: ``info`` (what runs on this machine)."""

from __future__ import annotations

import argparse
import sys

import torch


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nvae-fast", description="NVAE with fused CUDA and Triton kernels.")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="show versions and which backends can run here")
    info.set_defaults(func=_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
