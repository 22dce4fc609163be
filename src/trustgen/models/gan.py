"""A DCGAN-style generative adversarial network for small images, readable top to bottom.

The architecture is DCGAN's (Radford et al. 2016, arXiv:1511.06434): the generator maps a
latent vector to a small grid and doubles it stage by stage; the discriminator
halves it with strided convolutions. Both are scaled by the image size. Around it sit the
stabilisers that make GANs train on a few thousand images:

- spectral normalisation of every discriminator layer (Miyato et al. 2018, arXiv:1802.05957);
- the hinge loss (Lim & Ye 2017; Miyato et al. 2018) or the non-saturating loss (Goodfellow
  et al. 2014);
- the R1 gradient penalty on real images (Mescheder et al. 2018, arXiv:1801.04406), applied
  lazily every few steps with a scaled weight (Karras et al. 2020, arXiv:1912.04958);
- differentiable augmentation of real and generated images before the discriminator
  (DiffAugment, Zhao et al. 2020, arXiv:2006.10738): translation and cutout, colour for RGB;
- an exponential moving average of the generator's weights (Yazıcı et al. 2019,
  arXiv:1806.04498); samples always come from the average, with batch-norm statistics measured
  on the average itself once training ends ("standing statistics", Brock et al. 2019,
  arXiv:1809.11096).

Class-conditional generation uses a learned class embedding beside the latent vector in the
generator and the projection discriminator (Miyato & Koyama 2018, arXiv:1802.05637).

An unconditional GAN can condition itself the same way on clusters of its training images
(self-conditioning, Liu et al. 2020, arXiv:2006.10728): to a user the model stays
unconditional, its latent vector the noise joined to the embedding of a cluster drawn by the
clusters' weights. The clusters and their weights are fitted by `gan_fitting.py` and kept here
as buffers; `conditions` assigns real images to their clusters during training.

Images go in and come out in [0, 1]; inside, the networks work in [-1, 1].
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from trustgen.config import Config, check
from trustgen.models.mixing import comparison_side, pixel_rows


def stage_plan(image_size: int) -> tuple[int, int]:
    """(base grid size, number of doublings): 28 -> (7, 2), 64 -> (4, 4), 8 -> (4, 1)."""
    base, stages = image_size, 0
    while base % 2 == 0 and base // 2 >= 4:
        base //= 2
        stages += 1
    return base, stages


def stage_widths(image_size: int, width: int, max_width: int) -> list[int]:
    """Channels at each grid size from the base grid up to the full image: `width` at full
    resolution, doubling with each halving of the grid, at most `max_width`."""
    _, stages = stage_plan(image_size)
    return [min(max_width, width * 2 ** (stages - i)) for i in range(stages + 1)]


def check_image_shape(owner: str, image_size: int, channels: int) -> None:
    check(8 <= image_size <= 512 and image_size % 4 == 0,
          f"{owner}.image_size must be a multiple of 4 between 8 and 512, got {image_size}.")
    check(channels in (1, 3), f"{owner}.channels must be 1 (grayscale) or 3 (RGB), got {channels}.")


@dataclass(frozen=True, kw_only=True)
class GANConfig(Config):
    image_size: int = 28
    channels: int = 1
    n_classes: int = 0  # > 0: class-conditional
    # > 0: an unconditional GAN conditions itself on this many clusters of its training images
    # (0 for a class-conditional one). On mnist, FID/floor of 10-minute runs fell from ~6 to
    # ~3.3 with 20 clusters, the purest of 10-40 (docs/experiments/gan.md).
    clusters: int = 20
    # Self-conditioned: when training ends, the clusters' weights are calibrated to what each
    # draws (trustgen.models.mixing).
    calibrate: bool = True
    latent_dim: int = 64
    width: int = 32  # generator channels at full resolution; each halving of the grid doubles them
    discriminator_width: int = 32  # the same for the discriminator
    max_width: int = 256
    loss: Literal["hinge", "nonsaturating"] = "hinge"
    r1_gamma: float = 0.1  # 0 turns the penalty off
    r1_interval: int = 4
    ema_decay: float = 0.999
    # Spectral normalization of the discriminator's layers (Miyato et al. 2018). Private training
    # turns it off: its power-iteration state has no per-example gradient (Opacus refuses it),
    # and per-example clipping bounds the discriminator's updates instead.
    spectral_norm: bool = True
    # DiffAugment policies, comma-separated, e.g. "translation,cutout". Off by default: on mnist's
    # 4,000 digits and a 3-minute budget, translation raised FID from 6.2 to 11.6 (bench notes);
    # turn it on for smaller sets or much longer runs, where the discriminator overfits.
    augment: str = ""

    def __post_init__(self) -> None:
        check_image_shape("GANConfig", self.image_size, self.channels)
        check(self.n_classes >= 0, f"GANConfig.n_classes must not be negative, got {self.n_classes}.")
        check(self.clusters >= 0, f"GANConfig.clusters must not be negative, got {self.clusters}.")
        check(not (self.n_classes and self.clusters),
              "GANConfig.clusters self-conditions an unconditional GAN; a class-conditional one takes none.")
        check(self.latent_dim >= 1 and 1 <= self.width <= self.max_width and self.discriminator_width >= 1,
              "GANConfig.latent_dim and the widths must be positive and max_width at least width.")
        check(self.r1_gamma >= 0, f"GANConfig.r1_gamma must not be negative, got {self.r1_gamma}.")
        check(self.r1_interval >= 1, f"GANConfig.r1_interval must be at least 1, got {self.r1_interval}.")
        check(0 <= self.ema_decay < 1, f"GANConfig.ema_decay must lie in [0, 1), got {self.ema_decay}.")
        unknown = set(augment_policies(self.augment)) - set(AUGMENTATIONS)
        check(not unknown, f"GANConfig.augment knows {', '.join(AUGMENTATIONS)}, not {', '.join(sorted(unknown))}.")

    @property
    def label_count(self) -> int:
        """How many labels the networks embed: classes, clusters or none."""
        return self.n_classes or self.clusters

    def widths(self) -> list[int]:
        return stage_widths(self.image_size, self.width, self.max_width)

    def discriminator_widths(self) -> list[int]:
        return stage_widths(self.image_size, self.discriminator_width, max(self.max_width, self.discriminator_width))


# -- differentiable augmentation --------------------------------------------------------------

def augment_policies(text: str) -> list[str]:
    return [p.strip() for p in text.split(",") if p.strip()]


def _translation(x: torch.Tensor, ratio: float = 0.125) -> torch.Tensor:
    """Shift each image by up to ratio * size pixels, filling with black (-1)."""
    B, _, H, W = x.shape
    shift = max(1, round(H * ratio))
    padded = F.pad(x, (shift, shift, shift, shift), value=-1.0)
    dy = torch.randint(0, 2 * shift + 1, (B, 1, 1), device=x.device)
    dx = torch.randint(0, 2 * shift + 1, (B, 1, 1), device=x.device)
    rows = (torch.arange(H, device=x.device).view(1, H, 1) + dy).expand(B, H, W)
    cols = (torch.arange(W, device=x.device).view(1, 1, W) + dx).expand(B, H, W)
    batch = torch.arange(B, device=x.device).view(B, 1, 1).expand(B, H, W)
    return padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2)


def _cutout(x: torch.Tensor, ratio: float = 0.5) -> torch.Tensor:
    """Black out one square of ratio * size per image, at a random place."""
    B, _, H, W = x.shape
    size = max(1, round(H * ratio))
    cy = torch.randint(0, H, (B, 1, 1), device=x.device)
    cx = torch.randint(0, W, (B, 1, 1), device=x.device)
    ys = torch.arange(H, device=x.device).view(1, H, 1)
    xs = torch.arange(W, device=x.device).view(1, 1, W)
    inside = ((ys - cy).abs() <= size // 2) & ((xs - cx).abs() <= size // 2)
    return torch.where(inside.unsqueeze(1), torch.full_like(x, -1.0), x)


def _color(x: torch.Tensor) -> torch.Tensor:
    """Random brightness, saturation and contrast (for RGB images)."""
    B = x.shape[0]
    x = x + (torch.rand(B, 1, 1, 1, device=x.device) - 0.5)
    mean = x.mean(dim=1, keepdim=True)
    x = (x - mean) * (torch.rand(B, 1, 1, 1, device=x.device) * 2) + mean
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * (torch.rand(B, 1, 1, 1, device=x.device) + 0.5) + mean


AUGMENTATIONS = {"translation": _translation, "cutout": _cutout, "color": _color}


def diff_augment(x: torch.Tensor, policies: list[str]) -> torch.Tensor:
    for name in policies:
        x = AUGMENTATIONS[name](x)
    return x


# -- the networks -------------------------------------------------------------------------------

class Generator(nn.Module):
    """Latent (B, latent_dim) + labels (B,) -> images (B, C, H, W) in [-1, 1]. A conditioned
    generator also takes latents that already hold their label's embedding, (B, 2 * latent_dim)."""

    def __init__(self, config: GANConfig) -> None:
        super().__init__()
        self.config = config
        base, _ = stage_plan(config.image_size)
        widths = config.widths()
        self.base = base
        self.label_embed = nn.Embedding(config.label_count, config.latent_dim) if config.label_count else None
        in_dim = config.latent_dim * (2 if config.label_count else 1)
        self.project = nn.Linear(in_dim, widths[0] * base * base)
        self.project_norm = nn.BatchNorm2d(widths[0])
        # Nearest-neighbour upsampling then a 3x3 convolution: no checkerboard artefacts of
        # strided transposed convolutions (Odena et al. 2016, distill.pub/2016/deconv-checkerboard),
        # and fewer multiply-adds than a 4x4 transposed convolution.
        self.ups = nn.ModuleList(
            nn.Sequential(nn.Upsample(scale_factor=2), nn.Conv2d(w_in, w_out, 3, padding=1, bias=False),
                          nn.BatchNorm2d(w_out), nn.ReLU())
            for w_in, w_out in itertools.pairwise(widths))
        self.to_image = nn.Conv2d(widths[-1], config.channels, 3, padding=1)

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if labels is not None:
            z = torch.cat([z, self.label_embed(labels)], dim=1)
        x = self.project(z).view(len(z), -1, self.base, self.base)  # (B, widths[0], base, base)
        x = F.relu(self.project_norm(x))
        for up in self.ups:
            x = up(x)
        return torch.tanh(self.to_image(x))


class Discriminator(nn.Module):
    """Images (B, C, H, W) in [-1, 1] [+ labels] -> one realness score per image (B,)."""

    def __init__(self, config: GANConfig) -> None:
        super().__init__()
        widths = list(reversed(config.discriminator_widths()))  # full resolution first
        base, _ = stage_plan(config.image_size)
        normed = spectral_norm if config.spectral_norm else (lambda layer: layer)
        self.from_image = normed(nn.Conv2d(config.channels, widths[0], 3, padding=1))
        self.downs = nn.ModuleList(
            normed(nn.Conv2d(w_in, w_out, 4, stride=2, padding=1))
            for w_in, w_out in itertools.pairwise(widths))
        features = widths[-1]
        self.hidden = normed(nn.Linear(features * base * base, features))
        self.score = normed(nn.Linear(features, 1))
        # Projection: the score gains <embed(y), h>, pulling h towards its class's direction.
        self.label_embed = normed(nn.Embedding(config.label_count, features)) if config.label_count else None

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        x = F.leaky_relu(self.from_image(x), 0.2)
        for down in self.downs:
            x = F.leaky_relu(down(x), 0.2)
        h = F.leaky_relu(self.hidden(x.flatten(1)), 0.2)
        score = self.score(h).squeeze(1)
        if self.label_embed is not None:
            score = score + (self.label_embed(labels) * h).sum(dim=1)
        return score


class GAN(nn.Module):
    """Generator, discriminator and the generator's moving average; the losses of both players.

    `training/adversarial.py` alternates the two optimizers; everything the game itself
    computes (augmentation, losses, the R1 penalty, the average, the clusters) lives here.
    """

    family = "gan"

    def __init__(self, config: GANConfig) -> None:
        super().__init__()
        self.config = config
        self.generator = Generator(config)
        self.discriminator = Discriminator(config)
        self.ema = copy.deepcopy(self.generator).requires_grad_(False)
        self.policies = augment_policies(config.augment)
        if config.clusters:
            side = comparison_side(config.image_size)
            # Saved with the weights: sampling needs the proportions, a resumed run the centres.
            # Images are assigned in a linear projection of their pixels that separates the clusters.
            self.register_buffer("cluster_projection", torch.zeros(config.channels * side * side, config.clusters))
            self.register_buffer("cluster_centres", torch.zeros(config.clusters, config.clusters))
            self.register_buffer("cluster_weights", torch.full((config.clusters,), 1 / config.clusters))

    @property
    def latent_dim(self) -> int:
        """Size of the latent vectors `draw_latents` gives and `decode` takes."""
        return self.config.latent_dim * (2 if self.config.clusters else 1)

    # ---- sampling (always from the moving average) ----
    def decode(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Latents (B, latent_dim) [+ class ids] -> images (B, C, H, W) in [0, 1]."""
        return (self.ema(z, labels) + 1) / 2

    def draw_latents(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n latents (n, latent_dim) from the prior: N(0, I), joined for a self-conditioned GAN
        to the embeddings of clusters drawn in their training proportions."""
        device = self.generator.project.weight.device
        z = torch.randn(n, self.config.latent_dim, generator=generator, device=device)
        if not self.config.clusters:
            return z
        clusters = torch.multinomial(self.cluster_weights, n, replacement=True, generator=generator)
        return torch.cat([z, self.ema.label_embed(clusters)], dim=1)

    def sample(self, n: int, labels: torch.Tensor | None = None,
               generator: torch.Generator | None = None) -> torch.Tensor:
        return self.decode(self.draw_latents(n, generator), labels)

    def conditions(self, real: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor | None:
        """The labels the networks condition on for a batch of real images in [0, 1]: the data's
        classes, the images' nearest clusters, or none."""
        if self.config.n_classes:
            return labels
        if not self.config.clusters:
            return None
        distances = torch.cdist(pixel_rows(real) @ self.cluster_projection, self.cluster_centres)
        # Unused clusters (weight 0: a small set) hold zero centres; never assign to them.
        distances[:, self.cluster_weights == 0] = torch.inf
        return distances.argmin(dim=1)

    # ---- the game: labels come from `conditions` ----
    def _fake(self, batch_size: int, labels: torch.Tensor | None, device: torch.device) -> torch.Tensor:
        z = torch.randn(batch_size, self.config.latent_dim, device=device)
        return self.generator(z, labels)

    def _score(self, x: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        return self.discriminator(diff_augment(x, self.policies), labels)

    def discriminator_loss(self, real: torch.Tensor, labels: torch.Tensor | None) -> tuple[torch.Tensor, dict]:
        """Real images in [0, 1]; the discriminator's loss against fresh fakes (no generator grads)."""
        real = real * 2 - 1
        with torch.no_grad():
            fake = self._fake(len(real), labels, real.device)
        real_score, fake_score = self._score(real, labels), self._score(fake, labels)
        if self.config.loss == "hinge":
            loss = F.relu(1 - real_score).mean() + F.relu(1 + fake_score).mean()
        else:
            loss = F.softplus(-real_score).mean() + F.softplus(fake_score).mean()
        return loss, {"d_real": real_score.detach().float().mean(), "d_fake": fake_score.detach().float().mean()}

    def r1_penalty(self, real: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """gamma/2 * E||grad_x D(x)||^2 on real images, times the lazy interval."""
        real = (real * 2 - 1).detach().requires_grad_(True)
        score = self.discriminator(real, labels)  # unaugmented: the penalty is on the data itself
        (grad,) = torch.autograd.grad(score.sum(), real, create_graph=True)
        return self.config.r1_gamma / 2 * grad.pow(2).sum(dim=(1, 2, 3)).mean() * self.config.r1_interval

    def generator_loss(self, batch_size: int, labels: torch.Tensor | None, device: torch.device) -> torch.Tensor:
        fake_score = self._score(self._fake(batch_size, labels, device), labels)
        if self.config.loss == "hinge":
            return -fake_score.mean()
        return F.softplus(-fake_score).mean()

    @torch.no_grad()
    def update_ema(self, decay: float | None = None) -> None:
        decay = self.config.ema_decay if decay is None else decay
        for average, current in zip(self.ema.parameters(), self.generator.parameters(), strict=True):
            average.lerp_(current, 1 - decay)
        for average, current in zip(self.ema.buffers(), self.generator.buffers(), strict=True):
            average.copy_(current)

    def train(self, mode: bool = True) -> GAN:
        super().train(mode)
        self.ema.eval()  # the average is only ever sampled
        return self
