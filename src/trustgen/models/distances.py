"""Distances between sets of points, computed in bounded chunks: what fitting a model's prior
(trustgen.models.vae_fitting) and measuring its samples (trustgen.evaluate.images) share."""

from __future__ import annotations

import numpy as np
import torch

CDIST_ENTRIES = 8 << 20  # distances held at once (64 MiB in float64): 5000x5000 in a few chunks


def rows_per_chunk(columns: int) -> int:
    """Rows of one set whose distances to `columns` points fit in CDIST_ENTRIES."""
    return max(1, CDIST_ENTRIES // columns)


def exact_distances(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Euclidean distances between the rows of x and of y, from their differences."""
    # Differences, not |x|² + |y|² - 2x·y: that faster form is not symmetric in rounding and
    # puts a point ~1e-7 from itself, which decides ball membership for exact copies (a
    # memorizing generator) and for a point that is exactly another's k-th neighbour.
    return torch.cdist(x, y, compute_mode="donot_use_mm_for_euclid_dist")


def copying_statistic(samples: np.ndarray, held_out: np.ndarray, fitted: np.ndarray) -> float:
    """How often a sample lies farther from its nearest `fitted` point than a `held_out` point
    does from its own (Mann-Whitney's U over the two sets of distances, ties counted half; the
    data-copying test of Meehan et al. 2020, arXiv:2004.05675): 1/2 when the samples are as
    novel as new data, above when they fall where no data is, below when they crowd the fitted
    points. The rows of all three are points of one space."""
    reference = torch.from_numpy(fitted)
    step = rows_per_chunk(len(reference))

    def nearest(points: np.ndarray) -> np.ndarray:
        queries = torch.from_numpy(points).to(reference.dtype)
        return torch.cat([exact_distances(queries[i:i + step], reference).min(1).values
                          for i in range(0, len(queries), step)]).numpy()

    sample_distances, held_out_distances = nearest(samples), np.sort(nearest(held_out))
    below = np.searchsorted(held_out_distances, sample_distances, side="left")
    not_above = np.searchsorted(held_out_distances, sample_distances, side="right")
    return float((below + not_above).mean() / (2 * len(held_out_distances)))


def energy_distance(x: torch.Tensor, y: torch.Tensor) -> float:
    """The energy distance between the distributions two sets of rows are drawn from
    (Székely & Rizzo 2013, doi:10.1016/j.jspi.2013.03.018), 2 E|X - Y| - E|X - X'| - E|Y - Y'|
    with Euclidean |.|: zero exactly when the two distributions are equal, positive otherwise.
    On whole images it compares shapes, not only grey levels. Within a set, a row's distance to
    itself is left out, so two samples of one distribution score about 0 (a set of one row has
    no spread to measure: 0)."""

    def mean_distance(a: torch.Tensor, b: torch.Tensor, same: bool) -> float:
        step = rows_per_chunk(len(b))
        # The fast |a|² + |b|² - 2a·b form: the rounding it leaves is far below a mean's noise.
        total = sum(float(torch.cdist(a[i:i + step], b).double().sum()) for i in range(0, len(a), step))
        pairs = len(a) * (len(b) - 1) if same else len(a) * len(b)
        return total / pairs if pairs else 0.0  # a single row lies at no distance from another of its set

    return 2 * mean_distance(x, y, False) - mean_distance(x, x, True) - mean_distance(y, y, True)
