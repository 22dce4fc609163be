"""Image quality on the features of a domain classifier, beside the floor real images reach.

FID, KID, precision/recall and density/coverage all compare two sets of images in some feature
space. The usual space is an ImageNet Inception network, but its weights cannot be downloaded
here (no network at run time) and it was never trained on 28x28 digits, so its features say
little about them. Instead a small CNN is trained on the dataset's own training split (once;
cached by the content hash of the data) and its 128-wide penultimate layer is the feature space.
A set without labels trains the same CNN to tell how far an image was rotated (Gidaris et al.
2018, arXiv:1803.07728), which still needs features of shape, stroke and layout.

These numbers have no absolute scale, and FID and precision/recall also depend on how many
images are compared (Chong & Forsyth 2020, arXiv:1911.07023). So every report carries a *floor*:
the same metrics between the held-out real images and the training split, i.e. what a generator
that samples the true distribution would score. The model is measured on all its samples and on
a random subset as large as the floor's, and `fid_ratio` compares the two at equal n.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from trustgen.cache import cache_dir
from trustgen.config import TrainConfig
from trustgen.data.images import ImageDataset, ImageSplit
from trustgen.errors import TrustgenError
from trustgen.io import (
    atomic_write_bytes,
    load_weights,
    read_json,
    read_tensors,
    tensors_to_bytes,
    write_json,
)
from trustgen.models.distances import exact_distances, rows_per_chunk
from trustgen.progress import progress_bar
from trustgen.runtime import bf16_is_fast, private_rng
from trustgen.training.trainer import train_steps

# Part of the cache key: change it whenever the architecture or the training recipe changes,
# so that a cached classifier is never one that this code would not have trained.
CLASSIFIER_VERSION = 2  # 2: trained by the one training loop (warmup + cosine, not one-cycle)
WIDTHS = (32, 64, 128)
GRID = 4  # the last feature map is average-pooled to GRID x GRID, whatever the image size
FEATURE_DIM = 128
MIN_IMAGE_SIZE = 8
EPOCHS = 15
MAX_STEPS = 3000  # bounds the training time on large folders (~384k images seen)
BATCH_SIZE = 128
LEARNING_RATE = 3e-3
WARMUP_FRACTION = 0.2
LABEL_SMOOTHING = 0.1
MAX_SHIFT = 2
TRAIN_SEED = 0
EVAL_SEED = 0
PR_K = 3  # Kynkäänniemi et al. use k=3
DC_K = 5  # Naeem et al. use k=5
MIN_SAMPLES = max(PR_K, DC_K) + 1  # each set needs k neighbours besides the point itself
KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000


# -- the domain classifier ------------------------------------------------------------------

class DomainClassifier(nn.Module):
    """Three conv blocks (max-pooled while the map is at least 8 wide), average pooling to a
    4x4 grid, a 128-wide feature layer and a linear head: any channel count, any size >= 8."""

    loss_terms = ()

    def __init__(self, channels: int, image_size: int, outputs: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        size, width_in = image_size, channels
        for width in WIDTHS:
            layers += [nn.Conv2d(width_in, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
            if size >= 2 * GRID:
                layers.append(nn.MaxPool2d(2))
                size //= 2
            width_in = width
        self.conv = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(GRID), nn.Flatten())
        self.embed = nn.Sequential(nn.Linear(width_in * GRID * GRID, FEATURE_DIM), nn.ReLU())
        self.head = nn.Sequential(nn.Dropout(0.3), nn.Linear(FEATURE_DIM, outputs))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, C, H, W) in [-1, 1] -> features (B, FEATURE_DIM), logits (B, outputs)."""
        features = self.embed(self.conv(x))
        return features, self.head(features)

    def loss(self, x: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Cross-entropy with label smoothing, in float32 (what the trainer minimises)."""
        return F.cross_entropy(self(x)[1].float(), target, label_smoothing=LABEL_SMOOTHING), {}


def _scale(images: torch.Tensor) -> torch.Tensor:
    return images.float() / 127.5 - 1


def _shift(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Move each image by its own random offset of up to MAX_SHIFT pixels each way; the border
    is repeated into the uncovered edge."""
    b, _, h, w = x.shape
    padded = F.pad(x, (MAX_SHIFT,) * 4, mode="replicate")
    dy = torch.randint(0, 2 * MAX_SHIFT + 1, (b,), generator=generator)
    dx = torch.randint(0, 2 * MAX_SHIFT + 1, (b,), generator=generator)
    rows = (dy[:, None] + torch.arange(h))[:, :, None]  # (B, H, 1)
    cols = (dx[:, None] + torch.arange(w))[:, None, :]  # (B, 1, W)
    return padded[torch.arange(b)[:, None, None], :, rows, cols].permute(0, 3, 1, 2)  # (B, H, W, C) -> (B, C, H, W)


def _rotate(x: torch.Tensor, turns: torch.Tensor) -> torch.Tensor:
    """Each image turned by its own number of quarter turns (same direction as np.rot90)."""
    out = x.clone()
    for k in (1, 2, 3):
        chosen = turns == k
        out[chosen] = torch.rot90(x[chosen], k, dims=(2, 3))
    return out


def _kind(train: ImageDataset) -> str:
    return "classes" if train.labels.size and bool((train.labels >= 0).all()) else "rotation"


def _outputs(train: ImageDataset, kind: str) -> int:
    return len(train.classes) if kind == "classes" else 4


class _ShiftedImages:
    """The classifier's training batches, as the trainer draws them (`sample`): BATCH_SIZE
    images at a time through a fresh permutation every epoch, each shifted by its own random
    offset; for rotation, each also turned by a random number of quarter turns, its target."""

    def __init__(self, train: ImageDataset, kind: str) -> None:
        self.images = torch.from_numpy(np.ascontiguousarray(train.images))
        self.labels = torch.from_numpy(train.labels)
        self.kind = kind
        self._order: Iterator[torch.Tensor] = iter(())

    def sample(self, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        index = next(self._order, None)
        if index is None:
            self._order = iter(torch.randperm(len(self.images), generator=generator).split(batch_size))
            index = next(self._order)
        x = _shift(_scale(self.images[index]), generator)
        if self.kind == "classes":
            return x, self.labels[index]
        target = torch.randint(0, 4, (len(index),), generator=generator)
        return _rotate(x, target), target


def _train(train: ImageDataset, kind: str, precision: str, progress: bool) -> DomainClassifier:
    """The one training loop's `train_steps` on shifted copies of the training images: Adam
    (AdamW without weight decay), warmup over the first fifth, then cosine decay to zero.
    Seeded, on a private random stream: training neither reads nor disturbs the caller's
    global seed, and the same data always gives the same classifier."""
    total = min(EPOCHS * math.ceil(len(train.images) / BATCH_SIZE), MAX_STEPS)
    config = TrainConfig(batch_size=BATCH_SIZE, max_steps=total, learning_rate=LEARNING_RATE, min_learning_rate=0.0,
                         warmup_steps=round(WARMUP_FRACTION * total), weight_decay=0.0, beta1=0.9, beta2=0.999,
                         grad_clip=0.0, precision=precision, seed=TRAIN_SEED)
    with private_rng(TRAIN_SEED):
        model = DomainClassifier(train.channels, train.image_size, _outputs(train, kind))
    bar = progress_bar(total, f"domain classifier ({kind})", unit="step") if progress else None

    def show(step: int, stats: dict[str, float]) -> None:
        bar.update()
        bar.set_postfix(loss=f"{stats['train_loss']:.3f}", refresh=False)

    try:
        train_steps(model, _ShiftedImages(train, kind), config, total, on_step=show if bar is not None else None)
    finally:
        if bar is not None:
            bar.close()
    return model.eval()


def _held_out_accuracy(model: DomainClassifier, held_out: ImageDataset, kind: str) -> float:
    if kind == "classes":
        return float((predict_classes(model, held_out.images) == held_out.labels).mean())
    # Rotation: every held-out image at each of the four turns.
    hits = [predict_classes(model, np.ascontiguousarray(np.rot90(held_out.images, k, axes=(2, 3)))) == k
            for k in range(4)]
    return float(np.concatenate(hits).mean())


def _cache_key(split: ImageSplit, kind: str) -> str:
    # The held-out split is in the key too: the cached record states the accuracy on it.
    digest = hashlib.sha256(f"domain-classifier-v{CLASSIFIER_VERSION}:{kind}:{len(split.train.classes)}".encode())
    for part in (split.train, split.held_out):
        digest.update(repr(part.images.shape).encode())
        digest.update(np.ascontiguousarray(part.images).tobytes())
        digest.update(part.labels.astype("<i8").tobytes())
    return digest.hexdigest()[:32]


def load_domain_classifier(split: ImageSplit, progress: bool = True) -> tuple[DomainClassifier, dict[str, Any]]:
    """The feature network for this split: loaded from the cache, or trained on the training
    split and cached (safetensors + JSON under the cache folder's `classifiers/`).

    The info dict has `kind` ('classes', or 'rotation' for unlabelled data), the
    `held_out_accuracy` (of classes, or of rotations), `train_seconds` and `cached`.
    """
    train = split.train
    if min(train.images.shape[2:]) < MIN_IMAGE_SIZE:
        raise TrustgenError(f"the domain classifier needs images of at least {MIN_IMAGE_SIZE}x{MIN_IMAGE_SIZE} "
                            f"pixels; {train.name} has {train.images.shape[2]}x{train.images.shape[3]}.")
    kind = _kind(train)
    key = _cache_key(split, kind)
    folder = cache_dir("classifiers")
    weights, record = folder / f"{key}.safetensors", folder / f"{key}.json"
    if record.exists():  # written after the weights, so it only exists beside complete ones
        info = read_json(record)
        model = DomainClassifier(info["channels"], info["image_size"], info["outputs"])
        load_weights(model, read_tensors(weights), weights)
        return model.eval(), {**info, "cached": True}
    # bf16 autocast where the CPU multiplies bf16 natively: ~1.6x faster here, same accuracy.
    precision = "bf16" if bf16_is_fast(torch.device("cpu")) else "fp32"
    started = time.perf_counter()
    model = _train(train, kind, precision, progress)  # train_steps flushes denormals on the CPU
    info = {
        "version": CLASSIFIER_VERSION,
        "key": key,
        "dataset": train.name,
        "kind": kind,
        "channels": train.channels,
        "image_size": train.image_size,
        "outputs": _outputs(train, kind),
        "feature_dim": FEATURE_DIM,
        "train_images": len(train.images),
        "held_out_images": len(split.held_out.images),
        "train_seconds": round(time.perf_counter() - started, 2),
        "train_precision": precision,
        "held_out_accuracy": _held_out_accuracy(model, split.held_out, kind),
    }
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(weights, tensors_to_bytes(model.state_dict()))
    write_json(record, info)
    return model, {**info, "cached": False}


def image_features(model: DomainClassifier, images: np.ndarray,
                   batch_size: int = 500) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images (N, C, H, W) -> features (N, FEATURE_DIM) float64 and predicted classes (N,)."""
    model.eval()
    features, predictions = [], []
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            batch = torch.from_numpy(np.ascontiguousarray(images[start:start + batch_size]))
            embedded, logits = model(_scale(batch))
            features.append(embedded.double().numpy())
            predictions.append(logits.argmax(1).numpy())
    if not features:
        return np.zeros((0, FEATURE_DIM)), np.zeros(0, dtype=np.int64)
    return np.concatenate(features), np.concatenate(predictions)


def predict_classes(model: DomainClassifier, images: np.ndarray, batch_size: int = 500) -> np.ndarray:
    """The classifier's class (or, for a rotation classifier, quarter turn) of each uint8 image."""
    return image_features(model, images, batch_size)[1]


# -- metrics on features --------------------------------------------------------------------

def _as_features(x: np.ndarray, name: str, minimum: int = 2) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or len(x) < minimum:
        raise TrustgenError(f"{name} must be a 2-D array of at least {minimum} feature rows, got shape {x.shape}.")
    return x


def _pair(a: np.ndarray, b: np.ndarray, minimum: int = 2) -> tuple[np.ndarray, np.ndarray]:
    a, b = _as_features(a, "the first feature set", minimum), _as_features(b, "the second feature set", minimum)
    if a.shape[1] != b.shape[1]:
        raise TrustgenError(f"the two feature sets have different widths ({a.shape[1]} and {b.shape[1]}).")
    return a, b


def _psd_sqrt(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Square root of a symmetric positive semi-definite matrix, and its eigenvalues."""
    values, vectors = np.linalg.eigh(matrix)
    return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T, values


def frechet_distance_from_moments(mu_a: np.ndarray, cov_a: np.ndarray, mu_b: np.ndarray, cov_b: np.ndarray,
                                  eps: float = 1e-10) -> float:
    """||mu_a - mu_b||² + tr(A + B - 2 (A^½ B A^½)^½): the Fréchet distance of two Gaussians.

    tr((A B)^½) is computed as tr((A^½ B A^½)^½), whose argument is symmetric PSD, so both
    roots come from symmetric eigendecompositions with rounding negatives clipped to 0: no
    complex parts and no failing `sqrtm` on singular matrices. When a covariance is
    ill-conditioned (dead ReLU units, fewer images than features) eps times the larger mean variance
    is added to both diagonals, which keeps the roots of the tiny eigenvalues out of the
    rounding noise and changes the distance by at most about 2·sqrt(eps)·tr.
    """
    mu_a, mu_b = np.asarray(mu_a, np.float64), np.asarray(mu_b, np.float64)
    cov_a, cov_b = np.asarray(cov_a, np.float64), np.asarray(cov_b, np.float64)
    root_a, values_a = _psd_sqrt(cov_a)
    values_b = np.linalg.eigvalsh(cov_b)
    scale = max(values_a.max(initial=0.0), values_b.max(initial=0.0))
    if scale > 0 and min(values_a.min(), values_b.min()) < eps * scale:
        offset = eps * max(np.trace(cov_a), np.trace(cov_b)) / len(cov_a) * np.eye(len(cov_a))
        cov_a, cov_b = cov_a + offset, cov_b + offset
        root_a, _ = _psd_sqrt(cov_a)
    middle = root_a @ cov_b @ root_a
    middle = (middle + middle.T) / 2  # exactly symmetric, so eigvalsh sees the matrix it assumes
    trace_root = np.sqrt(np.clip(np.linalg.eigvalsh(middle), 0, None)).sum()
    diff = mu_a - mu_b
    return float(max(diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2 * trace_root, 0.0))


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """FID (Heusel et al. 2017, arXiv:1706.08500): the Fréchet distance between Gaussians with
    the means and covariances of the two feature sets."""
    a, b = _pair(feats_a, feats_b)
    return frechet_distance_from_moments(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))


def kernel_inception_distance(feats_a: np.ndarray, feats_b: np.ndarray, subsets: int = KID_SUBSETS,
                              subset_size: int = KID_SUBSET_SIZE, seed: int = EVAL_SEED) -> tuple[float, float]:
    """KID (Bińkowski et al. 2018, arXiv:1801.01401): the unbiased MMD² with the cubic kernel
    k(x, y) = (x·y/d + 1)³, averaged over random subsets; returns (mean, std over subsets).

    Unbiased, so unlike FID its expectation does not depend on n, and it can be slightly
    negative when the sets come from one distribution.
    """
    a, b = _pair(feats_a, feats_b)
    m = min(subset_size, len(a), len(b))
    d = a.shape[1]
    rng = np.random.default_rng(seed)
    values = np.empty(subsets)
    for i in range(subsets):
        x = a[rng.choice(len(a), m, replace=False)]
        y = b[rng.choice(len(b), m, replace=False)]
        k_xx = (x @ x.T / d + 1) ** 3
        k_yy = (y @ y.T / d + 1) ** 3
        k_xy = (x @ y.T / d + 1) ** 3
        # Unbiased: the diagonals k(x_i, x_i) are left out of the within-set means.
        values[i] = ((k_xx.sum() - np.trace(k_xx)) / (m * (m - 1)) + (k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
                     - 2 * k_xy.mean())
    return float(values.mean()), float(values.std())


def _knn_radii(x: torch.Tensor, k: int) -> torch.Tensor:
    """Distance from each row of x to its k-th nearest other row."""
    step = rows_per_chunk(len(x))
    # k + 1: every point is its own nearest neighbour, at distance 0.
    return torch.cat([exact_distances(x[i:i + step], x).kthvalue(k + 1, dim=1).values for i in range(0, len(x), step)])


def _ball_counts(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each point, how many centres' balls contain it; for each centre, how many points its
    ball holds (a ball: a centre and its k-NN radius)."""
    per_point, per_centre = [], torch.zeros(len(centres), dtype=torch.int64)
    step = rows_per_chunk(len(centres))
    for i in range(0, len(points), step):
        inside = exact_distances(points[i:i + step], centres) <= radii[None, :]
        per_point.append(inside.sum(1))
        per_centre += inside.sum(0)
    return torch.cat(per_point), per_centre


def _tensors(real: np.ndarray, fake: np.ndarray, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    real, fake = _pair(real, fake, minimum=k + 1)
    return torch.from_numpy(real), torch.from_numpy(fake)


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = PR_K) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019, arXiv:1904.06991).

    Each set's manifold is the union of balls around its points reaching their k-th nearest
    neighbour. Precision: the share of fakes inside the real manifold (quality); recall: the
    share of reals inside the fake manifold (diversity).
    """
    real_t, fake_t = _tensors(real, fake, k)
    in_real, _ = _ball_counts(fake_t, real_t, _knn_radii(real_t, k))
    in_fake, _ = _ball_counts(real_t, fake_t, _knn_radii(fake_t, k))
    return float((in_real > 0).double().mean()), float((in_fake > 0).double().mean())


def density_coverage(real: np.ndarray, fake: np.ndarray, k: int = DC_K) -> tuple[float, float]:
    """Density and coverage (Naeem et al. 2020, arXiv:2002.09797), both on real k-NN balls only,
    which makes them robust to outlying fakes.

    Density: how many real balls hold each fake, divided by k (1 on average for a fake drawn
    from the real distribution; above 1 when fakes crowd where reals are dense). Coverage: the
    share of real balls that hold at least one fake.
    """
    real_t, fake_t = _tensors(real, fake, k)
    per_fake, per_real = _ball_counts(fake_t, real_t, _knn_radii(real_t, k))
    return per_fake.sum().item() / (k * len(fake_t)), float((per_real > 0).double().mean())


def class_coverage(predictions: np.ndarray, train_labels: np.ndarray, n_classes: int) -> dict[str, Any]:
    """How the predicted classes of samples compare with the training split's classes.

    `class_kl` is KL(sample histogram || training distribution) in nats (0 when they match;
    log(n_classes) when a uniform dataset's samples all land in one class). A class is covered
    when it gets at least a quarter of its expected share; fewer covered than there are
    classes is reported as `mode_collapse`.
    """
    expected = np.bincount(train_labels, minlength=n_classes) / len(train_labels)
    histogram = np.bincount(predictions, minlength=n_classes) / len(predictions)
    seen = histogram > 0  # 0 log 0 = 0; every class has training images, so expected > 0 there
    kl = float((histogram[seen] * np.log(histogram[seen] / expected[seen])).sum())
    covered = int((histogram >= expected / 4).sum())
    return {"class_kl": kl, "classes_covered": covered, "classes": n_classes,
            "mode_collapse": covered < n_classes, "class_histogram": histogram.tolist()}


# -- the report -----------------------------------------------------------------------------

def _metrics(reference: np.ndarray, features: np.ndarray, predictions: np.ndarray,
             train: ImageDataset, kind: str) -> dict[str, Any]:
    kid_mean, kid_std = kernel_inception_distance(reference, features)
    precision, recall = precision_recall(reference, features)
    density, coverage = density_coverage(reference, features)
    row: dict[str, Any] = {"n": len(features), "fid": frechet_distance(reference, features),
                           "kid": kid_mean, "kid_std": kid_std, "precision": precision, "recall": recall,
                           "density": density, "coverage": coverage}
    if kind == "classes":
        row.update(class_coverage(predictions, train.labels, len(train.classes)))
    return row


def _check_samples(samples: np.ndarray, train: ImageDataset) -> np.ndarray:
    samples = np.asarray(samples)
    expected = train.images.shape[1:]
    if samples.ndim != 4 or samples.shape[1:] != expected:
        raise TrustgenError(f"the samples have shape {samples.shape}, but images of {train.name} have shape "
                            f"{expected} (channels, height, width): generate at the dataset's size and channels.")
    if samples.dtype != np.uint8:
        raise TrustgenError(f"the samples must be uint8 pixels (0-255), not {samples.dtype}.")
    if len(samples) < MIN_SAMPLES:
        raise TrustgenError(f"evaluation needs at least {MIN_SAMPLES} samples, got {len(samples)}.")
    return samples


def evaluate_samples(samples: np.ndarray, split: ImageSplit, n_floor: int | None = None,
                     progress: bool = True) -> dict[str, Any]:
    """All metrics of uint8 samples (N, C, H, W) against the training split, beside the floor.

    Rows: `model` (all samples), `matched` (the samples at the floor's size) and `floor`
    (held-out real images; n_floor of them, default all). Every row is measured against the
    whole training split. FID at a small n depends on which samples are drawn (one mnist GAN
    scored 1.18 and 1.66 on two draws of 1,000), so the samples are split at random into as many
    disjoint sets of the floor's size as they fill: `matched` holds the mean FID over those
    sets, its spread between them (`fid_std`) and their count (`fid_sets`), and the other
    metrics of the first set. JSON-ready: plain floats, ints, lists.
    """
    started = time.perf_counter()
    samples = _check_samples(samples, split.train)
    if n_floor is not None and n_floor < MIN_SAMPLES:
        raise TrustgenError(f"n_floor must be at least {MIN_SAMPLES}, got {n_floor}.")
    model, info = load_domain_classifier(split, progress)
    classifier_done = time.perf_counter()
    reference, _ = image_features(model, split.train.images)
    held_out, held_out_pred = image_features(model, split.held_out.images)
    features, predictions = image_features(model, samples)
    features_done = time.perf_counter()
    n = min(n_floor or len(held_out), len(held_out), len(features))
    if n < MIN_SAMPLES:
        raise TrustgenError(f"{split.train.name} holds out only {len(held_out)} images; the floor needs "
                            f"at least {MIN_SAMPLES}.")
    rng = np.random.default_rng(EVAL_SEED)
    floor_index = np.sort(rng.choice(len(held_out), n, replace=False))
    matched_sets = np.sort(rng.permutation(len(features))[: len(features) // n * n].reshape(-1, n), axis=1)
    matched_fids = [frechet_distance(reference, features[index]) for index in matched_sets]
    first = matched_sets[0]
    rows = {
        "model": _metrics(reference, features, predictions, split.train, info["kind"]),
        "matched": {**_metrics(reference, features[first], predictions[first], split.train, info["kind"]),
                    "fid": float(np.mean(matched_fids)), "fid_std": float(np.std(matched_fids)),
                    "fid_sets": len(matched_fids)},
        "floor": _metrics(reference, held_out[floor_index], held_out_pred[floor_index], split.train, info["kind"]),
    }
    floor_fid = rows["floor"]["fid"]
    finished = time.perf_counter()
    return {
        "dataset": split.train.name,
        "image_shape": list(split.train.images.shape[1:]),
        "classifier": {name: info[name] for name in
                       ("kind", "held_out_accuracy", "feature_dim", "train_images", "train_seconds", "cached", "key")},
        "n_samples": len(features),
        "n_matched": n,
        "n_reference": len(reference),
        **rows,
        "fid_ratio": rows["matched"]["fid"] / floor_fid if floor_fid > 0 else None,
        "seconds": {"classifier": round(classifier_done - started, 3),
                    "features": round(features_done - classifier_done, 3),
                    "metrics": round(finished - features_done, 3),
                    "total": round(finished - started, 3)},
    }


def _cells(row: dict[str, Any]) -> list[str]:
    cells = [f"{row['fid']:.3f}", f"{row['kid'] * 1000:.3f} ± {row['kid_std'] * 1000:.3f}"]
    cells += [f"{row[name]:.3f}" for name in ("precision", "recall", "density", "coverage")]
    if "class_kl" in row:
        cells += [f"{row['class_kl']:.4f}", f"{row['classes_covered']}/{row['classes']}",
                  "yes" if row["mode_collapse"] else "no"]
    return cells


def format_report(report: dict[str, Any]) -> str:
    """The report of `evaluate_samples` as a plain-text table, one row per metric."""
    names = ["FID", "KID x 1000", "precision", "recall", "density", "coverage"]
    if "class_kl" in report["model"]:
        names += ["class KL (nats)", "classes covered", "mode collapse"]
    headers = ["metric", f"model (n={report['model']['n']})", f"model (matched n={report['matched']['n']})",
               f"floor (n={report['floor']['n']})"]
    columns = [names, *(_cells(report[row]) for row in ("model", "matched", "floor"))]
    widths = [max(len(headers[i]), *(len(c) for c in column)) for i, column in enumerate(columns)]

    def line(values: list[str]) -> str:
        return " | ".join([values[0].ljust(widths[0])] + [v.rjust(w) for v, w in zip(values[1:], widths[1:], strict=True)])

    classifier = report["classifier"]
    what = "class" if classifier["kind"] == "classes" else "rotation"
    ratio = "n/a" if report["fid_ratio"] is None else f"{report['fid_ratio']:.2f}"
    lines = [f"{report['dataset']}: {report['n_samples']} samples against {report['n_reference']} training images; "
             f"features of a domain classifier ({what} accuracy on held-out images "
             f"{classifier['held_out_accuracy']:.1%})",
             "", line(headers), "-+-".join("-" * w for w in widths)]
    lines += [line([column[i] for column in columns]) for i in range(len(names))]
    matched = report["matched"]
    lines += ["", f"FID ratio (matched / floor): {ratio}; the floor is what real held-out images score.",
              f"Matched FID: the mean over {matched['fid_sets']} disjoint sets of {matched['n']} samples "
              f"(spread {matched['fid_std']:.3f}); its other metrics are those of the first set."]
    return "\n".join(lines)
