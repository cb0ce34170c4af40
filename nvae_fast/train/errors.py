"""Errors that mean "the user's input is wrong" (or the run diverged), as opposed to a bug, and the
one place that says which failures a command reports as one line, with which exit status.

The CLI prints expected failures as one line (no traceback); library callers get ordinary
ValueError / FileNotFoundError / RuntimeError subclasses.
"""

from __future__ import annotations

from torch import OutOfMemoryError

from nvae_fast.backend import BackendUnavailableError

EXIT_INPUT, EXIT_DIVERGED, EXIT_INTERRUPTED = 2, 3, 130


class InputError(ValueError):
    """Bad user input: unknown format, corrupt file, wrong image size, inconsistent options."""


class MissingPathError(InputError, FileNotFoundError):
    """A path the user named (or that a format needs) does not exist."""


class TrainingDiverged(RuntimeError):
    """Too many consecutive steps had a NaN/Inf loss or gradient, or the weights became NaN/Inf."""


class NonFiniteSamples(RuntimeError):
    """Sampled images (or the BatchNorm statistics re-estimated on samples) hold NaN/Inf values."""


def one_line(text: str) -> str:
    """``text`` with its lines joined by '; ' (messages from libraries may span several)."""
    return "; ".join(line.strip() for line in str(text).splitlines() if line.strip())


def expected_failure(err: BaseException) -> tuple[int, str] | None:
    """(exit status, one-line message) for a failure a user can act on, None for anything else
    (a bug, whose traceback is worth seeing).

    Expected: bad input (``InputError``, exit 2), a backend the environment asks for that cannot
    run (exit 2), a file system that refuses a read or write (exit 2), memory exhausted on the
    device (exit 2), divergence or samples that are all NaN/Inf (exit 3), Ctrl-C (exit 130).
    """
    if isinstance(err, (TrainingDiverged, NonFiniteSamples)):
        return EXIT_DIVERGED, one_line(str(err))
    if isinstance(err, KeyboardInterrupt):
        return EXIT_INTERRUPTED, "interrupted"
    if isinstance(err, InputError):
        return EXIT_INPUT, one_line(str(err))
    if isinstance(err, BackendUnavailableError):
        return EXIT_INPUT, f"{one_line(str(err))} (NVAE_FAST_BACKEND asks for it; nvae-fast info lists what runs here)"
    if isinstance(err, OutOfMemoryError):
        return EXIT_INPUT, f"out of memory ({one_line(str(err)).split('. ')[0]}); lower --batch_size"
    if isinstance(err, OSError):
        where = f"{err.filename}: " if err.filename else ""
        return EXIT_INPUT, f"{where}{err.strerror or one_line(str(err))}"
    return None


def failure_message(err: BaseException) -> str:
    """The line a log records for ``err``: the expected failure's message, else its type and
    first line."""
    expected = expected_failure(err)
    if expected is not None:
        return expected[1]
    first = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"{type(err).__name__}: {first}" if first else type(err).__name__
