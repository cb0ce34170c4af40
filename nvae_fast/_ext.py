"""Loads the optional CUDA extension ``nvae_fast._C`` and says why when it cannot be used.

The extension is built from csrc/ only where a CUDA toolkit was found at install time, and it is
usable only where a CUDA device is visible. Neither is an error: the package imports everywhere and
the dispatcher (nvae_fast.backend) reports the reason when the ``cuda`` backend is asked for.
"""

from __future__ import annotations

import functools
from types import ModuleType

REBUILD_HINT = (
    "rebuild with a CUDA toolkit on PATH: `NVAE_FAST_BUILD_CUDA=1 pip install --no-build-isolation .`"
)


@functools.cache
def _load() -> tuple[ModuleType | None, str | None]:
    try:
        from nvae_fast import _C  # type: ignore[attr-defined]
    except ImportError as err:
        return None, f"nvae_fast._C is not built or cannot load ({err}); {REBUILD_HINT}"
    count, error = _C.device_count()
    if count == 0:
        return None, f"nvae_fast._C is built but finds no CUDA device ({error or 'none visible'})"
    return _C, None


def extension() -> ModuleType:
    """The loaded ``nvae_fast._C`` module; RuntimeError (with the reason) when it is unusable."""
    module, reason = _load()
    if module is None:
        raise RuntimeError(reason)
    return module


def unavailable_reason() -> str | None:
    """None when ``nvae_fast._C`` is loaded and sees a device, else a one-line reason."""
    return _load()[1]
