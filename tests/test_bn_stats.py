"""BatchNorm statistics re-estimated on samples: in fp32 whatever the precision, cached beside the
checkpoint per temperature and weights; sampled NaN/Inf images reported, never written."""

import pytest
import torch
from torch.nn.modules.batchnorm import _BatchNorm

from nvae_fast.cli import main
from nvae_fast.train import bn_stats
from nvae_fast.train.errors import InputError, NonFiniteSamples
from nvae_fast.train.sample import generate

from sampling_fixtures import tiny_digits_model, write_checkpoint

pytestmark = pytest.mark.usefixtures("small_cpu_convs")


def _bn_state(model):
    return {k: v.clone() for k, v in bn_stats.bn_buffers(model).items()}


def _finite(model) -> bool:
    return all(torch.isfinite(b.running_mean).all() and torch.isfinite(b.running_var).all()
               for b in model.modules() if isinstance(b, _BatchNorm))


def _loud_model(scale: float):
    """A model whose decoder activations leave the fp16 range: its learned decoder input is
    ``scale`` times larger than usual (BatchNorm normalises it away in fp32)."""
    model = tiny_digits_model()
    with torch.no_grad():
        model.prior_ftr0.mul_(scale)
    return model


def test_fp16_reestimation_poisons_the_statistics_and_ours_stays_fp32():
    # The failure the official --readjust_bn shows (NVlabs/NVAE#36): re-estimating under fp16
    # autocast turns the running statistics into Inf/NaN and then every sample into NaN.
    official = _loud_model(1e5)
    torch.manual_seed(1)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16):
        official.train()
        for _ in range(3):
            official.sample(4, 0.7)
    official.eval()
    assert not _finite(official)
    with torch.no_grad():
        assert not torch.isfinite(official.sample(4, 0.7)).any()

    # readjust_bn under the same autocast computes in fp32: exactly what it computes without it.
    ours, reference = _loud_model(1e5), _loud_model(1e5)
    torch.manual_seed(1)
    with torch.autocast("cpu", dtype=torch.float16):
        ours.readjust_bn(4, 0.7, 3)
    torch.manual_seed(1)
    reference.readjust_bn(4, 0.7, 3)
    assert _finite(ours) and not ours.training
    for name, value in _bn_state(ours).items():
        assert torch.equal(value, bn_stats.bn_buffers(reference)[name]), name
    with torch.no_grad():
        assert torch.isfinite(ours.sample(4, 0.7)).all()


def test_reestimation_of_a_bf16_model_runs_in_fp32():
    low = tiny_digits_model().to(torch.bfloat16)
    weights = {k: v.clone() for k, v in low.named_parameters()}
    reference = tiny_digits_model()
    reference.load_state_dict(low.float().state_dict())
    low.to(torch.bfloat16)
    seen = set()
    hooks = [bn.register_forward_pre_hook(lambda m, args: seen.add(args[0].dtype))
             for bn in low.modules() if isinstance(bn, _BatchNorm)]
    torch.manual_seed(2)
    low.readjust_bn(4, 0.8, 2)
    for h in hooks:
        h.remove()
    assert seen == {torch.float32}
    assert all(torch.equal(p, weights[k]) and p.dtype == torch.bfloat16 for k, p in low.named_parameters())
    torch.manual_seed(2)
    reference.readjust_bn(4, 0.8, 2)
    for name, value in bn_stats.bn_buffers(low).items():
        assert torch.equal(value, bn_stats.bn_buffers(reference)[name].to(value.dtype)), name


def test_statistics_that_do_not_fit_fp16_are_an_error():
    model = _loud_model(3e4).half()  # fits fp16; its variance (about 7e7) does not
    with pytest.raises(ValueError, match="not finite in .* layers .*float16 model.*float32"):
        model.readjust_bn(4, 0.7, 2)


def _with_nonfinite_rows(model, rows, value):
    sample = model.sample

    def patched(n, t):
        logits = sample(n, t)
        logits[[r for r in rows if r < n]] = value
        return logits

    model.sample = patched
    return model


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nonfinite_samples_are_counted_and_left_out(value):
    model = _with_nonfinite_rows(tiny_digits_model(), rows=[1, 6], value=value)
    images = generate(model, 8, 0.7, batch_size=5)
    assert images.shape == (6, 1, 8, 8) and torch.isfinite(images).all()
    with pytest.raises(NonFiniteSamples, match=r"2 of 8 samples at t=0.7 have NaN/Inf"):
        generate(model, 8, 0.7, batch_size=5, on_nonfinite="raise")


def _run(args, capsys):
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_sample_reports_nonfinite_images_instead_of_writing_them(tmp_path, capsys):
    model = tiny_digits_model()
    with torch.no_grad():  # what the fp16 re-estimation leaves behind
        next(b for b in model.dec_tower.modules() if isinstance(b, _BatchNorm)).running_var[0] = float("nan")
    ckpt = write_checkpoint(model, tmp_path / "model.safetensors")
    code, out, err = _run(["sample", "--checkpoint", ckpt, "--num_samples", 6, "--output", tmp_path / "s"], capsys)
    assert code == 3 and "6 of 6 samples at t=0.7 have NaN/Inf values" in err and "nothing written" in err
    assert len([line for line in err.splitlines() if "error" in line]) == 1 and not (tmp_path / "s").exists()


def test_reestimated_statistics_are_cached_per_temperature_and_weights(tmp_path):
    ckpt = write_checkpoint(tiny_digits_model(), tmp_path / "model.safetensors")
    cache = tmp_path / "model.bn_stats.safetensors"
    assert bn_stats.cache_path(ckpt) == cache

    first = tiny_digits_model()
    logs = []
    stats = bn_stats.prepare_bn(first, ckpt, 0.7, readjust=True, iterations=2, batch_size=4, log=logs.append,
                                progress=False)
    assert stats.source == "re-estimated" and cache.is_file() and not logs
    at_07 = _bn_state(first)
    bn_stats.prepare_bn(first, ckpt, 0.9, readjust=True, iterations=2, batch_size=4, progress=False)
    at_09 = _bn_state(first)

    # A later run with the same weights finds both temperatures; another temperature, or other
    # weights, get the checkpoint's statistics.
    for temp, expected in ((0.7, at_07), (0.9, at_09)):
        model = tiny_digits_model()
        stats = bn_stats.prepare_bn(model, ckpt, temp, readjust=False)
        assert stats.source == "cached" and (stats.iterations, stats.batch_size) == (2, 4)
        assert f"t={temp:g}" in stats.describe() and str(cache) in stats.describe()
        assert all(torch.equal(v, expected[k]) for k, v in bn_stats.bn_buffers(model).items())
    untouched = tiny_digits_model()
    before = _bn_state(untouched)
    assert bn_stats.prepare_bn(untouched, ckpt, 0.8, readjust=False).source == "checkpoint"
    assert bn_stats.prepare_bn(untouched, ckpt, 0.7, readjust=False, use_cache=False).source == "checkpoint"
    other = tiny_digits_model(seed=1)
    assert bn_stats.prepare_bn(other, ckpt, 0.7, readjust=False).source == "checkpoint"
    assert all(torch.equal(v, before[k]) for k, v in bn_stats.bn_buffers(untouched).items())

    # --readjust_bn again replaces the entry (other samples, other statistics).
    model = tiny_digits_model()
    torch.manual_seed(7)
    bn_stats.prepare_bn(model, ckpt, 0.7, readjust=True, iterations=2, batch_size=4, progress=False)
    again = tiny_digits_model()
    bn_stats.prepare_bn(again, ckpt, 0.7, readjust=False)
    assert any(not torch.equal(v, at_07[k]) for k, v in bn_stats.bn_buffers(again).items() if "running" in k)

    cache.write_bytes(b"not safetensors")
    with pytest.raises(InputError, match="not an nvae_fast BatchNorm statistics file"):
        bn_stats.prepare_bn(tiny_digits_model(), ckpt, 0.7, readjust=False)
    stats = bn_stats.prepare_bn(tiny_digits_model(), ckpt, 0.7, readjust=True, iterations=1, batch_size=4,
                                progress=False)  # re-estimating replaces an unreadable file
    assert bn_stats.prepare_bn(tiny_digits_model(), ckpt, 0.7, readjust=False).source == "cached"


def test_unwritable_cache_location_costs_only_the_cache(tmp_path, monkeypatch):
    ckpt = write_checkpoint(tiny_digits_model(), tmp_path / "model.safetensors")

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(bn_stats, "save", refuse)
    logs = []
    stats = bn_stats.prepare_bn(tiny_digits_model(), ckpt, 0.7, readjust=True, iterations=1, batch_size=4,
                                log=logs.append, progress=False)
    assert stats.source == "re-estimated" and len(logs) == 1 and "used for this run only" in logs[0]


def test_sample_and_evaluate_reuse_the_cached_statistics(tmp_path, capsys):
    ckpt = write_checkpoint(tiny_digits_model(), tmp_path / "model.safetensors")
    out = tmp_path / "samples.png"
    code, stdout, _ = _run(["sample", "--checkpoint", ckpt, "--num_samples", 4, "--temp", 0.6, "--readjust_bn",
                            "--readjust_bn_iters", 2, "--readjust_bn_batch_size", 4, "--output", out], capsys)
    assert code == 0 and "re-estimated at t=0.6 (2 passes of 4 samples)" in stdout and out.is_file()
    code, stdout, _ = _run(["sample", "--checkpoint", ckpt, "--num_samples", 4, "--temp", 0.6, "--output", out],
                           capsys)
    assert code == 0 and "re-estimated at t=0.6 (2 passes of 4 samples), cached in" in stdout
    code, stdout, _ = _run(["sample", "--checkpoint", ckpt, "--num_samples", 4, "--temp", 0.6, "--no_bn_cache",
                            "--output", out], capsys)
    assert code == 0 and "the checkpoint's BatchNorm statistics" in stdout
    code, stdout, _ = _run(["evaluate", "--checkpoint", ckpt, "--num_iw_samples", 1, "--batch_size", 150,
                            "--temp", 0.6], capsys)
    assert code == 0 and "cached in" in stdout and "NELBO" in stdout
    code, _, err = _run(["evaluate", "--checkpoint", ckpt, "--readjust_bn"], capsys)
    assert code == 2 and "--readjust_bn needs a temperature" in err
