"""Reading weights from files anyone may hand us: refusals and mismatches said in one line.

``torch.load(weights_only=True)`` refuses everything but tensors and plain values, but its error
text is several paragraphs long, carries terminal escape codes and advises retrying with
``weights_only=False``, which would run whatever the file holds. ``load_error_reason`` keeps the
part that says what is wrong with the file. ``load_state_dict_checked`` names the first missing
key, the first unexpected key and the first shape mismatch instead of torch's multi-line report.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch import Tensor, nn

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_GLOBAL = re.compile(r"GLOBAL (\S+) (?:was not an allowed global|whose module)")
# Keys of the official model's second name for a weight (convolutions without weight
# normalisation): written by our state_dict, optional in a file (older official checkpoints lack it).
_OPTIONAL_SUFFIX = ".weight_normalized"


def load_error_reason(err: BaseException) -> str:
    """One line saying why ``torch.load(weights_only=True)`` refused a file."""
    if isinstance(err, EOFError):
        return "the file ends early: truncated or empty"
    text = _ANSI.sub("", str(err))
    found = _GLOBAL.search(text)
    if found:
        return (f"it holds a pickled {found.group(1)}, not only tensors and plain values; refused without "
                "running it")
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
    elif text.startswith("Weights only load failed."):
        text = text.split("\n\n", 1)[-1]
    text = text.split("Check the documentation of torch.load", 1)[0]
    lines = [line.strip() for line in text.splitlines() if line.strip() and "weights_only" not in line]
    # torch's reader follows the cause with sentences of advice: keep the first sentence.
    return lines[0].split(". ", 1)[0].rstrip(".") if lines else type(err).__name__


class StateDictMismatchError(ValueError, RuntimeError):
    """Weights that do not fit the model: a ``ValueError`` (bad input) that is also the
    ``RuntimeError`` ``nn.Module.load_state_dict`` raises, for callers that catch that."""


def state_dict_mismatch(model: nn.Module, state: Mapping[str, object]) -> str | None:
    """What keeps ``state`` from loading into ``model`` strictly, or None: the first missing key,
    the first unexpected key and the first shape mismatch, each with its count."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith(_OPTIONAL_SUFFIX)]
    unexpected = [k for k in state if k not in expected]
    not_tensors = [k for k in expected if k in state and not isinstance(state[k], Tensor)]
    shapes = [k for k in expected if k in state and isinstance(state[k], Tensor)
              and state[k].shape != expected[k].shape]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing key(s), the first {missing[0]!r}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s), the first {unexpected[0]!r}")
    if not_tensors:
        parts.append(f"{len(not_tensors)} value(s) that are not tensors, the first {not_tensors[0]!r}")
    if shapes:
        k = shapes[0]
        parts.append(f"{len(shapes)} shape mismatch(es), the first {k!r}: {tuple(state[k].shape)} in the file, "
                     f"{tuple(expected[k].shape)} in the model")
    return "; ".join(parts) or None


def load_state_dict_checked(model: nn.Module, state: Mapping[str, object], source: str) -> None:
    """``model.load_state_dict(state)`` (strict) raising a one-line ``StateDictMismatchError`` that
    starts with ``source`` and names what does not fit."""
    problem = state_dict_mismatch(model, state)
    if problem is not None:
        raise StateDictMismatchError(f"{source}: the weights do not fit the model ({problem})")
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        lines = [line.strip() for line in str(e).splitlines()[1:] if line.strip()] or [str(e).strip()]
        raise StateDictMismatchError(f"{source}: the weights do not fit the model ({'; '.join(lines)})") from e


def first_non_finite(tensors: Mapping[str, object]) -> tuple[str, int] | None:
    """(name of the first floating-point tensor holding NaN or ±Inf, how many do), or None."""
    floats = [(k, v) for k, v in tensors.items() if isinstance(v, Tensor) and v.is_floating_point() and v.numel()]
    if not floats:
        return None
    finite = torch.stack([v.isfinite().all() for _, v in floats]).cpu()  # one device sync for all
    bad = [k for (k, _), ok in zip(floats, finite.tolist()) if not ok]
    return (bad[0], len(bad)) if bad else None
