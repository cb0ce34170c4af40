"""NVAEConfig: every option of the official ``train.py`` that shapes the model, plus presets.

Field names and defaults are those of the official command-line flags, so a config converts to and
from the official ``argparse.Namespace`` (``NVAEConfig.from_namespace``, ``NVAEConfig.to_namespace``)
and an existing command line keeps its meaning. ``NVAEConfig()`` is the official default model.

Presets (``NVAEConfig.preset(name)``, names in ``PRESETS``): the six training commands of the
official README (``mnist``, ``cifar10``, ``celeba_64``, ``imagenet_32``, ``celeba_256``, ``ffhq``,
all with the default architecture ``res_mbconv``), the published commands for LSUN Church 64
and OMNIGLOT (``lsun_church_64``, ``omniglot``) and tiny models for tests and CPU demos
(``tiny_mnist``, ``tiny_cifar10``).
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from typing import Any

CHANNEL_MULT = 2
"""Channels double (and the resolution halves) at every down cell; the reverse at every up cell."""

# The cells of each official architecture (``utils.get_arch_cells``): for every cell type, the
# operations a cell of that type chains. Flows ('ar_nn') have one fixed structure in every arch.
_RES2 = ("res_bnswish", "res_bnswish")
ARCHITECTURES: dict[str, dict[str, tuple[str, ...]]] = {
    "res_elu": dict.fromkeys(("normal_enc", "down_enc", "normal_dec", "up_dec",
                              "normal_pre", "down_pre", "normal_post", "up_post"), ("res_elu", "res_elu")),
    "res_bnelu": dict.fromkeys(("normal_enc", "down_enc", "normal_dec", "up_dec",
                                "normal_pre", "down_pre", "normal_post", "up_post"), ("res_bnelu", "res_bnelu")),
    "res_bnswish": dict.fromkeys(("normal_enc", "down_enc", "normal_dec", "up_dec",
                                  "normal_pre", "down_pre", "normal_post", "up_post"), _RES2),
}


def _arch(enc: tuple[str, ...], dec: tuple[str, ...], pre: tuple[str, ...], post: tuple[str, ...]
          ) -> dict[str, tuple[str, ...]]:
    return {"normal_enc": enc, "down_enc": enc, "normal_dec": dec, "up_dec": dec,
            "normal_pre": pre, "down_pre": pre, "normal_post": post, "up_post": post}


ARCHITECTURES.update({
    "mbconv_sep": _arch(("mconv_e6k5g0",), ("mconv_e6k5g0",), ("mconv_e3k5g0",), ("mconv_e3k5g0",)),
    "mbconv_sep11": _arch(("mconv_e6k11g0",), ("mconv_e6k11g0",), ("mconv_e3k5g0",), ("mconv_e3k5g0",)),
    "res_mbconv": _arch(_RES2, ("mconv_e6k5g0",), _RES2, ("mconv_e3k5g0",)),
    "res53_mbconv": _arch(("res_bnswish5", "res_bnswish"), ("mconv_e6k5g0",), ("res_bnswish5", "res_bnswish"),
                          ("mconv_e3k5g0",)),
    "res35_mbconv": _arch(("res_bnswish", "res_bnswish5"), ("mconv_e6k5g0",), ("res_bnswish", "res_bnswish5"),
                          ("mconv_e3k5g0",)),
    "res55_mbconv": _arch(("res_bnswish5", "res_bnswish5"), ("mconv_e6k5g0",), ("res_bnswish5", "res_bnswish5"),
                          ("mconv_e3k5g0",)),
    "mbconv_res": _arch(("mconv_e6k5g0",), _RES2, ("mconv_e3k5g0",), _RES2),
    "mbconv_den": _arch(("mconv_e6k5g0",), ("mconv_e6k5g0",), ("mconv_e3k5g8",), ("mconv_e3k5g8",)),
})

# name -> (image size, image channels) of the datasets the official code builds models for.
DATASETS: dict[str, tuple[int, int]] = {
    "mnist": (32, 1), "omniglot": (32, 1), "stacked_mnist": (32, 3), "cifar10": (32, 3),
    "celeba_64": (64, 3), "celeba_256": (256, 3), "imagenet_32": (32, 3), "imagenet_64": (64, 3),
    "ffhq": (256, 3), "lsun_bedroom_128": (128, 3), "lsun_bedroom_256": (256, 3),
    "lsun_church_64": (64, 3), "lsun_church_128": (128, 3), "lsun_church_256": (256, 3),
}
# 28x28 images padded to 32x32: the reconstruction loss only counts the central 28x28.
CROPPED_DATASETS = frozenset({"mnist", "omniglot", "stacked_mnist"})
# Binary images: the official model gives them a Bernoulli output whatever num_mixture_dec says.
BERNOULLI_DATASETS = frozenset({"mnist", "omniglot"})
OUTPUT_DISTRIBUTIONS = ("bernoulli", "normal", "logistic_mixture")

# The options of the official command line that shape the model, in the official order.
_OFFICIAL_ARGS = (
    "dataset", "arch_instance", "num_nf", "num_x_bits", "num_latent_scales", "num_groups_per_scale",
    "num_latent_per_group", "ada_groups", "min_groups_per_scale", "num_channels_enc", "num_preprocess_blocks",
    "num_preprocess_cells", "num_cell_per_cond_enc", "num_channels_dec", "num_postprocess_blocks",
    "num_postprocess_cells", "num_cell_per_cond_dec", "num_mixture_dec", "use_se", "res_dist",
)
# Options that older official checkpoints lack, with the defaults the official evaluate.py assumes.
OLD_CHECKPOINT_DEFAULTS: dict[str, Any] = {"ada_groups": False, "min_groups_per_scale": 1, "num_mixture_dec": 10}


@dataclass(frozen=True)
class NVAEConfig:
    """The architecture of an NVAE model (the official ``train.py`` flags that shape it).

    Fields left None are derived when the config is built (and then hold the derived value);
    ``dataclasses.replace`` keeps derived values, ``NVAEConfig.preset(name, **overrides)`` derives
    them again.

    Attributes:
        dataset: official dataset name (sets ``image_size``, ``in_channels`` and ``crop_output``)
            or any other name, which then needs ``image_size`` and ``in_channels``.
        image_size: height = width of the input images; None takes the dataset's.
        in_channels: image channels; None takes the dataset's.
        crop_output: score only the central 28x28 of 32x32 reconstructions (MNIST-like data padded
            to 32); None takes the dataset's.
        output_distribution: p(x|z): 'bernoulli', 'normal' or 'logistic_mixture' (discretised,
            ``num_mixture_dec`` components, 1 or 3 channels). None takes the official choice:
            Bernoulli for mnist and omniglot, else normal if ``num_mixture_dec == 1``, else the
            logistic mixture.
        arch_instance: one of ``ARCHITECTURES`` (``res_mbconv`` is the official default).
        num_channels_enc, num_channels_dec: channels at the highest latent resolution.
        num_latent_scales: spatial scales holding latent groups.
        num_groups_per_scale: latent groups at the highest-resolution scale (at every scale unless
            ada_groups).
        ada_groups, min_groups_per_scale: halve the groups at each coarser scale, down to the minimum.
        num_latent_per_group: latent channels of one group.
        num_preprocess_blocks, num_preprocess_cells: blocks of the encoder's pre-processing (each
            ends with a down cell) and cells per block; likewise the decoder's post-processing.
        num_cell_per_cond_enc, num_cell_per_cond_dec: cells per latent group in each tower.
        num_mixture_dec: logistic mixture components of the output (1: a normal distribution).
        use_se: squeeze-and-excitation in every cell.
        res_dist: residual parametrisation of the posterior relative to the prior.
        num_nf: pairs of autoregressive flow cells per latent group (0: no flows).
        num_x_bits: bits per colour channel the output distribution models.
    """

    dataset: str = "mnist"
    image_size: int | None = None
    in_channels: int | None = None
    crop_output: bool | None = None
    output_distribution: str | None = None
    arch_instance: str = "res_mbconv"
    num_channels_enc: int = 32
    num_channels_dec: int = 32
    num_latent_scales: int = 1
    num_groups_per_scale: int = 10
    num_latent_per_group: int = 20
    ada_groups: bool = False
    min_groups_per_scale: int = 1
    num_preprocess_blocks: int = 2
    num_preprocess_cells: int = 3
    num_cell_per_cond_enc: int = 1
    num_postprocess_blocks: int = 2
    num_postprocess_cells: int = 3
    num_cell_per_cond_dec: int = 1
    num_mixture_dec: int = 10
    use_se: bool = False
    res_dist: bool = False
    num_nf: int = 0
    num_x_bits: int = 8

    def __post_init__(self) -> None:
        size, channels = DATASETS.get(self.dataset, (None, None))
        if self.image_size is None:
            object.__setattr__(self, "image_size", size)
        if self.in_channels is None:
            object.__setattr__(self, "in_channels", channels)
        if self.crop_output is None:
            object.__setattr__(self, "crop_output", self.dataset in CROPPED_DATASETS)
        if self.output_distribution is None:
            object.__setattr__(self, "output_distribution", self._official_output_distribution())
        self._validate()

    def _official_output_distribution(self) -> str:
        if self.dataset in BERNOULLI_DATASETS:
            return "bernoulli"
        return "normal" if self.num_mixture_dec == 1 else "logistic_mixture"

    def _validate(self) -> None:
        if not isinstance(self.dataset, str) or not self.dataset:
            raise ValueError(f"dataset must be a non-empty string, got {self.dataset!r}")
        if self.image_size is None or self.in_channels is None:
            raise ValueError(f"dataset {self.dataset!r} is not an official dataset ({', '.join(DATASETS)}): "
                             "give image_size and in_channels")
        if self.arch_instance not in ARCHITECTURES:
            hint = (" (the official code lists it but never defines its operations mconv_e6k9g0/mconv_e3k9g0)"
                    if self.arch_instance == "res_mbconv9" else "")
            raise ValueError(f"arch_instance must be one of {', '.join(ARCHITECTURES)}, "
                             f"got {self.arch_instance!r}{hint}")
        for name in ("image_size", "in_channels", "num_channels_enc", "num_channels_dec", "num_latent_scales",
                     "num_groups_per_scale", "num_latent_per_group", "min_groups_per_scale",
                     "num_preprocess_blocks", "num_preprocess_cells", "num_cell_per_cond_enc",
                     "num_postprocess_blocks", "num_postprocess_cells", "num_cell_per_cond_dec",
                     "num_mixture_dec", "num_x_bits"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if isinstance(self.num_nf, bool) or not isinstance(self.num_nf, int) or self.num_nf < 0:
            raise ValueError(f"num_nf must be a non-negative integer, got {self.num_nf!r}")
        for name in ("ada_groups", "use_se", "res_dist", "crop_output"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.num_x_bits > 8:
            raise ValueError(f"num_x_bits must be at most 8, got {self.num_x_bits}")
        if self.output_distribution not in OUTPUT_DISTRIBUTIONS:
            raise ValueError(f"output_distribution must be one of {', '.join(OUTPUT_DISTRIBUTIONS)} or None, "
                             f"got {self.output_distribution!r}")
        if self.output_distribution == "logistic_mixture" and self.in_channels not in (1, 3):
            raise ValueError(f"in_channels={self.in_channels}: the logistic mixture output models grey (1 channel) "
                             "or RGB (3 channels) images; use output_distribution='normal' or 'bernoulli'")
        reduction = 2 ** (self.num_preprocess_blocks + self.num_latent_scales - 1)
        if self.image_size % reduction:
            raise ValueError(f"image_size must be a multiple of 2**(num_preprocess_blocks + num_latent_scales - 1)"
                             f" = {reduction}, got {self.image_size}")
        if self.num_postprocess_blocks != self.num_preprocess_blocks:
            raise ValueError("num_postprocess_blocks must equal num_preprocess_blocks (the decoder must undo the "
                             f"encoder's down-sampling), got {self.num_postprocess_blocks} and "
                             f"{self.num_preprocess_blocks}")
        if "mconv_e3k5g8" in ARCHITECTURES[self.arch_instance]["normal_pre"]:
            # the grouped convolution splits 3*C channels into 8 groups at every pre/post width
            for width in self._pre_post_widths():
                if (3 * width) % 8:
                    raise ValueError(f"arch_instance {self.arch_instance!r} needs 3 * channels divisible by 8 in "
                                     f"every pre/post-processing cell; got {width} channels")

    def _pre_post_widths(self) -> list[int]:
        widths = []
        for b in range(self.num_preprocess_blocks + 1):
            widths += [self.num_channels_enc * CHANNEL_MULT ** b, self.num_channels_dec * CHANNEL_MULT ** b]
        return widths

    # -----------------------------------------------------------------------------------------
    # Derived quantities
    # -----------------------------------------------------------------------------------------

    @property
    def groups_per_scale(self) -> list[int]:
        """Latent groups at each scale, highest resolution first (the official ``groups_per_scale``)."""
        groups, n = [], self.num_groups_per_scale
        for _ in range(self.num_latent_scales):
            groups.append(n)
            if self.ada_groups:
                n = max(self.min_groups_per_scale, n // 2)
        return groups

    @property
    def arch_cells(self) -> dict[str, tuple[str, ...]]:
        """Cell type -> the operations its cells chain, for ``arch_instance``."""
        return ARCHITECTURES[self.arch_instance]

    @property
    def output_channels(self) -> int:
        """Channels of the decoder's logits."""
        kind = self.output_distribution
        if kind == "bernoulli":
            return self.in_channels
        if kind == "normal":
            return 2 * self.in_channels
        # per component: a mixture logit, and per channel a mean, a log scale and (RGB) a coefficient
        return self.num_mixture_dec * (10 if self.in_channels == 3 else 3)

    # -----------------------------------------------------------------------------------------
    # Construction
    # -----------------------------------------------------------------------------------------

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> NVAEConfig:
        """The named preset (see ``PRESETS``), with any field replaced by ``overrides``."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    @classmethod
    def from_namespace(cls, args: argparse.Namespace | dict[str, Any]) -> NVAEConfig:
        """The config of an official ``train.py`` argument namespace (as stored in its checkpoints).

        Options that do not shape the model (learning rate, paths, ...) are ignored. Options that
        older checkpoints lack take the official defaults (``OLD_CHECKPOINT_DEFAULTS``); any other
        missing option is an error. ``arch_instance`` defaults to ``res_mbconv``.
        """
        values = dict(vars(args)) if isinstance(args, argparse.Namespace) else dict(args)
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in values.items() if k in fields}
        for name, default in OLD_CHECKPOINT_DEFAULTS.items():
            kwargs.setdefault(name, default)
        kwargs.setdefault("arch_instance", "res_mbconv")
        missing = [name for name in _OFFICIAL_ARGS if name not in kwargs]
        if missing:
            raise ValueError(f"the official arguments lack {', '.join(missing)}: not an NVAE train.py namespace")
        return cls(**kwargs)

    def to_namespace(self) -> argparse.Namespace:
        """The official ``train.py`` options of this config, as an ``argparse.Namespace``.

        Fields the official code does not know (image_size, in_channels, crop_output,
        output_distribution) are included only when they differ from what the official code derives.
        """
        values = {name: getattr(self, name) for name in _OFFICIAL_ARGS}
        size, channels = DATASETS.get(self.dataset, (None, None))
        if self.image_size != size:
            values["image_size"] = self.image_size
        if self.in_channels != channels:
            values["in_channels"] = self.in_channels
        if self.crop_output != (self.dataset in CROPPED_DATASETS):
            values["crop_output"] = self.crop_output
        if self.output_distribution != self._official_output_distribution():
            values["output_distribution"] = self.output_distribution
        return argparse.Namespace(**values)


def _official(dataset: str, channels: int, scales: int, groups: int, pre_cells: int, blocks: int, nf: int,
              **extra: Any) -> dict[str, Any]:
    """A README training command: SE, residual posteriors, 2 cells per group in each tower."""
    return dict(dataset=dataset, num_channels_enc=channels, num_channels_dec=channels, num_latent_scales=scales,
                num_groups_per_scale=groups, num_latent_per_group=20, num_preprocess_cells=pre_cells,
                num_postprocess_cells=pre_cells, num_preprocess_blocks=blocks, num_postprocess_blocks=blocks,
                num_cell_per_cond_enc=2, num_cell_per_cond_dec=2, num_nf=nf, use_se=True, res_dist=True, **extra)


# Presets are the keyword arguments of NVAEConfig (so that overrides re-derive the None fields).
PRESETS: dict[str, dict[str, Any]] = {
    # The six training commands of the official README (github.com/NVlabs/NVAE, "Running the main NVAE
    # training and evaluation scripts"); every other option at its train.py default.
    "mnist": _official("mnist", 32, scales=2, groups=10, pre_cells=3, blocks=2, nf=0, ada_groups=True),
    "cifar10": _official("cifar10", 128, scales=1, groups=30, pre_cells=2, blocks=1, nf=1),
    "celeba_64": _official("celeba_64", 64, scales=3, groups=20, pre_cells=2, blocks=1, nf=1, ada_groups=True),
    "imagenet_32": _official("imagenet_32", 192, scales=1, groups=28, pre_cells=2, blocks=1, nf=1),
    "celeba_256": _official("celeba_256", 30, scales=5, groups=16, pre_cells=2, blocks=1, nf=2, ada_groups=True,
                            min_groups_per_scale=4, num_x_bits=5),
    "ffhq": _official("ffhq", 30, scales=5, groups=16, pre_cells=2, blocks=1, nf=2, ada_groups=True,
                      min_groups_per_scale=4, num_x_bits=5),
    # The published NVAE commands for datasets the official code reads but its README does not train:
    # LSUN Church 64 from the NVAE training commands of NVlabs/VAEBM (run with the official NVAE code),
    # OMNIGLOT from the NVAE stage of NVlabs/LSGM's OMNIGLOT command (its --channel_mult 1 2 is NVAE's
    # fixed doubling, --decoder_dist bin the Bernoulli output). Stacked MNIST and LSUN Church 256 have none.
    "lsun_church_64": _official("lsun_church_64", 48, scales=3, groups=5, pre_cells=2, blocks=1, nf=1,
                                num_mixture_dec=1),
    "omniglot": dict(dataset="omniglot", num_channels_enc=64, num_channels_dec=64, num_latent_scales=1,
                     num_groups_per_scale=3, num_latent_per_group=20, num_preprocess_cells=2, num_postprocess_cells=2,
                     num_preprocess_blocks=1, num_postprocess_blocks=1, num_cell_per_cond_enc=3,
                     num_cell_per_cond_dec=3, num_nf=0, use_se=True, res_dist=False),
    # The embedded demo, `nvae-fast train --preset digits` (training recipe: nvae_fast.train.recipe):
    # scikit-learn's bundled 8x8 handwritten digits with 17 grey levels. The grey levels are the
    # data, so the output is a discretised logistic mixture over 16 levels (num_x_bits=4 merges the
    # two faintest of the 17) rather than a Bernoulli on binarised pixels, whose binarisation noise
    # alone would be half of the likelihood. 8x8 allows one down-sampling block (to 4x4) and two
    # latent scales (4 groups at 4x4, 2 at 2x2); 16 channels and 8 latent channels per group give
    # about 0.57M parameters, small enough for a full run (40 epochs of 23 steps, evaluations and
    # samples) to take a few minutes on 2 CPU cores.
    "digits": dict(dataset="digits", image_size=8, in_channels=1, crop_output=False,
                   output_distribution="logistic_mixture", num_mixture_dec=3, num_x_bits=4,
                   num_channels_enc=16, num_channels_dec=16, num_latent_scales=2, num_groups_per_scale=4,
                   ada_groups=True, num_latent_per_group=8, num_preprocess_blocks=1, num_preprocess_cells=1,
                   num_postprocess_blocks=1, num_postprocess_cells=1, num_cell_per_cond_enc=1,
                   num_cell_per_cond_dec=1, num_nf=0, use_se=True, res_dist=True),
    # Tiny models with every part of the official ones (two scales, flows, SE, residual posteriors,
    # down/up cells): a forward and backward take tens of milliseconds on one CPU core.
    "tiny_mnist": dict(dataset="mnist", num_channels_enc=8, num_channels_dec=8, num_latent_scales=2,
                       num_groups_per_scale=2, num_latent_per_group=4, num_preprocess_blocks=1,
                       num_preprocess_cells=2, num_postprocess_blocks=1, num_postprocess_cells=2,
                       num_cell_per_cond_enc=1, num_cell_per_cond_dec=1, num_nf=1, use_se=True, res_dist=True),
    "tiny_cifar10": dict(dataset="cifar10", num_channels_enc=8, num_channels_dec=8, num_latent_scales=2,
                         num_groups_per_scale=2, num_latent_per_group=4, num_preprocess_blocks=1,
                         num_preprocess_cells=2, num_postprocess_blocks=1, num_postprocess_cells=2,
                         num_cell_per_cond_enc=1, num_cell_per_cond_dec=1, num_mixture_dec=3, num_nf=1,
                         use_se=True, res_dist=True),
}
