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
evenly, and latents drawn from its empty regions decode to blurred in-between shapes. Measured on
built-in mnist after 10 minutes of training: FID on the domain features 12.6 from N(0, I), 4.2
from a 10-component mixture (held-out reconstructions, the decoder's own limit: 2.1). How many
components is chosen by the data-copying test of Meehan et al. 2020 (arXiv:2004.05675) on codes
held out of the fit: a mixture's samples should lie as far from their nearest training code as
new images' codes do. Too few components leave holes, samples farther than new data; too many
describe the training codes themselves, samples nearer (in the limit, copies). The held-out
codes' likelihood, the criterion before it, peaks earlier (20 components on mnist, where the
test picks 80): in 16 dimensions a component's full covariance has 136 numbers to estimate from
the codes it holds, and held-out codes off a poorly estimated ellipsoid cost the likelihood dearly
long before the samples crowd the codes (per held-out code: -18.6 nats at 20 components, -21.8
at 80, -40.5 at 160). Refitted on three finished 10-minute mnist VAEs, FID / floor (three
sample seeds) 5.87 -> 5.18, 5.54 -> 5.33 and 5.63 -> 5.69, precision 0.85-0.87 -> 0.90; five
new runs with it, 4.85, 5.22, 5.15, 4.97 and 5.67 (five sample seeds; the temperature below then
fitted to grey levels), against 5.76, 5.73, 6.37.
A component's weight is its share of the codes; with `calibrate` it becomes instead the share
under which the samples fill fine cells of the training images in the data's proportions
(`mixing.py`), fitted last, after the temperature below.

What a sample shows is the Bernoulli decoder's mean image. Trained on codes drawn from the
posterior, the decoder hedges: where an edge may lie a pixel either way, its mean is grey, so
mean images are blurrier and greyer than any real digit. With `fit_temperature`, the decoder's
distribution is tempered, p(x|z)^(1/T) (for a Bernoulli, its logits divided by T), with the T
under which samples lie nearest the training images as whole images (least energy distance
between the two sets, `evaluate.images.energy_distance`), fitted once training ends, after the
prior. The likelihood and the ELBO stay those of T = 1. The same idea as sampling a flow or a
VAE at a reduced temperature (Kingma & Dhariwal 2018, arXiv:1807.03039; Vahdat & Kautz 2020,
arXiv:2007.03898), applied to the pixels instead of the latents. The first criterion matched
only how the pixel values are distributed (least Wasserstein-1 distance between the two grey-level
histograms): on mnist it chose T = 0.70–0.73 and FID / floor fell from 12.8 to 5.3 (two
10-minute runs). But a histogram does not see where the grey lies: a real digit's is a thin
anti-aliased edge, a sample's a blur across the stroke. Whole images choose T = 0.62–0.63 on
four finished 10-minute VAEs the histogram gave 0.71–0.72, and their FID / floor went from
5.22, 5.15, 4.97, 5.67 (five sample seeds; 5.38 over the first three on the first VAE) to 4.43,
4.33, 4.20, 4.65 (three sample seeds), recall 0.74–0.76 -> 0.78–0.80, precision 0.89–0.90 ->
0.885–0.89. Four new runs with it: 3.98, 4.05, 4.36 and 4.12 (five sample seeds; T = 0.58–0.63).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from trustgen.config import Config, check
from trustgen.evaluate.images import copying_statistic, energy_distance
from trustgen.models.gan import check_image_shape, stage_plan, stage_widths
from trustgen.models.mixing import (
    CALIBRATION_IMAGES,
    DECODE_BATCH,
    RowSample,
    calibrate_components,
    pixel_rows,
)

# Prior samples, and training images, the decoder's temperature is fitted on. With 2,000 of each,
# refits of one mnist VAE under three seeds ranged over T = 0.61-0.69; with 4,000, 0.625-0.64.
TEMPERATURE_SAMPLES = 4000
TEMPERATURE_PIXELS = 1024  # images are compared on at most this many pixels (the same random ones), to bound memory
COPYING_SAMPLES = 10_000  # the most mixture samples the copying statistic compares with the held-out codes


@dataclass(frozen=True, kw_only=True)
class VAEConfig(Config):
    image_size: int = 28
    channels: int = 1
    n_classes: int = 0  # > 0: conditional
    latent_dim: int = 16
    width: int = 32  # channels at full resolution, doubling with each halving; new runs: 48 (registry)
    max_width: int = 256
    beta: float = 1.0
    decoder: Literal["bernoulli", "gaussian"] = "bernoulli"
    prior: Literal["standard", "mixture"] = "standard"  # new runs: "mixture" (registry model defaults)
    prior_components: int = 10  # the most the mixture may use; new runs: 160 (registry model defaults)
    fit_temperature: bool = False  # Bernoulli decoder only; new runs: True (registry model defaults)
    # Unconditional with a mixture prior: the mixture's weights are calibrated to what each component
    # decodes to (trustgen.models.mixing); new runs: True (registry model defaults).
    calibrate: bool = False

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
        if config.prior == "mixture":  # N(0, I) until finish_training fits it
            k, d = config.prior_components, config.latent_dim
            self.register_buffer("prior_weights", torch.full((k,), 1 / k))
            self.register_buffer("prior_means", torch.zeros(k, d))
            self.register_buffer("prior_scales", torch.eye(d).repeat(k, 1, 1))  # Cholesky factors
        if self.tempered:  # 1 until finish_training fits it
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
        return self._component_latents(component, noise)

    def _component_latents(self, component: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Standard normal noise (n, latent_dim) -> latents of the given mixture components (n,)."""
        return self.prior_means[component] + (self.prior_scales[component] @ noise.unsqueeze(-1)).squeeze(-1)

    def sample(self, n: int, labels: torch.Tensor | None = None,
               generator: torch.Generator | None = None) -> torch.Tensor:
        return self.decode(self.draw_latents(n, generator), labels)

    @torch.no_grad()
    def finish_training(self, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """What the training loop calls once training ends, with batches of (images, labels) of
        the training split: fit the mixture prior to the images' codes, then the decoder's
        temperature to their pixel values. Nothing to do for a standard prior and no temperature.
        A private random generator draws the samples, so an exact resume is untouched."""
        if self.config.prior == "standard" and not self.tempered:
            return
        device = self.dec_in.weight.device
        was_training = self.training
        self.eval()
        codes, classes = [], torch.zeros(max(1, self.config.n_classes))
        calibrated = self.config.calibrate and self.config.prior == "mixture" and not self.config.n_classes
        sample = RowSample(CALIBRATION_IMAGES) if calibrated else None
        compared = RowSample(TEMPERATURE_SAMPLES) if self.tempered else None
        compared_pixels = self._temperature_pixels()
        for x, labels in batches:
            if sample is not None:
                sample.add(pixel_rows(x))
            if self.config.prior == "mixture":
                condition = labels.to(device) if self.config.n_classes else None
                codes.append(self.encode(x.to(device), condition)[0].cpu())
            if compared is not None:
                compared.add(x.flatten(1)[:, compared_pixels])
                if self.config.n_classes:
                    classes += torch.bincount(labels, minlength=self.config.n_classes)
        if self.config.prior == "mixture":
            self._fit_mixture(torch.cat(codes).double().numpy())
        if compared is not None:
            self._fit_temperature(torch.from_numpy(compared.rows()), classes)
        if sample is not None:
            self._calibrate_mixture_weights(sample.rows())
        self.train(was_training)

    def _fit_mixture(self, codes: np.ndarray) -> None:
        """The mixture prior from the posterior means of the training images (a handful of
        images gets fewer components)."""
        from sklearn.mixture import GaussianMixture

        def fit(k: int, points: np.ndarray) -> GaussianMixture:
            return GaussianMixture(k, covariance_type="full", reg_covar=1e-4, random_state=0).fit(points)

        # The number of components: of most, most/2, ..., most/16 (with at least two codes each),
        # the one whose mixture, fitted to four fifths of the codes, draws samples as far from
        # those codes as the held-out fifth lies (the copying statistic nearest 1/2).
        most = self.config.prior_components
        order = np.random.default_rng(0).permutation(len(codes))
        held_out, kept = codes[order[: len(codes) // 5]], codes[order[len(codes) // 5:]]
        candidates = sorted({most >> halvings for halvings in range(5)} & set(range(1, len(kept) // 2 + 1))) or [1]
        best = candidates[0]
        if len(held_out) and len(candidates) > 1:
            draws = min(COPYING_SAMPLES, 4 * len(held_out))
            best = min(candidates, key=lambda k: abs(
                copying_statistic(fit(k, kept).sample(draws)[0], held_out, kept) - 0.5))
        mixture = fit(best, codes)
        unused = most - best  # zero weight: never drawn
        self.prior_weights.copy_(torch.from_numpy(np.concatenate([mixture.weights_, np.zeros(unused)])))
        self.prior_means.zero_()[:best] = torch.from_numpy(mixture.means_)
        self.prior_scales.copy_(torch.eye(self.latent_dim).repeat(most, 1, 1))
        self.prior_scales[:best] = torch.from_numpy(np.linalg.cholesky(mixture.covariances_))

    def _calibrate_mixture_weights(self, data_rows: np.ndarray) -> None:
        """Each component's weight such that the samples, at the fitted temperature, fill the
        training images' cells in the data's proportions (`trustgen.models.mixing`): the mixture
        weighs a component by its share of the codes, not of what it decodes to. By likelihood
        alone (before the prior on the shares), on two mnist VAEs: FID of 20,000 samples 1.13 ->
        1.05 and the class histogram's KL 0.0023 -> 0.0015 on one, FID / floor over five sample
        seeds 6.44 -> 6.10 on the other."""
        generator = torch.Generator(self.dec_in.weight.device).manual_seed(1)

        def draw(component: int, n: int) -> torch.Tensor:
            noise = torch.randn(n, self.latent_dim, generator=generator, device=generator.device)
            return self.decode(self._component_latents(torch.full((n,), component, device=generator.device), noise))

        shares = self.prior_weights.double().cpu().numpy()  # the mixture's, fitted to the codes
        weights = calibrate_components(shares, data_rows, draw, self.config.image_size)
        self.prior_weights.copy_(torch.from_numpy(weights))

    def _temperature_pixels(self) -> torch.Tensor:
        """The pixels (indices into a flattened image) samples and training images are compared
        on when the temperature is fitted: all of them, or a fixed random TEMPERATURE_PIXELS."""
        pixels = self.config.channels * self.config.image_size ** 2
        if pixels <= TEMPERATURE_PIXELS:
            return torch.arange(pixels)
        return torch.randperm(pixels, generator=torch.Generator().manual_seed(0))[:TEMPERATURE_PIXELS].sort().values

    @torch.no_grad()
    def _fit_temperature(self, real: torch.Tensor, classes: torch.Tensor) -> None:
        """The temperature whose samples are nearest the training images as whole images: least
        energy distance between the two (`real`: training images' rows of `_temperature_pixels`;
        `classes`: how many images of each class, for a conditional model)."""
        from scipy.optimize import minimize_scalar

        device = self.dec_in.weight.device
        generator = torch.Generator(device).manual_seed(0)
        labels = None
        if self.config.n_classes:
            labels = torch.multinomial(classes, TEMPERATURE_SAMPLES, replacement=True,
                                       generator=torch.Generator().manual_seed(0)).to(device)
        z = self.draw_latents(TEMPERATURE_SAMPLES, generator)
        pixels = self._temperature_pixels().to(device)
        logits = torch.cat([
            self.decoder_output(z[start:start + DECODE_BATCH], None if labels is None else labels[start:start + DECODE_BATCH])
            .float().flatten(1)[:, pixels].cpu()
            for start in range(0, TEMPERATURE_SAMPLES, DECODE_BATCH)])
        real = real.float()

        def distance(temperature: float) -> float:
            return energy_distance(torch.sigmoid(logits / temperature), real)

        # Brent's method in a bracket, not a grid: the distance falls and then rises with T (on
        # mnist VAEs, from 0.030 at T = 0.1 to 0.0025 at 0.6 and 0.158 at 2), and each evaluation
        # costs ~0.6 s at 4,000 x 784 pixels.
        best = minimize_scalar(distance, bounds=(0.1, 2.0), method="bounded", options={"xatol": 0.005})
        self.temperature.fill_(round(float(best.x), 3))

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
