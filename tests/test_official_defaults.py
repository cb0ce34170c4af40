"""Defaults that follow the official scripts, and the flags that select nvae_fast's alternatives.

(The official learning rates and random stream of a whole training run: test_official_run.py.)
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nvae_fast import NVAE
from nvae_fast.cli import build_parser, main
from nvae_fast.compat import save_official_checkpoint
from nvae_fast.train.options import resolve_train
from nvae_fast.train.recipe import TrainConfig
from nvae_fast.train.runtime import Runtime
from nvae_fast.train.sample import generate
from nvae_fast.train.trainer import Trainer
from train_fixtures import write_binary_mnist

HERE = Path(__file__).resolve().parent


def test_sample_at_temperature_zero_decodes_the_prior_means():
    model = NVAE.from_preset("tiny_cifar10").eval()
    with torch.no_grad():
        torch.manual_seed(1)
        a = model.sample(2, 0.0)
        after_zero = torch.random.get_rng_state()
        torch.manual_seed(2)
        b = model.sample(2, 0.0)
        torch.manual_seed(1)
        model.sample(2, 0.7)
        after_other = torch.random.get_rng_state()
        torch.manual_seed(3)
        tiny = model.sample(2, 1e-12)
    torch.testing.assert_close(a, b, rtol=0, atol=0)  # the noise is drawn, and multiplied by 0
    torch.testing.assert_close(a, tiny, rtol=1e-5, atol=1e-5)
    assert torch.equal(after_zero, after_other)  # the same random numbers as any temperature
    assert NVAE.from_preset("tiny_mnist").eval().sample(1, 0).shape == (1, 1, 32, 32)


def test_trainer_draws_nothing_the_first_step_draws_the_spectral_vectors():
    torch.manual_seed(4)
    model, twin = NVAE.from_preset("tiny_mnist"), NVAE.from_preset("tiny_mnist")
    twin.load_state_dict(model.state_dict())
    x = torch.bernoulli(torch.rand(2, 1, 32, 32))
    before = torch.random.get_rng_state()
    trainer = Trainer(model, TrainConfig(batch_size=2, epochs=2, warmup_epochs=1), Runtime(torch.device("cpu")), 4)
    assert torch.equal(torch.random.get_rng_state(), before) and model.sr_u == {}
    trainer.train_step(x, deterministic=True)  # no noise: the vectors are the step's first draws
    torch.random.set_rng_state(before)
    with torch.no_grad():
        twin.train()(x, deterministic=True)
        twin.spectral_norm_parallel()  # draws u then v per weight shape, 40 iterations
    assert list(model.sr_u) == list(twin.sr_u)
    for shape in twin.sr_u:
        assert torch.equal(model.sr_u[shape], twin.sr_u[shape]) and torch.equal(model.sr_v[shape], twin.sr_v[shape])


def test_sample_command_decodes_and_readjusts_as_the_official_evaluate(tmp_path, monkeypatch):
    args = build_parser().parse_args(["sample", "--checkpoint", "c.pt"])
    assert (args.decoder_temp, args.readjust_bn_batch_size, args.temp, args.readjust_bn_iters) == (1.0, 16, 0.7, 500)
    model = NVAE.from_preset("tiny_cifar10").eval()
    torch.manual_seed(3)
    images = generate(model, 4, 0.7, decoder_temp=1.0)
    torch.manual_seed(3)
    with torch.no_grad():
        expected = model.decoder_output(model.sample(4, 0.7)).sample(1.0)
    torch.testing.assert_close(images, expected, rtol=0, atol=0)
    torch.manual_seed(3)
    assert not torch.equal(generate(model, 4, 0.7), images)  # the decoder sampled at t = 0.7

    save_official_checkpoint(model, tmp_path / "c.pt")
    seen = []
    monkeypatch.setattr(NVAE, "readjust_bn", lambda self, num_samples, t, iterations, **_: seen.append(
        (num_samples, t, iterations)))
    assert main(["sample", "--checkpoint", str(tmp_path / "c.pt"), "--num_samples", "4", "--readjust_bn",
                 "--temp", "0", "--output", str(tmp_path / "s")]) == 0
    assert seen == [(16, 0.0, 500)]
    assert (tmp_path / "s" / "samples.npz").is_file()


def test_training_defaults_and_flags():
    cfg = TrainConfig()
    assert (cfg.lr_schedule, cfg.eval_iw_samples, cfg.isolate_eval_rng, cfg.kl_balance_scope, cfg.amp) == \
        ("official", 10, False, "global", "auto")
    request = resolve_train(build_parser().parse_args(
        ["train", "--dataset", "mnist", "--lr_schedule", "textbook", "--eval_iw_samples", "3", "--isolate_eval_rng",
         "--kl_balance_scope", "rank", "--amp", "fp16"]))
    t = request.train
    assert (t.lr_schedule, t.eval_iw_samples, t.isolate_eval_rng, t.kl_balance_scope, t.amp) == \
        ("textbook", 3, True, "rank", "fp16")
    for bad in (dict(lr_schedule="cosine"), dict(kl_balance_scope="node"), dict(eval_iw_samples=0)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            TrainConfig(**bad)


def _losses(data: Path, root: Path, *flags: str) -> list[float]:
    from nvae_fast.train.loop import run_training

    request = resolve_train(build_parser().parse_args(
        ["train", "--preset", "tiny_mnist", "--data", str(data), "--root", str(root), "--epochs", "3",
         "--warmup_epochs", "1", "--batch_size", "4", "--eval_iw_samples", "2", "--num_iw_samples", "1", *flags]))
    result = run_training(request.model, request.train, request.run_dir, Runtime(torch.device("cpu")),
                          stop_after_step=4, tensorboard=False)
    return [result.losses[i] for i in range(4)]


def test_periodic_evaluations_change_the_training_stream_unless_isolated(tmp_path):
    write_binary_mnist(tmp_path, n_train=8, n_test=2)
    every = _losses(tmp_path, tmp_path / "a", "--eval_every", "1", "--isolate_eval_rng")
    rare = _losses(tmp_path, tmp_path / "b", "--eval_every", "5", "--isolate_eval_rng")
    official = _losses(tmp_path, tmp_path / "c", "--eval_every", "1")
    assert every == rare
    assert official[:2] == every[:2]  # 2 steps per epoch: the first evaluation ends epoch 1
    assert all(a != b for a, b in zip(official[2:], every[2:]))


def test_kl_balance_scope_rank_balances_each_rank_on_its_own_batch(tmp_path):
    out = tmp_path / "kl.pt"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent), str(HERE)]), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(HERE / "dist_kl_scope_worker.py"), str(out)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = torch.load(out)
    ranks = got["rank"]
    for r in ranks:
        torch.testing.assert_close(r["weights"], r["own"])
    assert not torch.allclose(ranks[0]["weights"], ranks[1]["weights"])
    shared = got["global"]
    torch.testing.assert_close(shared[0]["weights"], shared[1]["weights"])
    assert not torch.allclose(shared[0]["weights"], shared[0]["own"])
