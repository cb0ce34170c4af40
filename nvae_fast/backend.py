"""Backend dispatch: which implementation runs each fused op, decided per call.

Three backends implement every fused op:

* ``torch``  - the pure-PyTorch reference; runs anywhere, in any float dtype; the ground truth.
* ``triton`` - Triton kernels; on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1``.
* ``cuda``   - hand-written kernels of the extension ``nvae_fast._C`` (csrc/); CUDA tensors only.

Automatic choice (the default): CPU tensors use ``torch``; CUDA tensors use the op's fastest
available backend (its preference order), skipping, with one warning per reason, any that is
missing. An explicit request - ``NVAE_FAST_BACKEND=torch|triton|cuda`` in the environment, or
:func:`set_backend` / :func:`use_backend` in Python, which wins over the environment - is obeyed
or fails with :class:`BackendUnavailableError` saying why. An op that has no kernel for the
requested backend (say, an op written only in Triton under ``cuda``) runs its automatic choice
and warns once.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import os
import warnings
from collections.abc import Iterator, Sequence
from types import ModuleType

import torch

from nvae_fast import _ext

BACKENDS: tuple[str, ...] = ("torch", "triton", "cuda")
ENV_VAR = "NVAE_FAST_BACKEND"

_override: str | None = None
_warned: set[str] = set()


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run the call (not installed, no device, ...)."""


def _validate(name: str | None, source: str) -> str | None:
    if name is None or name in ("", "auto"):
        return None
    if name not in BACKENDS:
        raise ValueError(f"{source} must be one of {', '.join(BACKENDS)} or 'auto', got {name!r}")
    return name


def set_backend(name: str | None) -> None:
    """Force ``name`` for every fused op in this process; ``None`` or ``'auto'`` restores automatic choice."""
    global _override
    _override = _validate(name, "backend")


@contextlib.contextmanager
def use_backend(name: str | None) -> Iterator[None]:
    """Context manager form of :func:`set_backend`; restores the previous setting on exit."""
    global _override
    previous = _override
    set_backend(name)
    try:
        yield
    finally:
        _override = previous


def requested_backend() -> str | None:
    """The explicit request in force (Python call first, then ``NVAE_FAST_BACKEND``), or None for auto."""
    if _override is not None:
        return _override
    return _validate(os.environ.get(ENV_VAR), ENV_VAR)


def triton_interpreted() -> bool:
    """True when Triton runs kernels on the CPU (``TRITON_INTERPRET=1``), as the CI tests do."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def _triton_import_error() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install 'nvae_fast[triton]')"
    try:
        import triton  # noqa: F401
    except Exception as err:  # a broken triton install must not break the package
        return f"triton failed to import ({err})"
    return None


def unavailable_reason(name: str, device: torch.device) -> str | None:
    """None if backend ``name`` can run on tensors on ``device``, else a one-line reason."""
    if name == "torch":
        return None
    if name == "triton":
        reason = _triton_import_error()
        if reason is not None:
            return reason
        if device.type == "cpu" and not triton_interpreted():
            return "triton runs CPU tensors only under TRITON_INTERPRET=1"
        if device.type == "cuda" and not torch.cuda.is_available():
            return "no CUDA device is available to torch"
        if device.type not in ("cpu", "cuda"):
            return f"triton does not run on {device.type} tensors"
        return None
    if name == "cuda":
        if device.type != "cuda":
            return f"the cuda backend runs CUDA tensors only, got {device.type} tensors"
        return _ext.unavailable_reason()
    raise ValueError(f"unknown backend {name!r}; expected one of {', '.join(BACKENDS)}")


def status() -> dict[str, str]:
    """Backend name -> 'available' or the reason it is not, for CUDA tensors on this machine."""
    device = torch.device("cuda")
    return {name: unavailable_reason(name, device) or "available" for name in BACKENDS}


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def select(op: str, device: torch.device, implemented: Sequence[str]) -> str:
    """The backend that runs ``op`` on tensors on ``device``.

    Args:
        op: the op's name, for messages.
        device: where the op's tensors live.
        implemented: the backends the op has, fastest first; must include ``"torch"``.
    """
    requested = requested_backend()
    if requested is not None:
        if requested in implemented:
            reason = unavailable_reason(requested, device)
            if reason is not None:
                raise BackendUnavailableError(f"{op}: backend {requested!r} was requested but {reason}")
            return requested
        _warn_once(f"{op}:{requested}:missing",
                   f"{op} has no {requested!r} kernel; using its automatic choice instead")
    if device.type == "cpu":
        return "torch"
    for name in implemented:
        reason = unavailable_reason(name, device)
        if reason is None:
            return name
        _warn_once(f"{op}:{name}:{reason}", f"{op}: skipping backend {name!r}: {reason}")
    return "torch"


@functools.cache
def has_kernels(op: str, backend_name: str) -> bool:
    """Whether ``nvae_fast.kernels.<backend>.<op>`` exists (without importing it): ops list only the
    fast backends that ship a kernel module for them."""
    return importlib.util.find_spec(f"nvae_fast.kernels.{backend_name}.{op}") is not None


def kernels(op: str, backend_name: str) -> ModuleType:
    """The kernel module of a fast backend for ``op``: ``nvae_fast.kernels.<backend>.<op>``."""
    if backend_name not in ("triton", "cuda"):
        raise ValueError(f"only the triton and cuda backends have kernel modules, got {backend_name!r}")
    return importlib.import_module(f"nvae_fast.kernels.{backend_name}.{op}")
