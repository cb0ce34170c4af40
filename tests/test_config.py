"""NVAEConfig: presets equal the official README commands, Namespace round trips, validation."""

import argparse
import dataclasses
import json
from pathlib import Path

import pytest

from nvae_fast import NVAEConfig
from nvae_fast.config import ARCHITECTURES, OLD_CHECKPOINT_DEFAULTS, PRESETS

FIXTURES = Path(__file__).parent / "fixtures" / "official_nvae"
OFFICIAL_PRESETS = ("mnist", "cifar10", "celeba_64", "imagenet_32", "celeba_256", "ffhq")


@pytest.mark.parametrize("name", OFFICIAL_PRESETS)
def test_official_presets_equal_the_readme_commands(name):
    fixture = json.loads((FIXTURES / f"{name}.json").read_text())
    assert fixture["arch_instance"] == "res_mbconv"
    assert NVAEConfig.from_namespace(argparse.Namespace(**fixture["args"])) == NVAEConfig.preset(name)


def test_defaults_are_the_official_train_py_defaults():
    c = NVAEConfig()
    assert (c.dataset, c.arch_instance, c.num_channels_enc, c.num_channels_dec) == ("mnist", "res_mbconv", 32, 32)
    assert (c.num_latent_scales, c.num_groups_per_scale, c.num_latent_per_group) == (1, 10, 20)
    assert (c.num_preprocess_blocks, c.num_preprocess_cells, c.num_postprocess_blocks, c.num_postprocess_cells) == (
        2, 3, 2, 3)
    assert (c.num_cell_per_cond_enc, c.num_cell_per_cond_dec, c.num_mixture_dec, c.num_nf, c.num_x_bits) == (
        1, 1, 10, 0, 8)
    assert not (c.use_se or c.res_dist or c.ada_groups)


def test_dataset_sets_size_channels_crop_and_output():
    mnist, cifar, celeba = NVAEConfig.preset("mnist"), NVAEConfig.preset("cifar10"), NVAEConfig.preset("celeba_256")
    assert (mnist.image_size, mnist.in_channels, mnist.crop_output, mnist.output_distribution) == (
        32, 1, True, "bernoulli")
    assert (cifar.image_size, cifar.in_channels, cifar.crop_output, cifar.output_distribution) == (
        32, 3, False, "logistic_mixture")
    assert cifar.output_channels == 100 and mnist.output_channels == 1
    assert celeba.image_size == 256
    normal = NVAEConfig.preset("cifar10", num_mixture_dec=1)  # overrides derive the None fields again
    assert (normal.output_distribution, normal.output_channels) == ("normal", 6)
    assert NVAEConfig.preset("cifar10", dataset="celeba_64").image_size == 64


def test_output_distribution_of_other_datasets():
    grey = NVAEConfig(dataset="digits", image_size=8, in_channels=1, num_preprocess_blocks=1,
                      num_postprocess_blocks=1, num_mixture_dec=4)
    assert (grey.output_distribution, grey.output_channels, grey.crop_output) == ("logistic_mixture", 12, False)
    binary = NVAEConfig(dataset="digits", image_size=8, in_channels=1, num_preprocess_blocks=1,
                        num_postprocess_blocks=1, output_distribution="bernoulli")
    assert binary.output_channels == 1
    assert NVAEConfig(dataset="cifar10", output_distribution="normal").output_channels == 6


def test_groups_per_scale():
    assert NVAEConfig.preset("celeba_256").groups_per_scale == [16, 8, 4, 4, 4]
    assert NVAEConfig.preset("celeba_64").groups_per_scale == [20, 10, 5]
    assert NVAEConfig.preset("mnist").groups_per_scale == [10, 5]
    assert NVAEConfig.preset("cifar10").groups_per_scale == [30]
    assert NVAEConfig.preset("mnist", ada_groups=False).groups_per_scale == [10, 10]


def test_old_namespaces_get_the_official_defaults():
    fixture = json.loads((FIXTURES / "cifar10.json").read_text())
    args = {k: v for k, v in fixture["args"].items() if k not in OLD_CHECKPOINT_DEFAULTS}
    args.update(batch_size=32, learning_rate=1e-2, save="/tmp/x")  # training options are ignored
    config = NVAEConfig.from_namespace(argparse.Namespace(**args))
    assert (config.ada_groups, config.min_groups_per_scale, config.num_mixture_dec) == (False, 1, 10)
    assert config == NVAEConfig.preset("cifar10")


def test_namespace_missing_a_model_option_is_rejected():
    args = vars(NVAEConfig.preset("cifar10").to_namespace())
    del args["num_channels_enc"]
    with pytest.raises(ValueError, match="num_channels_enc"):
        NVAEConfig.from_namespace(argparse.Namespace(**args))


@pytest.mark.parametrize("config", [
    *(NVAEConfig.preset(name) for name in PRESETS),
    NVAEConfig(dataset="faces", image_size=16, in_channels=3, num_preprocess_blocks=1, num_postprocess_blocks=1,
               arch_instance="mbconv_den"),
    NVAEConfig.preset("mnist", crop_output=False),
    NVAEConfig.preset("cifar10", output_distribution="normal"),
], ids=lambda c: f"{c.dataset}-{c.arch_instance}-{c.image_size}")
def test_namespace_round_trip(config):
    args = config.to_namespace()
    assert isinstance(args, argparse.Namespace)
    assert NVAEConfig.from_namespace(args) == config


def test_preset_overrides_and_unknown_preset():
    assert NVAEConfig.preset("cifar10", num_nf=0).num_nf == 0
    assert NVAEConfig.preset("cifar10").num_nf == 1
    with pytest.raises(ValueError, match="unknown preset 'cifar100'"):
        NVAEConfig.preset("cifar100")


def test_every_official_architecture_is_known():
    assert set(ARCHITECTURES) == {"res_elu", "res_bnelu", "res_bnswish", "mbconv_sep", "mbconv_sep11", "res_mbconv",
                                  "res53_mbconv", "res35_mbconv", "res55_mbconv", "mbconv_res", "mbconv_den"}
    for cells in ARCHITECTURES.values():
        assert set(cells) == {"normal_enc", "down_enc", "normal_dec", "up_dec", "normal_pre", "down_pre",
                              "normal_post", "up_post"}


@pytest.mark.parametrize("overrides, message", [
    (dict(arch_instance="res_mbconv9"), "never defines its operations"),
    (dict(arch_instance="resnet"), "arch_instance must be one of"),
    (dict(dataset="faces"), "give image_size and in_channels"),
    (dict(image_size=33), "multiple of 2\\*\\*\\(num_preprocess_blocks"),
    (dict(num_channels_enc=0), "num_channels_enc must be a positive integer"),
    (dict(num_latent_scales=2.0), "num_latent_scales must be a positive integer"),
    (dict(num_nf=-1), "num_nf must be a non-negative integer"),
    (dict(use_se=1), "use_se must be a bool"),
    (dict(num_x_bits=9), "num_x_bits must be at most 8"),
    (dict(in_channels=2), "models grey \\(1 channel\\) or RGB"),
    (dict(output_distribution="gaussian"), "output_distribution must be one of"),
    (dict(num_postprocess_blocks=2), "num_postprocess_blocks must equal num_preprocess_blocks"),
    (dict(arch_instance="mbconv_den", num_channels_enc=20), "divisible by 8"),
])
def test_invalid_configs_are_rejected(overrides, message):
    base = dataclasses.asdict(NVAEConfig.preset("cifar10"))
    base.update(image_size=None, in_channels=None, crop_output=None, output_distribution=None)
    base.update(overrides)
    with pytest.raises(ValueError, match=message):
        NVAEConfig(**base)
