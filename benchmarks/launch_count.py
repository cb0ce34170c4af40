"""Counts, on the CPU, the kernels a GPU run would launch and the host synchronisations it would make.

At the model's shapes one kernel's work is a few microseconds, so launch latency and the CPU time
spent issuing launches, not the GPU, set the speed; and one host synchronisation stops the CPU from
running ahead and forbids capturing the step as a CUDA graph. Both are structural and can be counted
without a GPU:

* **Triton launches**: every launch of a ``@triton.jit`` kernel (compiled on a GPU; without one,
  run as a script, it sets ``TRITON_INTERPRET=1`` and the interpreter runs them on the CPU).
* **ATen launches**: every ATen operation outside a Triton launch that would launch a kernel on a GPU
  (``__torch_dispatch__`` sees each one, autograd's backward ops included, composite ops as their
  parts). Views, allocations and metadata queries launch nothing and are left out; a ``_foreach_*``
  op counts once. The Python implementations of nvae_fast's custom ops (``torch.ops.nvae_fast.*``)
  are followed: their own ATen ops and Triton launches are counted, the custom-op call itself is
  reported separately (``custom_ops``: each costs CPU time in dispatch).
* **Host synchronisations**: reading a device value on the host (``.item()``, ``bool(t)``,
  ``float(t)``, ``.tolist()``, ``.numpy()``, ``.cpu()``), and the ops whose output size depends on
  values (``nonzero``, boolean-mask indexing, ``masked_select``, ``unique``, ...) or that read a
  tensor argument on the host (``masked_fill`` with a tensor value).

``--skip_triton`` counts without running the Triton kernels (the interpreter's work is what
makes a count slow): their outputs keep whatever memory they were given. The counts are the same as
long as the measured code makes no host synchronisation (then no value can steer the host's path),
so the mode first checks that: it refuses to report a count with syncs in it.

What this cannot see: work a GPU library splits into several kernels behind one ATen op (cuDNN
batch norm, a foreach op over many tensors), and Python code that reads tensor memory without
PyTorch (``t.data_ptr()`` arithmetic). The counts are per call of the measured function. The
workloads run on the GPU when there is one, else on the CPU.

The ``summary`` of the JSON (also printed on stderr) gives each decoder cell's launches next to
the budget of the fused cell (20 forward+backward in training, 6 in eval) and, for the normal
cell, next to what it launched before its per-channel steps moved into the stage kernels (208
and 38). The up-cell's count includes its skip convolution's weight normalisation (plain torch
ops, as in every weight-normalised convolution of the model), also counted alone.

    python benchmarks/launch_count.py                         # every workload, JSON on stdout
    python benchmarks/launch_count.py --workloads cell --backend torch
    python benchmarks/launch_count.py --output counts.json
    python benchmarks/launch_count.py --workloads train_step --skip_triton   # seconds, not minutes
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

# Ops that launch nothing on a GPU: allocation and metadata. (Views are recognised by their schema.)
NO_KERNEL_OPS = frozenset({
    "empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "resize_", "set_",
    "lift_fresh", "sym_size", "sym_stride", "sym_numel", "sym_storage_offset", "is_same_size",
    "_has_compatible_shallow_copy_type", "is_contiguous", "_nested_tensor_size", "record_stream",
})

# Ops whose output size depends on tensor values (the host must wait for the device).
DATA_DEPENDENT_OPS = frozenset({
    "nonzero", "masked_select", "unique", "_unique", "_unique2", "unique_dim", "unique_consecutive",
    "equal", "is_nonzero", "_local_scalar_dense", "allclose",
})

# Tensor methods that move a value to the host (caught at the Python level: on CPU tensors they
# bypass the dispatcher).
HOST_READ_METHODS = frozenset({"tolist", "numpy", "__array__", "cpu"})


def _op_name(func: Any) -> str:
    return func._schema.name.split("::")[-1]


def _is_view(func: Any) -> bool:
    """An op whose outputs alias an input without writing to it."""
    return any(r.alias_info is not None and not r.alias_info.is_write for r in func._schema.returns)


def _sync_reason(func: Any, args: tuple, kwargs: dict) -> str | None:
    """Why ``func(*args, **kwargs)`` synchronises with the host, or None."""
    name = _op_name(func)
    if name in DATA_DEPENDENT_OPS:
        return name
    if name == "repeat_interleave" and kwargs.get("output_size") is None and isinstance(args[0], torch.Tensor):
        return "repeat_interleave without output_size"
    if name in ("index", "index_put", "index_put_", "_index_put_impl_"):
        indices = args[1] if len(args) > 1 else []
        if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices):
            return f"{name} with a boolean mask"
    if name in ("masked_fill", "masked_fill_") and len(args) > 2 and isinstance(args[2], torch.Tensor):
        return f"{name} with a tensor value"
    return None


@dataclass
class Counts:
    """What one measured call launched and synchronised."""

    triton: Counter = field(default_factory=Counter)       # kernel name -> launches
    aten: Counter = field(default_factory=Counter)         # op name -> launches
    syncs: Counter = field(default_factory=Counter)        # reason -> count
    custom_ops: Counter = field(default_factory=Counter)   # nvae_fast custom op -> calls
    inside: Counter = field(default_factory=Counter)       # outermost custom op -> launches inside it

    @property
    def launches(self) -> int:
        return sum(self.triton.values()) + sum(self.aten.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "launches": self.launches,
            "triton_launches": sum(self.triton.values()),
            "aten_launches": sum(self.aten.values()),
            "syncs": sum(self.syncs.values()),
            "custom_op_calls": sum(self.custom_ops.values()),
            "triton_by_kernel": dict(self.triton.most_common()),
            "aten_by_op": dict(self.aten.most_common()),
            "syncs_by_reason": dict(self.syncs.most_common()),
            "custom_ops": dict(self.custom_ops.most_common()),
            "launches_inside_custom_ops": dict(self.inside.most_common()),
        }

    def launch(self, kind: Counter, name: str, state: dict) -> None:
        kind[name] += 1
        if state["custom_op"] is not None:
            self.inside[state["custom_op"]] += 1


class _DispatchCounter(TorchDispatchMode):
    def __init__(self, counts: Counts, state: dict, host_tensors: set[int]) -> None:
        super().__init__()
        self.counts, self.state, self.host_tensors = counts, state, host_tensors

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.state["in_triton"]:
            return func(*args, **kwargs)
        namespace = func.namespace
        if namespace not in ("aten", "prims", "prim"):
            opdef = _custom_op_definition(func)
            if opdef is not None:
                # Follow the op's Python implementation so that its own launches are counted.
                name = f"{namespace}::{_op_name(func)}"
                self.counts.custom_ops[name] += 1
                outer = self.state["custom_op"]
                self.state["custom_op"] = outer or name
                try:
                    with self:
                        return opdef._init_fn(*args, **kwargs)
                finally:
                    self.state["custom_op"] = outer
        if self.host_tensors and _only_host_tensors(args, self.host_tensors):
            return func(*args, **kwargs)    # CPU work in a GPU run too: neither a launch nor a sync
        reason = _sync_reason(func, args, kwargs)
        if reason is not None:
            self.counts.syncs[reason] += 1
        name = _op_name(func)
        if reason is None or name not in ("_local_scalar_dense", "is_nonzero", "equal", "allclose"):
            if not _is_view(func) and name not in NO_KERNEL_OPS:
                self.counts.launch(self.counts.aten, name if namespace == "aten" else f"{namespace}::{name}",
                                   self.state)
        return func(*args, **kwargs)


class _HostReadCounter(TorchFunctionMode):
    def __init__(self, counts: Counts, state: dict) -> None:
        super().__init__()
        self.counts, self.state = counts, state

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in HOST_READ_METHODS and not self.state["in_triton"]:
            self.counts.syncs[f"Tensor.{name}"] += 1
        return func(*args, **(kwargs or {}))


def _only_host_tensors(args: tuple, host_tensors: set[int]) -> bool:
    tensors = [t for t in pytree.tree_leaves(args) if isinstance(t, torch.Tensor)]
    return bool(tensors) and all(id(t) in host_tensors for t in tensors)


def _custom_op_definition(func: Any) -> Any:
    """The ``torch.library.custom_op`` definition behind an OpOverload, or None."""
    from torch._library import custom_ops

    return custom_ops.OPDEFS.get(func._schema.name)


@contextlib.contextmanager
def _count_triton_launches(counts: Counts, state: dict) -> Iterator[None]:
    """Wraps the run methods of Triton's interpreted and compiled kernels."""
    try:
        from triton.runtime import interpreter, jit
    except ImportError:
        yield
        return
    originals = [(cls, cls.run) for cls in (interpreter.InterpretedFunction, jit.JITFunction)]

    def wrap(run: Callable) -> Callable:
        def counted_run(self, *args, **kwargs):
            if state["in_triton"] or kwargs.get("warmup"):
                return run(self, *args, **kwargs)
            counts.launch(counts.triton, getattr(self.fn, "__name__", repr(self.fn)), state)
            state["in_triton"] = True
            try:
                return run(self, *args, **kwargs)
            finally:
                state["in_triton"] = False
        return counted_run

    for cls, run in originals:
        cls.run = wrap(run)
    try:
        yield
    finally:
        for cls, run in originals:
            cls.run = run


@contextlib.contextmanager
def skipping_triton() -> Iterator[None]:
    """Triton kernels launched inside the block do not run (their outputs are left as they were)."""
    try:
        from triton.runtime import interpreter, jit
    except ImportError:
        yield
        return
    originals = [(cls, cls.run) for cls in (interpreter.InterpretedFunction, jit.JITFunction)]

    def skipped_run(self, *args, **kwargs):
        return None

    for cls, _ in originals:
        cls.run = skipped_run
    try:
        yield
    finally:
        for cls, run in originals:
            cls.run = run


@contextlib.contextmanager
def counting(host_tensors: Iterable[torch.Tensor] = ()) -> Iterator[Counts]:
    """Counts every launch and host synchronisation inside the block (one thread).

    ``host_tensors`` are tensors that stay on the CPU in a GPU run too (an optimizer's step
    counters, say): reading them is neither a launch nor a synchronisation.
    """
    counts = Counts()
    state = {"in_triton": False, "custom_op": None}
    host = {id(t) for t in host_tensors}
    with _count_triton_launches(counts, state), _HostReadCounter(counts, state), \
            _DispatchCounter(counts, state, host):
        yield counts


def count(fn: Callable[[], Any], host_tensors: Iterable[torch.Tensor] = ()) -> Counts:
    """The launches and host synchronisations of one call of ``fn`` (see :func:`counting`)."""
    with counting(host_tensors) as counts:
        fn()
    return counts


# ---------------------------------------------------------------------------------------------
# Workloads
# ---------------------------------------------------------------------------------------------

def default_device() -> torch.device:
    """The GPU when there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# Budget of one fused decoder cell (SE on, single process), and what a normal cell (E=6, k=5, SE)
# launched on the triton backend before its per-channel steps ran inside the stage kernels.
CELL_BUDGET = {"train_forward_backward": 20, "eval_forward": 6}
CELL_BEFORE = {("normal_dec", "mconv_e6k5g0", True): {"train_forward_backward": 208, "eval_forward": 38}}


def cell_counts(cell_type: str = "normal_dec", op: str = "mconv_e6k5g0", use_se: bool = True,
                shape: tuple[int, int, int, int] = (2, 16, 8, 8), backend: str = "triton",
                device: torch.device | str | None = None) -> dict[str, Any]:
    """Launches of one decoder cell: forward + backward in training (after one warm-up step), and
    the forward in eval, with every op on ``backend``, on ``device`` (default: :func:`default_device`)."""
    import nvae_fast
    from nvae_fast.nn.cells import make_cell

    device = torch.device(device) if device is not None else default_device()
    N, C, H, W = shape
    c_out = C // 2 if cell_type.startswith("up") else C
    torch.manual_seed(0)
    cell = make_cell(C, c_out, cell_type, (op,), use_se).to(device)
    x = torch.randn(shape, device=device, requires_grad=True)
    results: dict[str, Any] = {"cell_type": cell_type, "op": op, "se": use_se, "shape": list(shape),
                               "backend": backend, "device": device.type}
    with nvae_fast.use_backend(backend):
        cell.train()

        grad = torch.randn(N, c_out, H * 2 if cell_type.startswith("up") else H,
                           W * 2 if cell_type.startswith("up") else W, device=device)

        def train_step() -> None:
            cell(x).backward(grad)

        train_step()
        # as a training step starts: gradients set to None (optimizer.zero_grad's default), so that
        # backward assigns them instead of accumulating (one add_ per parameter)
        cell.zero_grad(set_to_none=True)
        x.grad = None
        results["train_forward_backward"] = count(train_step).to_dict()
        if cell_type.startswith("up"):
            # The up-cell's skip convolution normalises its weight (the model's weight
            # normalisation, in every Conv2D): its share of the step, counted alone.
            skip_conv = cell.skip[1]
            ones = torch.ones_like(skip_conv.weight)
            cell.zero_grad(set_to_none=True)
            results["skip_weight_norm"] = count(lambda: skip_conv.normalized_weight().backward(ones)).to_dict()
        cell.eval()
        with torch.no_grad():
            cell(x)
            results["eval_forward"] = count(lambda: cell(x)).to_dict()
    return results


def cell_summary(cell: dict[str, Any]) -> dict[str, dict[str, int]]:
    """Per phase of :func:`cell_counts`'s result: its launches, and for the triton backend the
    fused cell's budget and (where known) what the cell launched before."""
    before = CELL_BEFORE.get((cell["cell_type"], cell["op"], cell["se"]), {})
    out = {}
    for phase, budget in CELL_BUDGET.items():
        entry = {"launches": cell[phase]["launches"]}
        if phase == "train_forward_backward" and "skip_weight_norm" in cell:
            entry["of_which_skip_weight_norm"] = cell["skip_weight_norm"]["launches"]
        if cell["backend"] == "triton":
            entry["budget"] = budget
            if phase in before:
                entry["before"] = before[phase]
        out[phase] = entry
    return out


def _summary_line(name: str, summary: dict[str, dict[str, int]]) -> str:
    parts = []
    for phase, label in (("train_forward_backward", "forward+backward in training"), ("eval_forward", "eval")):
        e = summary[phase]
        extra = [f"budget {e['budget']}"] if "budget" in e else []
        extra += [f"was {e['before']}"] if "before" in e else []
        if e.get("of_which_skip_weight_norm"):
            extra.append(f"{e['of_which_skip_weight_norm']} of them the skip convolution's weight normalisation")
        parts.append(f"{e['launches']} launches {label}" + (f" ({', '.join(extra)})" if extra else ""))
    return f"{name}: " + "; ".join(parts)


def train_step_counts(preset: str = "tiny_cifar10", batch: int = 4, backend: str = "triton",
                      device: torch.device | str | None = None, skip_triton: bool = False) -> dict[str, Any]:
    """Launches and host synchronisations of one ``Trainer.train_step`` of ``preset`` on ``device``
    (default: :func:`default_device`; the second step: the first one draws the spectral
    regulariser's start vectors). ``skip_triton``: the Triton kernels do not run (see the module
    docstring); raises RuntimeError if the step synchronises, since its count could then depend
    on the values skipped."""
    import nvae_fast
    from nvae_fast import NVAE, NVAEConfig
    from nvae_fast.train.recipe import TrainConfig
    from nvae_fast.train.runtime import Runtime
    from nvae_fast.train.trainer import Trainer

    device = torch.device(device) if device is not None else default_device()
    torch.manual_seed(0)
    config = NVAEConfig.preset(preset)
    cfg = TrainConfig(batch_size=batch, epochs=2, warmup_epochs=1, amp="off")
    x = torch.rand(batch, config.in_channels, config.image_size, config.image_size, device=device)
    with nvae_fast.use_backend(backend), (skipping_triton() if skip_triton else contextlib.nullcontext()):
        trainer = Trainer(NVAE(config).to(device), cfg, Runtime(device), steps_per_epoch=10)
        trainer.train_step(x)
        # Optimizers keep their step counters on the CPU unless told otherwise.
        host = [s["step"] for s in trainer.optimizer.state.values()
                if isinstance(s.get("step"), torch.Tensor) and not s["step"].is_cuda]
        counts = count(lambda: trainer.train_step(x), host)
    if skip_triton and counts.syncs:
        raise RuntimeError(f"the step synchronises ({dict(counts.syncs)}): its launch count without running the "
                           "Triton kernels could differ from the real one; count without skip_triton")
    return {"preset": preset, "batch": batch, "backend": backend, "device": device.type, "skip_triton": skip_triton,
            "train_step": counts.to_dict()}


WORKLOADS = ("cell", "train_step")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--workloads", default=",".join(WORKLOADS),
                        help=f"comma-separated subset of {', '.join(WORKLOADS)}")
    parser.add_argument("--backend", default="triton", choices=("triton", "torch"),
                        help="backend of nvae_fast's fused ops (the torch backend is the eager reference)")
    parser.add_argument("--preset", default="tiny_cifar10", help="model preset of the train_step workload")
    parser.add_argument("--batch", type=int, default=4, help="batch size of the train_step workload")
    parser.add_argument("--skip_triton", action="store_true",
                        help="do not run the Triton kernels of the train_step workload (same counts while the step "
                             "makes no host synchronisation, which is checked; much faster under the interpreter)")
    parser.add_argument("--output", help="also write the JSON to this file")
    args = parser.parse_args(argv)
    workloads = [w for w in args.workloads.split(",") if w]
    unknown = sorted(set(workloads) - set(WORKLOADS))
    if unknown:
        parser.error(f"--workloads: unknown {unknown}; expected names from {', '.join(WORKLOADS)}")
    if args.batch < 2:
        parser.error(f"--batch must be at least 2 (training needs batch statistics), got {args.batch}")
    from nvae_fast.backend import triton_interpreted

    device = default_device()
    report: dict[str, Any] = {"torch": torch.__version__,
                              "counted_on": "cpu (Triton interpreter)" if device.type == "cpu" and triton_interpreted()
                              else device.type}
    if "cell" in workloads:
        report["cells"] = [cell_counts("normal_dec", backend=args.backend, device=device),
                           cell_counts("up_dec", backend=args.backend, device=device)]
        report["summary"] = {c["cell_type"]: cell_summary(c) for c in report["cells"]}
        for name, summary in report["summary"].items():
            print(_summary_line(name, summary), file=sys.stderr)
    if "train_step" in workloads:
        report["train_step"] = train_step_counts(args.preset, args.batch, args.backend, device,
                                                 skip_triton=args.skip_triton)
    text = json.dumps(report, indent=2)
    print(text)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    if not torch.cuda.is_available():
        # Without a GPU the interpreter runs the Triton kernels; it is chosen when they are
        # defined, so before nvae_fast is imported.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    sys.exit(main())
