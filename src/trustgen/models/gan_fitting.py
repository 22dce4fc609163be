"""What a GAN fits from its training images: its self-conditioning clusters before the first
step, and once training ends the averaged generator's batch-norm statistics and the clusters'
weights (`GAN` keeps the results as buffers).

An unconditional GAN can condition itself on clusters of its training images
(self-conditioning, Liu et al. 2020, arXiv:2006.10728, who cluster discriminator features and
re-cluster as training goes; here the pixels, once, before the first step). The fakes get
clusters in the training proportions, and the discriminator judges each fake against the real
images of its cluster, so the generator cannot drop a mode without being caught. The purer the
clusters, the closer this comes to a GAN given the true classes, so they are found with k-means
on a t-SNE map of the images (van der Maaten & Hinton 2008), which keeps neighbouring images
together, rather than on the pixels themselves, which cut the data into Voronoi cells (on mnist
with 20 clusters, 86% of the training images share their cluster with a majority of their own
digit, against 71% for k-means on the pixels). A real image is assigned to its cluster by the
nearest centre along the clusters' Fisher discriminants, a linear map fitted to the t-SNE
clusters (`GAN.conditions`).

A cluster's generator drops its cluster's rarest shapes, so clusters drawn in their training
shares would under-represent whatever is rare in many clusters; when training ends, the
clusters' weights are instead calibrated so that the samples fill fine cells of the training
images in the data's proportions (`mixing.py`). Measurements: docs/experiments/gan.md.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from torch import nn

from trustgen.models.gan import GAN
from trustgen.models.mixing import CALIBRATION_IMAGES, RowSample, calibrate_components, pixel_rows
from trustgen.runtime import one_native_thread

STANDING_BATCHES = 64  # latent batches the averaged generator's batch-norm statistics are measured on
CLUSTER_IMAGES = 10_000  # the clustering sees at most this many training images, drawn at random
# Fewer clusters for small sets: with a handful of images per cluster, the discriminator would
# judge each fake against those few images, pressing the generator to copy them.
IMAGES_PER_CLUSTER = 20
DISCRIMINANT_RIDGE = 1e-3  # of the mean pixel variance, added to the within-cluster scatter


def discriminant_directions(rows: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """The k - 1 directions along which the k labelled groups of rows (n, d) lie furthest apart
    relative to their spread (Fisher's linear discriminants), as columns (d, k - 1). A small
    ridge on the within-group scatter keeps it invertible when pixels are constant (an empty
    border) or groups hold identical images."""
    from scipy.linalg import eigh

    group_means = np.stack([rows[labels == group].mean(axis=0) for group in range(k)])
    shares = np.bincount(labels, minlength=k) / len(rows)
    spread = rows - group_means[labels]
    within = spread.T @ spread / len(rows)
    offsets = group_means - rows.mean(axis=0)
    between = (offsets * shares[:, None]).T @ offsets
    ridge = DISCRIMINANT_RIDGE * np.trace(within + between) / rows.shape[1]
    _, directions = eigh(between, within + ridge * np.eye(rows.shape[1]),
                         subset_by_index=[rows.shape[1] - (k - 1), rows.shape[1] - 1])
    return directions


def fit_clusters(model: GAN, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Cluster (at most CLUSTER_IMAGES of) the training images and fit the map that assigns
    an image to its cluster; each cluster's share of the images. Seeded, so the same data
    gives the same clusters. One native thread: see `one_native_thread`."""
    if not model.config.clusters:
        return
    with one_native_thread():
        _fit_clusters(model, batches)


def _fit_clusters(model: GAN, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> None:
    # imported here: only self-conditioned GANs need them
    from sklearn.cluster import KMeans
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    sample = RowSample(CLUSTER_IMAGES)
    for images, _ in batches:
        sample.add(pixel_rows(images))
    pixels = sample.rows().astype(np.float64)
    # Small sets get fewer clusters; the rest keep weight 0 and are never drawn.
    k = max(1, min(model.config.clusters, len(pixels) // IMAGES_PER_CLUSTER, len(np.unique(pixels, axis=0))))
    projection = torch.zeros_like(model.cluster_projection)
    centres = torch.zeros_like(model.cluster_centres)
    labels = np.zeros(len(pixels), dtype=np.int64)
    if k > 1:
        # k-means on a t-SNE map of the images, not on their pixels: t-SNE keeps each image's
        # neighbours together, so the clusters follow the data's shapes rather than cutting
        # it into Voronoi cells.
        pcs = PCA(min(50, *pixels.shape), random_state=0).fit_transform(pixels)
        perplexity = min(30.0, (len(pixels) - 1) / 3)
        embedded = TSNE(2, perplexity=perplexity, init="pca", random_state=0).fit_transform(pcs)
        labels = KMeans(n_clusters=k, n_init=4, random_state=0).fit_predict(embedded)
        directions = discriminant_directions(pixels, labels, k)
        projection[:, : directions.shape[1]] = torch.from_numpy(directions)
        projected = torch.from_numpy(pixels).float() @ projection
        for c in range(k):
            centres[c] = projected[torch.from_numpy(labels == c)].mean(dim=0)
    weights = torch.zeros_like(model.cluster_weights)
    weights[:k] = torch.from_numpy(np.bincount(labels, minlength=k) / len(pixels))
    model.cluster_projection.copy_(projection)
    model.cluster_centres.copy_(centres)
    model.cluster_weights.copy_(weights)


@torch.no_grad()
def finish_training(model: GAN, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """What the training loop calls once training ends, with batches of the training split:
    measure the averaged generator's own batch-norm statistics, then (self-conditioned)
    calibrate the weights its clusters are drawn with (`trustgen.models.mixing`). Private
    random generators draw the latents, so the training's random state, and with it an exact
    resume, is untouched."""
    device = model.generator.project.weight.device
    standing: list[tuple[int, torch.Tensor | None]] = []  # (batch size, conditions) per batch
    calibrating = bool(model.config.clusters and model.config.calibrate)
    sample = RowSample(CALIBRATION_IMAGES)
    assigned = torch.zeros(model.config.clusters, dtype=torch.float64)  # images per cluster
    for images, labels in batches:
        if len(standing) == STANDING_BATCHES and not calibrating:
            break
        conditions = model.conditions(images.to(device), labels.to(device))
        if len(standing) < STANDING_BATCHES:
            standing.append((len(images), conditions))
        if calibrating:
            sample.add(pixel_rows(images))
            assigned += torch.bincount(conditions.cpu(), minlength=model.config.clusters)
    measure_standing_statistics(model, standing)
    if calibrating:
        calibrate_cluster_weights(model, sample.rows(), (assigned / assigned.sum()).numpy())


def measure_standing_statistics(model: GAN, batches: list[tuple[int, torch.Tensor | None]]) -> None:
    """During training the average borrows the live generator's batch-norm statistics, which
    belong to other weights; re-measured over latent batches the size of the training
    batches, with their images' classes or clusters, FID on mnist improved by 3–6% in two
    10-minute runs."""
    norms = [m for m in model.ema.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    momenta = [norm.momentum for norm in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a cumulative average over all the batches
    device = model.generator.project.weight.device
    latents = torch.Generator(device).manual_seed(0)
    model.ema.train()
    for size, conditions in batches:
        model.ema(torch.randn(size, model.config.latent_dim, generator=latents, device=device), conditions)
    model.ema.eval()
    for norm, momentum in zip(norms, momenta, strict=True):
        norm.momentum = momentum


def calibrate_cluster_weights(model: GAN, data_rows: np.ndarray, shares: np.ndarray) -> None:
    """Each cluster's weight such that the samples fill the training images' cells in the
    data's proportions, from the clusters' `shares` of the training images (as the
    discriminator saw them assigned). On four 10-minute mnist runs the samples' class
    histogram moved towards uniform (KL 0.0017–0.0030 -> 0.0004–0.0015) and FID of 20,000
    samples fell by 21–32% (by likelihood alone; 30% with the prior on the one run
    measured both ways)."""
    device = model.generator.project.weight.device
    latents = torch.Generator(device).manual_seed(1)

    def draw(cluster: int, n: int) -> torch.Tensor:
        z = torch.randn(n, model.config.latent_dim, generator=latents, device=device)
        return model.decode(z, torch.full((n,), cluster, device=device))

    # A cluster no image is assigned to was never trained: its share, and weight, is 0.
    with one_native_thread():
        weights = calibrate_components(shares, data_rows, draw, model.config.image_size)
    model.cluster_weights.copy_(torch.from_numpy(weights))
