"""NVAE: the deep hierarchical VAE, a drop-in replacement for the official ``model.AutoEncoder``.

Same state_dict (keys and shapes), same forward outputs ``(logits, log_q, log_p, kl_all, kl_diag)``
and the same methods (``sample``, ``decoder_output``, ``spectral_norm_parallel``,
``batchnorm_loss``), on any device and dtype. Hot operations go through the backend dispatcher
(fused BatchNorm+Swish, the residual-normal KL), so fused kernels take over on CUDA tensors.

Structure (channels double and resolution halves at every down cell)::

    x -> stem -> pre_process (down cells) -> enc_tower (cells, combiners, down cells) -> enc0
    prior_ftr0 -> dec_tower: for each latent group, [cells] -> combiner(state, z) (up cells between
    scales) -> post_process (up cells) -> image_conditional -> logits

Latent group 0 (at the coarsest scale) has a standard-normal prior; every later group's prior comes
from the decoder state (``dec_sampler``) and its posterior from the encoder features combined with
that state (``enc_tower`` combiners, ``enc_sampler``), optionally followed by ``num_nf`` flow pairs.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from nvae_fast import distributions
from nvae_fast.config import CHANNEL_MULT, NVAEConfig
from nvae_fast.nn.cells import DecCombinerCell, EncCombinerCell, make_cell
from nvae_fast.nn.conv import Conv2D, ConvWeightBank
from nvae_fast.nn.flows import ARConv2d, PairedARFlow
from nvae_fast.ops import weight_norm as weight_norm_op
from nvae_fast.ops.normal_kl import SIGMA_MIN, GroupKL, flow_kl, normal_kl, normal_sample, soft_clamp5
from nvae_fast.ops.spectral_norm import POWER_ITER_EPS, spectral_norm

NUM_POWER_ITER = 4

ForwardOutput = tuple[Tensor, Tensor, Tensor, list[Tensor], list[Tensor]]


class LatentGroup(NamedTuple):
    """One latent group of q(z | x) (see :meth:`NVAE.encode`), each (N, C_latent, h, w).

    ``mu`` and ``log_sigma`` are the Gaussian the group's z is drawn from, as the model uses it:
    ``mu = 5 tanh(m / 5)`` and ``sigma = exp(5 tanh(s / 5)) + 0.01`` of the raw parameters (with
    ``res_dist``, the prior's plus the encoder's). ``z`` is what the decoder takes: ``mu + sigma *
    eps`` (eps = 0 for the posterior mean), then the group's flows if the model has them.
    """

    mu: Tensor
    log_sigma: Tensor
    z: Tensor


class NVAE(nn.Module):
    """The NVAE model of ``config`` (see :class:`nvae_fast.NVAEConfig`).

    Build: ``NVAE(NVAEConfig.preset("cifar10"))``, ``NVAE.from_preset("tiny_cifar10")``,
    ``NVAE.from_official_args(namespace)`` or ``NVAE.load_official_checkpoint(path)``.

    Every public attribute of the official ``AutoEncoder`` is here, read-only (see "Attributes of
    the official model" below), except its construction helpers ``init_*`` (they build new, freshly
    initialised modules: calling one on a built model has no use).

    Latent space: :meth:`encode` (every group's posterior), :meth:`decode` (a full or partial list
    of groups, the rest from the prior), :meth:`reconstruct`, :meth:`interpolate`.
    """

    def __init__(self, config: NVAEConfig) -> None:
        super().__init__()
        if not isinstance(config, NVAEConfig):
            raise TypeError(f"config must be an NVAEConfig, got {type(config).__name__}")
        self.config = c = config
        self.crop_output = c.crop_output
        self.num_latent_scales = c.num_latent_scales
        self.groups_per_scale = c.groups_per_scale
        self.num_flows = c.num_nf
        self.vanilla_vae = c.num_latent_scales == 1 and c.num_groups_per_scale == 1

        blocks, scales = c.num_preprocess_blocks, c.num_latent_scales
        top = blocks + scales - 1  # channels are C * 2**level; level `top` is the coarsest
        size = c.image_size // 2 ** top
        self.prior_ftr0 = nn.Parameter(torch.rand(c.num_channels_dec * CHANNEL_MULT ** top, size, size))
        self.z0_size = [c.num_latent_per_group, size, size]

        self.stem = Conv2D(c.in_channels, c.num_channels_enc, 3, padding=1, bias=True)
        self.pre_process = self._build_pre_process()
        self.enc_tower = nn.ModuleList() if self.vanilla_vae else self._build_encoder_tower()
        enc_top = c.num_channels_enc * CHANNEL_MULT ** top
        self.enc0 = nn.Sequential(nn.ELU(), Conv2D(enc_top, enc_top, 1, bias=True), nn.ELU())
        self.enc_sampler, self.dec_sampler, self.nf_cells = self._build_samplers()
        if self.vanilla_vae:
            self.dec_tower = nn.ModuleList()
            self.stem_decoder = Conv2D(c.num_latent_per_group, enc_top, 1, bias=True)
        else:
            self.dec_tower = self._build_decoder_tower()
        self.post_process = self._build_post_process()
        self.image_conditional = nn.Sequential(
            nn.ELU(), Conv2D(c.num_channels_dec, c.output_channels, 3, padding=1, bias=True))

        # Power-iteration state of spectral_norm_parallel, per weight-matrix shape (not saved).
        # On the fused path the per-shape tensors are views of two flat buffers (_sr_flat).
        self._sr_u: dict[torch.Size, Tensor] = {}
        self._sr_v: dict[torch.Size, Tensor] = {}
        self._sr_flat: tuple[Tensor, Tensor] | None = None
        self._sr_layouts: dict[tuple[torch.device, torch.dtype], tuple[Tensor, list[tuple[torch.Size, int]]]] = {}
        # Every convolution's weight is normalised in one op on the fused path (see _prepare_weights).
        self._convs: list[Conv2D | ARConv2d] = self.conv_layers()
        self._weight_bank = ConvWeightBank()
        self._weight_bank.attach(self._convs)
        self._forward_weights: tuple[Tensor, Tensor, int] | None = None
        self._bn_offsets: dict[torch.device, Tensor] = {}

    # -----------------------------------------------------------------------------------------
    # Construction
    # -----------------------------------------------------------------------------------------

    def _groups_in_decoder_order(self) -> list[tuple[int, int]]:
        """(level, groups) per scale, coarsest first: the order of the decoder and the samplers."""
        c = self.config
        top = c.num_preprocess_blocks + c.num_latent_scales - 1
        return [(top - s, self.groups_per_scale[c.num_latent_scales - 1 - s]) for s in range(c.num_latent_scales)]

    def _build_pre_process(self) -> nn.ModuleList:
        c, arch = self.config, self.config.arch_cells
        cells = nn.ModuleList()
        for b in range(c.num_preprocess_blocks):
            width = c.num_channels_enc * CHANNEL_MULT ** b
            for i in range(c.num_preprocess_cells):
                if i == c.num_preprocess_cells - 1:
                    cells.append(make_cell(width, CHANNEL_MULT * width, "down_pre", arch["down_pre"], c.use_se))
                else:
                    cells.append(make_cell(width, width, "normal_pre", arch["normal_pre"], c.use_se))
        return cells

    def _build_encoder_tower(self) -> nn.ModuleList:
        c, arch = self.config, self.config.arch_cells
        cells = nn.ModuleList()
        for s in range(c.num_latent_scales):
            level = c.num_preprocess_blocks + s
            enc, dec = c.num_channels_enc * CHANNEL_MULT ** level, c.num_channels_dec * CHANNEL_MULT ** level
            groups = self.groups_per_scale[s]
            for g in range(groups):
                for _ in range(c.num_cell_per_cond_enc):
                    cells.append(make_cell(enc, enc, "normal_enc", arch["normal_enc"], c.use_se))
                if not (s == c.num_latent_scales - 1 and g == groups - 1):
                    cells.append(EncCombinerCell(enc, dec, enc))
            if s < c.num_latent_scales - 1:
                cells.append(make_cell(enc, CHANNEL_MULT * enc, "down_enc", arch["down_enc"], c.use_se))
        return cells

    def _build_samplers(self) -> tuple[nn.ModuleList, nn.ModuleList, nn.ModuleList]:
        c = self.config
        latent = c.num_latent_per_group
        enc_sampler, dec_sampler, nf_cells = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        for s, (level, groups) in enumerate(self._groups_in_decoder_order()):
            for g in range(groups):
                enc_sampler.append(Conv2D(c.num_channels_enc * CHANNEL_MULT ** level, 2 * latent, 3, padding=1,
                                          bias=True))
                nf_cells.extend(PairedARFlow(latent) for _ in range(c.num_nf))
                if not (s == 0 and g == 0):  # group 0's prior is a fixed standard normal
                    dec_sampler.append(nn.Sequential(
                        nn.ELU(), Conv2D(c.num_channels_dec * CHANNEL_MULT ** level, 2 * latent, 1, bias=True)))
        return enc_sampler, dec_sampler, nf_cells

    def _build_decoder_tower(self) -> nn.ModuleList:
        c, arch = self.config, self.config.arch_cells
        cells = nn.ModuleList()
        order = self._groups_in_decoder_order()
        for s, (level, groups) in enumerate(order):
            width = c.num_channels_dec * CHANNEL_MULT ** level
            for g in range(groups):
                if not (s == 0 and g == 0):
                    for _ in range(c.num_cell_per_cond_dec):
                        cells.append(make_cell(width, width, "normal_dec", arch["normal_dec"], c.use_se))
                cells.append(DecCombinerCell(width, c.num_latent_per_group, width))
            if s < len(order) - 1:
                cells.append(make_cell(width, width // CHANNEL_MULT, "up_dec", arch["up_dec"], c.use_se))
        return cells

    def _build_post_process(self) -> nn.ModuleList:
        c, arch = self.config, self.config.arch_cells
        cells = nn.ModuleList()
        for b in range(c.num_postprocess_blocks):
            width = c.num_channels_dec * CHANNEL_MULT ** (c.num_postprocess_blocks - b)
            for i in range(c.num_postprocess_cells):
                if i == 0:
                    cells.append(make_cell(width, width // CHANNEL_MULT, "up_post", arch["up_post"], c.use_se))
                else:
                    cells.append(make_cell(width // CHANNEL_MULT, width // CHANNEL_MULT, "normal_post",
                                           arch["normal_post"], c.use_se))
        return cells

    @classmethod
    def from_preset(cls, name: str, **overrides) -> NVAE:
        """The model of preset ``name`` (see ``nvae_fast.config.PRESETS``), fields replaced by ``overrides``."""
        return cls(NVAEConfig.preset(name, **overrides))

    @classmethod
    def from_official_args(cls, args) -> NVAE:
        """The model the official ``train.py`` builds for its ``argparse.Namespace`` ``args``."""
        return cls(NVAEConfig.from_namespace(args))

    @classmethod
    def load_official_checkpoint(cls, path: str | os.PathLike, device: torch.device | str | None = None) -> NVAE:
        """The model of an official checkpoint file, loaded strictly, on ``device``, in eval mode.

        See :func:`nvae_fast.compat.official.load_official_checkpoint`.
        """
        from nvae_fast.compat.official import load_official_checkpoint

        return load_official_checkpoint(path, device=device)

    # -----------------------------------------------------------------------------------------
    # Forward
    # -----------------------------------------------------------------------------------------

    def _check_images(self, x: Tensor) -> None:
        c = self.config
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor of images, got {type(x).__name__}")
        expected = f"(N, {c.in_channels}, {c.image_size}, {c.image_size})"
        if x.dim() != 4 or tuple(x.shape[1:]) != (c.in_channels, c.image_size, c.image_size) or x.shape[0] < 1:
            raise ValueError(f"x must be a batch of images of shape {expected}, got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"x must be a floating-point tensor with values in [0, 1], got {x.dtype}")
        param = self.prior_ftr0
        if x.device != param.device:
            raise ValueError(f"x is on {x.device} but the model is on {param.device}")
        if x.dtype != param.dtype and not torch.is_autocast_enabled(x.device.type):
            raise ValueError(f"x has dtype {x.dtype} but the model's parameters are {param.dtype}; convert one of "
                             "them or run under torch.autocast")
        distributions.check_unit_interval(x, "x")

    def forward(self, x: Tensor, deterministic: bool = False) -> ForwardOutput:
        """Encode x, sample every latent group from its posterior, decode.

        Args:
            x: images (N, C, H, W) with the config's channels and size, float in [0, 1], on the
                model's device (and in its dtype, unless under autocast).
            deterministic: use each posterior's mean instead of a sample (the noise is zero): the
                outputs are then a deterministic function of x and the weights (in eval mode, or
                in training mode for a given batch) - for reconstructions and tests.
        Returns:
            ``(logits, log_q, log_p, kl_all, kl_diag)`` as the official model: the decoder's
            logits (N, output channels, H, W) (see :meth:`decoder_output`); log q(z|x) and
            log p(z) summed over all groups, (N,); per group, kl_all[g] (N,) = KL summed over
            the group's latent variables and kl_diag[g] (C_latent,) = KL per channel summed over
            H, W and averaged over the batch. With flows the KL is log q - log p of the sample,
            otherwise analytic. Sums are fp32 (fp64 for a float64 model).
        """
        self._check_images(x)
        self._prepare_weights()
        try:
            return self._forward(x, deterministic)
        finally:
            self._weight_bank.weights = None

    def _forward(self, x: Tensor, deterministic: bool) -> ForwardOutput:
        ftr, combiners = self._encoder_features(x)
        mu_q, log_sigma_q = self.enc_sampler[0](ftr).chunk(2, dim=1)
        z0, group0 = self._posterior(0, None, None, mu_q, log_sigma_q, ftr, deterministic)
        groups: list[GroupKL] = [group0]

        def latent(group: int, state: Tensor | None) -> Tensor:
            if group == 0:
                return z0
            mu_p, log_sigma_p = self.dec_sampler[group - 1](state).chunk(2, dim=1)
            combiner, enc_state = combiners[group - 1]
            features = combiner(enc_state, state)
            mu_q, log_sigma_q = self.enc_sampler[group](features).chunk(2, dim=1)
            z, result = self._posterior(group, mu_p, log_sigma_p, mu_q, log_sigma_q, features, deterministic)
            groups.append(result)
            return z

        logits = self._decode(x.shape[0], latent)
        log_q = torch.stack([g.log_q for g in groups]).sum(dim=0)
        log_p = torch.stack([g.log_p for g in groups]).sum(dim=0)
        return logits, log_q, log_p, [g.kl_all for g in groups], [g.kl_diag for g in groups]

    def _encoder_features(self, x: Tensor) -> tuple[Tensor, list[tuple[EncCombinerCell, Tensor]]]:
        """The encoder: the top features (group 0's posterior input) and, for every later group in
        decoder order, its combiner cell with the encoder state it combines."""
        s = self.stem(2 * x - 1.0)
        for cell in self.pre_process:
            s = cell(s)
        combiners: list[tuple[EncCombinerCell, Tensor]] = []
        for cell in self.enc_tower:
            if isinstance(cell, EncCombinerCell):
                combiners.append((cell, s))
            else:
                s = cell(s)
        combiners.reverse()  # the decoder visits the groups from the coarsest scale up
        return self.enc0(s), combiners

    def _posterior(self, group: int, mu_p: Tensor | None, log_sigma_p: Tensor | None, mu_q: Tensor,
                   log_sigma_q: Tensor, features: Tensor, deterministic: bool) -> tuple[Tensor, GroupKL]:
        """Sample z of one group (through its flows) and reduce its KL and log-densities."""
        res_dist = self.config.res_dist
        eps = torch.zeros_like(mu_q) if deterministic else torch.randn_like(mu_q)
        if self.num_flows == 0:
            result = normal_kl(mu_p, log_sigma_p, mu_q, log_sigma_q, eps, residual=res_dist)
            return result.z, result
        if res_dist and mu_p is not None:
            z = normal_sample(mu_p + mu_q, log_sigma_p + log_sigma_q, eps)
        else:
            z = normal_sample(mu_q, log_sigma_q, eps)
        log_det = torch.zeros_like(z)
        for flow in self.nf_cells[group * self.num_flows:(group + 1) * self.num_flows]:
            z, flow_log_det = flow(z, features)
            log_det = log_det + flow_log_det
        return z, flow_kl(mu_p, log_sigma_p, log_sigma_q, eps, z, log_det, residual=res_dist)

    def _decode(self, batch_size: int, latent: Callable[[int, Tensor | None], Tensor]) -> Tensor:
        """Run the decoder from the learned prior input; ``latent(group, state)`` gives each z."""
        return self._decoder_head(self._decoder_tower(batch_size, latent))

    def _decoder_tower(self, batch_size: int, latent: Callable[[int, Tensor | None], Tensor]) -> Tensor:
        """The decoder up to its last latent group: the state post-processing starts from."""
        state = self.prior_ftr0.unsqueeze(0).expand(batch_size, -1, -1, -1)
        group = 0
        for cell in self.dec_tower:
            if isinstance(cell, DecCombinerCell):
                state = cell(state, latent(group, state))
                group += 1
            else:
                state = cell(state)
        if self.vanilla_vae:
            state = self.stem_decoder(latent(0, None))
        return state

    def _decoder_head(self, state: Tensor) -> Tensor:
        for cell in self.post_process:
            state = cell(state)
        return self.image_conditional(state)

    # -----------------------------------------------------------------------------------------
    # Generation and outputs
    # -----------------------------------------------------------------------------------------

    def sample(self, num_samples: int, t: float = 1.0) -> Tensor:
        """Logits of ``num_samples`` images drawn from the prior at temperature ``t`` (which
        scales every prior's standard deviation), on the model's device and in its dtype (autocast
        applies as usual). Decode them with :meth:`decoder_output`.

        ``t = 0`` decodes the prior means (each group's mean given the groups above it), as the
        official model does; it draws the same noise as any other temperature, multiplied by 0."""
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
        if not 0 <= t < float("inf"):
            raise ValueError(f"t (temperature) must be a finite number >= 0, got {t}")
        param = self.prior_ftr0
        z0 = normal_sample(None, None, torch.randn(num_samples, *self.z0_size, device=param.device,
                                                   dtype=param.dtype), t)

        def latent(group: int, state: Tensor | None) -> Tensor:
            if group == 0:
                return z0
            mu, log_sigma = self.dec_sampler[group - 1](state).chunk(2, dim=1)
            return normal_sample(mu, log_sigma, torch.randn_like(mu), t)

        self._prepare_weights()
        try:
            return self._decode(num_samples, latent)
        finally:
            self._weight_bank.weights = None

    def decoder_output(self, logits: Tensor):
        """The output distribution p(x | z) of ``logits`` (``config.output_distribution``):
        ``torch.distributions.Bernoulli``, :class:`nvae_fast.distributions.NormalDecoder` or
        :class:`nvae_fast.distributions.DiscMixLogistic`. Each has ``log_prob(x)`` and
        ``sample(t)``/``mean()`` (Bernoulli: ``.mean``)."""
        c = self.config
        return distributions.decoder_output(logits, c.output_distribution, c.num_mixture_dec, c.num_x_bits,
                                            c.in_channels)

    # -----------------------------------------------------------------------------------------
    # Latent space: encode, decode, reconstruct, interpolate
    # -----------------------------------------------------------------------------------------

    @property
    def num_latent_groups(self) -> int:
        """Number of latent groups (the length of :meth:`encode`'s list)."""
        return len(self.enc_sampler)

    def latent_shapes(self) -> list[tuple[int, int, int]]:
        """(C, H, W) of every latent group's z, in decoder order: the coarsest scale first, each
        scale twice the resolution of the one before."""
        channels, height, width = self.z0_size
        shapes: list[tuple[int, int, int]] = []
        for scale, (_, groups) in enumerate(self._groups_in_decoder_order()):
            shapes += [(channels, height * 2 ** scale, width * 2 ** scale)] * groups
        return shapes

    def encode(self, x: Tensor, deterministic: bool = True) -> list[LatentGroup]:
        """Every latent group's posterior q(z_g | x, z_<g), in decoder order (coarsest first).

        Args:
            x: images (N, C, H, W) as :meth:`forward` takes them (the config's channels and size,
                values in [0, 1], the model's device and dtype).
            deterministic: z is each posterior's mean (then the flows), as ``forward(x,
                deterministic=True)`` uses it; False draws z from the posteriors (the forward pass's
                random numbers, in the same order).
        Returns:
            One :class:`LatentGroup` (mu, log_sigma, z; each (N, C_latent, h, w) with the shapes
            of :meth:`latent_shapes`) per group. ``decode([g.z for g in groups])`` gives the
            logits ``forward`` gives for the same z. Later groups' posteriors depend on the
            earlier z, so encoding runs the decoder's latent tower too.
        """
        self._check_images(x)
        ftr, combiners = self._encoder_features(x)
        groups: list[LatentGroup] = []

        def latent(group: int, state: Tensor | None) -> Tensor:
            mu_p = log_sigma_p = None
            features = ftr
            if group > 0:
                mu_p, log_sigma_p = self.dec_sampler[group - 1](state).chunk(2, dim=1)
                combiner, enc_state = combiners[group - 1]
                features = combiner(enc_state, state)
            mu_q, log_sigma_q = self.enc_sampler[group](features).chunk(2, dim=1)
            z, _ = self._posterior(group, mu_p, log_sigma_p, mu_q, log_sigma_q, features, deterministic)
            if self.config.res_dist and mu_p is not None:
                mu_q, log_sigma_q = mu_p + mu_q, log_sigma_p + log_sigma_q
            sigma = torch.exp(soft_clamp5(log_sigma_q)) + SIGMA_MIN
            groups.append(LatentGroup(soft_clamp5(mu_q), torch.log(sigma), z))
            return z

        self._decoder_tower(x.shape[0], latent)
        return groups

    def decode(self, zs: Sequence[Tensor], t: float = 1.0) -> Tensor:
        """Logits of the images of the latent groups ``zs`` (see :meth:`decoder_output`).

        Args:
            zs: z of the first ``k`` groups in decoder order (1 <= k <= :attr:`num_latent_groups`),
                each (N, C, h, w) with the shapes of :meth:`latent_shapes`, on the model's device
                and in its dtype (unless under autocast) - e.g. ``[g.z for g in encode(x)]`` or a
                prefix of it. Fixing only the first (coarsest) groups keeps an image's global
                structure and lets the finer groups vary.
            t: temperature (>= 0) of the prior the groups after the first ``k`` are drawn from
                (it scales the prior's standard deviation; 0 takes the prior means, as
                :meth:`sample` does).
        Returns:
            Logits (N, output channels, H, W), as :meth:`sample` and :meth:`forward` give them.
        """
        self._check_latents(zs)
        if not 0 <= t < float("inf"):
            raise ValueError(f"t (temperature) must be a finite number >= 0, got {t}")
        batch = zs[0].shape[0]
        param = self.prior_ftr0

        def latent(group: int, state: Tensor | None) -> Tensor:
            if group < len(zs):
                return zs[group]
            if group == 0:
                noise = torch.randn(batch, *self.z0_size, device=param.device, dtype=param.dtype)
                return normal_sample(None, None, noise, t)
            mu, log_sigma = self.dec_sampler[group - 1](state).chunk(2, dim=1)
            return normal_sample(mu, log_sigma, torch.randn_like(mu), t)

        return self._decode(batch, latent)

    def _check_latents(self, zs: Sequence[Tensor]) -> None:
        shapes = self.latent_shapes()
        if isinstance(zs, Tensor) or not isinstance(zs, Sequence):
            raise TypeError(f"zs must be a list of tensors, one per latent group, got {type(zs).__name__}")
        if not 1 <= len(zs) <= len(shapes):
            raise ValueError(f"zs must hold between 1 and {len(shapes)} latent groups (the model has {len(shapes)}; "
                             f"sample() draws them all from the prior), got {len(zs)}")
        param = self.prior_ftr0
        batch = None
        for g, z in enumerate(zs):
            if not isinstance(z, Tensor):
                raise TypeError(f"zs[{g}] must be a torch.Tensor, got {type(z).__name__}")
            if batch is None:
                batch = z.shape[0] if z.dim() == 4 else 0
            if z.dim() != 4 or tuple(z.shape[1:]) != shapes[g] or z.shape[0] != batch or batch < 1:
                raise ValueError(f"zs[{g}] must have shape (N, {', '.join(map(str, shapes[g]))}) with the N of zs[0], "
                                 f"got {tuple(z.shape)}")
            if z.device != param.device:
                raise ValueError(f"zs[{g}] is on {z.device} but the model is on {param.device}")
            if z.dtype != param.dtype and not torch.is_autocast_enabled(z.device.type):
                raise ValueError(f"zs[{g}] has dtype {z.dtype} but the model's parameters are {param.dtype}")

    def mean_image(self, logits: Tensor) -> Tensor:
        """Images (N, C, H, W) in [0, 1] of ``logits``: the mean of p(x | z) (a Bernoulli's pixel
        probabilities; the mixture-weighted means of the logistic mixture, as the official FID
        samples; the normal's mean), in fp32."""
        output = self.decoder_output(logits.float())
        return output.mean if isinstance(output, torch.distributions.Bernoulli) else output.mean()

    def reconstruct(self, x: Tensor, deterministic: bool = True) -> Tensor:
        """Reconstructions (N, C, H, W) in [0, 1], fp32, of images x (as :meth:`forward` takes
        them): :meth:`mean_image` of ``decode(encode(x, deterministic))``."""
        return self.mean_image(self.decode([g.z for g in self.encode(x, deterministic)]))

    def interpolate(self, x1: Tensor, x2: Tensor, steps: int = 8, groups: int | Sequence[int] | None = None
                    ) -> Tensor:
        """Images along the line between the posterior means of x1 and x2, in latent space.

        Args:
            x1, x2: images (N, C, H, W) as :meth:`forward` takes them; pair i is (x1[i], x2[i]).
            steps: images per pair (>= 2), from x1's reconstruction to x2's.
            groups: the latent groups that move: None (all), an int k (the first k groups in
                decoder order: the coarse structure) or a sequence of group indices. The others
                keep x1's z, so the image changes only in what those groups encode.
        Returns:
            (N, steps, C, H, W) fp32 images in [0, 1] (:meth:`mean_image` of the decoded z).
        """
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 2:
            raise ValueError(f"steps must be an integer >= 2, got {steps!r}")
        if not isinstance(x1, Tensor) or not isinstance(x2, Tensor) or x1.shape != x2.shape:
            raise ValueError(f"x1 and x2 must be image batches of the same shape, got "
                             f"{tuple(getattr(x1, 'shape', ()))} and {tuple(getattr(x2, 'shape', ()))}")
        moving = self._group_indices(groups)
        start, end = self.encode(x1), self.encode(x2)
        weights = torch.linspace(0, 1, steps, device=x1.device, dtype=start[0].z.dtype).view(1, steps, 1, 1, 1)
        zs = []
        for g, (a, b) in enumerate(zip(start, end)):
            z = torch.lerp(a.z.unsqueeze(1), b.z.unsqueeze(1), weights) if g in moving else \
                a.z.unsqueeze(1).expand(-1, steps, -1, -1, -1)
            zs.append(z.flatten(0, 1))
        return self.mean_image(self.decode(zs)).unflatten(0, (x1.shape[0], steps))

    def _group_indices(self, groups: int | Sequence[int] | None) -> set[int]:
        total = self.num_latent_groups
        if groups is None:
            return set(range(total))
        if isinstance(groups, int) and not isinstance(groups, bool):
            if not 1 <= groups <= total:
                raise ValueError(f"groups must be between 1 and {total} (the model's latent groups), got {groups}")
            return set(range(groups))
        indices = list(groups)
        bad = [g for g in indices if isinstance(g, bool) or not isinstance(g, int) or not 0 <= g < total]
        if not indices or bad:
            raise ValueError(f"groups must be group indices in [0, {total}), got {indices}")
        return set(indices)

    @torch.no_grad()
    def readjust_bn(self, num_samples: int = 16, t: float = 1.0, iterations: int = 500,
                    progress: Callable[[Iterable[int]], Iterable[int]] | None = None) -> None:
        """Re-estimate every BatchNorm's running statistics on samples at temperature ``t``.

        The official ``--readjust_bn``: runs ``iterations`` prior samples of ``num_samples`` in
        training mode (each updates the running statistics with momentum 0.05; across ranks when
        torch.distributed runs), then leaves the model in eval mode, ready to sample.

        Always in fp32, whatever the model's dtype or an enclosing ``torch.autocast``: the
        official code re-estimates under fp16 autocast, where activations beyond the fp16 range
        turn the running statistics into Inf/NaN and every later sample into NaN images. A float16
        or bfloat16 model is cast to fp32 for the passes and back after them (its weights round-trip
        exactly); statistics that do not fit the model's dtype raise a ``ValueError``.

        ``progress`` wraps the iteration range (e.g. ``tqdm``) to report the passes.
        """
        if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
            raise ValueError(f"iterations must be a positive integer, got {iterations!r}")
        dtype = self.prior_ftr0.dtype
        passes = range(iterations) if progress is None else progress(range(iterations))
        with torch.autocast(self.prior_ftr0.device.type, enabled=False):
            if dtype in (torch.float16, torch.bfloat16):
                self.float()
            try:
                self.train()
                for _ in passes:
                    self.sample(num_samples, t)
            finally:
                self.to(dtype)
                self.eval()
        overflow = [name for name, bn in self.named_modules() if isinstance(bn, _BatchNorm)
                    and not (torch.isfinite(bn.running_mean).all() and torch.isfinite(bn.running_var).all())]
        if overflow:
            hint = ("they do not fit its dtype: keep the model in float32 and sample under torch.autocast"
                    if dtype in (torch.float16, torch.bfloat16) else "the samples themselves are not finite")
            raise ValueError(f"the BatchNorm statistics re-estimated at t={t} are not finite in {len(overflow)} "
                             f"layers (first: {overflow[0]}) of this {dtype} model; {hint}")

    # -----------------------------------------------------------------------------------------
    # Regularisers
    # -----------------------------------------------------------------------------------------

    def conv_layers(self) -> list[Conv2D | ARConv2d]:
        """Every convolution of the model, in module order (the official ``all_conv_layers``)."""
        return [m for m in self.modules() if isinstance(m, (Conv2D, ARConv2d))]

    def bn_layers(self) -> list[_BatchNorm]:
        """Every BatchNorm of the model, in module order (the official ``all_bn_layers``)."""
        return [m for m in self.modules() if isinstance(m, _BatchNorm)]

    def spectral_norm_parallel(self) -> Tensor:
        """Sum of the largest singular values of all convolution weights (as matrices C_out x rest).

        Power iteration: 4 iterations per call, 40 on the first call for a shape, which draws the
        start vectors from the CPU random generator (as the official model); the singular vectors
        persist between calls on the weights' device (not in the state_dict). Differentiable in
        the weights (the vectors are constants). On the fused path (the weight-norm op on a fast
        backend) every matrix is iterated in one launch (:mod:`nvae_fast.ops.spectral_norm`) on the
        weights the last forward pass normalised, when the parameters have not changed since;
        otherwise batched by weight shape.
        """
        if self._fused_weights():
            return self._spectral_norm_fused()
        by_shape: dict[torch.Size, list[Tensor]] = {}
        for conv in self._convs:
            weight = conv.normalized_weight()
            matrix = weight.reshape(weight.shape[0], -1)
            by_shape.setdefault(matrix.shape, []).append(matrix)
        total = self.prior_ftr0.new_zeros(())
        for shape, matrices in by_shape.items():
            weights = torch.stack(matrices)
            with torch.no_grad():
                u, v, iterations = self._power_vectors(shape, *weights.shape, weights.device, weights.dtype)
                u, v = u.to(weights), v.to(weights)
                for _ in range(iterations):
                    v = F.normalize(torch.bmm(u.unsqueeze(1), weights).squeeze(1), dim=1, eps=POWER_ITER_EPS)
                    u = F.normalize(torch.bmm(weights, v.unsqueeze(2)).squeeze(2), dim=1, eps=POWER_ITER_EPS)
                self._sr_u[shape], self._sr_v[shape] = u, v
                self._sr_flat = None
            sigma = torch.bmm(u.unsqueeze(1), torch.bmm(weights, v.unsqueeze(2)))
            total = total + sigma.sum()
        return total

    def _spectral_norm_fused(self) -> Tensor:
        convs, bank = self._convs, self._weight_bank
        inputs = self._reusable_forward_weights()
        w, g = inputs if inputs is not None else bank.inputs(convs)
        flat = bank.normalize(convs, w, g)
        table, groups = self._spectral_layout(flat)
        u, v, iterations = self._flat_power_vectors(groups, flat.device, flat.dtype)
        sigma, u_new, v_new = spectral_norm(flat, table, u, v, iterations)
        with torch.no_grad():
            torch._foreach_copy_([u, v], [u_new, v_new])
        return sigma.sum()

    def _spectral_layout(self, flat: Tensor) -> tuple[Tensor, list[tuple[torch.Size, int]]]:
        """The (L, 5) layer table of :func:`nvae_fast.ops.spectral_norm.spectral_norm` for the
        bank's flat weights, and the (matrix shape, count) groups in first-seen order."""
        key = (flat.device, flat.dtype)
        if key not in self._sr_layouts:
            offsets = self._weight_bank.layout(self._convs).offsets
            groups: dict[torch.Size, list[int]] = {}
            for i, conv in enumerate(self._convs):
                rows = conv.weight.shape[0]
                groups.setdefault(torch.Size([rows, conv.weight.numel() // rows]), []).append(i)
            table = [[0] * 5 for _ in self._convs]
            u_off = v_off = 0
            for (rows, cols), members in groups.items():
                for i in members:
                    table[i] = [offsets[i], rows, cols, u_off, v_off]
                    u_off, v_off = u_off + rows, v_off + cols
            self._sr_layouts[key] = (torch.tensor(table, dtype=torch.int64, device=flat.device),
                                     [(shape, len(members)) for shape, members in groups.items()])
        return self._sr_layouts[key]

    def _flat_power_vectors(self, groups: list[tuple[torch.Size, int]], device: torch.device, dtype: torch.dtype
                            ) -> tuple[Tensor, Tensor, int]:
        """Flat u, v buffers holding every group's vectors (the per-shape entries become views of
        them) and the iterations to run: 40 when any vector was just drawn."""
        iterations = NUM_POWER_ITER
        for shape, num in groups:
            u, v, iters = self._power_vectors(shape, num, *shape, device, dtype)
            if iters != NUM_POWER_ITER:
                self._sr_u[shape], self._sr_v[shape], iterations, self._sr_flat = u, v, iters, None
        flat = self._sr_flat
        if flat is None or flat[0].device != device or flat[0].dtype != dtype:
            u = torch.cat([self._sr_u[shape].reshape(-1) for shape, _ in groups]).to(device, dtype)
            v = torch.cat([self._sr_v[shape].reshape(-1) for shape, _ in groups]).to(device, dtype)
            flat = self._sr_flat = (u, v)
            u_off = v_off = 0
            for (shape, num) in groups:
                rows, cols = shape
                self._sr_u[shape] = u[u_off:u_off + num * rows].view(num, rows)
                self._sr_v[shape] = v[v_off:v_off + num * cols].view(num, cols)
                u_off, v_off = u_off + num * rows, v_off + num * cols
        return flat[0], flat[1], iterations

    def spectral_state(self) -> list[dict]:
        """The power-iteration vectors of :meth:`spectral_norm_parallel`, on the CPU: one
        ``{"shape": [rows, cols], "u": (num, rows), "v": (num, cols)}`` per weight shape. They live
        outside the state_dict, as in the official model; a training checkpoint carries them so that
        a resumed run computes the same regulariser."""
        return [{"shape": list(shape), "u": u.detach().cpu().clone(), "v": self._sr_v[shape].detach().cpu().clone()}
                for shape, u in self._sr_u.items()]

    def load_spectral_state(self, state: list[dict]) -> None:
        """Restores vectors saved by :meth:`spectral_state`, moved to the model's device."""
        device = self.prior_ftr0.device
        for item in state:
            shape = torch.Size(item["shape"])
            self._sr_u[shape] = item["u"].to(device)
            self._sr_v[shape] = item["v"].to(device)
        self._sr_flat = None

    def _power_vectors(self, shape: torch.Size, num: int, rows: int, cols: int, device: torch.device,
                       dtype: torch.dtype) -> tuple[Tensor, Tensor, int]:
        """The stored vectors of the ``num`` matrices of ``shape`` and the iterations to run: 4, or
        random unit vectors and 40 iterations when none are stored for that many matrices."""
        u, v = self._sr_u.get(shape), self._sr_v.get(shape)
        if u is None or u.shape[0] != num:
            # As the official model: standard-normal float32 draws from the CPU generator (u, then
            # v, shape by shape in module order), whatever the weights' device, so that a seed
            # gives the same vectors on any device.
            u = F.normalize(torch.randn(num, rows).to(device=device, dtype=dtype), dim=1, eps=POWER_ITER_EPS)
            v = F.normalize(torch.randn(num, cols).to(device=device, dtype=dtype), dim=1, eps=POWER_ITER_EPS)
            return u, v, 10 * NUM_POWER_ITER
        return u, v, NUM_POWER_ITER

    def batchnorm_loss(self) -> Tensor:
        """Sum over the affine BatchNorms of the largest absolute scale (the official BN loss), in
        a few launches for all of them (a segmented max over their concatenated scales)."""
        weights = [bn.weight for bn in self.bn_layers() if bn.affine]
        if not weights:
            return self.prior_ftr0.new_zeros(())
        device = weights[0].device
        offsets = self._bn_offsets.get(device)
        if offsets is None or offsets.shape[0] != len(weights) + 1:
            sizes = torch.tensor([0] + [w.numel() for w in weights], dtype=torch.int64)
            offsets = self._bn_offsets[device] = sizes.cumsum(0).to(device)
        flat = torch.cat([w.reshape(-1) for w in weights]).abs()
        # unsafe=True skips segment_reduce's own check of the offsets, which reads them on the host.
        return torch.segment_reduce(flat, "max", offsets=offsets, unsafe=True).sum()

    # -----------------------------------------------------------------------------------------
    # Convolution weights of a forward pass
    # -----------------------------------------------------------------------------------------

    def _fused_weights(self) -> bool:
        """Whether the convolutions' weights go through the batched ops (a fast backend for
        :mod:`nvae_fast.ops.weight_norm`) rather than being normalised one by one (the reference)."""
        weight = self.prior_ftr0
        return weight_norm_op.backend_for(weight.device, weight.dtype) != "torch"

    def _prepare_weights(self) -> None:
        """On the fused path, normalises every convolution's weight in one op and lends them to the
        convolutions for this forward pass; keeps the op's inputs for :meth:`spectral_norm_parallel`."""
        bank = self._weight_bank
        bank.weights = None
        self._forward_weights = None
        if not self._fused_weights() or any(c.data_init and not c.init_done for c in self._convs
                                            if isinstance(c, Conv2D)):
            return  # the ELU cells' data-dependent init changes weights inside the forward
        w, g = bank.inputs(self._convs)
        if torch.is_grad_enabled() and not torch.compiler.is_compiling():
            self._forward_weights = (w, g, self._weights_version())
        bank.weights = bank.split(self._convs, bank.normalize(self._convs, w, g))

    def _reusable_forward_weights(self) -> tuple[Tensor, Tensor] | None:
        """The last forward's concatenated weights when they still hold the parameters' values
        (no in-place change since: an optimizer step bumps the version counters) and carry a graph
        when one is needed. Concatenations save no tensors for backward, so a graph through them
        can be used again after a backward. Compiled code recomputes them (inductor fuses that)."""
        cached = self._forward_weights
        if cached is None or torch.compiler.is_compiling():
            return None
        w, g, version = cached
        if version != self._weights_version() or (torch.is_grad_enabled() and not w.requires_grad):
            return None
        return w, g

    def _weights_version(self) -> int:
        return sum(p._version for conv in self._convs for p in (conv.weight, conv.log_weight_norm) if p is not None)

    # -----------------------------------------------------------------------------------------
    # Attributes of the official model (read-only; user scripts written for it read them)
    # -----------------------------------------------------------------------------------------

    @property
    def all_conv_layers(self) -> list[Conv2D | ARConv2d]:
        """Every convolution, in module order (as :meth:`conv_layers`)."""
        return self.conv_layers()

    @property
    def all_bn_layers(self) -> list[_BatchNorm]:
        """Every BatchNorm, in module order (as :meth:`bn_layers`)."""
        return self.bn_layers()

    @property
    def all_log_norm(self) -> list[Tensor | None]:
        """The ``log_weight_norm`` parameter of each of :attr:`all_conv_layers` (None without weight
        normalisation)."""
        return [conv.log_weight_norm for conv in self.conv_layers()]

    @property
    def sr_u(self) -> dict[torch.Size, Tensor]:
        """Left power-iteration vectors of :meth:`spectral_norm_parallel`, per weight-matrix shape
        (the live dict: empty until the first call; clearing it restarts the iteration)."""
        return self._sr_u

    @property
    def sr_v(self) -> dict[torch.Size, Tensor]:
        """Right power-iteration vectors, as :attr:`sr_u`."""
        return self._sr_v

    @property
    def num_power_iter(self) -> int:
        """Power iterations per call of :meth:`spectral_norm_parallel` (10x on the first call)."""
        return NUM_POWER_ITER

    @property
    def arch_instance(self) -> dict[str, list[str]]:
        """Cell type -> operations, as the official ``utils.get_arch_cells`` (a copy)."""
        cells = {name: list(ops) for name, ops in self.config.arch_cells.items()}
        cells["ar_nn"] = [""]
        return cells

    @property
    def dataset(self) -> str:
        return self.config.dataset

    @property
    def input_size(self) -> int:
        """Image height and width."""
        return self.config.image_size

    @property
    def num_bits(self) -> int:
        """Bits per colour channel (``num_x_bits``)."""
        return self.config.num_x_bits

    @property
    def num_mix_output(self) -> int:
        """Logistic mixture components of the output (``num_mixture_dec``)."""
        return self.config.num_mixture_dec

    @property
    def use_se(self) -> bool:
        return self.config.use_se

    @property
    def res_dist(self) -> bool:
        return self.config.res_dist

    @property
    def with_nf(self) -> bool:
        """Whether the posteriors have normalising flows."""
        return self.config.num_nf > 0

    @property
    def num_groups_per_scale(self) -> int:
        return self.config.num_groups_per_scale

    @property
    def num_latent_per_group(self) -> int:
        return self.config.num_latent_per_group

    @property
    def num_channels_enc(self) -> int:
        return self.config.num_channels_enc

    @property
    def num_channels_dec(self) -> int:
        return self.config.num_channels_dec

    @property
    def num_preprocess_blocks(self) -> int:
        return self.config.num_preprocess_blocks

    @property
    def num_preprocess_cells(self) -> int:
        return self.config.num_preprocess_cells

    @property
    def num_cell_per_cond_enc(self) -> int:
        return self.config.num_cell_per_cond_enc

    @property
    def num_postprocess_blocks(self) -> int:
        return self.config.num_postprocess_blocks

    @property
    def num_postprocess_cells(self) -> int:
        return self.config.num_postprocess_cells

    @property
    def num_cell_per_cond_dec(self) -> int:
        return self.config.num_cell_per_cond_dec

    @property
    def enc_kv(self) -> nn.ModuleList:
        """Empty, as in the official model (which declares it and never fills it)."""
        return nn.ModuleList()

    @property
    def dec_kv(self) -> nn.ModuleList:
        """Empty, as in the official model."""
        return nn.ModuleList()

    @property
    def query(self) -> nn.ModuleList:
        """Empty, as in the official model."""
        return nn.ModuleList()

    @property
    def writer(self) -> None:
        """The official model keeps the TensorBoard writer its constructor was given; NVAE takes
        none (training logs through ``nvae_fast.train``)."""
        return None
