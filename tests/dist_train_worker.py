"""Run by test_train_distributed.py under torchrun: two training steps of a tiny NVAE with DDP,
each rank on its share of a fixed batch; rank 0 saves the global losses and the gradients."""

import sys

import torch

from nvae_fast import NVAE, NVAEConfig
from nvae_fast.train.recipe import TrainConfig
from nvae_fast.train.runtime import all_reduce_mean, init_runtime, shutdown
from nvae_fast.train.trainer import Trainer

# KL coefficient 0.5 from the first step: KL balancing (with its cross-rank batch mean) is active.
CONFIG = TrainConfig(batch_size=4, epochs=2, warmup_epochs=0, kl_const_coeff=0.5, weight_decay_norm=1e-2)
STEPS = 2


def joined_batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return [torch.bernoulli(torch.rand(2 * CONFIG.batch_size, 1, 32, 32, generator=g)) for _ in range(STEPS)]


def run(rank: int, world: int, trainer: Trainer) -> dict:
    losses = []
    for x in joined_batches():
        share = x.shape[0] // world
        stats = trainer.train_step(x[rank * share:(rank + 1) * share], deterministic=True)
        losses.append(all_reduce_mean(stats.loss, trainer.rt).item())
    grads = {name: p.grad.clone() for name, p in trainer.model.named_parameters()}
    return {"losses": losses, "grads": grads,
            "buffers": {name: b.clone() for name, b in trainer.model.named_buffers()}}


def make_trainer(rt) -> Trainer:
    torch.manual_seed(0)
    model = NVAE(NVAEConfig.preset("tiny_mnist"))
    return Trainer(model, CONFIG, rt, steps_per_epoch=10)


if __name__ == "__main__":
    rt = init_runtime("cpu")
    try:
        out = run(rt.rank, rt.world_size, make_trainer(rt))
        if rt.is_main:
            torch.save(out, sys.argv[1])
    finally:
        shutdown(rt)
