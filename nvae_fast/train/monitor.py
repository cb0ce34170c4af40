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

from nvae_fast.train.errors import failure_message


class Monitor:
    """Logs of one run in ``run_dir``: TensorBoard event files and ``log.txt``.

    The directory and its files are created by the first message or scalar, so a run that fails
    while it reads its data leaves nothing behind; from then on, ``error`` records in log.txt why
    a run stopped.
    """

    def __init__(self, run_dir: str | Path | None, enabled: bool = True, tensorboard: bool = True) -> None:
        self.enabled = enabled
        self.start = time.time()
        self.run_dir = Path(run_dir) if enabled and run_dir is not None else None
        self.tensorboard = tensorboard
        self._writer = None
        self._log = None

    def _open(self) -> None:
        if self.run_dir is None or self._log is not None:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._log = open(self.run_dir / "log.txt", "a", encoding="utf-8")
        if self.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(self.run_dir), flush_secs=30)

    def info(self, message: str) -> None:
        """A console line (through tqdm, so it does not break a bar) and a line in log.txt."""
        if not self.enabled:
            return
        self._open()
        elapsed = time.strftime("%H:%M:%S", time.gmtime(time.time() - self.start))
        line = f"[{elapsed}] {message}"
        tqdm.write(line, file=sys.stdout)
        if self._log is not None:
            self._log.write(line + "\n")
            self._log.flush()

    def error(self, err: BaseException) -> None:
        """Records why the run stopped in log.txt (the console gets it from the caller); writes
        nothing where the run had not created its directory yet."""
        if self.run_dir is None:
            return
        if self._log is None:
            if not self.run_dir.is_dir():
                return
            self._log = open(self.run_dir / "log.txt", "a", encoding="utf-8")
        elapsed = time.strftime("%H:%M:%S", time.gmtime(time.time() - self.start))
        self._log.write(f"[{elapsed}] error: {failure_message(err)}\n")
        self._log.flush()

    def progress(self, iterable: Iterable, total: int | None = None, desc: str = "", leave: bool = False) -> Iterable:
        """``iterable`` with a tqdm bar on the main rank."""
        if not self.enabled:
            return iterable
        return tqdm(iterable, total=total, desc=desc, leave=leave, dynamic_ncols=True, file=sys.stderr)

    def scalars(self, values: dict[str, float], step: int) -> None:
        self._open()
        if self._writer is not None:
            for tag, value in values.items():
                self._writer.add_scalar(tag, float(value), step)

    def image(self, tag: str, image: Tensor, step: int) -> None:
        """A (C, H, W) image in [0, 1] (NaN shown as black: a diverging model's samples must not
        make TensorBoard's uint8 conversion warn)."""
        self._open()
        if self._writer is not None:
            self._writer.add_image(tag, image.detach().float().nan_to_num(0.0).clamp(0, 1).cpu(), step)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._log is not None:
            self._log.close()
            self._log = None
        self.run_dir = None
