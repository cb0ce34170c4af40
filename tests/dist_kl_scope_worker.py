"""Run by test_official_defaults.py under torchrun: one training step of a tiny NVAE on two ranks
with each --kl_balance_scope; rank 0 saves every rank's KL-balancing weights and those its own
batch alone gives."""

import sys

import torch

from nvae_fast import NVAE, NVAEConfig
from nvae_fast.train.losses import balanced_kl
from nvae_fast.train.recipe import TrainConfig
from nvae_fast.train.runtime import gather_objects, init_runtime, shutdown
from nvae_fast.train.trainer import Trainer


def step(rt, scope: str) -> dict:
    torch.manual_seed(0)
    cfg = TrainConfig(batch_size=2, epochs=2, warmup_epochs=0, kl_const_coeff=0.5, kl_balance_scope=scope)
    trainer = Trainer(NVAE(NVAEConfig.preset("tiny_mnist")), cfg, rt, steps_per_epoch=10)
    g = torch.Generator().manual_seed(7)
    x = torch.bernoulli(torch.rand(4, 1, 32, 32, generator=g))[2 * rt.rank:2 * rt.rank + 2]
    model = trainer.model
    with torch.no_grad():  # this rank's per-group KL in the step's forward (same weights, same noise)
        state = torch.random.get_rng_state()
        kl_all = model(x, deterministic=True)[3]
        torch.random.set_rng_state(state)
    own = balanced_kl(kl_all, 0.5, trainer.alphas)[1]
    stats = trainer.train_step(x, deterministic=True)
    return {"weights": stats.kl_weights.clone(), "own": own}


if __name__ == "__main__":
    rt = init_runtime("cpu")
    try:
        out = {scope: gather_objects(step(rt, scope), rt) for scope in ("global", "rank")}
        if rt.is_main:
            torch.save(out, sys.argv[1])
    finally:
        shutdown(rt)
