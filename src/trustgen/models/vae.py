"""A convolutional variational autoencoder (Kingma & Welling 2014, arXiv:1312.6114).

The encoder halves the image with strided convolutions down to a small grid and predicts the
mean and log-variance of a diagonal Gaussian posterior q(z|x); the decoder mirrors it, upsampling
and convolving. The loss is the negative ELBO in nats per image,

    -ELBO = E_q[-log p(x|z)] + beta * KL(q(z|x) || N(0, I)),

reported with its two terms. beta = 1 is the plain VAE, beta > 1 the beta-VAE (Higgins et al.
2017), which trades reconstruction for a more disentangled latent space.

Two decoders: Bernoulli (pixel intensities in [0, 1] as probabilities, the usual choice for
digits) and Gaussian with one shared variance set to its optimum, the mean squared error
(sigma-VAE, Rybkin et al. 2021, arXiv:2006.13202): a Gaussian decoder without a variance to
tune. The conditional variant (Sohn et al. 2015) gives the class to the encoder and decoder.

Samples come from the prior. With `prior="mixture"` that is not N(0, I) but a Gaussian mixture
fitted, once training ends, to the posterior means of the training images ("ex-post density
estimation", Ghosh et al. 2020, arXiv:1903.12436): the encoder never fills the standard normal
evenly, and latents drawn from its empty regions decode to blurred in-between shapes. With
`fit_temperature`, samples show the Bernoulli decoder tempered, p(x|z)^(1/T) (its logits divided
by T), which undoes the decoder's hedging between pixel values; the likelihood and the ELBO stay
those of T = 1. Both are fitted by `vae_fitting.py` and kept here as buffers, so a saved model
samples without refitting. Measurements behind the defaults: docs/experiments/vae.md.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from trustgen.config import Config, check
from trustgen.models.gan import check_image_shape, stage_plan, stage_widths


@dataclass(frozen=True, kw_only=True)
class VAEConfig(Config):
    image_size: int = 28
    channels: int = 1
    n_classes: int = 0  # > 0: conditional
    latent_dim: int = 16
    width: int = 48  # channels at full resolution, doubling with each halving
    max_width: int = 256
    beta: float = 1.0
    decoder: Literal["bernoulli", "gaussian"] = "bernoulli"
    prior: Literal["standard", "mixture"] = "mixture"  # mixture: fitted to the codes once training ends
    prior_components: int = 160  # the most the mixture may use (vae_fitting chooses how many)
    fit_temperature: bool = True  # Bernoulli decoder only
    # Unconditional with a mixture prior: the mixture's weights are calibrated to what each component
    # decodes to (trustgen.models.mixing).
    calibrate: bool = True

    def __post_init__(self) -> None:
        check_image_shape("VAEConfig", self.image_size, self.channels)
        check(self.n_classes >= 0, f"VAEConfig.n_classes must not be negative, got {self.n_classes}.")
        check(self.latent_dim >= 1 and self.width >= 1 and self.max_width >= self.width,
              "VAEConfig.latent_dim and width must be positive and max_width at least width.")
        check(self.beta > 0, f"VAEConfig.beta must be positive, got {self.beta}.")
        check(self.prior_components >= 1, f"VAEConfig.prior_components must be positive, got {self.prior_components}.")

    def widths(self) -> list[int]:
        return stage_widths(self.image_size, self.width, self.max_width)


class VAE(nn.Module):
    family = "vae"
    loss_terms = ("recon", "kl", "neg_elbo")

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        self.config = config
        base, _ = stage_plan(config.image_size)
        widths = config.widths()  # coarsest first
        self.base = base
        self.label_embed = nn.Embedding(config.n_classes, config.latent_dim) if config.n_classes else None
        condition = config.latent_dim if config.n_classes else 0
        # encoder: full resolution -> base grid -> (mean, log-variance)
        fine_first = list(reversed(widths))
        self.enc_in = nn.Conv2d(config.channels, fine_first[0], 3, padding=1)
        self.enc_downs = nn.ModuleList(
            nn.Conv2d(w_in, w_out, 4, stride=2, padding=1) for w_in, w_out in itertools.pairwise(fine_first))
        flat = widths[0] * base * base
        self.enc_out = nn.Linear(flat + condition, 2 * config.latent_dim)
        # decoder: latent -> base grid -> full resolution
        self.dec_in = nn.Linear(config.latent_dim + condition, flat)
        self.dec_ups = nn.ModuleList(  # upsampling as in the GAN's generator: no checkerboard
            nn.Sequential(nn.Upsample(scale_factor=2), nn.Conv2d(w_in, w_out, 3, padding=1))
            for w_in, w_out in itertools.pairwise(widths))
        self.dec_out = nn.Conv2d(widths[-1], config.channels, 3, padding=1)
        if config.prior == "mixture":  # N(0, I) until vae_fitting fits it
            k, d = config.prior_components, config.latent_dim
            self.register_buffer("prior_weights", torch.full((k,), 1 / k))
            self.register_buffer("prior_means", torch.zeros(k, d))
            self.register_buffer("prior_scales", torch.eye(d).repeat(k, 1, 1))  # Cholesky factors
        if self.tempered:  # 1 until vae_fitting fits it
            self.register_buffer("temperature", torch.ones(()))

    @property
    def tempered(self) -> bool:
        """Whether samples show the decoder at a fitted temperature (only a Bernoulli's has one)."""
        return self.config.fit_temperature and self.config.decoder == "bernoulli"

    @property
    def latent_dim(self) -> int:
        return self.config.latent_dim

    def _condition(self, features: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        if self.label_embed is None:
            return features
        return torch.cat([features, self.label_embed(labels)], dim=1)

    def encode(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (B, C, H, W) in [0, 1] -> posterior mean and log-variance, each (B, latent_dim)."""
        h = F.silu(self.enc_in(x * 2 - 1))
        for down in self.enc_downs:
            h = F.silu(down(h))
        mean, log_var = self.enc_out(self._condition(h.flatten(1), labels)).chunk(2, dim=1)
        return mean, log_var.clamp(-12, 8)

    def decoder_output(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Latents -> pixel logits (Bernoulli) or means (Gaussian), (B, C, H, W)."""
        h = F.silu(self.dec_in(self._condition(z, labels))).view(len(z), -1, self.base, self.base)
        for up in self.dec_ups:
            h = F.silu(up(h))
        return self.dec_out(h)

    def decode(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Latents (B, latent_dim) -> the decoder's mean image (B, C, H, W) in [0, 1], at the
        fitted temperature if there is one."""
        out = self.decoder_output(z, labels).float()
        if self.config.decoder == "gaussian":
            return out.clamp(0, 1)
        return torch.sigmoid(out / self.temperature if self.tempered else out)

    def draw_latents(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n latents (n, latent_dim) from the prior."""
        noise = torch.randn(n, self.latent_dim, generator=generator, device=self.dec_in.weight.device)
        if self.config.prior == "standard":
            return noise
        component = torch.multinomial(self.prior_weights, n, replacement=True, generator=generator)
        return self.component_latents(component, noise)

    def component_latents(self, component: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Standard normal noise (n, latent_dim) -> latents of the given mixture components (n,)."""
        return self.prior_means[component] + (self.prior_scales[component] @ noise.unsqueeze(-1)).squeeze(-1)

    def sample(self, n: int, labels: torch.Tensor | None = None,
               generator: torch.Generator | None = None) -> torch.Tensor:
        return self.decode(self.draw_latents(n, generator), labels)

    def reconstruct(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """The decoder's mean image at the posterior mean of each input."""
        mean, _ = self.encode(x, labels)
        return self.decode(mean, labels)

    def loss(self, x: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """beta-weighted negative ELBO in nats per image, with its reconstruction and KL terms
        and the plain (beta = 1) negative ELBO."""
        labels = labels if self.config.n_classes else None
        mean, log_var = self.encode(x, labels)
        z = mean + torch.randn_like(mean) * (0.5 * log_var).exp()  # reparameterisation
        out = self.decoder_output(z, labels).float()
        if self.config.decoder == "bernoulli":
            recon = F.binary_cross_entropy_with_logits(out, x, reduction="none").flatten(1).sum(1)
        else:
            squared = (out - x).pow(2).flatten(1)
            variance = squared.mean().clamp_min(1e-6)  # the optimal shared sigma^2
            recon = 0.5 * (squared / variance + math.log(2 * math.pi) + variance.log()).sum(1)
        mean, log_var = mean.float(), log_var.float()
        kl = 0.5 * (mean.pow(2) + log_var.exp() - 1 - log_var).sum(1)
        loss = (recon + self.config.beta * kl).mean()
        terms = {"recon": recon.detach().mean(), "kl": kl.detach().mean(),
                 "neg_elbo": (recon + kl).detach().mean()}
        return loss, terms
