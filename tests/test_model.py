"""nvae_fast.NVAE on the CPU: every architecture forward, backward and sample; posterior-mean mode;
KL against torch.distributions in float64; regularisers; input checks; layouts and dtypes."""

import pytest
import torch
from torch.distributions import Bernoulli, Normal, kl_divergence
from torch.nn.modules.batchnorm import _BatchNorm

import nvae_fast.model as model_module
from nvae_fast import NVAE, NVAEConfig
from nvae_fast.config import ARCHITECTURES
from nvae_fast.distributions import DiscMixLogistic, NormalDecoder, reconstruction_loss
from nvae_fast.nn import BatchNorm2d, BatchNormSwish
from nvae_fast.nn.cells import EluConv, InvertedResidual, InvertedResidualCell
from nvae_fast.ops.normal_kl import soft_clamp5

from tolerances import assert_close

pytestmark = pytest.mark.usefixtures("small_cpu_convs")

BATCH = 2  # one batch size everywhere: CPU convolutions reuse their per-shape setup across tests


def _model(preset="tiny_cifar10", seed=0, **overrides):
    torch.manual_seed(seed)
    return NVAE.from_preset(preset, **overrides)


def _images(model, n=BATCH, seed=1, dtype=torch.float32):
    c = model.config
    x = torch.rand(n, c.in_channels, c.image_size, c.image_size, generator=torch.Generator().manual_seed(seed))
    if c.output_distribution == "bernoulli":
        x = (x > 0.5).float()
    return x.to(dtype)


def _loss(model, outputs, x):
    logits, log_q, log_p, kl_all, kl_diag = outputs
    recon = reconstruction_loss(model.decoder_output(logits), x, crop=model.crop_output)
    return (recon + sum(kl_all)).mean() + 1e-2 * (model.spectral_norm_parallel() + model.batchnorm_loss())


# ---------------------------------------------------------------------------------------------
# Every architecture
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("flows_and_se", [(1, True), (0, False)], ids=["flows+se", "plain"])
@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_forward_backward_sample_every_architecture(arch, flows_and_se):
    num_nf, use_se = flows_and_se
    model = _model(arch_instance=arch, num_nf=num_nf, use_se=use_se, res_dist=use_se).train()
    x = _images(model)
    logits, log_q, log_p, kl_all, kl_diag = outputs = model(x)

    c = model.config
    assert logits.shape == (BATCH, c.output_channels, 32, 32)
    assert log_q.shape == log_p.shape == (BATCH,)
    num_groups = sum(c.groups_per_scale)
    assert len(kl_all) == len(kl_diag) == num_groups
    assert all(k.shape == (BATCH,) for k in kl_all) and all(k.shape == (c.num_latent_per_group,) for k in kl_diag)
    assert all(torch.isfinite(t).all() for t in (logits, log_q, log_p, *kl_all, *kl_diag))

    _loss(model, outputs, x).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), name

    samples = model.eval().sample(BATCH, t=0.7)
    assert samples.shape == logits.shape and torch.isfinite(samples).all()
    images = model.decoder_output(samples).sample()
    assert images.shape == x.shape and images.min() >= 0 and images.max() <= 1


def test_grey_images_with_a_logistic_mixture():
    model = _model(dataset="grey16", image_size=16, in_channels=1, num_mixture_dec=2, num_nf=0).train()
    x = _images(model)
    outputs = model(x)
    assert isinstance(model.decoder_output(outputs[0]), DiscMixLogistic) and outputs[0].shape == (BATCH, 6, 16, 16)
    _loss(model, outputs, x).backward()
    samples = model.decoder_output(model.eval().sample(BATCH, 1.0)).sample()
    assert samples.shape == x.shape


def test_mnist_output_is_bernoulli_and_cropped():
    model = _model("tiny_mnist").eval()
    x = _images(model)
    logits = model(x, deterministic=True)[0]
    output = model.decoder_output(logits)
    assert isinstance(output, Bernoulli) and model.crop_output
    full = -output.log_prob(x)
    expected = full[:, :, 2:30, 2:30].sum(dim=(1, 2, 3))
    assert_close(reconstruction_loss(output, x, crop=True), expected)
    assert (reconstruction_loss(output, x, crop=False) > expected).all()


def test_output_distributions():
    mixture = _model()
    assert isinstance(mixture.decoder_output(torch.randn(1, 30, 4, 4)), DiscMixLogistic)
    normal = _model(num_mixture_dec=1)
    logits = torch.randn(BATCH, 6, 32, 32)
    out = normal.decoder_output(logits)
    assert isinstance(out, NormalDecoder)
    x = torch.rand(BATCH, 3, 32, 32)
    expected = Normal(soft_clamp5(logits[:, :3]), torch.exp(soft_clamp5(logits[:, 3:])) + 0.01).log_prob(2 * x - 1)
    assert_close(out.log_prob(x), expected)
    assert out.mean().shape == out.sample().shape == x.shape


@pytest.mark.parametrize("channels, num_bits", [(3, 1), (3, 2), (1, 4)])
def test_disc_mix_logistic_sums_to_one_over_all_images(channels, num_bits):
    """A pixel's probabilities over every value of the 2**num_bits levels per channel sum to 1."""
    levels = torch.arange(2 ** num_bits, dtype=torch.float64) / (2 ** num_bits - 1)
    grid = torch.cartesian_prod(*[levels] * channels) if channels > 1 else levels[:, None]   # (L^C, C)
    x = grid.view(-1, channels, 1, 1)
    logits = torch.randn(1, 30 if channels == 3 else 9, 1, 1, dtype=torch.float64,
                         generator=torch.Generator().manual_seed(2))
    dist = DiscMixLogistic(logits.expand(x.shape[0], -1, -1, -1), num_mix=3, num_bits=num_bits,
                           num_channels=channels)
    total = dist.log_prob(x).exp().sum()
    assert abs(total.item() - 1) < 1e-6
    assert 0 <= dist.mean().min() and dist.mean().max() <= 1


# ---------------------------------------------------------------------------------------------
# Posterior-mean mode and determinism
# ---------------------------------------------------------------------------------------------

def test_posterior_mean_mode_is_deterministic():
    model = _model().eval()
    x = _images(model)
    with torch.no_grad():
        first = model(x, deterministic=True)
        torch.manual_seed(123)
        second = model(x, deterministic=True)
        sampled = model(x)
    for a, b in zip(first[:3], second[:3]):
        assert torch.equal(a, b)
    for a, b in zip(first[3] + first[4], second[3] + second[4]):
        assert torch.equal(a, b)
    assert not torch.equal(first[0], sampled[0])


def test_training_mode_deterministic_forward_repeats():
    model = _model().train()
    x = _images(model)
    first, second = model(x, deterministic=True), model(x, deterministic=True)
    assert torch.equal(first[0], second[0])


# ---------------------------------------------------------------------------------------------
# KL per group against torch.distributions in float64
# ---------------------------------------------------------------------------------------------

def _record(monkeypatch, name):
    calls = []
    original = getattr(model_module, name)

    def recorder(*args, **kwargs):
        result = original(*args, **kwargs)
        calls.append((args, kwargs, result))
        return result

    monkeypatch.setattr(model_module, name, recorder)
    return calls


def _normal(mu, log_sigma):
    return Normal(soft_clamp5(mu), torch.exp(soft_clamp5(log_sigma)) + 1e-2)


def _prior_and_posterior(mu_p, log_sigma_p, mu_q, log_sigma_q, residual):
    if mu_p is None:
        mu_p, log_sigma_p = torch.zeros_like(mu_q), torch.zeros_like(mu_q)
    elif residual:
        mu_q, log_sigma_q = mu_p + mu_q, log_sigma_p + log_sigma_q
    return _normal(mu_p, log_sigma_p), _normal(mu_q, log_sigma_q)


@pytest.mark.parametrize("res_dist", [True, False])
def test_analytic_kl_per_group_matches_torch_distributions(monkeypatch, res_dist):
    model = _model(num_nf=0, res_dist=res_dist).double().train()
    calls = _record(monkeypatch, "normal_kl")
    x = _images(model, dtype=torch.float64)
    _, log_q, log_p, kl_all, kl_diag = model(x)
    assert len(calls) == len(kl_all) == sum(model.config.groups_per_scale)

    total_q, total_p = 0, 0
    for g, (args, kwargs, result) in enumerate(calls):
        mu_p, log_sigma_p, mu_q, log_sigma_q, eps = args
        prior, posterior = _prior_and_posterior(mu_p, log_sigma_p, mu_q, log_sigma_q, res_dist)
        kl = kl_divergence(posterior, prior)
        assert_close(kl_all[g], kl.sum(dim=(1, 2, 3)))
        assert_close(kl_diag[g], kl.sum(dim=(2, 3)).mean(dim=0))
        z = posterior.mean + posterior.stddev * eps
        assert_close(result.z, z)
        total_q = total_q + posterior.log_prob(z).sum(dim=(1, 2, 3))
        total_p = total_p + prior.log_prob(z).sum(dim=(1, 2, 3))
    assert_close(log_q, total_q)
    assert_close(log_p, total_p)


def test_flow_kl_per_group_matches_torch_distributions(monkeypatch):
    """With flows, KL = log q(z0) - log_det - log p(z) of the flowed sample z (log_det = 0)."""
    model = _model(num_nf=2, res_dist=True).double().train()
    samples = _record(monkeypatch, "normal_sample")
    kls = _record(monkeypatch, "flow_kl")
    x = _images(model, dtype=torch.float64)
    _, log_q, log_p, kl_all, kl_diag = model(x)
    assert len(kls) == len(samples) == len(kl_all)

    total_q, total_p = 0, 0
    for g, ((mu_post, log_sigma_post, eps), _, z0) in enumerate(samples):
        mu_p, log_sigma_p, log_sigma_q, eps_kl, z, log_det = kls[g][0]
        assert eps_kl is eps and torch.equal(log_det, torch.zeros_like(z))
        assert not torch.equal(z, z0)  # the flows moved the sample
        posterior = _normal(mu_post, log_sigma_post)
        prior = _normal(mu_p, log_sigma_p) if mu_p is not None else _normal(torch.zeros_like(z), torch.zeros_like(z))
        assert_close(z0, posterior.mean + posterior.stddev * eps)
        log_q_conv = posterior.log_prob(z0) - log_det
        log_p_conv = prior.log_prob(z)
        assert_close(kl_all[g], (log_q_conv - log_p_conv).sum(dim=(1, 2, 3)))
        assert_close(kl_diag[g], (log_q_conv - log_p_conv).sum(dim=(2, 3)).mean(dim=0))
        total_q = total_q + log_q_conv.sum(dim=(1, 2, 3))
        total_p = total_p + log_p_conv.sum(dim=(1, 2, 3))
    assert_close(log_q, total_q)
    assert_close(log_p, total_p)


# ---------------------------------------------------------------------------------------------
# Sampling, BatchNorm re-adjustment
# ---------------------------------------------------------------------------------------------

def test_sample_follows_the_model_dtype_and_checks_arguments():
    model = _model().double().eval()
    assert model.sample(1, 1.0).dtype == torch.float64
    with pytest.raises(ValueError, match="num_samples must be a positive integer"):
        model.sample(0, 1.0)
    with pytest.raises(ValueError, match="temperature"):
        model.sample(1, -0.5)
    with pytest.raises(ValueError, match="temperature"):
        model.sample(1, float("nan"))


def test_readjust_bn_updates_running_statistics_and_ends_in_eval():
    model = _model().train()
    bns = [m for m in model.dec_tower.modules() if isinstance(m, _BatchNorm)]
    before = [bn.running_mean.clone() for bn in bns]
    model.readjust_bn(num_samples=BATCH, t=0.8, iterations=2)
    assert not model.training
    assert any(not torch.equal(b, bn.running_mean) for b, bn in zip(before, bns))


# ---------------------------------------------------------------------------------------------
# Regularisers
# ---------------------------------------------------------------------------------------------

def test_spectral_norm_parallel_converges_to_the_largest_singular_values():
    model = _model(num_nf=1)
    with torch.no_grad():
        expected = sum(torch.linalg.matrix_norm(conv.normalized_weight().flatten(1), ord=2)
                       for conv in model.conv_layers())
    for _ in range(10):
        value = model.spectral_norm_parallel()
    assert abs(value.item() - expected.item()) < 1e-3 * expected.item()
    assert all(u.device == model.prior_ftr0.device for u in model._sr_u.values())
    value.backward()
    assert model.stem.log_weight_norm.grad is not None and model.stem.log_weight_norm.grad.abs().sum() > 0

    # The power-iteration vectors round-trip, so a restored copy computes the same next value.
    other = _model(num_nf=1)
    other.load_state_dict(model.state_dict())
    other.load_spectral_state(model.spectral_state())
    assert all(item["u"].device.type == "cpu" for item in model.spectral_state())
    assert torch.equal(other.spectral_norm_parallel(), model.spectral_norm_parallel())


def test_batchnorm_loss_and_every_bn_synchronises_across_ranks():
    model = _model()
    bns = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    assert bns and all(type(m) in (BatchNorm2d, BatchNormSwish) for m in bns)
    expected = sum(bn.weight.abs().max() for bn in bns)
    assert_close(model.batchnorm_loss(), expected)
    assert _model(arch_instance="res_elu").batchnorm_loss().item() == 0  # no BatchNorm in that architecture


# ---------------------------------------------------------------------------------------------
# Structure
# ---------------------------------------------------------------------------------------------

def test_decoder_cells_are_inverted_residual_cells_with_named_layers():
    model = _model(arch_instance="res_mbconv")
    cells = [m for m in model.modules() if isinstance(m, InvertedResidualCell)]
    assert {cell.cell_type for cell in cells} == {"normal_dec", "up_dec", "normal_post", "up_post"}
    up = next(cell for cell in cells if cell.cell_type == "up_dec")
    block = up.block
    assert isinstance(block, InvertedResidual) and block.upsample and block.expansion == 6
    c = block.bn0.num_features
    assert block.conv1.weight.shape == (6 * c, c, 1, 1) and isinstance(block.bn1, BatchNormSwish)
    assert block.conv_dw.weight.shape == (6 * c, 1, 5, 5) and block.conv_dw.groups == 6 * c
    assert isinstance(block.bn2, BatchNormSwish) and block.conv2.weight.shape == (c // 2, 6 * c, 1, 1)
    assert block.bn3.num_features == c // 2 and block.bn3.momentum == 0.05


def test_elu_cells_initialise_from_the_first_batch():
    model = _model(arch_instance="res_elu")
    conv = next(m for m in model.modules() if isinstance(m, EluConv)).conv_0
    outputs = []
    conv.register_forward_hook(lambda module, args, out: outputs.append(out.detach()))
    model.train()(_images(model))
    assert conv.init_done
    out = outputs[0]
    assert_close(out.mean(dim=(0, 2, 3)), torch.zeros(out.shape[1]), scale=10)
    assert_close(out.std(dim=(0, 2, 3)), torch.full((out.shape[1],), 0.2), scale=10)
    fresh = _model(arch_instance="res_elu", seed=5)
    fresh.load_state_dict(model.state_dict())
    assert all(m.init_done for m in fresh.modules() if hasattr(m, "init_done"))


def test_vanilla_vae_one_group():
    model = _model(num_latent_scales=1, num_groups_per_scale=1).train()
    assert model.vanilla_vae and len(model.dec_tower) == 0 and len(model.enc_tower) == 0
    x = _images(model)
    logits, log_q, log_p, kl_all, kl_diag = model(x)
    assert logits.shape == (BATCH, 30, 32, 32) and len(kl_all) == 1
    assert model.eval().sample(1, 1.0).shape == (1, 30, 32, 32)


# ---------------------------------------------------------------------------------------------
# Layouts, dtypes, devices
# ---------------------------------------------------------------------------------------------

def test_channels_last_matches_contiguous():
    model = _model().eval()
    x = _images(model)
    with torch.no_grad():
        expected = model(x, deterministic=True)
        model.to(memory_format=torch.channels_last)
        actual = model(x.contiguous(memory_format=torch.channels_last), deterministic=True)
    for a, b in zip(actual[:3], expected[:3]):
        assert_close(a, b, scale=10)


def test_float64_backward_and_autocast_forward():
    model = _model().double().train()
    x = _images(model, dtype=torch.float64)
    outputs = model(x)
    assert outputs[0].dtype == outputs[1].dtype == torch.float64
    _loss(model, outputs, x).backward()
    model = _model().train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, log_q, *_ = model(_images(model))
    assert logits.dtype == torch.bfloat16 and log_q.dtype == torch.float32
    assert torch.isfinite(log_q).all()


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("x, message", [
    (torch.rand(3, 32, 32), r"shape \(N, 3, 32, 32\)"),
    (torch.rand(2, 1, 32, 32), r"shape \(N, 3, 32, 32\)"),
    (torch.rand(2, 3, 28, 28), r"shape \(N, 3, 32, 32\)"),
    (torch.randint(0, 255, (2, 3, 32, 32)), "floating-point"),
    (torch.rand(2, 3, 32, 32) * 255, r"values in \[0, 1\]"),
    (torch.rand(2, 3, 32, 32) - 0.5, r"values in \[0, 1\]"),
    (torch.rand(2, 3, 32, 32, dtype=torch.float64), "dtype torch.float64"),
])
def test_bad_images_are_rejected(x, message):
    model = _model()
    with pytest.raises(ValueError, match=message):
        model(x)


def test_non_tensor_and_bad_config():
    with pytest.raises(TypeError, match="torch.Tensor"):
        _model()([[0.5]])
    with pytest.raises(TypeError, match="NVAEConfig"):
        NVAE({"dataset": "cifar10"})
    with pytest.raises(ValueError, match="res_mbconv9"):
        NVAE(NVAEConfig(dataset="cifar10", arch_instance="res_mbconv9"))


def test_official_attributes():
    model = _model("tiny_mnist")
    assert model.crop_output and model.num_latent_scales == 2 and model.groups_per_scale == [2, 2]
    assert model.z0_size == [4, 8, 8]
    assert model.prior_ftr0.shape == (32, 8, 8)
