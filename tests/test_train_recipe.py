"""The official recipe's pieces: LR, KL and λ schedules, KL balancing, likelihood bookkeeping."""

import math

import pytest
import torch

from nvae_fast.distributions import reconstruction_loss
from nvae_fast.train.losses import balanced_kl, dims_per_sample, kl_balance_alphas, log_importance_weight
from nvae_fast.train.schedules import WarmupCosineLR, kl_coefficient, learning_rate, spectral_coefficient


def _official_lrs(steps_per_epoch: int, epochs: int, warmup_epochs: int, lr: float, lr_min: float) -> list[float]:
    """Every step's learning rate as the official train.py sets it: the warm-up value written into
    the optimizer at each warm-up step, torch's CosineAnnealingLR(T_max = epochs - warmup - 1)
    stepped at the start of every epoch after ``warmup_epochs``."""
    opt = torch.optim.Adamax([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, float(epochs - warmup_epochs - 1), eta_min=lr_min)
    warmup_steps, step, lrs = steps_per_epoch * warmup_epochs, 0, []
    for epoch in range(epochs):
        if epoch > warmup_epochs:
            sched.step()
        for _ in range(steps_per_epoch):
            if step < warmup_steps:
                opt.param_groups[0]["lr"] = lr * float(step) / warmup_steps
            lrs.append(opt.param_groups[0]["lr"])
            opt.step()  # no gradients: nothing moves, but the scheduler sees a step taken
            step += 1
    return lrs


@pytest.mark.parametrize("steps_per_epoch,epochs,warmup_epochs", [(10, 8, 2), (3, 5, 1), (1, 6, 0), (7, 4, 3),
                                                                  (2, 3, 2), (195, 12, 5), (4, 1, 1)])
def test_official_learning_rate_is_what_the_official_recipe_sets_bit_for_bit(steps_per_epoch, epochs, warmup_epochs):
    kw = dict(steps_per_epoch=steps_per_epoch, epochs=epochs, warmup_epochs=warmup_epochs, lr=1e-2, lr_min=1e-4)
    expected = _official_lrs(**kw)
    assert [learning_rate(s, **kw) for s in range(len(expected))] == expected
    assert [learning_rate(s, **kw, schedule="official") for s in range(len(expected))] == expected


def test_official_learning_rate_after_warmup_is_the_cosine_from_the_last_warmup_value():
    kw = dict(steps_per_epoch=2, epochs=8, warmup_epochs=2, lr=1e-2, lr_min=1e-4)
    start = 1e-2 * 3 / 4  # W = 4 warm-up steps: the cosine starts from lr·(W-1)/W
    span = 8 - 2 - 1
    for epoch in range(2, 8):
        cosine = 1e-4 + (start - 1e-4) * 0.5 * (1 + math.cos(math.pi * (epoch - 2) / span))
        assert learning_rate(2 * epoch, **kw) == pytest.approx(cosine, rel=1e-12)
        assert learning_rate(2 * epoch + 1, **kw) == learning_rate(2 * epoch, **kw)


def test_textbook_learning_rate_warmup_then_cosine_per_epoch():
    kw = dict(steps_per_epoch=10, epochs=8, warmup_epochs=2, lr=1e-2, lr_min=1e-4, schedule="textbook")
    assert learning_rate(0, **kw) == 0
    assert learning_rate(5, **kw) == pytest.approx(1e-2 * 5 / 20)
    assert learning_rate(20, **kw) == pytest.approx(1e-2)        # first epoch after warm-up
    assert learning_rate(29, **kw) == pytest.approx(1e-2)        # constant within an epoch
    span = 8 - 2 - 1
    assert learning_rate(30, **kw) == pytest.approx(1e-4 + (1e-2 - 1e-4) * 0.5 * (1 + math.cos(math.pi / span)))
    assert learning_rate(79, **kw) == pytest.approx(1e-4)        # last epoch
    assert learning_rate(500, **kw) == pytest.approx(1e-4)
    with pytest.raises(ValueError, match="schedule must be one of official, textbook"):
        learning_rate(0, 10, 8, 2, 1e-2, 1e-4, schedule="linear")


def test_warmup_cosine_scheduler_follows_the_formula_and_resumes():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.Adamax([p], lr=0.5)
    sched = WarmupCosineLR(opt, steps_per_epoch=3, epochs=5, warmup_epochs=1, lr_min=0.01)
    seen = []
    for _ in range(15):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == [learning_rate(s, 3, 5, 1, 0.5, 0.01) for s in range(15)] == _official_lrs(3, 5, 1, 0.5, 0.01)
    textbook = WarmupCosineLR(torch.optim.Adamax([p], lr=0.5), 3, 5, 1, 0.01, schedule="textbook")
    assert textbook.get_last_lr() == [0.0]
    for _ in range(3):
        textbook.optimizer.step()
        textbook.step()
    assert textbook.get_last_lr() == [0.5]
    state = sched.state_dict()
    opt2 = torch.optim.Adamax([p], lr=0.5)
    sched2 = WarmupCosineLR(opt2, steps_per_epoch=3, epochs=5, warmup_epochs=1, lr_min=0.01)
    sched2.load_state_dict(state)
    assert sched2.get_last_lr() == sched.get_last_lr()


def test_kl_coefficient_official_warmup():
    total = 1000
    c = lambda s: kl_coefficient(s, total, anneal_portion=0.3, const_portion=0.1, const_coeff=1e-4)  # noqa: E731
    assert c(0) == 1e-4 and c(100) == 1e-4
    assert c(250) == pytest.approx(150 / 300)
    assert c(400) == 1.0 and c(999) == 1.0
    assert kl_coefficient(5, total, 0.0, 0.0, 1e-4) == 1.0


def test_spectral_coefficient_log_linear_anneal():
    assert spectral_coefficient(0.3, 1e-2, 10.0, anneal=False) == 1e-2
    assert spectral_coefficient(0.0, 1e-2, 10.0, anneal=True) == pytest.approx(10.0)
    assert spectral_coefficient(1.0, 1e-2, 10.0, anneal=True) == pytest.approx(1e-2)
    assert spectral_coefficient(0.5, 1e-2, 10.0, anneal=True) == pytest.approx(math.sqrt(1e-2 * 10.0))
    with pytest.raises(ValueError, match="weight_decay_norm_init"):
        spectral_coefficient(0.5, 0.0, 10.0, anneal=True)


def test_kl_balance_alphas_square():
    # Two scales, 4 groups at the finest and 2 at the coarsest (decoder order: coarsest first).
    alphas = kl_balance_alphas([4, 2])
    torch.testing.assert_close(alphas, torch.tensor([1.0, 1.0, 2.0, 2.0, 2.0, 2.0]))
    torch.testing.assert_close(kl_balance_alphas([3]), torch.ones(3))


def test_balanced_kl_during_and_after_warmup():
    g = torch.Generator().manual_seed(0)
    kl_all = [torch.rand(5, generator=g) * (i + 1) for i in range(3)]
    alphas = torch.tensor([1.0, 2.0, 4.0])
    kl, gamma, per_group = balanced_kl(kl_all, 0.5, alphas)
    stacked = torch.stack(kl_all, 1)
    expected_gamma = (stacked.abs().mean(0) + 0.01) / alphas
    expected_gamma = expected_gamma / expected_gamma.mean()
    torch.testing.assert_close(gamma, expected_gamma)
    torch.testing.assert_close(kl, 0.5 * (stacked * expected_gamma).sum(1))
    torch.testing.assert_close(per_group, stacked.mean(0))
    kl1, gamma1, _ = balanced_kl(kl_all, 1.0, alphas)
    torch.testing.assert_close(kl1, stacked.sum(1))
    assert torch.equal(gamma1, torch.ones(3))
    # The balancing weights carry no gradient; a cross-rank mean hook replaces the local mean.
    leaf = [t.clone().requires_grad_() for t in kl_all]
    balanced_kl(leaf, 0.5, alphas)[0].sum().backward()
    torch.testing.assert_close(torch.stack([t.grad for t in leaf], 1), 0.5 * expected_gamma.expand(5, 3))
    _, gamma_hook, _ = balanced_kl(kl_all, 0.5, alphas, mean_over_batch=lambda m: torch.ones_like(m))
    torch.testing.assert_close(gamma_hook, (1.01 / alphas) / (1.01 / alphas).mean())
    with pytest.raises(ValueError, match="latent groups"):
        balanced_kl(kl_all, 0.5, torch.ones(2))


class _Decoder:
    def __init__(self, log_p):
        self.log_p = log_p

    def log_prob(self, x):
        return self.log_p


def test_importance_weight_and_dims():
    log_p = torch.randn(2, 1, 32, 32)
    x = torch.zeros(2, 1, 32, 32)
    recon = reconstruction_loss(_Decoder(log_p), x, crop=True)
    log_q, log_prior = torch.randn(2), torch.randn(2)
    torch.testing.assert_close(log_importance_weight(_Decoder(log_p), x, log_q, log_prior, crop=True),
                               -recon - log_q + log_prior)
    assert dims_per_sample(x, crop=True) == 28 * 28 and dims_per_sample(x, crop=False) == 32 * 32
    assert dims_per_sample(torch.zeros(1, 3, 8, 8), crop=False) == 3 * 8 * 8
