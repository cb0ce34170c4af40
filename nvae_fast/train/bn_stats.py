"""BatchNorm statistics re-estimated on samples (the official ``--readjust_bn``), computed once
per temperature and kept beside the checkpoint.

The official code re-estimates them with 500 sampling passes every time it samples. Here
``prepare_bn`` re-estimates them when asked (``--readjust_bn``) and saves them in
``<checkpoint stem>.bn_stats.safetensors`` next to the checkpoint, keyed by the temperature and
by a fingerprint of the weights they belong to; later ``sample``, ``evaluate`` and ``fid`` runs
at that temperature load them instead of re-estimating. Weights that change (training went on,
EMA instead of raw weights) have another fingerprint, so stale statistics are never applied.

File layout (safetensors: no code runs when it is read): for every entry, the tensors
``"<key>/<module>.running_mean"``, ``".running_var"`` and ``".num_batches_tracked"`` of every
BatchNorm; the metadata ``nvae_fast.bn_stats`` is JSON ``{"format": 1, "entries": {key:
{"temperature", "weights", "iterations", "batch_size"}}}``.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from tqdm import tqdm

from nvae_fast.train.errors import InputError, NonFiniteSamples

FORMAT = 1
METADATA_KEY = "nvae_fast.bn_stats"
_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


@dataclass(frozen=True)
class BNStats:
    """Which BatchNorm statistics a model samples with: ``source`` is 'checkpoint' (as trained),
    're-estimated' (now) or 'cached' (loaded from ``path``); the rest describes the
    re-estimation (None for 'checkpoint')."""

    source: str
    temperature: float | None = None
    iterations: int | None = None
    batch_size: int | None = None
    path: Path | None = None

    def describe(self) -> str:
        if self.source == "checkpoint":
            return "the checkpoint's BatchNorm statistics"
        how = f"re-estimated at t={self.temperature:g} ({self.iterations} passes of {self.batch_size} samples)"
        return f"BatchNorm statistics {how}" + (f", cached in {self.path}" if self.source == "cached" else "")


def cache_path(checkpoint: str | os.PathLike) -> Path:
    """Where the re-estimated statistics of ``checkpoint`` live: ``<stem>.bn_stats.safetensors``."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(f"{checkpoint.stem}.bn_stats.safetensors")


def weights_fingerprint(model: nn.Module) -> str:
    """SHA-256 of the model's parameters (names, dtypes, shapes and bytes), as hex."""
    digest = hashlib.sha256()
    for name, param in model.named_parameters():
        data = param.detach().cpu().contiguous()
        digest.update(f"{name}:{data.dtype}:{tuple(data.shape)};".encode())
        digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()


def _entry_key(temperature: float, fingerprint: str) -> str:
    return f"t={float(temperature)!r}@{fingerprint[:32]}"


def bn_buffers(model: nn.Module) -> dict[str, Tensor]:
    """Every BatchNorm buffer the re-estimation changes, by its state_dict name."""
    return {f"{name}.{buf}": getattr(module, buf) for name, module in model.named_modules()
            if isinstance(module, _BatchNorm) for buf in _BUFFERS if getattr(module, buf, None) is not None}


def _read(path: Path) -> tuple[dict[str, dict], dict[str, Tensor]]:
    """(metadata entries, tensors) of a statistics file; InputError if it is not one."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})[METADATA_KEY])
        if meta.get("format") != FORMAT or not isinstance(meta.get("entries"), dict):
            raise KeyError("format")
        return meta["entries"], load_file(str(path))
    except (SafetensorError, OSError, KeyError, ValueError, TypeError) as e:
        raise InputError(f"{path}: not an nvae_fast BatchNorm statistics file ({e}); delete it or re-estimate "
                         "with --readjust_bn") from e


def load_cached(model: nn.Module, path: Path, temperature: float, fingerprint: str) -> BNStats | None:
    """Loads the statistics cached in ``path`` for these weights at ``temperature`` into the
    model's BatchNorms; None (and the model untouched) if there are none."""
    if not path.is_file():
        return None
    entries, tensors = _read(path)
    key = _entry_key(temperature, fingerprint)
    entry = entries.get(key)
    if entry is None or entry.get("weights") != fingerprint:
        return None
    buffers = bn_buffers(model)
    stored = {name: tensors.get(f"{key}/{name}") for name in buffers}
    bad = [n for n, t in stored.items() if t is None or t.shape != buffers[n].shape]
    if bad:
        raise InputError(f"{path}: the statistics for t={temperature:g} do not fit this model ({bad[0]}); delete "
                         "the file or re-estimate with --readjust_bn")
    with torch.no_grad():
        for name, value in stored.items():
            buffers[name].copy_(value)
    return BNStats("cached", float(entry["temperature"]), int(entry["iterations"]), int(entry["batch_size"]), path)


def save(model: nn.Module, path: Path, stats: BNStats, fingerprint: str) -> None:
    """Adds (or replaces) the model's current BatchNorm statistics as the entry for ``stats``'s
    temperature and these weights; other entries stay. Written atomically."""
    from safetensors.torch import save_file

    try:
        entries, tensors = _read(path) if path.is_file() else ({}, {})
    except InputError:  # an unreadable file holds nothing worth keeping: start afresh
        entries, tensors = {}, {}
    key = _entry_key(stats.temperature, fingerprint)
    tensors = {k: v for k, v in tensors.items() if not k.startswith(key + "/")}
    tensors.update({f"{key}/{name}": buf.detach().cpu().contiguous() for name, buf in bn_buffers(model).items()})
    entries[key] = {"temperature": stats.temperature, "weights": fingerprint, "iterations": stats.iterations,
                    "batch_size": stats.batch_size}
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata={METADATA_KEY: json.dumps({"format": FORMAT, "entries": entries})})
    os.replace(tmp, path)


def prepare_bn(model: nn.Module, checkpoint: str | os.PathLike, temperature: float | None, *, readjust: bool,
               iterations: int = 500, batch_size: int = 16, use_cache: bool = True, write_cache: bool = True,
               log: Callable[[str], None] = print, progress: bool = True) -> BNStats:
    """Puts the BatchNorm statistics a command samples with into ``model`` (left in eval mode).

    * ``readjust``: re-estimate them at ``temperature`` now (fp32, see ``NVAE.readjust_bn``) and,
      with ``write_cache`` (one rank of several), save them beside ``checkpoint`` (a location that
      cannot be written only costs the cache: a warning, and the statistics are used for this run).
    * otherwise, with ``use_cache`` and a ``temperature``: statistics cached for these weights at
      that temperature, if any.
    * otherwise the checkpoint's own statistics.
    """
    model.eval()
    if readjust and temperature is None:
        raise InputError("--readjust_bn needs a temperature (--temp) to re-estimate the statistics at")
    if temperature is None or not (readjust or use_cache):
        return BNStats("checkpoint")
    path = cache_path(checkpoint)
    if not readjust:
        if not path.is_file():
            return BNStats("checkpoint")
        return load_cached(model, path, temperature, weights_fingerprint(model)) or BNStats("checkpoint")
    fingerprint = weights_fingerprint(model)
    bar = (lambda it: tqdm(it, desc=f"re-estimating BatchNorm statistics at t={temperature:g}", leave=False)) \
        if progress else None
    try:
        model.readjust_bn(num_samples=batch_size, t=temperature, iterations=iterations, progress=bar)
    except ValueError as e:
        raise NonFiniteSamples(str(e)) from e
    stats = BNStats("re-estimated", float(temperature), iterations, batch_size, path)
    if use_cache and write_cache:
        try:
            save(model, path, stats, fingerprint)
        except OSError as e:
            log(f"warning: cannot save the re-estimated BatchNorm statistics to {path} ({e.strerror or e}); "
                "they are used for this run only")
    return stats
