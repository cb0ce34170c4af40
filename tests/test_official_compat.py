"""Drop-in compatibility: official state_dict layout, official checkpoint files in and out."""

import argparse
import collections
import json
import pickle
from pathlib import Path

import pytest
import torch

from nvae_fast import NVAE, NVAEConfig
from nvae_fast.compat import load_official_checkpoint, read_official_checkpoint, save_official_checkpoint
from nvae_fast.config import OLD_CHECKPOINT_DEFAULTS

pytestmark = pytest.mark.usefixtures("small_cpu_convs")

FIXTURES = Path(__file__).parent / "fixtures" / "official_nvae"
OFFICIAL_PRESETS = ("mnist", "cifar10", "celeba_64", "imagenet_32", "celeba_256", "ffhq")


@pytest.mark.parametrize("name", OFFICIAL_PRESETS)
def test_state_dict_keys_and_shapes_equal_the_official_model(name):
    fixture = json.loads((FIXTURES / f"{name}.json").read_text())
    with torch.device("meta"):  # shapes only: no memory, no init cost
        model = NVAE.from_official_args(argparse.Namespace(**fixture["args"]))
    ours = {key: list(t.shape) for key, t in model.state_dict().items()}
    assert ours == fixture["state_dict"]


def _tiny(seed=0, **overrides):
    torch.manual_seed(seed)
    return NVAE.from_preset("tiny_cifar10", **overrides)


def _images(n=2, seed=1):
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _outputs(model, x):
    with torch.no_grad():
        return model.eval()(x, deterministic=True)


def _assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def test_checkpoint_round_trip(tmp_path):
    model = _tiny()
    model.train()(_images(4))  # move the running statistics away from their initial values
    path = tmp_path / "checkpoint.pt"
    save_official_checkpoint(model, path, epoch=3, global_step=120, extra_args={"batch_size": 4})

    raw = read_official_checkpoint(path)
    assert isinstance(raw["args"], argparse.Namespace)
    assert raw["args"].batch_size == 4 and raw["epoch"] == 3 and raw["global_step"] == 120
    assert raw["arch_instance"]["normal_dec"] == ["mconv_e6k5g0"]

    loaded = NVAE.load_official_checkpoint(path)
    assert not loaded.training
    assert loaded.config == model.config
    _assert_same_state(loaded, model)
    for a, b in zip(_outputs(loaded, _images()), _outputs(model, _images())):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_official_format_checkpoint_loads_strictly(tmp_path):
    """A file as the official train.py writes it: every option in the Namespace, the weight of each
    conv without weight norm listed twice (``weight`` and ``weight_normalized``), and an older
    Namespace without ada_groups, min_groups_per_scale and num_mixture_dec."""
    source = _tiny(seed=3, num_mixture_dec=10)
    state = source.state_dict()
    assert any(key.endswith("weight_normalized") for key in state)
    args = vars(source.config.to_namespace())
    for name in OLD_CHECKPOINT_DEFAULTS:
        del args[name]
    args.update(batch_size=16, data="/data/cifar10", learning_rate=1e-2, seed=1, distributed=True)
    torch.save({"epoch": 7, "state_dict": state, "optimizer": {"state": {}, "param_groups": []},
                "global_step": 700, "args": argparse.Namespace(**args),
                "arch_instance": {"normal_dec": ["mconv_e6k5g0"], "ar_nn": [""]},
                "scheduler": {"last_epoch": 2}, "grad_scalar": {"scale": 1024.0}}, tmp_path / "official.pt")

    model = load_official_checkpoint(tmp_path / "official.pt")
    _assert_same_state(model, source)


def test_checkpoint_without_weight_normalized_keys_loads(tmp_path):
    """Older official models did not save ``weight_normalized``."""
    source = _tiny(seed=4)
    state = collections.OrderedDict((k, v) for k, v in source.state_dict().items()
                                    if not k.endswith("weight_normalized"))
    torch.save({"state_dict": state, "args": source.config.to_namespace()}, tmp_path / "old.pt")
    _assert_same_state(load_official_checkpoint(tmp_path / "old.pt"), source)


def test_inconsistent_weight_normalized_is_an_error():
    model = _tiny()
    state = model.state_dict()
    key = next(k for k in state if k.endswith("weight_normalized"))
    state[key] = state[key] + 1
    with pytest.raises(RuntimeError, match="weight_normalized must equal"):
        model.load_state_dict(state)


def test_loading_is_strict(tmp_path):
    model = _tiny()
    state = model.state_dict()
    del state["stem.bias"]
    torch.save({"state_dict": state, "args": model.config.to_namespace()}, tmp_path / "partial.pt")
    with pytest.raises(RuntimeError, match="stem.bias"):
        load_official_checkpoint(tmp_path / "partial.pt")


class _Payload:
    """Stands for any class a checkpoint must not be allowed to run while loading."""


@pytest.mark.parametrize("content, message", [
    (torch.zeros(3), "is not an official NVAE checkpoint"),
    ({"state_dict": {}}, "is not an official NVAE checkpoint"),
    ({"state_dict": {}, "args": 3}, "'args' is a int"),
    ({"state_dict": {}, "args": _Payload()}, "cannot be read as an official NVAE checkpoint"),
])
def test_files_that_are_not_official_checkpoints(tmp_path, content, message):
    path = tmp_path / "file.pt"
    torch.save(content, path)
    with pytest.raises(ValueError, match=message):
        read_official_checkpoint(path)


def test_unreadable_and_missing_files(tmp_path):
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="cannot be read as an official NVAE checkpoint"):
        read_official_checkpoint(tmp_path / "notes.txt")
    with pytest.raises(FileNotFoundError, match="no checkpoint file"):
        read_official_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "plain.pkl").write_bytes(pickle.dumps({"state_dict": {}, "args": _Payload()}, protocol=2))
    with pytest.raises(ValueError, match="cannot be read"):
        read_official_checkpoint(tmp_path / "plain.pkl")


def test_load_moves_to_device_and_loads_into_float64(tmp_path):
    model = _tiny()
    save_official_checkpoint(model, tmp_path / "c.pt")
    loaded = load_official_checkpoint(tmp_path / "c.pt", device="cpu")
    assert loaded.prior_ftr0.device.type == "cpu"
    double = NVAE(NVAEConfig.preset("tiny_cifar10")).double()
    double.load_state_dict(model.state_dict())
    assert double.stem.weight.dtype == torch.float64
