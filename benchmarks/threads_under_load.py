"""The digits demo's training step time on the CPU, idle and with one core kept busy by another process.

Each condition runs ``nvae-fast train --preset digits`` for one epoch (23 steps, no evaluation in
between) in a fresh run directory and reads the epoch's wall time from the run's log; the busy
conditions start ``python -c 'while True: pass'`` beside it. Conditions: the CLI's default thread
choice (sized to the free cores, ``nvae_fast.train.threads``) and a fixed ``OMP_NUM_THREADS``
(the count PyTorch would pick by itself is the number of cores). The machine's load average is
printed with each figure: on a shared machine "idle" is only as idle as the others let it be.

    python benchmarks/threads_under_load.py [--repeats 2] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

STEPS = 23  # one epoch of the digits preset


def _epoch_seconds(env: dict[str, str], busy: bool) -> float:
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
    try:
        with tempfile.TemporaryDirectory() as root:
            subprocess.run([sys.executable, "-m", "nvae_fast", "train", "--preset", "digits", "--root", root,
                            "--stop_after_step", str(STEPS), "--eval_every", "1000"],
                           env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            log = (Path(root) / "eval-digits" / "log.txt").read_text()
    finally:
        if spinner is not None:
            spinner.kill()
            spinner.wait()
    found = re.search(r"epoch 1/\d+ .* ([0-9.]+)s", log)
    if found is None:
        raise RuntimeError(f"no epoch time in the run's log:\n{log}")
    return float(found.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2, help="runs per condition (the median is shown)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="the fixed OMP_NUM_THREADS compared against (default: the cores, PyTorch's own choice)")
    args = parser.parse_args()
    base = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    fixed = {**base, "OMP_NUM_THREADS": str(args.threads)}
    print(f"{os.cpu_count()} cores; seconds per training step of the digits demo (median of {args.repeats} "
          f"epochs of {STEPS} steps)")
    for name, env, busy in [("default threads, idle", base, False), ("default threads, one core busy", base, True),
                            (f"OMP_NUM_THREADS={args.threads}, idle", fixed, False),
                            (f"OMP_NUM_THREADS={args.threads}, one core busy", fixed, True)]:
        times = sorted(_epoch_seconds(env, busy) / STEPS for _ in range(args.repeats))
        load = os.getloadavg()[0]
        print(f"{name:<36} {statistics.median(times):.3f} s/step  (runs {', '.join(f'{t:.3f}' for t in times)}; "
              f"load average {load:.1f})", flush=True)


if __name__ == "__main__":
    main()
