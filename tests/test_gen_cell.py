"""The fused generative cell: reference against the official layers, every backend against the
reference (output, input gradient, every parameter gradient, running statistics), saved memory."""

import math
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

import nvae_fast
from nvae_fast.ops.gen_cell import GenCellParams, GenCellRunningStats, gen_cell, gen_cell_ref

from conftest import HAS_CUDA, requires_cuda
from tolerances import TOL, assert_close

DEVICE = "cuda" if HAS_CUDA else "cpu"


def _params(Cin, Cout, E, k=5, se=True, seed=0):
    """Random float64 parameters with the official shapes, scaled so that activations stay O(1)."""
    g = torch.Generator().manual_seed(seed)
    EC, hidden = Cin * E, max(Cout // 16, 4)

    def r(*shape, scale=1.0, offset=0.0):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * scale + offset

    se_params = (r(hidden, Cout, scale=Cout ** -0.5), r(hidden, scale=0.1), r(Cout, hidden, scale=hidden ** -0.5),
                 r(Cout, scale=0.1)) if se else ()
    params = GenCellParams(
        r(Cin, scale=0.2, offset=1), r(Cin, scale=0.2), r(EC, Cin, 1, 1, scale=Cin ** -0.5),
        r(EC, scale=0.2, offset=1), r(EC, scale=0.2), r(EC, 1, k, k, scale=1 / k),
        r(EC, scale=0.2, offset=1), r(EC, scale=0.2), r(Cout, EC, 1, 1, scale=EC ** -0.5),
        r(Cout, scale=0.2, offset=1), r(Cout, scale=0.2), *se_params)
    running = GenCellRunningStats(*(r(C, scale=0.1) if i % 2 == 0 else r(C).abs() + 0.5
                                    for i, C in enumerate((Cin, Cin, EC, EC, EC, EC, Cout, Cout))),
                                  *(torch.tensor(3) for _ in range(4)))
    return params, running


def _copy_running(running, dtype=None, device=DEVICE):
    """A copy of the running statistics (in ``dtype``) and of the integer batch counters."""
    return GenCellRunningStats(*(t.to(device, dtype if t.is_floating_point() and dtype else t.dtype).clone()
                                 for t in running))


def _inputs(N, Cin, Cout, H, W, upsample, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, Cin, H, W, generator=g, dtype=torch.float64) * 1.5 + 0.3
    needs_skip = upsample or Cin != Cout
    Ho, Wo = (2 * H, 2 * W) if upsample else (H, W)
    skip = torch.randn(N, Cout, Ho, Wo, generator=g, dtype=torch.float64) if needs_skip else None
    dout = torch.randn(N, Cout, Ho, Wo, generator=g, dtype=torch.float64)
    return x, skip, dout


def _leaf(t, dtype=None, layout="channels_last", device=DEVICE):
    if t is None:
        return None
    t = t.to(device, dtype or t.dtype)
    if layout == "channels_last" and t.dim() == 4:
        t = t.contiguous(memory_format=torch.channels_last)
    return t.detach().clone().requires_grad_()


def _run(backend, x, skip, dout, params, running, upsample, training, dtype, layout="channels_last",
         device=DEVICE):
    """Output and gradients of one forward/backward; params and running statistics in fp32 (fp64
    for fp64 activations), as a model keeps them."""
    pdtype = torch.float64 if dtype == torch.float64 else torch.float32
    xl, sl = _leaf(x, dtype, layout, device), _leaf(skip, dtype, layout, device)
    pl = GenCellParams(*(None if t is None else _leaf(t, pdtype, "keep", device) for t in params))
    rl = _copy_running(running, pdtype, device)
    fn = gen_cell_ref if backend == "ref" else gen_cell
    with nvae_fast.use_backend(None if backend == "ref" else backend):
        out = fn(xl, pl, rl, sl, upsample, training, 0.05, 1e-5)
        out.backward(dout.to(device, dtype))
    grads = {"x": xl.grad, **({"skip": sl.grad} if sl is not None else {})}
    grads.update({name: t.grad for name, t in zip(GenCellParams._fields, pl) if t is not None})
    return out.detach(), grads, rl


def _compare(got, expected, dtype, where, scale=1.0):
    out, grads, running = got
    out_e, grads_e, running_e = expected
    assert out.dtype == dtype
    assert_close(out.double(), out_e.double(), dtype, scale=scale, msg=f"output, {where}")
    for name, g in grads.items():
        # Parameter gradients are sums over N*H*W terms; relative to the largest entry.
        ref = grads_e[name]
        atol_scale = scale * max(1.0, ref.abs().max().item())
        assert_close(g.double(), ref.double(), dtype if name in ("x", "skip") else torch.float32, scale=atol_scale,
                     msg=f"grad {name}, {where}")
    for name, r, r_e in zip(GenCellRunningStats._fields, running, running_e):
        if r.is_floating_point():
            assert_close(r.double(), r_e.double(), torch.float32, scale=scale, msg=f"running {name}, {where}")
        else:
            assert torch.equal(r, r_e), f"running {name}, {where}: {r} != {r_e}"


# ---------------------------------------------------------------------------------------------
# The reference against the official cell's layers (float64)
# ---------------------------------------------------------------------------------------------

class _OfficialLikeCell(nn.Module):
    """The official Cell(InvertedResidual + SE) rebuilt from torch.nn layers and the official
    SyncBatchNormSwish (nvae_fast.BatchNormSwish), holding the given parameters."""

    def __init__(self, params: GenCellParams, running: GenCellRunningStats, upsample: bool):
        super().__init__()
        EC, Cin = params.conv1_weight.shape[:2]
        Cout, k = params.conv2_weight.shape[0], params.dw_weight.shape[-1]
        bns = [nn.BatchNorm2d(Cin, momentum=0.05), nvae_fast.BatchNormSwish(EC, momentum=0.05),
               nvae_fast.BatchNormSwish(EC, momentum=0.05), nn.BatchNorm2d(Cout, momentum=0.05)]
        convs = [nn.Conv2d(Cin, EC, 1, bias=False), nn.Conv2d(EC, EC, k, padding=k // 2, groups=EC, bias=False),
                 nn.Conv2d(EC, Cout, 1, bias=False)]
        layers = [nn.UpsamplingNearest2d(scale_factor=2)] if upsample else []
        self.conv = nn.Sequential(*layers, bns[0], convs[0], bns[1], convs[1], bns[2], convs[2], bns[3])
        self.se = nn.Sequential(nn.Linear(Cout, params.se_fc1_weight.shape[0]), nn.ReLU(),
                                nn.Linear(params.se_fc1_weight.shape[0], Cout), nn.Sigmoid())
        self.to(params.conv1_weight.dtype)
        with torch.no_grad():
            for i, bn in enumerate(bns):
                bn.weight.copy_(params[(0, 3, 6, 9)[i]])
                bn.bias.copy_(params[(1, 4, 7, 10)[i]])
                bn.running_mean.copy_(running[2 * i])
                bn.running_var.copy_(running[2 * i + 1])
            for conv, w in zip(convs, (params.conv1_weight, params.dw_weight, params.conv2_weight)):
                conv.weight.copy_(w)
            for lin, w, b in ((self.se[0], params.se_fc1_weight, params.se_fc1_bias),
                              (self.se[2], params.se_fc2_weight, params.se_fc2_bias)):
                lin.weight.copy_(w)
                lin.bias.copy_(b)
        self.bns = bns

    def forward(self, x, skip):
        s = self.conv(x)
        s = s * self.se(s.mean(dim=(2, 3)))[:, :, None, None]
        return (x if skip is None else skip) + 0.1 * s


@pytest.mark.parametrize("upsample", [False, True])
def test_reference_matches_official_layers(upsample):
    Cin, Cout, E, k = (6, 3, 3, 5) if upsample else (5, 5, 6, 3)
    params, running = _params(Cin, Cout, E, k)
    x, skip, _ = _inputs(2, Cin, Cout, 4, 3, upsample)
    cell = _OfficialLikeCell(params, running, upsample)
    run = _copy_running(running, device="cpu")
    for training in (True, False):   # eval after the training step: with the updated statistics
        cell.train(training)
        expected = cell(x, skip)
        got = gen_cell_ref(x, params, run, skip, upsample, training, 0.05, 1e-5)
        assert_close(got, expected)
        if training:
            for i, bn in enumerate(cell.bns):
                assert_close(run[2 * i], bn.running_mean)
                assert_close(run[2 * i + 1], bn.running_var)


# ---------------------------------------------------------------------------------------------
# The pipeline's hand-written backward (torch backend) against the reference, float64
# ---------------------------------------------------------------------------------------------

TORCH_CASES = [
    # (N, Cin, Cout, E, k, H, W, upsample, training, se)
    (3, 20, 20, 6, 5, 5, 7, False, True, True),
    (3, 20, 20, 6, 5, 5, 7, False, False, True),
    (2, 8, 4, 3, 5, 3, 4, True, True, True),
    (1, 8, 4, 6, 5, 1, 1, True, True, True),
    (3, 3, 3, 6, 11, 1, 1, False, True, False),
    (1, 3, 3, 3, 5, 1, 1, False, False, False),
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", TORCH_CASES, ids=lambda c: "x".join(map(str, c)))
def test_torch_backend_matches_reference_float64(case):
    N, Cin, Cout, E, k, H, W, upsample, training, se = case
    params, running = _params(Cin, Cout, E, k, se)
    x, skip, dout = _inputs(N, Cin, Cout, H, W, upsample)
    expected = _run("ref", x, skip, dout, params, running, upsample, training, torch.float64)
    got = _run("torch", x, skip, dout, params, running, upsample, training, torch.float64)
    # The 1x1 up-cell normalises four copies of one value: its variance is 0 and 1/sqrt(eps)
    # amplifies the reference's own rounding.
    _compare(got, expected, torch.float64, f"{case}", scale=1e3 if H * W == 1 and upsample else 1.0)


@pytest.mark.parametrize("training", [True, False])
def test_torch_backend_gradcheck(training):
    params, running = _params(3, 3, 3, 3, se=True)
    x, _, _ = _inputs(2, 3, 3, 2, 2, False)
    leaves = [x.requires_grad_()] + [t.requires_grad_() for t in params.tensors()]

    def fn(x, *tensors):
        with nvae_fast.use_backend("torch"):
            return gen_cell(x, GenCellParams(*tensors), _copy_running(running, device="cpu"),
                            training=training)

    assert torch.autograd.gradcheck(fn, leaves, fast_mode=True)


# ---------------------------------------------------------------------------------------------
# Triton against the reference (fp32 under the interpreter on CPU; also bf16 on a GPU)
# ---------------------------------------------------------------------------------------------

TRITON_CASES = [
    # (N, Cin, Cout, E, k, H, W, upsample, training, se)
    (3, 20, 20, 6, 5, 5, 7, False, True, True),
    (3, 20, 20, 6, 5, 5, 7, False, False, True),
    (1, 36, 36, 3, 5, 8, 8, False, True, True),
    (3, 3, 3, 6, 5, 1, 1, False, True, True),
    (1, 3, 3, 3, 5, 1, 1, False, False, False),
    (1, 20, 10, 6, 5, 8, 8, True, True, True),
    (3, 36, 18, 3, 5, 5, 7, True, False, True),
    (3, 3, 1, 6, 5, 1, 1, True, True, True),
    (3, 20, 20, 6, 11, 5, 7, False, True, False),
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", TRITON_CASES, ids=lambda c: "x".join(map(str, c)))
def test_triton_matches_reference(case):
    N, Cin, Cout, E, k, H, W, upsample, training, se = case
    params, running = _params(Cin, Cout, E, k, se)
    x, skip, dout = _inputs(N, Cin, Cout, H, W, upsample)
    expected = _run("ref", x, skip, dout, params, running, upsample, training, torch.float64)
    with warnings.catch_warnings():
        # numpy's exp overflows inside sigmoid where a zero-variance batch (1x1 images) meets
        # 1/sqrt(eps); the result (0 or 1) is exact
        warnings.filterwarnings("ignore", "overflow encountered in exp", RuntimeWarning)
        got = _run("triton", x, skip, dout, params, running, upsample, training, torch.float32)
    # fp32 kernels against the fp64 reference: a chain of four normalisations and three
    # convolutions (sums over up to 216 channels) accumulates a few fp32 roundings per stage.
    _compare(got, expected, torch.float32, f"{case}", scale=25 if H * W > 1 or not upsample else 1e3)


@pytest.mark.gpu
def test_triton_nchw_input():
    params, running = _params(20, 20, 6, 5)
    x, skip, dout = _inputs(2, 20, 20, 5, 7, False)
    expected = _run("ref", x, skip, dout, params, running, False, True, torch.float64)
    got = _run("triton", x, skip, dout, params, running, False, True, torch.float32, layout="nchw")
    assert got[1]["x"].is_contiguous()
    _compare(got, expected, torch.float32, "nchw", scale=25)


def _check_half_against_autocast(case, dtype, x_offset=0.0):
    """Half activations with fp32 statistics against the fp64 reference, within three times the
    error of PyTorch's own eager cell under autocast (plus one tolerance unit of the dtype).
    ``x_offset`` shifts x's mean far from zero relative to its spread (BN0 must then normalise
    before the GEMM's half-precision rounding, as the eager cell does)."""
    N, Cin, Cout, E, k, H, W, upsample = case
    params, running = _params(Cin, Cout, E, k)
    x, skip, dout = _inputs(N, Cin, Cout, H, W, upsample)
    x = x + x_offset
    x = x.to(dtype).double()   # inputs every run represents exactly
    skip = None if skip is None else skip.to(dtype).double()
    expected = _run("ref", x, skip, dout, params, running, upsample, True, torch.float64)
    got = _run("triton", x, skip, dout, params, running, upsample, True, dtype)
    with torch.autocast(DEVICE, dtype=dtype):
        eager = _run("ref", x, skip, dout, params, running, upsample, True, dtype)
    atol = TOL[dtype][0]
    pairs = [("output", got[0], eager[0], expected[0])]
    pairs += [(f"grad {n}", got[1][n], eager[1][n], expected[1][n]) for n in expected[1]]
    pairs += [(f"running {n}", a, b, c) for n, a, b, c in zip(GenCellRunningStats._fields[:8], got[2], eager[2],
                                                               expected[2])]
    for name, g, e, ref in pairs:
        err = (g.double() - ref.double()).abs().max().item()
        eager_err = (e.double() - ref.double()).abs().max().item()
        assert err <= 3 * eager_err + atol, f"{name}, {case} {dtype}: error {err:.3g}, eager's {eager_err:.3g}"


@pytest.mark.gpu
@pytest.mark.parametrize("x_offset", [0.0, 15.0])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_half_precision(dtype, x_offset):
    _check_half_against_autocast((2, 20, 10, 6, 5, 4, 4, True), dtype, x_offset)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fp32_math_is_not_rounded_by_autocast(backend):
    """Autocast stays on inside custom ops; the op's own fp32 math (BN folds, SE MLP) must not
    follow it, so an fp32 call gives the same numbers with autocast on or off."""
    params, running = _params(20, 20, 6, 5)
    x, skip, dout = _inputs(2, 20, 20, 4, 4, False)
    plain = _run(backend, x, skip, dout, params, running, False, True, torch.float32)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        under = _run(backend, x, skip, dout, params, running, False, True, torch.float32)
    _compare(under, plain, torch.float32, f"autocast, {backend}")


@requires_cuda
@pytest.mark.parametrize("case", [(32, 128, 128, 6, 5, 8, 8, False), (16, 64, 32, 3, 5, 16, 16, True),
                                  (8, 96, 96, 6, 11, 8, 8, False)])
def test_triton_large_shapes_on_gpu(case):
    N, Cin, Cout, E, k, H, W, upsample = case
    params, running = _params(Cin, Cout, E, k)
    x, skip, dout = _inputs(N, Cin, Cout, H, W, upsample)
    expected = _run("ref", x, skip, dout, params, running, upsample, True, torch.float64)
    got = _run("triton", x, skip, dout, params, running, upsample, True, torch.float32)
    _compare(got, expected, torch.float32, f"{case}", scale=25)
    _check_half_against_autocast(case, torch.bfloat16)


# ---------------------------------------------------------------------------------------------
# Memory: what the fused cell keeps for backward
# ---------------------------------------------------------------------------------------------

def _saved_tensors(fn):
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, saved


def _nbytes(tensors):
    seen, total = set(), 0
    for t in tensors:
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.shape)
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


@pytest.mark.gpu
@pytest.mark.parametrize("backend,upsample", [("torch", False), ("torch", True), ("triton", False)])
def test_saved_activations_are_x_a_c_e_and_statistics(backend, upsample):
    N, Cin, H, W = (8, 32, 16, 16) if backend == "torch" else (2, 8, 4, 4)
    Cout = Cin // 2 if upsample else Cin
    params, running = _params(Cin, Cout, 6, 5)
    x, skip, _ = _inputs(N, Cin, Cout, H, W, upsample)
    pl = GenCellParams(*(_leaf(t, torch.float32, "keep") for t in params.tensors()))
    xl, sl = _leaf(x, torch.float32), _leaf(skip, torch.float32)
    rl = _copy_running(running, torch.float32)
    with nvae_fast.use_backend(backend):
        _, saved = _saved_tensors(lambda: gen_cell(xl, pl, rl, sl, upsample))
    eager_cell = _OfficialLikeCell(pl, rl, upsample).to(DEVICE)
    _, eager_saved = _saved_tensors(lambda: eager_cell(xl, sl))
    EC, Ho = Cin * 6, 2 * H if upsample else H
    param_ids = {id(t) for t in pl}
    kept = [t for t in saved if id(t) not in param_ids]
    activations = [(N, Cin, H, W), (N, EC, H, W), (N, EC, Ho, Ho), (N, Cout, Ho, Ho)]   # x, a, c, e
    assert sorted(tuple(t.shape) for t in kept if t.dim() == 4) == sorted(activations)
    assert any(t is xl for t in saved)
    statistics = [(2 * (Cin + 2 * EC + Cout),), (N, Cout)]   # BN means and variances; sums of e for SE
    assert sorted(tuple(t.shape) for t in kept if t.dim() != 4) == sorted(statistics)
    fused = _nbytes(kept)
    eager = _nbytes(t for t in eager_saved if not isinstance(t, nn.Parameter))
    assert fused == 4 * sum(math.prod(shape) for shape in activations + statistics)
    assert fused < eager
    print(f"\nsaved for backward (N={N}, C={Cin}, {H}x{W}, E=6, upsample={upsample}): fused {fused} B, "
          f"eager {eager} B ({eager / fused:.2f}x)")


# ---------------------------------------------------------------------------------------------
# Registration, compile, distributed, bad input
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("training", [True, False])
def test_opcheck(training):
    """The forward op (which updates the running statistics in place) and the backward op; the
    autograd between them is an autograd.Function (checked by the gradient tests)."""
    params, running = _params(4, 4, 3, 3)
    x, _, dout = _inputs(2, 4, 4, 3, 3, False)
    x, dout = x.float(), dout.float()
    tensors = [t.float() for t in params.tensors()]
    args = (x, None, tensors, [], list(_copy_running(running, torch.float32, "cpu")), False, training, 0.05, 1e-5)
    torch.library.opcheck(torch.ops.nvae_fast.gen_cell.default, args)
    _, a, c, e, stats, sum_e = torch.ops.nvae_fast.gen_cell(*args)
    if not training:   # the backward of eval mode takes the running statistics, packed
        stats = torch.cat(args[4][:8])
    torch.library.opcheck(torch.ops.nvae_fast.gen_cell_backward.default,
                          (dout, x, a, c, e, stats, sum_e, tensors, [], False, training, 1e-5, False))


def test_compiles_without_graph_breaks():
    params, running = _params(4, 2, 3, 3)
    x, skip, dout = _inputs(2, 4, 2, 3, 3, True)
    pl = GenCellParams(*(t.float().requires_grad_() for t in params.tensors()))

    def step(x, skip):
        return gen_cell(x, pl, _copy_running(running, torch.float32, "cpu"), skip, upsample=True)

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    xs = [x.float().requires_grad_() for _ in range(2)]
    got, expected = compiled(xs[0], skip.float()), step(xs[1], skip.float())
    assert_close(got, expected)
    got.backward(dout.float())
    expected.backward(dout.float())
    assert_close(xs[0].grad, xs[1].grad)


def _dist_worker(rank, init_file, backend, upsample, out_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        N, Cin, Cout = 4, 6, 3 if upsample else 6
        params, running = _params(Cin, Cout, 3, 3)
        x, skip, dout = _inputs(N, Cin, Cout, 3, 4, upsample)
        part = slice(rank * N // 2, (rank + 1) * N // 2)
        out, grads, run = _run(backend, x[part], None if skip is None else skip[part], dout[part], params, running,
                               upsample, True, torch.float32, device="cpu")
        for name in grads:
            if name not in ("x", "skip"):
                dist.all_reduce(grads[name])   # DDP sums (then averages) the parameter gradients
        gathered = {}
        for name, t in (("out", out), ("x", grads["x"])):
            parts = [torch.empty_like(t) for _ in range(2)]
            dist.all_gather(parts, t.contiguous())
            gathered[name] = torch.cat(parts)
        if rank == 0:
            torch.save({"gathered": gathered, "grads": grads, "running": list(run)}, out_file)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("backend,upsample", [("triton", False), ("torch", True)])
def test_two_ranks_equal_one_process_on_joined_batch(tmp_path, monkeypatch, backend, upsample):
    """Two gloo ranks on CPU tensors; on a GPU machine too, with Triton's interpreter in the ranks."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    out_file = tmp_path / "out.pt"
    mp.spawn(_dist_worker, args=(str(tmp_path / "init"), backend, upsample, str(out_file)), nprocs=2, join=True)
    got = torch.load(out_file)
    N, Cin, Cout = 4, 6, 3 if upsample else 6
    params, running = _params(Cin, Cout, 3, 3)
    x, skip, dout = _inputs(N, Cin, Cout, 3, 4, upsample)
    out, grads, run = _run("torch", x, skip, dout, params, running, upsample, True, torch.float32, device="cpu")
    assert_close(got["gathered"]["out"], out, scale=5, msg="output")
    assert_close(got["gathered"]["x"], grads["x"], scale=5, msg="grad x")
    for name, g in got["grads"].items():
        if name not in ("x", "skip"):
            assert_close(g, grads[name], scale=5 * max(1.0, grads[name].abs().max().item()), msg=f"grad {name}")
    for name, r, r_e in zip(GenCellRunningStats._fields, got["running"], run):
        if r.is_floating_point():
            assert_close(r, r_e, scale=5, msg=f"running {name}")
        else:
            assert torch.equal(r, r_e), f"running {name}: {r} != {r_e}"


def test_bad_inputs_raise_clear_errors():
    params, running = _params(4, 4, 3, 3)
    p = GenCellParams(*(t.float() for t in params.tensors()))
    r = _copy_running(running, torch.float32, "cpu")
    x = torch.randn(2, 4, 3, 3)
    with pytest.raises(ValueError, match="4-D"):
        gen_cell(x[0], p, r)
    with pytest.raises(ValueError, match=r"conv1_weight must have shape \(EC, 5, 1, 1\)"):
        gen_cell(torch.randn(2, 5, 3, 3), p, r)
    with pytest.raises(ValueError, match=r"dw_weight must have shape \(12, 1, k, k\)"):
        gen_cell(x, p._replace(dw_weight=torch.randn(12, 1, 4, 4)), r)
    with pytest.raises(ValueError, match=r"bn2_bias must have shape \(12,\)"):
        gen_cell(x, p._replace(bn2_bias=torch.randn(4)), r)
    with pytest.raises(ValueError, match="four se_"):
        gen_cell(x, p._replace(se_fc2_bias=None), r)
    with pytest.raises(ValueError, match="skip is needed"):
        gen_cell(x, p, r, upsample=True)
    with pytest.raises(ValueError, match=r"skip must have shape \(2, 4, 6, 6\)"):
        gen_cell(x, p, r, skip=torch.randn(2, 4, 3, 3), upsample=True)
    with pytest.raises(ValueError, match="needs the running statistics"):
        gen_cell(x, p, None, training=False)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        gen_cell(torch.randn(1, 4, 1, 1), p, r)
    with pytest.raises(TypeError, match="x must be float32"):
        gen_cell(x.long(), p, r)
    with pytest.raises(ValueError, match="bn1_weight is on meta but x is on cpu"):
        gen_cell(x, p._replace(bn1_weight=torch.empty(12, device="meta")), r)


@pytest.mark.parametrize("limit, stages", [(101_376, 2), (166_912, 3), (232_448, 3), (0, 3)])
def test_gemm_pipelining_fits_the_gpu_shared_memory(monkeypatch, limit, stages):
    """The fp32 weight-gradient GEMM with 64 x (32 + 64) tiles (24 KiB a stage) needs 122,880 B of
    shared memory at three stages (ptxas, Triton 3.9): too much for sm_86/sm_89 (99 KiB per block),
    fine on sm_80 and sm_90; two stages take 73,728 B."""
    from types import SimpleNamespace

    from nvae_fast.kernels.triton.common import gemm_stages

    props = SimpleNamespace(shared_memory_per_block_optin=limit)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: props)
    gpu_tensor = SimpleNamespace(is_cuda=True, device="cuda:0")
    assert gemm_stages(gpu_tensor, 64 * (32 + 64) * 4) == stages


def test_gemm_tiles_per_shape():
    """On a GPU (132 SMs) the GEMM stages take 128-row tiles where M fills the SMs, GEMM2's
    forward a column block covering Cout (its prologue's sigmoids computed once), smaller tiles
    where M is small; fp32 halves the K depth; the weight-gradient dots are >= 64 both ways."""
    from types import SimpleNamespace

    from nvae_fast.kernels.triton import gen_cell as kernels

    def gpu(elem):
        return SimpleNamespace(is_cuda=True, device="cuda:0", element_size=lambda: elem)

    cifar = 32 * 16 * 16   # N H W of the CIFAR-10 decoder cell: C=256, EC=1536
    assert kernels._gemm_blocks("conv1_forward", cifar, 256, 1536, gpu(2)) == (128, 128, 64, 8)
    assert kernels._gemm_blocks("conv2_forward", cifar, 1536, 256, gpu(2)) == (64, 256, 32, 8)
    assert kernels._gemm_blocks("conv2_backward_data", cifar, 256, 1536, gpu(2)) == (128, 128, 64, 8)
    assert kernels._gemm_blocks("conv1_backward_data", cifar, 1536, 256, gpu(2)) == (128, 64, 64, 4)
    assert kernels._gemm_blocks("conv1_forward", cifar, 256, 1536, gpu(4)) == (128, 128, 32, 8)
    assert kernels._gemm_blocks("conv1_forward", 2 * 8 * 8, 20, 120, gpu(2)) == (64, 64, 32, 4)
    for k1, k2, rows, warps in kernels._WEIGHT_GRAD_TILES.values():
        assert k1 >= 64 and k2 >= 64 and rows >= 16


# ---------------------------------------------------------------------------------------------
# Launch budget (structural counts: what a GPU run would launch, counted on the CPU)
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def launch_count(monkeypatch):
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import launch_count

    return launch_count


def _cell_counts(launch_count, cell_type, op="mconv_e6k5g0"):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "overflow encountered in exp", RuntimeWarning)
        return launch_count.cell_counts(cell_type, op, True, shape=(1, 8, 2, 2), backend="triton")


FORWARD_KERNELS = {"_stats_kernel": 1, "_forward_gemm_kernel": 2, "_forward_kernel": 1, "_output_kernel": 1}
BACKWARD_KERNELS = {"_output_backward_kernel": 1, "_conv2_backward_data_kernel": 1, "_weight_grad_kernel": 2,
                    "_backward_kernel": 1, "_conv1_backward_data_kernel": 1}


@pytest.mark.skipif(not nvae_fast.backend.triton_interpreted(), reason="counts Triton launches under the interpreter")
def test_normal_cell_launch_budget(launch_count):
    """One normal cell with SE: 11 launches forward + backward in training (budget 20; 208 before
    the in-kernel merges), 4 in eval (budget 6): one per stage, nothing between them, no sync."""
    counts = _cell_counts(launch_count, "normal_dec")
    train, evaluation = counts["train_forward_backward"], counts["eval_forward"]
    assert train["triton_by_kernel"] == {k: FORWARD_KERNELS.get(k, 0) + BACKWARD_KERNELS.get(k, 0)
                                         for k in {**FORWARD_KERNELS, **BACKWARD_KERNELS}}
    assert train["aten_launches"] == 0 and train["launches"] == 11 <= 20
    assert evaluation["triton_by_kernel"] == {"_forward_gemm_kernel": 2, "_forward_kernel": 1, "_output_kernel": 1}
    assert evaluation["aten_launches"] == 0 and evaluation["launches"] == 4 <= 6
    assert train["syncs"] == evaluation["syncs"] == 0
    assert launch_count.cell_summary(counts) == {
        "train_forward_backward": {"launches": 11, "budget": 20, "before": 208},
        "eval_forward": {"launches": 4, "budget": 6, "before": 38}}


@pytest.mark.skipif(not nvae_fast.backend.triton_interpreted(), reason="counts Triton launches under the interpreter")
def test_up_cell_launch_budget(launch_count, monkeypatch):
    """The up-cell adds its skip, bilinear_2x(conv1x1(x)): a convolution and an upsampling each
    way, and the sum of x's two gradients. Its weight normalisation is the model's (counted per
    training step, not per cell): here the identity, so that only the cell's own launches count."""
    import nvae_fast.nn.conv as conv

    monkeypatch.setattr(conv, "normalize_weight", lambda weight, log_weight_norm: weight)
    counts = _cell_counts(launch_count, "up_dec")
    train, evaluation = counts["train_forward_backward"], counts["eval_forward"]
    assert sum(train["triton_by_kernel"].values()) == 11
    # + autograd's sum of x's two gradients (through the branch and through the skip)
    assert train["aten_by_op"] == {"convolution": 1, "upsample_bilinear2d": 1, "convolution_backward": 1,
                                   "upsample_bilinear2d_backward": 1, "add": 1}
    assert train["launches"] == 16 <= 20
    assert sum(evaluation["triton_by_kernel"].values()) == 4
    assert evaluation["aten_by_op"] == {"convolution": 1, "upsample_bilinear2d": 1}
    assert evaluation["launches"] == 6 <= 6
    assert train["syncs"] == evaluation["syncs"] == 0


def test_module_prepares_kernel_weights_once():
    """The cell's 1x1 weights in the activations' dtype are cast once and reused until the
    parameters change (an optimizer step bumps their version); gradients still reach them."""
    from nvae_fast.nn.cells import make_cell

    torch.manual_seed(0)
    cell = make_cell(8, 8, "normal_dec", ("mconv_e6k5g0",), True)
    blk = cell.block
    w1, w2 = blk.conv1.normalized_weight(), blk.conv2.normalized_weight()
    first = cell._kernel_weights(w1, w2, torch.bfloat16)
    assert first.w1.dtype == torch.bfloat16 and first.w1.shape == (48, 8)
    assert cell._kernel_weights(w1, w2, torch.bfloat16) is first
    with torch.no_grad():
        blk.conv1.weight.mul_(2)
    second = cell._kernel_weights(w1, w2, torch.bfloat16)
    assert second is not first
    torch.testing.assert_close(second.w1.float(), (blk.conv1.weight.reshape(48, 8)).bfloat16().float())
    fp32 = cell._kernel_weights(w1, w2, torch.float32)
    assert fp32.w1.data_ptr() == blk.conv1.weight.data_ptr()    # a view: no copy at all
