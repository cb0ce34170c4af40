"""Training on tiny presets: the loss falls, a resumed run equals an uninterrupted one, bad steps are
skipped without touching the weights, checkpoints feed evaluate/sample/export."""

import math

import numpy as np
import pytest
import torch

from nvae_fast import NVAE, NVAEConfig
from nvae_fast.cli import main
from nvae_fast.train.errors import TrainingDiverged
from nvae_fast.train.loop import run_training
from nvae_fast.train.recipe import TrainConfig, train_preset
from nvae_fast.train.runtime import Runtime
from nvae_fast.train.trainer import Trainer
from nvae_fast.train.weights import load_trained_model
from train_fixtures import write_mnist

CPU = Runtime(torch.device("cpu"))


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models gain nothing from a second intra-op thread, and on a busy 2-core machine its
    spin-waiting made these tests ten times slower (measured: 12 min instead of 1): one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _batch(preset: str, n: int = 8) -> torch.Tensor:
    cfg = NVAEConfig.preset(preset)
    g = torch.Generator().manual_seed(3)
    x = torch.rand(n, cfg.in_channels, cfg.image_size, cfg.image_size, generator=g)
    return torch.bernoulli(x, generator=g) if cfg.in_channels == 1 else (x * 255).round() / 255


@pytest.mark.parametrize("preset", ["tiny_mnist", "tiny_cifar10"])
def test_a_few_steps_decrease_the_loss(preset):
    torch.manual_seed(0)
    # Full KL and learning rate from the first step, so that only learning changes the loss.
    cfg = TrainConfig(epochs=1, warmup_epochs=0, kl_anneal_portion=0.0, kl_const_portion=0.0,
                      weight_decay_norm=1e-2, batch_size=8)
    trainer = Trainer(NVAE(NVAEConfig.preset(preset)), cfg, CPU, steps_per_epoch=8)
    x = _batch(preset)
    losses = [trainer.train_step(x).loss.item() for _ in range(8)]
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.95 * losses[0] and np.mean(losses[-3:]) < np.mean(losses[:3]), losses


def test_bad_step_is_skipped_without_touching_the_weights():
    """A step with a NaN gradient changes no weight, optimizer state, EMA or BatchNorm statistic
    (the forward updated the running statistics: they are restored), decided on the device."""
    torch.manual_seed(0)
    cfg = TrainConfig(epochs=1, warmup_epochs=0, max_bad_steps=3, batch_size=8, ema_decay=0.9, log_every=1)
    trainer = Trainer(NVAE(NVAEConfig.preset("tiny_cifar10")), cfg, CPU, steps_per_epoch=10)
    x = _batch("tiny_cifar10")
    assert trainer.train_step(x).ok
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    ema_before = {k: v.clone() for k, v in trainer.ema.state_dict().items()}
    adam_before = [{k: v.clone() for k, v in s.items()} for s in trainer.optimizer.state.values()]
    weight = trainer.model.stem.weight
    poison = weight.register_hook(lambda grad: grad * float("nan"))
    stats = trainer.train_step(x)
    assert not stats.ok and stats.logged["ok"] == 0 and trainer.guard.total == 1 and trainer.step == 2
    after = trainer.model.state_dict()
    for name, value in before.items():
        assert torch.equal(after[name], value), name
    for name, value in ema_before.items():
        assert torch.equal(trainer.ema.state_dict()[name], value), name
    for state, saved in zip(trainer.optimizer.state.values(), adam_before):
        assert all(torch.equal(state[k], v) for k, v in saved.items())
    # A good step resets the run of bad ones; max_bad_steps in a row stop training.
    poison.remove()
    assert trainer.train_step(x).ok and trainer.guard.consecutive == 0
    weight.register_hook(lambda grad: grad * float("inf"))
    trainer.train_step(x)
    trainer.train_step(x)
    with pytest.raises(TrainingDiverged, match="3 consecutive steps"):
        trainer.train_step(x)


def test_bad_steps_are_counted_on_the_device_and_read_on_log_steps():
    """Between log steps nothing is read: the guard's verdict waits on the device until the next
    log step, which stops the run when too many steps in a row were bad."""
    torch.manual_seed(0)
    cfg = TrainConfig(epochs=1, warmup_epochs=0, max_bad_steps=2, batch_size=4, log_every=4)
    trainer = Trainer(NVAE(NVAEConfig.preset("tiny_mnist")), cfg, CPU, steps_per_epoch=8)
    x = _batch("tiny_mnist", 4)
    trainer.model.stem.weight.register_hook(lambda grad: grad * float("nan"))
    for _ in range(3):
        stats = trainer.train_step(x)
        assert stats.logged is None and not stats.ok
    assert trainer.guard.total == 0   # the host has not looked yet
    with pytest.raises(TrainingDiverged, match="4 consecutive steps up to step 3"):
        trainer.train_step(x)


def test_nan_and_out_of_range_images_are_refused():
    model = NVAE(NVAEConfig.preset("tiny_cifar10"))
    x = _batch("tiny_cifar10", 2)
    for value, text in ((float("nan"), "NaN or Inf"), (float("inf"), "NaN or Inf"), (1.5, r"\[0, 1\]")):
        bad = x.clone()
        bad[1, 2, 3, 4] = value
        with pytest.raises(ValueError, match=text):
            model(bad)


def test_mixed_precision_steps():
    x = _batch("tiny_cifar10", 4)
    torch.manual_seed(0)
    bf16 = Trainer(NVAE(NVAEConfig.preset("tiny_cifar10")), TrainConfig(epochs=1, warmup_epochs=0, amp="bf16"),
                   CPU, steps_per_epoch=4)
    assert bf16.dtype == torch.bfloat16 and not bf16.scaler.is_enabled()
    assert bf16.train_step(x).ok
    # fp16: the gradient scaler starts at 2**10 (official); overflowing steps are skipped and halve
    # the scale until the gradients fit.
    torch.manual_seed(0)
    fp16 = Trainer(NVAE(NVAEConfig.preset("tiny_cifar10")), TrainConfig(epochs=1, warmup_epochs=0, amp="fp16"),
                   CPU, steps_per_epoch=8)
    oks = [bool(fp16.train_step(x).ok) for _ in range(6)]
    fp16.guard.check()
    assert oks[-1] and fp16.scaler.get_scale() <= 2.0 ** 10
    assert fp16.guard.total == oks.count(False) and fp16.guard.consecutive == 0


@pytest.fixture(scope="module")
def mnist_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("mnist")
    write_mnist(root, n_train=32, n_test=8)
    return root


def _tiny_run(data, **changes) -> TrainConfig:
    return TrainConfig(**{**train_preset("tiny_mnist"), "data": str(data), "epochs": 2, "num_samples": 4,
                          "num_iw_samples": 2, "kl_const_coeff": 0.3, **changes})


def test_resume_continues_exactly(mnist_dir, tmp_path):
    model_cfg = NVAEConfig.preset("tiny_mnist")
    cfg = _tiny_run(mnist_dir, ema_decay=0.5)   # 4 steps per epoch, 8 in all
    full = run_training(model_cfg, cfg, tmp_path / "full", CPU, tensorboard=False)
    assert full.finished and sorted(full.losses) == list(range(8))

    # Interrupted mid-epoch (after step 6 of 8), then resumed.
    first = run_training(model_cfg, cfg, tmp_path / "split", CPU, stop_after_step=6, tensorboard=False)
    assert not first.finished and sorted(first.losses) == list(range(6))
    assert (tmp_path / "split" / "checkpoint.pt").is_file()
    torch.manual_seed(1234)  # the resumed run must not depend on the state it starts in
    rest = run_training(model_cfg, cfg, tmp_path / "split", CPU, resume=True, tensorboard=False)
    assert rest.finished and sorted(rest.losses) == [6, 7]
    for step in range(6):
        assert first.losses[step] == full.losses[step]
    for step in (6, 7):
        assert rest.losses[step] == full.losses[step], (step, rest.losses[step], full.losses[step])
    assert rest.final == full.final
    a = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=True)
    for key in ("model", "ema"):
        for name, value in a[key].items():
            assert torch.equal(b[key][name], value), (key, name)


@pytest.mark.gpu   # the commands' default device: on a GPU machine this trains, evaluates and samples there
def test_cli_trains_then_evaluates_samples_and_exports(mnist_dir, tmp_path, capsys):
    pytest.importorskip("safetensors")
    root = tmp_path / "runs"
    code = main(["train", "--preset", "tiny_mnist", "--data", str(mnist_dir), "--root", str(root), "--save", "t",
                 "--epochs", "1", "--warmup_epochs", "0", "--num_iw_samples", "2", "--eval_untrained",
                 "--export_official", "--export_safetensors", "--seed", "4"])
    assert code == 0
    run = root / "eval-t"
    for name in ("checkpoint.pt", "log.txt", "final_eval.json", "samples.png", "samples.npz",
                 "checkpoint_official.pt", "model.safetensors"):
        assert (run / name).is_file(), name
    assert list(run.glob("events.out.tfevents.*"))
    assert "test bits/dim" in capsys.readouterr().out
    samples = np.load(run / "samples.npz")["samples"]
    assert samples.shape == (16, 32, 32, 1) and samples.dtype == np.uint8

    # The three files hold the same weights.
    x = _batch("tiny_mnist", 4)
    outs = []
    for name in ("checkpoint.pt", "checkpoint_official.pt", "model.safetensors"):
        model, info = load_trained_model(run / name)
        outs.append(model(x, deterministic=True)[0])
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=0)
    torch.testing.assert_close(outs[2], outs[0], rtol=0, atol=0)

    assert main(["evaluate", "--checkpoint", str(run / "checkpoint.pt"), "--num_iw_samples", "3",
                 "--output", str(tmp_path / "eval.json")]) == 0
    assert "-log p(x)" in capsys.readouterr().out
    assert (tmp_path / "eval.json").is_file()
    assert main(["sample", "--checkpoint", str(run / "checkpoint_official.pt"), "--num_samples", "9", "--temp",
                 "0.8", "--readjust_bn", "--readjust_bn_iters", "2", "--output", str(tmp_path / "s" / "grid.png")]
                ) == 0
    assert (tmp_path / "s" / "grid.png").is_file()
    assert np.load(tmp_path / "s" / "grid.npz")["samples"].shape == (9, 32, 32, 1)
