"""Test-set likelihood: the negative ELBO and the importance-weighted log-likelihood.

For each test image, K posterior samples z_k ~ q(z|x) give the ELBO terms and the importance
weights log p(x, z_k) - log q(z_k|x); log p(x) ≈ logsumexp_k(weights) - log K (the official
``test`` in train.py). Results are in nats per image and in bits per dimension.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader

from nvae_fast.train import threads
from nvae_fast.train.loaders import quantize
from nvae_fast.distributions import reconstruction_loss
from nvae_fast.train.losses import dims_per_sample, log_importance_weight
from nvae_fast.train.monitor import Monitor
from nvae_fast.train.runtime import Runtime, all_reduce_sum
from nvae_fast.train.trainer import autocast


@dataclass(frozen=True)
class EvalResult:
    """nelbo and neg_log_p in nats per image; bpd_* in bits per dimension; images evaluated."""

    nelbo: float
    neg_log_p: float
    bpd_elbo: float
    bpd_log_p: float
    num_iw_samples: int
    images: int

    def as_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        return (f"NELBO {self.nelbo:.3f} nats ({self.bpd_elbo:.4f} bits/dim), "
                f"-log p(x) {self.neg_log_p:.3f} nats ({self.bpd_log_p:.4f} bits/dim, "
                f"{self.num_iw_samples} importance samples, {self.images} images)")


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, rt: Runtime, num_iw_samples: int = 1,
             amp: torch.dtype | None = None, monitor: Monitor | None = None, desc: str = "eval") -> EvalResult:
    """NELBO and importance-weighted -log p(x) of ``model`` (eval mode) over ``loader``; with
    several ranks each evaluates its shard and the sums are combined."""
    if num_iw_samples < 1:
        raise ValueError(f"num_iw_samples must be >= 1, got {num_iw_samples}")
    was_training = model.training
    model.eval()
    cfg = model.config
    sums = torch.zeros(3, dtype=torch.float64, device=rt.device)  # Σ nelbo, Σ -log p, images
    dims = None
    batches = monitor.progress(loader, total=len(loader), desc=desc) if monitor else loader
    for x in batches:
        threads.adjust()
        x = quantize(x.to(rt.device, non_blocking=True), cfg.num_x_bits)
        dims = dims_per_sample(x, cfg.crop_output)
        nelbo, log_w = [], []
        for _ in range(num_iw_samples):
            with autocast(rt.device, amp):
                logits, log_q, log_p, kl_all, _ = model(x)
                decoder = model.decoder_output(logits)
                recon = reconstruction_loss(decoder, x, cfg.crop_output).float()
                nelbo.append(recon + torch.stack(kl_all, 1).float().sum(1))
                log_w.append(log_importance_weight(decoder, x, log_q.float(), log_p.float(), cfg.crop_output).float())
        log_px = torch.logsumexp(torch.stack(log_w), 0) - math.log(num_iw_samples)
        sums += torch.stack([torch.stack(nelbo).mean(0).sum(), -log_px.sum(), torch.tensor(float(len(x)))]
                            ).to(sums)
    sums = all_reduce_sum(sums, rt)
    model.train(was_training)
    count = sums[2].item()
    if count == 0:
        raise ValueError("the evaluation split is empty")
    nelbo, neg_log_p = sums[0].item() / count, sums[1].item() / count
    to_bpd = 1.0 / (math.log(2.0) * dims)
    return EvalResult(nelbo, neg_log_p, nelbo * to_bpd, neg_log_p * to_bpd, num_iw_samples, int(count))
