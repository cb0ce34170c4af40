"""Where commands write: checked before any work, written whole, readable like any other file.

``check_writable_dir`` and ``check_output_file`` run before training, evaluating or sampling, so a
command never computes for an hour and then fails on a path it cannot write. They create nothing:
they find the nearest existing ancestor and probe it with a temporary file (``os.access`` is wrong
for root and on some network file systems). ``write_atomic`` writes a temporary file beside the
target and renames it over the target, with the permissions the umask gives new files (a
temporary file is created 0600), after removing the temporaries an interrupted earlier write left.
``json_text`` writes non-finite numbers as ``null``, so a result file is always valid JSON.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from nvae_fast.train.errors import InputError


def _first_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _probe(directory: Path, what: str) -> None:
    try:
        fd, probe = tempfile.mkstemp(prefix=".nvae_fast-write-test-", dir=directory)
    except OSError as e:
        raise InputError(f"{what} {directory}: cannot write there ({e.strerror or e})") from e
    os.close(fd)
    os.unlink(probe)


def check_writable_dir(path: str | os.PathLike, what: str) -> None:
    """Raises ``InputError`` unless ``path`` is, or can be created as, a writable directory.

    ``what`` names the option the path came from (e.g. ``"--output"``), for the message.
    """
    path = Path(path)
    existing = _first_existing(path)
    if not existing.is_dir():
        inside = "" if existing == path.absolute() else f" (in {path})"
        raise InputError(f"{what} {existing} is a file, not a directory{inside}")
    _probe(existing, what)


def check_output_file(path: str | os.PathLike, what: str) -> None:
    """Raises ``InputError`` unless a file can be written at ``path`` (not a directory, its
    directory writable or creatable)."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{what} {path} is a directory; expected a file name")
    check_writable_dir(path.parent, what)


def new_file_mode() -> int:
    """The mode ``open(path, "w")`` gives a new file under the current umask."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def remove_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Removes ``PATH.*.tmp`` files that an interrupted ``write_atomic`` of ``path`` left; returns
    them. Only one process writes a run's files, so any such file is stale."""
    path = Path(path)
    stale = sorted(path.parent.glob(f"{path.name}.*.tmp")) if path.parent.is_dir() else []
    for tmp in stale:
        tmp.unlink(missing_ok=True)
    return stale


def write_atomic(path: str | os.PathLike, write: Callable[[IO[bytes]], Any]) -> Path:
    """Calls ``write(f)`` on a temporary file beside ``path``, flushes it to disk and renames it
    over ``path``: readers see the old file or the new one, never a part. The file gets the mode of
    a newly created file (the umask's); stale temporaries of ``path`` are removed first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, new_file_mode())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(v) for v in value]
    return value


def json_text(obj: Any) -> str:
    """``obj`` as indented JSON with NaN and ±Inf written as ``null`` (JSON has no such numbers)."""
    return json.dumps(_finite_or_none(obj), indent=2, allow_nan=False) + "\n"


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Writes ``json_text(obj)`` to ``path`` atomically."""
    return write_atomic(path, lambda f: f.write(json_text(obj).encode()))
