"""The benchmarks run end to end in --quick mode on the CPU (``--device cpu``: on a GPU machine too)
and write what they promise (no timing is asserted): shapes read off the real model, honest rows
for implementations that cannot run, JSON with the environment and raw times, a PNG."""

from __future__ import annotations

import importlib
import json
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

import nvae_fast
from nvae_fast import NVAE, NVAEConfig
from nvae_fast.nn.cells import Cell, DecCombinerCell

from conftest import HAS_CUDA

BENCH_DIR = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def bench(monkeypatch):
    """Imports a benchmark script as a module (they import their helpers by name from benchmarks/)."""
    monkeypatch.syspath_prepend(str(BENCH_DIR))
    return importlib.import_module


def test_preset_shapes_are_the_shapes_a_forward_pass_sees(bench):
    """Every cell input and latent group the tiny model's forward meets, with multiplicity, is what
    model_shapes enumerates from the model's structure."""
    preset_shapes = bench("preset_shapes")
    config = NVAEConfig.preset("tiny_cifar10")
    cells, latents = preset_shapes.model_shapes(config, batch=3)

    model = NVAE(config)
    seen_cells: Counter = Counter()
    seen_latents: Counter = Counter()
    for module in model.modules():
        if isinstance(module, Cell):
            module.register_forward_pre_hook(
                lambda m, args: seen_cells.update([(m.cell_type, tuple(args[0].shape))]))
        elif isinstance(module, DecCombinerCell):
            module.register_forward_pre_hook(lambda m, args: seen_latents.update([tuple(args[1].shape)]))
    with torch.no_grad():
        model(torch.rand(3, 3, 32, 32))

    assert seen_cells == Counter({(s.cell_type, s.input_shape): s.count for s in cells})
    assert seen_latents == Counter({s.shape: s.count for s in latents})


def test_cifar10_shapes_are_the_design_notes_hot_path(bench):
    """DESIGN.md: the CIFAR-10 decoder runs 58 cells at N=32, C=256, 16x16, post-processing at
    C=128, 32x32 with E=3; 30 latent groups of 20 channels at 16x16."""
    preset_shapes = bench("preset_shapes")
    cells, latents = preset_shapes.model_shapes(NVAEConfig.preset("cifar10"), preset_shapes.PRESET_BATCH["cifar10"])
    by_type = {(s.cell_type, s.input_shape): s for s in cells}
    assert by_type[("normal_dec", (32, 256, 16, 16))].count == 58
    assert by_type[("normal_dec", (32, 256, 16, 16))].ops == ("mconv_e6k5g0",)
    assert by_type[("normal_post", (32, 128, 32, 32))].ops == ("mconv_e3k5g0",)
    assert [(s.shape, s.count) for s in latents] == [((32, 20, 16, 16), 30)]


def test_record_dispatch_reports_the_backend_that_ran(bench):
    """A forced backend an op lacks is reported as not implemented, not timed under its name."""
    harness = bench("harness")
    bn = nvae_fast.BatchNormSwish(4)
    with nvae_fast.use_backend("torch"), harness.record_dispatch() as chosen:
        bn(torch.randn(2, 4, 3, 3))
    assert chosen == {"bn_swish[float32]": "torch"}
    assert harness.dispatch_verdict("eager", chosen) is None
    assert harness.dispatch_verdict("cuda", chosen).startswith("not implemented")
    assert harness.dispatch_verdict("triton", {}).startswith("not implemented")
    assert harness.dispatch_verdict("triton", {"a": "triton", "b": "torch"}) is None


@pytest.mark.gpu
@pytest.mark.parametrize("kind, shape", [
    ("enc_bnswish", ("normal_enc", ("res_bnswish", "res_bnswish"), 2, 4, 4, 5, 5, True, 1)),
    ("dec_e6", ("normal_dec", ("mconv_e6k5g0",), 2, 4, 4, 5, 5, True, 1)),
])
def test_a_fast_backend_row_runs_that_backend(bench, kind, shape):
    """A triton row shows that the cell's fused ops ran on triton and nothing fell back: on the GPU,
    or on a CPU-only machine in Triton's interpreter, which the benchmarks themselves never time
    (driven directly here)."""
    cell_bench, preset_shapes = bench("cell_bench"), bench("preset_shapes")
    workload = cell_bench.Workload("test", kind, preset_shapes.CellShape(*shape))
    row = cell_bench.measure(workload, "triton", torch.float32, torch.channels_last, reps=1, warmup=0,
                             device=torch.device("cuda" if HAS_CUDA else "cpu"), copy_gbs=None)
    assert row["status"] == "timed" and row["dispatch"] and set(row["dispatch"].values()) == {"triton"}


def test_cpu_and_quick_runs_never_land_in_results(bench, monkeypatch):
    harness = bench("harness")
    for quick in (False, True):
        json_path, png_path = harness.output_paths("cell_bench", torch.device("cpu"), quick, None)
        assert json_path.parent == harness.SCRATCH_DIR and png_path.suffix == ".png"
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200 (MIG 1g.18gb)")
    json_path, _ = harness.output_paths("cell_bench", torch.device("cuda"), True, None, "cifar10")
    assert json_path.parent == harness.SCRATCH_DIR
    json_path, png_path = harness.output_paths("cell_bench", torch.device("cuda"), False, None, "cifar10")
    assert json_path == harness.RESULTS_DIR / "NVIDIA_H200__MIG_1g.18gb_" / "cell_bench_cifar10.json"
    assert png_path == json_path.with_suffix(".png")


def _check_common(payload: dict) -> list[dict]:
    env = payload["environment"]
    assert env["device"].startswith("CPU") and env["torch"] == torch.__version__ and "git_commit" in env
    assert payload["quick"] is True and payload["finished"] is True
    rows = payload["results"]
    for row in rows:
        assert not row["status"].startswith("failed"), row["status"]
        if row["impl"] == "triton":  # the interpreter is never timed
            assert row["status"].startswith("not timed") and "fwd_ms" not in row and "step_ms" not in row
        if row["impl"] == "cuda":
            assert row["status"].startswith("not available")
        if row["impl"].startswith("compile") and row["status"] != "timed":
            assert row["status"].startswith("not requested")
    return [r for r in rows if r["status"] == "timed"]


def test_official_layers_match_the_fused_module(bench):
    """The baselines' BatchNorm+Swish (official ops) computes what nvae_fast's fused module does."""
    harness = bench("harness")
    fused = nvae_fast.BatchNormSwish(5, momentum=0.05)
    official = harness.official_layers(torch.nn.Sequential(nvae_fast.BatchNormSwish(5, momentum=0.05)), "eager")
    assert isinstance(official[0], harness.OfficialBatchNormSwish)
    x = torch.randn(3, 5, 4, 4, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    y, y2 = fused(x), official(x2)
    y.square().sum().backward()
    y2.square().sum().backward()
    torch.testing.assert_close(y, y2)
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(fused.running_var, official[0].bn.running_var)
    assert int(official[0].bn.num_batches_tracked) == 1


def test_cell_bench_quick(bench, tmp_path):
    cell_bench = bench("cell_bench")
    out = tmp_path / "cell.json"
    assert cell_bench.main(["--quick", "--device", "cpu", "--out", str(out)]) == 0
    payload = json.loads(out.read_text())
    timed = _check_common(payload)
    assert {r["kind"] for r in timed} == set(cell_bench.KINDS)
    assert {r["impl"] for r in timed} == {"eager"} and {r["dtype"] for r in timed} == {"bfloat16", "float32"}
    for row in timed:
        assert len(row["times_fwd_ms"]) == len(row["times_fwd_bwd_ms"]) == 3
        assert 0 < row["fwd_ms"] and 0 < row["fwd_bwd_ms"]
        assert 0 < row["bytes_fwd"] < row["bytes_fwd_bwd"] and row["saved_MB"] > 0
        # The references are plain autograd on the official layers' ops: nothing dispatches.
        assert row["dispatch"] == {}
        assert "pct_floor_fwd_bwd" not in row  # no copy bandwidth on a CPU, so no floor is claimed
    assert pytest.importorskip("PIL.Image").open(out.with_suffix(".png")).size[0] > 0


def test_cell_bench_compile_row(bench, tmp_path):
    """torch.compile of the reference is timed when asked for, with its graph breaks counted."""
    cell_bench = bench("cell_bench")
    out = tmp_path / "kl.json"
    assert cell_bench.main(["--quick", "--device", "cpu", "--cells", "kl", "--dtypes", "fp32", "--impls",
                            "eager,compile", "--out", str(out)]) == 0
    rows = {r["impl"]: r for r in json.loads(out.read_text())["results"]}
    assert rows["compile"]["status"] == "timed" and rows["compile"]["graph_breaks"] == 0
    assert rows["compile"]["fwd_bwd_ms"] > 0 and "speedup" in rows["compile"]


def test_model_bench_quick(bench, tmp_path):
    model_bench = bench("model_bench")
    out = tmp_path / "model.json"
    assert model_bench.main(["--quick", "--device", "cpu", "--out", str(out)]) == 0
    payload = json.loads(out.read_text())
    timed = _check_common(payload)
    assert {(r["preset"], r["impl"], r["batch"]) for r in timed} == {("tiny_cifar10", "eager", 8)}
    assert {r["dtype"] for r in timed} == {"bfloat16", "float32"}
    for row in timed:
        assert all(row[f"{phase}_ms"] > 0 for phase in model_bench.PHASES)
        assert set(row["times_ms"]) == {*model_bench.PHASES, "total"} and len(row["times_ms"]["total"]) == 2
        assert row["samples_per_s"] > 0 and row["images_per_s"] > 0 and row["sample_batch"] == 8
        # The reference model runs the official layers (no fused BatchNorm+Swish); only the KL ops dispatch.
        assert f"bn_swish[{row['dtype']}]" not in row["dispatch"] and set(row["dispatch"].values()) <= {"torch"}
    assert pytest.importorskip("PIL.Image").open(out.with_suffix(".png")).size[0] > 0


@pytest.mark.parametrize("script", ["cell_bench", "model_bench"])
def test_time_limit_records_the_rows_it_leaves_out(bench, tmp_path, script):
    """Past --time-limit no row starts; each is recorded as not run (not a failure), and the JSON
    says the run finished."""
    out = tmp_path / f"{script}.json"
    assert bench(script).main(["--quick", "--device", "cpu", "--dtypes", "fp32", "--impls", "eager",
                               "--time-limit", "1e-9", "--out", str(out)]) == 0
    payload = json.loads(out.read_text())
    assert payload["finished"] is True and payload["results"]
    assert all(r["status"] == "not run: --time-limit of 1e-09 s reached" for r in payload["results"])


def test_bad_run_arguments_are_refused(bench, capsys):
    cell_bench = bench("cell_bench")
    with pytest.raises(SystemExit):
        cell_bench.parse_args(["--time-limit", "0"])
    assert "--time-limit: expected a positive number of seconds, got '0'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cell_bench.parse_args(["--device", "tpu"])


def test_cpu_timings_on_a_gpu_machine_say_so(bench, monkeypatch):
    """--device cpu where a GPU is present (as the tests above run there): the environment says the
    GPU was not used, and triton is 'not timed' whether or not the interpreter is on."""
    harness = bench("harness")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    env = harness.environment(torch.device("cpu"))
    assert env["device"].startswith("CPU (") and "the GPU was not used" in env["device"]
    for interpret in ("1", "0"):
        monkeypatch.setenv("TRITON_INTERPRET", interpret)
        assert harness.skip_reason("triton", torch.device("cpu")).startswith("not timed")
    assert harness.skip_reason("cuda", torch.device("cpu")).startswith("not available")


def test_device_cuda_without_a_gpu_is_refused(bench, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="--device cuda: no CUDA device"):
        bench("harness").run_device("cuda")


def test_a_missing_matplotlib_costs_the_chart_only(bench, monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    bench("harness").plot_bars(tmp_path / "c.png", [{"case": "a", "impl": "eager", "ms": 1.0}], ["case"], "impl",
                               [("ms", "ms")], "title")
    assert not (tmp_path / "c.png").exists() and "matplotlib is not installed" in capsys.readouterr().out


def test_cell_floor_is_the_largest_resource_time(bench):
    """The floor arithmetic, no timing: the CIFAR-10 decoder cell (N=32, C=256, 16x16, E=6, k=5)
    in bf16 is tensor-core-bound, a KL group is HBM-bound, fp32 GEMMs without TF32 join the
    depthwise work on the FP32 cores; the fused cell's launches move at least the ideal bytes."""
    cell_bench, preset_shapes = bench("cell_bench"), bench("preset_shapes")
    dec = cell_bench.Workload("cifar10", "dec_e6",
                              preset_shapes.CellShape("normal_dec", ("mconv_e6k5g0",), 32, 256, 256, 16, 16, True, 58))
    counts = cell_bench.traffic(dec, 2)
    M, C, EC = 32 * 16 * 16, 256, 1536
    assert counts["gemm_flop"] == 4 * M * C * EC and counts["dw_flop"] == 2 * M * EC * 25
    assert counts["bytes_fwd_bwd"] == 2 * (2 * (M * C + M * C + 2 * M * EC + M * C) + M * C)
    floor = cell_bench.floors(counts, torch.bfloat16, hbm_GBs=4300.0)
    assert floor["bound_fwd_bwd"] == "tensor"
    assert floor["floor_fwd_bwd_us"] == pytest.approx(3 * 4 * M * C * EC / 790e6)
    assert floor["hbm_fwd_bwd_us"] == pytest.approx(counts["bytes_fwd_bwd"] / 4300e3)
    assert floor["fp32_fwd_bwd_us"] == pytest.approx(3 * 2 * M * EC * 25 / 67e6)
    assert floor["sfu_fwd_bwd_us"] == pytest.approx(2 * 2 * (2 * M * EC + 32 * C) / 4180e3)
    assert max(floor[f"{r}_fwd_bwd_us"] for r in ("hbm", "tensor", "fp32", "sfu")) == floor["floor_fwd_bwd_us"]

    fp32 = cell_bench.floors(cell_bench.traffic(dec, 4), torch.float32, hbm_GBs=4300.0, tf32=False)
    assert fp32["tensor_fwd_bwd_us"] == 0 and fp32["bound_fwd_bwd"] == "fp32"
    assert fp32["fp32_fwd_bwd_us"] == pytest.approx(3 * (4 * M * C * EC + 2 * M * EC * 25) / 67e6)

    kl = cell_bench.Workload("cifar10", "kl", preset_shapes.LatentShape(32, 20, 16, 16, 30))
    assert cell_bench.floors(cell_bench.traffic(kl, 2), torch.bfloat16)["bound_fwd_bwd"] == "hbm"

    stages = cell_bench.fused_cell_stages(32, 256, 256, 16, 16, 6, False, 2)
    assert len(stages) == 11
    assert sum(s["read_bytes"] + s["write_bytes"] for s in stages) >= counts["bytes_fwd_bwd"]
