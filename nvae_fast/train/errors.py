"""Errors that mean "the user's input is wrong", as opposed to a bug.

The CLI prints these as one line (no traceback) and exits non-zero; library callers get ordinary
ValueError / FileNotFoundError subclasses.
"""


class InputError(ValueError):
    """Bad user input: unknown format, corrupt file, wrong image size, inconsistent options."""


class MissingPathError(InputError, FileNotFoundError):
    """A path the user named (or that a format needs) does not exist."""


class TrainingDiverged(RuntimeError):
    """Too many consecutive steps had a NaN/Inf loss or gradient."""


class NonFiniteSamples(RuntimeError):
    """Sampled images (or the BatchNorm statistics re-estimated on samples) hold NaN/Inf values."""
