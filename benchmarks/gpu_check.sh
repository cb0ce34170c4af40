#!/usr/bin/env bash
# The GPU check in one command: builds nvae_fast._C for this machine's GPU, runs every GPU test
# (pytest -m gpu), compute-sanitizer on the CUDA kernels and the decisive benchmarks, within a
# deadline (default 540 s; --quick 240 s). Writes DIR/summary.md, DIR/gpu_check.json,
# DIR/gpu_check.log and the benchmarks' JSON and PNG; exits non-zero on any failure.
#
#   PYTHON=/opt/torch/.venv/bin/python3 bash benchmarks/gpu_check.sh --out DIR [--quick]
#   bash benchmarks/gpu_check.sh --dry-run          # without a GPU: print and check the plan
#
# PYTHON is the interpreter with PyTorch (default: python3); everything runs with it.
# benchmarks/gpu_check.py --help lists every option.
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" benchmarks/gpu_check.py "$@"
