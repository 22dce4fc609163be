"""What a VAE fits from its training images once training ends (`VAE` keeps the results as
buffers): the mixture prior, the decoder's sampling temperature and the mixture's weights.

1. **The mixture prior** (Ghosh et al. 2020, arXiv:1903.12436): a Gaussian mixture with full
   covariances fitted to the posterior means of the training images. How many components is
   chosen by the data-copying test of Meehan et al. 2020 (arXiv:2004.05675) on codes held out of
   the fit: a mixture's samples should lie as far from their nearest training code as new
   images' codes do. Too few components leave holes (samples farther than new data); too many
   describe the training codes themselves (samples nearer; in the limit, copies). The held-out
   codes' likelihood peaks earlier: in 16 dimensions a component's full covariance has 136
   numbers to estimate from the codes it holds, and held-out codes off a poorly estimated
   ellipsoid cost the likelihood long before samples crowd the codes.
2. **The temperature**: trained on codes drawn from the posterior, the Bernoulli decoder hedges
   (where an edge may lie a pixel either way, its mean is grey), so mean images are blurrier
   than any real digit. Samples show p(x|z)^(1/T) with the T under which they lie nearest the
   training images as whole images: least energy distance between the two sets (Székely &
   Rizzo 2013). A grey-level histogram alone does not see where the grey lies. The same idea as
   sampling a flow or a VAE at a reduced temperature (Kingma & Dhariwal 2018, arXiv:1807.03039;
   Vahdat & Kautz 2020, arXiv:2007.03898), applied to the pixels instead of the latents.
3. **Calibrated weights** (unconditional mixtures only): a component's weight becomes the share
   under which the samples fill fine cells of the training images in the data's proportions
   (`mixing.py`), fitted last, at the fitted temperature.

Private random generators draw every sample, so the training's random state, and with it an
exact resume, is untouched. Measurements: docs/experiments/vae.md.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch

from trustgen.models.distances import copying_statistic, energy_distance
from trustgen.models.mixing import (
    CALIBRATION_IMAGES,
    DECODE_BATCH,
    RowSample,
    calibrate_components,
    pixel_rows,
)
from trustgen.models.vae import VAE, VAEConfig

# Prior samples, and training images, the decoder's temperature is fitted on. With 2,000 of each,
# refits of one mnist VAE under three seeds ranged over T = 0.61-0.69; with 4,000, 0.625-0.64.
TEMPERATURE_SAMPLES = 4000
TEMPERATURE_PIXELS = 1024  # images are compared on at most this many pixels (the same random ones), to bound memory
COPYING_SAMPLES = 10_000  # the most mixture samples the copying statistic compares with the held-out codes


@torch.no_grad()
def finish_training(model: VAE, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Fit, from batches of (images, labels) of the training split, the mixture prior to the
    images' codes, then the decoder's temperature, then the mixture's weights. Nothing to do for
    a standard prior and no temperature."""
    config = model.config
    if config.prior == "standard" and not model.tempered:
        return
    device = model.dec_in.weight.device
    was_training = model.training
    model.eval()
    codes, classes = [], torch.zeros(max(1, config.n_classes))
    calibrated = config.calibrate and config.prior == "mixture" and not config.n_classes
    sample = RowSample(CALIBRATION_IMAGES) if calibrated else None
    compared = RowSample(TEMPERATURE_SAMPLES) if model.tempered else None
    compared_pixels = temperature_pixels(config)
    for x, labels in batches:
        if sample is not None:
            sample.add(pixel_rows(x))
        if config.prior == "mixture":
            condition = labels.to(device) if config.n_classes else None
            codes.append(model.encode(x.to(device), condition)[0].cpu())
        if compared is not None:
            compared.add(x.flatten(1)[:, compared_pixels])
            if config.n_classes:
                classes += torch.bincount(labels, minlength=config.n_classes)
    if config.prior == "mixture":
        fit_mixture(model, torch.cat(codes).double().numpy())
    if compared is not None:
        fit_temperature(model, torch.from_numpy(compared.rows()), classes)
    if sample is not None:
        calibrate_mixture_weights(model, sample.rows())
    model.train(was_training)


def fit_mixture(model: VAE, codes: np.ndarray) -> None:
    """The mixture prior from the posterior means of the training images (a handful of images
    gets fewer components)."""
    from sklearn.mixture import GaussianMixture

    def fit(k: int, points: np.ndarray) -> GaussianMixture:
        return GaussianMixture(k, covariance_type="full", reg_covar=1e-4, random_state=0).fit(points)

    # The number of components: of most, most/2, ..., most/16 (with at least two codes each),
    # the one whose mixture, fitted to four fifths of the codes, draws samples as far from
    # those codes as the held-out fifth lies (the copying statistic nearest 1/2).
    most = model.config.prior_components
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
    model.prior_weights.copy_(torch.from_numpy(np.concatenate([mixture.weights_, np.zeros(unused)])))
    model.prior_means.zero_()[:best] = torch.from_numpy(mixture.means_)
    model.prior_scales.copy_(torch.eye(model.latent_dim).repeat(most, 1, 1))
    model.prior_scales[:best] = torch.from_numpy(np.linalg.cholesky(mixture.covariances_))


def calibrate_mixture_weights(model: VAE, data_rows: np.ndarray) -> None:
    """Each component's weight such that the samples, at the fitted temperature, fill the
    training images' cells in the data's proportions (`trustgen.models.mixing`): the mixture
    weighs a component by its share of the codes, not of what it decodes to."""
    generator = torch.Generator(model.dec_in.weight.device).manual_seed(1)

    def draw(component: int, n: int) -> torch.Tensor:
        noise = torch.randn(n, model.latent_dim, generator=generator, device=generator.device)
        return model.decode(model.component_latents(torch.full((n,), component, device=generator.device), noise))

    shares = model.prior_weights.double().cpu().numpy()  # the mixture's, fitted to the codes
    weights = calibrate_components(shares, data_rows, draw, model.config.image_size)
    model.prior_weights.copy_(torch.from_numpy(weights))


def temperature_pixels(config: VAEConfig) -> torch.Tensor:
    """The pixels (indices into a flattened image) samples and training images are compared on
    when the temperature is fitted: all of them, or a fixed random TEMPERATURE_PIXELS."""
    pixels = config.channels * config.image_size ** 2
    if pixels <= TEMPERATURE_PIXELS:
        return torch.arange(pixels)
    return torch.randperm(pixels, generator=torch.Generator().manual_seed(0))[:TEMPERATURE_PIXELS].sort().values


@torch.no_grad()
def fit_temperature(model: VAE, real: torch.Tensor, classes: torch.Tensor) -> None:
    """The temperature whose samples are nearest the training images as whole images: least
    energy distance between the two (`real`: training images' rows of `temperature_pixels`;
    `classes`: how many images of each class, for a conditional model)."""
    from scipy.optimize import minimize_scalar

    device = model.dec_in.weight.device
    generator = torch.Generator(device).manual_seed(0)
    labels = None
    if model.config.n_classes:
        labels = torch.multinomial(classes, TEMPERATURE_SAMPLES, replacement=True,
                                   generator=torch.Generator().manual_seed(0)).to(device)
    z = model.draw_latents(TEMPERATURE_SAMPLES, generator)
    pixels = temperature_pixels(model.config).to(device)
    logits = torch.cat([
        model.decoder_output(z[start:start + DECODE_BATCH], None if labels is None else labels[start:start + DECODE_BATCH])
        .float().flatten(1)[:, pixels].cpu()
        for start in range(0, TEMPERATURE_SAMPLES, DECODE_BATCH)])
    real = real.float()

    def distance(temperature: float) -> float:
        return energy_distance(torch.sigmoid(logits / temperature), real)

    # Brent's method in a bracket, not a grid: the distance falls and then rises with T (on
    # mnist VAEs, from 0.030 at T = 0.1 to 0.0025 at 0.6 and 0.158 at 2), and each evaluation
    # costs ~0.6 s at 4,000 x 784 pixels.
    best = minimize_scalar(distance, bounds=(0.1, 2.0), method="bounded", options={"xatol": 0.005})
    model.temperature.fill_(round(float(best.x), 3))
