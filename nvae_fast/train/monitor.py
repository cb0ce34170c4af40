"""Progress and logs of a run: tqdm bars, TensorBoard, a console summary and ``log.txt``.

Only the main rank writes; on other ranks every method does nothing, so the training code calls
them unconditionally.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable
from pathlib import Path

from torch import Tensor
from tqdm import tqdm


class Monitor:
    """Logs of one run in ``run_dir`` (created): TensorBoard event files and ``log.txt``."""

    def __init__(self, run_dir: str | Path | None, enabled: bool = True, tensorboard: bool = True) -> None:
        self.enabled = enabled
        self.start = time.time()
        self._writer = None
        self._log = None
        if enabled and run_dir is not None:
            run_dir = Path(run_dir)
            run_dir.mkdir(parents=True, exist_ok=True)
            self._log = open(run_dir / "log.txt", "a", encoding="utf-8")
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self._writer = SummaryWriter(log_dir=str(run_dir), flush_secs=30)

    def info(self, message: str) -> None:
        """A console line (through tqdm, so it does not break a bar) and a line in log.txt."""
        if not self.enabled:
            return
        elapsed = time.strftime("%H:%M:%S", time.gmtime(time.time() - self.start))
        line = f"[{elapsed}] {message}"
        tqdm.write(line, file=sys.stdout)
        if self._log is not None:
            self._log.write(line + "\n")
            self._log.flush()

    def progress(self, iterable: Iterable, total: int | None = None, desc: str = "", leave: bool = False) -> Iterable:
        """``iterable`` with a tqdm bar on the main rank."""
        if not self.enabled:
            return iterable
        return tqdm(iterable, total=total, desc=desc, leave=leave, dynamic_ncols=True, file=sys.stderr)

    def scalars(self, values: dict[str, float], step: int) -> None:
        if self._writer is not None:
            for tag, value in values.items():
                self._writer.add_scalar(tag, float(value), step)

    def image(self, tag: str, image: Tensor, step: int) -> None:
        """A (C, H, W) image in [0, 1]."""
        if self._writer is not None:
            self._writer.add_image(tag, image.detach().float().clamp(0, 1).cpu(), step)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._log is not None:
            self._log.close()
            self._log = None
