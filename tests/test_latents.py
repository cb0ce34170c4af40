"""NVAE's latent API: encode, decode (full and partial), reconstruct, interpolate, bad input."""

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from nvae_fast import NVAE
from nvae_fast.nn.cells import DecCombinerCell

pytestmark = pytest.mark.usefixtures("small_cpu_convs")

BATCH = 2


def _model(preset="tiny_cifar10", seed=0, **overrides):
    torch.manual_seed(seed)
    return NVAE.from_preset(preset, **overrides).eval()


def _images(model, n=BATCH, seed=1):
    c = model.config
    x = torch.rand(n, c.in_channels, c.image_size, c.image_size, generator=torch.Generator().manual_seed(seed))
    return (x > 0.5).float() if c.output_distribution == "bernoulli" else x


VARIANTS = {
    "flows+residual": ("tiny_cifar10", {}),
    "bernoulli+flows": ("tiny_mnist", {}),
    "no flows, absolute posterior": ("tiny_cifar10", dict(num_nf=0, res_dist=False)),
    "vanilla vae": ("tiny_cifar10", dict(num_latent_scales=1, num_groups_per_scale=1, num_nf=0)),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
@torch.no_grad()
def test_decode_of_encode_is_the_forward_pass(variant):
    preset, overrides = VARIANTS[variant]
    model = _model(preset, **overrides)
    x = _images(model)
    groups = model.encode(x)
    assert len(groups) == model.num_latent_groups == sum(model.config.groups_per_scale)
    assert [tuple(g.z.shape[1:]) for g in groups] == model.latent_shapes()
    assert all(g.mu.shape == g.log_sigma.shape == g.z.shape for g in groups)
    assert torch.equal(model.decode([g.z for g in groups]), model(x, deterministic=True)[0])

    # With posterior samples instead of means: the same random numbers as the forward pass.
    torch.manual_seed(5)
    expected = model(x)[0]
    torch.manual_seed(5)
    assert torch.equal(model.decode([g.z for g in model.encode(x, deterministic=False)]), expected)


@torch.no_grad()
def test_encoded_gaussians_are_the_ones_the_kl_uses():
    model = _model(num_nf=0, res_dist=True)
    x = _images(model)
    groups = model.encode(x)
    kl_all = model(x, deterministic=True)[3]
    for g in groups:  # without flows, z at the posterior mean is the mean
        assert torch.equal(g.z, g.mu)
    # Group 0's prior is the standard normal of the official parametrisation (sigma = 1 + 0.01).
    q = Normal(groups[0].mu.double(), groups[0].log_sigma.double().exp())
    p = Normal(torch.zeros_like(q.loc), torch.full_like(q.scale, 1.01))
    torch.testing.assert_close(kl_divergence(q, p).flatten(1).sum(1), kl_all[0].double(), rtol=1e-5, atol=1e-4)


def _record_decoder(model):
    """Per decode call: every decoder-tower module's output, and the z each combiner receives."""
    calls = []

    def hook(module, inputs, output):
        calls[-1]["states"].append(output.clone())
        if isinstance(module, DecCombinerCell):
            calls[-1]["z"].append(inputs[1].clone())

    handles = [cell.register_forward_hook(hook) for cell in model.dec_tower]
    return calls, handles


@torch.no_grad()
def test_partial_decoding_fixes_the_coarse_groups_and_redraws_the_fine_ones():
    model = _model()  # two scales of two groups: groups 0, 1 at 8x8, groups 2, 3 at 16x16
    zs = [g.z for g in model.encode(_images(model))]
    coarse = model.config.groups_per_scale[-1]
    calls, handles = _record_decoder(model)
    outputs = []
    for seed in (1, 2):
        calls.append({"states": [], "z": []})
        torch.manual_seed(seed)
        outputs.append(model.decode(zs[:coarse], t=1.0))
    for h in handles:
        h.remove()

    first, second = calls
    for g in range(coarse):  # the given groups reach the decoder unchanged
        assert torch.equal(first["z"][g], zs[g]) and torch.equal(second["z"][g], zs[g])
    for g in range(coarse, len(zs)):  # the others are fresh prior draws
        assert not torch.allclose(first["z"][g], second["z"][g])
    # The coarse structure: every decoder state up to the last fixed group's combiner is the
    # same in both decodes; from the first redrawn group on, the states and the images differ.
    combiners = [i for i, cell in enumerate(model.dec_tower) if isinstance(cell, DecCombinerCell)]
    for i in range(combiners[coarse - 1] + 1):
        assert torch.equal(first["states"][i], second["states"][i]), i
    assert not torch.allclose(first["states"][combiners[coarse]], second["states"][combiners[coarse]])
    assert not torch.allclose(outputs[0], outputs[1])

    # Every group given, or the rest at temperature 0 (the prior means): nothing is random.
    torch.manual_seed(3)
    full, prior_mean = model.decode(zs), model.decode(zs[:coarse], t=0.0)
    torch.manual_seed(4)
    assert torch.equal(model.decode(zs), full) and torch.equal(model.decode(zs[:coarse], t=0.0), prior_mean)


@torch.no_grad()
def test_reconstruct_and_interpolate():
    model = _model()
    x1, x2 = _images(model, seed=1), _images(model, seed=2)
    recon = model.reconstruct(x1)
    assert recon.dtype == torch.float32 and recon.shape == x1.shape and 0 <= recon.min() <= recon.max() <= 1
    assert torch.equal(recon, model.decoder_output(model(x1, deterministic=True)[0]).mean())

    strip = model.interpolate(x1, x2, steps=5)
    assert strip.shape == (BATCH, 5, 3, 32, 32)
    torch.testing.assert_close(strip[:, 0], recon, rtol=0, atol=1e-6)
    torch.testing.assert_close(strip[:, -1], model.reconstruct(x2), rtol=0, atol=1e-6)
    a, b = model.encode(x1), model.encode(x2)
    middle = model.mean_image(model.decode([torch.lerp(p.z, q.z, 0.5) for p, q in zip(a, b)]))
    torch.testing.assert_close(strip[:, 2], middle, rtol=0, atol=1e-6)

    # Only the first group moves: the others keep x1's z.
    one = model.interpolate(x1, x2, steps=3, groups=1)
    expected = model.mean_image(model.decode([b[0].z] + [g.z for g in a[1:]]))
    torch.testing.assert_close(one[:, -1], expected, rtol=0, atol=1e-6)
    assert torch.equal(model.interpolate(x1, x2, steps=3, groups=[0]), one)

    # Bernoulli output: the mean image is the pixel probabilities.
    mnist = _model("tiny_mnist")
    xb = _images(mnist)
    assert torch.equal(mnist.reconstruct(xb), torch.sigmoid(mnist(xb, deterministic=True)[0]))


@torch.no_grad()
def test_latent_api_rejects_bad_input():
    model = _model()
    x = _images(model)
    zs = [g.z for g in model.encode(x)]
    with pytest.raises(ValueError, match=r"shape \(N, 3, 32, 32\).*\(2, 1, 32, 32\)"):
        model.encode(x[:, :1])
    with pytest.raises(ValueError, match=r"shape \(N, 3, 32, 32\).*\(2, 3, 16, 16\)"):
        model.reconstruct(x[:, :, :16, :16])
    with pytest.raises(ValueError, match="between 1 and 4 latent groups"):
        model.decode([])
    with pytest.raises(ValueError, match="between 1 and 4 latent groups.*got 5"):
        model.decode(zs + zs[:1])
    with pytest.raises(ValueError, match=r"zs\[2\] must have shape \(N, 4, 16, 16\).*\(2, 4, 8, 8\)"):
        model.decode(zs[:2] + [zs[1]])
    with pytest.raises(ValueError, match=r"zs\[1\].*with the N of zs\[0\]"):
        model.decode([zs[0], zs[1][:1]])
    with pytest.raises(ValueError, match=r"zs\[0\] has dtype torch.float64"):
        model.decode([zs[0].double()])
    with pytest.raises(TypeError, match="list of tensors"):
        model.decode(zs[0])
    with pytest.raises(ValueError, match="temperature"):
        model.decode(zs, t=-1.0)
    with pytest.raises(ValueError, match="steps"):
        model.interpolate(x, x, steps=1)
    with pytest.raises(ValueError, match="same shape"):
        model.interpolate(x, x[:1])
    with pytest.raises(ValueError, match="between 1 and 4"):
        model.interpolate(x, x, groups=5)
    with pytest.raises(ValueError, match=r"group indices in \[0, 4\)"):
        model.interpolate(x, x, groups=[0, 4])
