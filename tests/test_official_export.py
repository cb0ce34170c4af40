"""--export_official files hold what the official evaluate.py and train.py --cont_training read.

The official scripts read ``args`` (every train.py option, ``distributed``, ...), build
``AutoEncoder(args)``, and on --cont_training load ``optimizer``, ``scheduler`` and ``grad_scalar``
into torch.optim.Adamax, CosineAnnealingLR and GradScaler, then go on from ``epoch`` and
``global_step``. These tests load the exported file into those same torch classes as train.py builds
them and continue the official learning-rate sequence.
"""

import argparse

import pytest
import torch

from nvae_fast import NVAE, NVAEConfig
from nvae_fast.compat.official import OFFICIAL_TRAIN_DEFAULTS, read_official_checkpoint, save_official_checkpoint
from nvae_fast.train.recipe import TrainConfig
from nvae_fast.train.runtime import Runtime
from nvae_fast.train.schedules import learning_rate
from nvae_fast.train.trainer import Trainer
from nvae_fast.train.weights import export_official

KEYS = {"epoch", "state_dict", "optimizer", "global_step", "args", "arch_instance", "scheduler", "grad_scalar"}
CFG = TrainConfig(batch_size=2, epochs=6, warmup_epochs=2, weight_decay_norm=1e-2, data="/data/mnist")
STEPS_PER_EPOCH = 3


def _trainer(steps: int) -> Trainer:
    torch.manual_seed(0)
    trainer = Trainer(NVAE(NVAEConfig.preset("tiny_mnist")), CFG, Runtime(torch.device("cpu")), STEPS_PER_EPOCH)
    for _ in range(steps):
        trainer.train_step(torch.bernoulli(torch.rand(2, 1, 32, 32)), deterministic=True)
    return trainer


def _load(path) -> dict:
    # As the official scripts load it (the whole pickle), and as nvae_fast does (weights only).
    full = torch.load(path, map_location="cpu", weights_only=False)
    assert read_official_checkpoint(path).keys() == full.keys()
    return full


def _official_objects(args: argparse.Namespace):
    """The optimizer, scheduler and scaler the official train.py builds for ``args``."""
    model = NVAE.from_official_args(args)
    optimizer = torch.optim.Adamax(model.parameters(), args.learning_rate, weight_decay=args.weight_decay, eps=1e-3)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, float(args.epochs - args.warmup_epochs - 1),
                                                           eta_min=args.learning_rate_min)
    return model, optimizer, scheduler, torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)


def test_export_holds_complete_args_and_the_official_training_state(tmp_path):
    trainer = _trainer(steps=2)
    path = export_official(trainer.model, tmp_path / "c.pt", CFG, epoch=1, global_step=2,
                           steps_per_epoch=STEPS_PER_EPOCH, optimizer_state=trainer.optimizer.state_dict(),
                           scaler_state=trainer.scaler.state_dict(), run_dir=tmp_path / "runs" / "eval-x")
    ck = _load(path)
    assert set(ck) == KEYS
    assert (ck["epoch"], ck["global_step"]) == (1, 2)
    args = ck["args"]
    assert isinstance(args, argparse.Namespace)
    for name, default in OFFICIAL_TRAIN_DEFAULTS.items():
        assert hasattr(args, name), name
        if default is not None and name != "data":
            assert type(getattr(args, name)) is type(default), (name, getattr(args, name))
    assert args.distributed is True and args.num_total_iter == STEPS_PER_EPOCH * CFG.epochs
    assert (args.batch_size, args.epochs, args.warmup_epochs, args.data) == (2, 6, 2, "/data/mnist")
    assert args.save == str(tmp_path / "runs" / "eval-x") and args.root == str(tmp_path / "runs")
    assert ck["arch_instance"] == trainer.model.arch_instance
    assert NVAEConfig.from_namespace(args) == trainer.model.config

    model, optimizer, scheduler, scaler = _official_objects(args)
    model.load_state_dict(ck["state_dict"])
    optimizer.load_state_dict(ck["optimizer"])
    scheduler.load_state_dict(ck["scheduler"])
    scaler.load_state_dict(ck["grad_scalar"])
    assert scaler.get_scale() == 2.0 ** 10
    first = next(iter(optimizer.state.values()))
    assert int(first["step"]) == 2 and first["exp_avg"].shape == model.prior_ftr0.shape
    assert optimizer.param_groups[0]["lr"] == learning_rate(1, STEPS_PER_EPOCH, 6, 2, CFG.learning_rate,
                                                            CFG.learning_rate_min)


@pytest.mark.parametrize("epochs_done", [1, 2, 3, 4, 6])
def test_official_continuation_keeps_the_official_learning_rates(tmp_path, epochs_done):
    """train.py --cont_training from an export after ``epochs_done`` epochs sets the learning rates
    of an uninterrupted official run."""
    trainer = _trainer(steps=0)
    step = epochs_done * STEPS_PER_EPOCH
    path = export_official(trainer.model, tmp_path / "c.pt", CFG, epoch=epochs_done, global_step=step,
                           steps_per_epoch=STEPS_PER_EPOCH, optimizer_state=trainer.optimizer.state_dict())
    ck = _load(path)
    _, optimizer, scheduler, _ = _official_objects(ck["args"])
    optimizer.load_state_dict(ck["optimizer"])
    scheduler.load_state_dict(ck["scheduler"])
    warmup_steps = STEPS_PER_EPOCH * CFG.warmup_epochs
    for epoch in range(ck["epoch"], CFG.epochs):  # the official main loop from the checkpoint on
        if epoch > CFG.warmup_epochs:
            optimizer.step()
            scheduler.step()
        for _ in range(STEPS_PER_EPOCH):
            if step < warmup_steps:
                optimizer.param_groups[0]["lr"] = CFG.learning_rate * float(step) / warmup_steps
            assert optimizer.param_groups[0]["lr"] == learning_rate(step, STEPS_PER_EPOCH, CFG.epochs,
                                                                    CFG.warmup_epochs, CFG.learning_rate,
                                                                    CFG.learning_rate_min), step
            step += 1


def test_plain_save_writes_the_official_initial_training_state(tmp_path):
    model = NVAE.from_preset("tiny_cifar10")
    save_official_checkpoint(model, tmp_path / "c.pt", extra_args={"batch_size": 4, "epochs": 10})
    ck = _load(tmp_path / "c.pt")
    assert set(ck) == KEYS and ck["args"].batch_size == 4 and ck["args"].distributed is True
    _, optimizer, scheduler, scaler = _official_objects(ck["args"])
    optimizer.load_state_dict(ck["optimizer"])
    scheduler.load_state_dict(ck["scheduler"])
    scaler.load_state_dict(ck["grad_scalar"])
    assert optimizer.param_groups[0]["lr"] == 1e-2 and scheduler.last_epoch == 0
