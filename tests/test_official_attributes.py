"""NVAE has every public attribute of the official AutoEncoder, with the same values, read-only.

``fixtures/official_model_attributes.json`` lists the official model's public attributes (beyond
``torch.nn.Module``'s) for two tiny configurations, recorded from the official code.
"""

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from nvae_fast import NVAE

FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "official_model_attributes.json").read_text())
# Construction helpers of the official model: they build new, freshly initialised modules.
NOT_PROVIDED = {"init_stem", "init_pre_process", "init_encoder_tower", "init_encoder0", "init_normal_sampler",
                "init_decoder_tower", "init_post_process", "init_image_conditional"}
CONFIG_MIRRORS = ["dataset", "input_size", "num_bits", "num_mix_output", "use_se", "res_dist", "with_nf",
                  "num_groups_per_scale", "num_latent_per_group", "num_channels_enc", "num_channels_dec",
                  "num_preprocess_blocks", "num_preprocess_cells", "num_cell_per_cond_enc", "num_postprocess_blocks",
                  "num_postprocess_cells", "num_cell_per_cond_dec", "num_power_iter", "arch_instance", "writer"]


@pytest.mark.parametrize("preset", sorted(FIXTURE["models"]))
def test_every_official_attribute_is_there_with_the_official_value(preset):
    official = FIXTURE["models"][preset]
    model = NVAE.from_preset(preset)
    model(torch.rand(2, model.config.in_channels, 32, 32))
    model.spectral_norm_parallel()
    missing = sorted(name for name in official if name not in NOT_PROVIDED and not hasattr(model, name))
    assert not missing
    for name, expected in official.items():
        if name in NOT_PROVIDED:
            continue
        value = getattr(model, name)
        if "value" in expected:
            assert value == expected["value"], name
        elif "length" in expected:
            assert len(value) == expected["length"], name
        elif "keys" in expected:
            assert [list(k) for k in value] == expected["keys"], name
        elif "module_list" in expected:
            assert isinstance(value, nn.ModuleList) and len(value) == expected["module_list"], name
        elif "method" in expected:
            assert callable(value), name


def test_official_attributes_are_read_only_and_follow_the_model():
    model = NVAE.from_preset("tiny_mnist")
    for name in CONFIG_MIRRORS + ["all_conv_layers", "all_bn_layers", "all_log_norm", "sr_u", "sr_v"]:
        with pytest.raises(AttributeError):
            setattr(model, name, None)
    assert model.all_log_norm[0] is model.stem.log_weight_norm
    assert all(conv.log_weight_norm is norm for conv, norm in zip(model.all_conv_layers, model.all_log_norm))
    assert model.sr_u == {} and model.sr_v == {}
    model(torch.rand(2, 1, 32, 32))
    model.spectral_norm_parallel()
    shape = next(iter(model.sr_u))
    assert model.sr_u[shape].shape[1] == shape[0] and model.sr_v[shape].shape[1] == shape[1]
    model.sr_u.clear()  # as on the official model: the next call restarts the power iteration
    model.sr_v.clear()
    model.spectral_norm_parallel()
    assert shape in model.sr_u
    arch = model.arch_instance
    arch["normal_enc"].append("x")
    assert model.arch_instance["normal_enc"] == ["res_bnswish", "res_bnswish"]
