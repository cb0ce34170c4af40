"""Output distributions of the decoder: p(x | z) from the logits of ``NVAE``.

* :class:`DiscMixLogistic` - RGB (or grey) images: a mixture of discretised logistics per pixel
  with autoregressive channel means (PixelCNN++), ``num_bits`` bits per channel.
* :class:`NormalDecoder` - a normal per pixel and channel (``num_mixture_dec == 1``).
* ``torch.distributions.Bernoulli`` - binary images (MNIST), as the official model returns.

Images are float in [0, 1]; the distributions work on ``2 x - 1`` in [-1, 1]. Sampling uses the
logits' device and dtype (the official code hard-codes CUDA).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.distributions import Bernoulli

from nvae_fast.ops.normal_kl import SIGMA_MIN, soft_clamp5

LOG_SCALE_MIN = -7.0
UNIFORM_EPS = 1e-5  # uniform noise in (eps, 1 - eps): keeps log(u) and log(1 - u) finite


def check_unit_interval(x: Tensor, name: str) -> None:
    """Refuses a tensor with a value outside [0, 1] (NaN and Inf included) without making the
    host wait for the device.

    On the CPU (eager) a bad value raises ``ValueError`` at once. On other devices, and in
    compiled code, the check is a device-side assert (``torch._assert_async``): a bad batch stops
    the run at the next synchronisation with an error naming the problem, and a good one costs
    a few launches and no host synchronisation.
    """
    inside = ((x.detach() - 0.5).abs() <= 0.5).all()   # comparisons with NaN are false
    message = f"{name} must have values in [0, 1] (no NaN or Inf)"
    if x.device.type != "cpu" or torch.compiler.is_compiling():
        torch._assert_async(inside, message)
        return
    try:
        torch._assert_async(inside, message)   # on the CPU: checked at once
    except RuntimeError:
        lo, hi = torch.aminmax(x.detach())
        finite = bool(torch.isfinite(x).all())
        raise ValueError(f"{name} must have values in [0, 1], got values in [{lo.item():.4g}, {hi.item():.4g}]"
                         + ("" if finite else " (with NaN or Inf)")) from None


def _check_images(x: Tensor, channels: int) -> None:
    if not isinstance(x, Tensor) or x.dim() != 4:
        raise ValueError(f"images must be a 4-D tensor (N, C, H, W), got {getattr(x, 'shape', type(x))}")
    if x.shape[1] != channels:
        raise ValueError(f"images must have {channels} channels, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"images must be a floating-point tensor in [0, 1], got {x.dtype}")
    check_unit_interval(x, "images")


def _logistic_noise(like: Tensor) -> Tensor:
    u = torch.empty_like(like).uniform_(UNIFORM_EPS, 1.0 - UNIFORM_EPS)
    return torch.log(u) - torch.log1p(-u)


class NormalDecoder:
    """Independent normals over [-1, 1]: logits (N, 2C, H, W) = (mu, log_sigma), soft-clamped like
    the latent normals (sigma = exp(5 tanh(log_sigma / 5)) + 0.01)."""

    def __init__(self, logits: Tensor, num_bits: int = 8) -> None:
        if logits.dim() != 4 or logits.shape[1] % 2:
            raise ValueError(f"NormalDecoder needs logits (N, 2C, H, W), got shape {tuple(logits.shape)}")
        self.num_c = logits.shape[1] // 2
        self.mu = soft_clamp5(logits[:, :self.num_c])
        self.sigma = torch.exp(soft_clamp5(logits[:, self.num_c:])) + SIGMA_MIN
        self.num_bits = num_bits

    def log_prob(self, x: Tensor) -> Tensor:
        """Per-value log density (N, C, H, W) of images x in [0, 1]."""
        _check_images(x, self.num_c)
        normalized = (2 * x - 1 - self.mu) / self.sigma
        return -0.5 * normalized * normalized - 0.5 * math.log(2 * math.pi) - torch.log(self.sigma)

    def sample(self, t: float = 1.0) -> Tensor:
        """Images in [0, 1] (N, C, H, W). Like the official decoder, ``t`` is not used."""
        x = self.mu + self.sigma * torch.randn_like(self.mu)
        return torch.clamp(x, -1, 1) / 2 + 0.5

    def mean(self) -> Tensor:
        """The mean image, clamped to [0, 1]."""
        return torch.clamp(self.mu, -1, 1) / 2 + 0.5


class DiscMixLogistic:
    """Mixture of ``num_mix`` discretised logistics per pixel (PixelCNN++ parametrisation).

    RGB logits (N, 10 M, H, W), the official layout: M mixture logits, then per colour channel (3
    blocks of 3 M) the M means, M log scales (clamped at -7) and M coefficients (tanh) through
    which G depends on R, and B on R and G. Grey logits (N, 3 M, H, W): M mixture logits, M means,
    M log scales. ``num_bits`` sets the bin width 2 / (2**num_bits - 1) on [-1, 1].
    """

    def __init__(self, logits: Tensor, num_mix: int = 10, num_bits: int = 8, num_channels: int = 3) -> None:
        if num_channels not in (1, 3):
            raise ValueError(f"DiscMixLogistic models 1 (grey) or 3 (RGB) channels, got num_channels={num_channels}")
        N, C, H, W = logits.shape
        per_channel = 3 if num_channels == 3 else 2  # mean, log scale (and a coefficient for RGB)
        if C != num_mix * (1 + num_channels * per_channel):
            raise ValueError(f"DiscMixLogistic with {num_mix} components over {num_channels} channel(s) needs "
                             f"{num_mix * (1 + num_channels * per_channel)} logit channels, got {C}")
        self.num_mix, self.num_channels = num_mix, num_channels
        self.logit_probs = logits[:, :num_mix]                                  # N, M, H, W
        params = logits[:, num_mix:].reshape(N, num_channels, per_channel * num_mix, H, W)
        self.means = params[:, :, :num_mix]                                     # N, C, M, H, W
        self.log_scales = torch.clamp(params[:, :, num_mix:2 * num_mix], min=LOG_SCALE_MIN)
        self.coeffs = torch.tanh(params[:, :, 2 * num_mix:]) if num_channels == 3 else None
        self.max_val = 2.0 ** num_bits - 1

    def _channel_means(self, x: Tensor) -> Tensor:
        """Means (N, C, M, H, W) given the image x in [-1, 1] (N, C, 1, H, W)."""
        if self.coeffs is None:
            return self.means
        r, g = x[:, 0], x[:, 1]
        mean_g = self.means[:, 1] + self.coeffs[:, 0] * r
        mean_b = self.means[:, 2] + self.coeffs[:, 1] * r + self.coeffs[:, 2] * g
        return torch.stack([self.means[:, 0], mean_g, mean_b], dim=1)

    def log_prob(self, x: Tensor) -> Tensor:
        """Per-pixel log probability (N, H, W) of images x in [0, 1], summed over the channels."""
        _check_images(x, self.num_channels)
        x = (2 * x - 1).unsqueeze(2)                                            # N, C, 1, H, W
        centered = x - self._channel_means(x)
        inv_scale = torch.exp(-self.log_scales)
        plus_in = inv_scale * (centered + 1.0 / self.max_val)
        min_in = inv_scale * (centered - 1.0 / self.max_val)
        cdf_delta = torch.sigmoid(plus_in) - torch.sigmoid(min_in)
        log_cdf_plus = plus_in - F.softplus(plus_in)                           # log CDF at the lowest bin's edge
        log_one_minus_cdf_min = -F.softplus(min_in)                            # log (1 - CDF) at the highest bin's
        mid_in = inv_scale * centered
        log_pdf_mid = mid_in - self.log_scales - 2.0 * F.softplus(mid_in)
        # Where the bin's mass underflows, approximate it by density times bin width.
        log_prob_mid = torch.where(cdf_delta > 1e-5, torch.log(torch.clamp(cdf_delta, min=1e-10)),
                                   log_pdf_mid - math.log(self.max_val / 2))
        # The top edge test is x > 0.99 (not 0.999) so that the largest value of 8-bit data counts.
        log_probs = torch.where(x < -0.999, log_cdf_plus,
                                torch.where(x > 0.99, log_one_minus_cdf_min, log_prob_mid))
        log_probs = log_probs.sum(dim=1) + F.log_softmax(self.logit_probs, dim=1)   # N, M, H, W
        return torch.logsumexp(log_probs, dim=1)

    def _select(self, component: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """Means, log scales, coefficients (N, C, H, W) weighted by component (N, M, H, W)."""
        w = component.unsqueeze(1)
        coeffs = None if self.coeffs is None else (self.coeffs * w).sum(2)
        return (self.means * w).sum(2), (self.log_scales * w).sum(2), coeffs

    @staticmethod
    def _to_image(x: Tensor, coeffs: Tensor | None) -> Tensor:
        """Clamp to [-1, 1] (RGB: adding the channel dependencies first), then map to [0, 1]."""
        if coeffs is None:
            return torch.clamp(x, -1, 1) / 2 + 0.5
        r = torch.clamp(x[:, 0], -1, 1)
        g = torch.clamp(x[:, 1] + coeffs[:, 0] * r, -1, 1)
        b = torch.clamp(x[:, 2] + coeffs[:, 1] * r + coeffs[:, 2] * g, -1, 1)
        return torch.stack([r, g, b], dim=1) / 2 + 0.5

    def sample(self, t: float = 1.0) -> Tensor:
        """Images in [0, 1] (N, C, H, W): a Gumbel-max pick of the component (logits / t), then
        a logistic draw with scale / t (not rounded to the bins)."""
        gumbel = -torch.log(-torch.log(torch.empty_like(self.logit_probs).uniform_(UNIFORM_EPS, 1 - UNIFORM_EPS)))
        pick = torch.argmax(self.logit_probs / t + gumbel, dim=1)
        one_hot = F.one_hot(pick, self.num_mix).permute(0, 3, 1, 2).to(self.means.dtype)
        means, log_scales, coeffs = self._select(one_hot)
        x = means + torch.exp(log_scales) / t * _logistic_noise(means)
        return self._to_image(x, coeffs)

    def mean(self) -> Tensor:
        """Images in [0, 1]: the component means weighted by the mixture probabilities."""
        means, _, coeffs = self._select(torch.softmax(self.logit_probs, dim=1))
        return self._to_image(means, coeffs)


def decoder_output(logits: Tensor, kind: str, num_mix: int = 10, num_bits: int = 8, num_channels: int = 3
                   ) -> Bernoulli | NormalDecoder | DiscMixLogistic:
    """The output distribution ``kind`` ('bernoulli', 'normal', 'logistic_mixture') of ``logits``
    for images of ``num_channels`` channels."""
    if kind == "bernoulli":
        # Unvalidated, like the other two: NaN logits of a diverging step must reach the trainer's
        # NaN/Inf guard (which skips the step) instead of raising here.
        return Bernoulli(logits=logits, validate_args=False)
    if kind == "normal":
        return NormalDecoder(logits, num_bits=num_bits)
    if kind == "logistic_mixture":
        return DiscMixLogistic(logits, num_mix, num_bits=num_bits, num_channels=num_channels)
    raise ValueError(f"kind must be 'bernoulli', 'normal' or 'logistic_mixture', got {kind!r}")


def reconstruction_loss(output: Bernoulli | NormalDecoder | DiscMixLogistic, x: Tensor, crop: bool = False
                        ) -> Tensor:
    """``-log p(x | z)`` per image (N,), as the official ``utils.reconstruction_loss``.

    With ``crop`` (``NVAE.crop_output``: 28x28 data padded to 32x32) only the central 28x28 pixels
    count.
    """
    log_p = output.log_prob(x)
    if crop:
        log_p = log_p[..., 2:30, 2:30]
    return -log_p.flatten(1).sum(dim=1)
