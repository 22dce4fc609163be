"""Musical statistics of four-voice pieces, compared with Bach's held-out chorales.

Per set of pieces: the pitch-class histogram (time-weighted), voice-range violations (notes
outside the textbook ranges below), voice crossings and parallel fifths and octaves per 100
chords, and the share of chords that are standard triads or seventh chords. A generated set is
compared with the held-out chorales by the distance between pitch-class histograms and by the
overlapping area (OA) of per-piece feature distributions (Yang & Lerch 2020, "On the evaluation
of generative models in music", Neural Computing and Applications): for each feature a Gaussian
kernel density per set, OA = the integral of the smaller of the two densities (1 = the same
distribution). The floor is Bach against Bach: the training chorales scored against the
held-out ones.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import numpy as np

from trustgen.data.music import HOLD, VOICE_RANGES, Chorale

_TRIADS = ((0, 4, 7), (0, 3, 7), (0, 3, 6), (0, 4, 8))
_SEVENTHS = ((0, 4, 7, 10), (0, 4, 7, 11), (0, 3, 7, 10), (0, 3, 6, 10), (0, 3, 6, 9))
STANDARD_CHORDS = {frozenset((root + i) % 12 for i in shape) for shape in (*_TRIADS, *_SEVENTHS) for root in range(12)}
FEATURES = ("pitch_classes_used", "pitch_range", "mean_soprano_interval", "notes_per_bar", "parallels_per_100",
            "crossings_per_100", "standard_chord_share")


def sounding(chorale: Chorale) -> np.ndarray:
    """The pitch sounding in each voice at each step (-1 for silence): holds resolved."""
    grid = chorale.grid.astype(np.int32)
    out = np.full(grid.shape, -1, dtype=np.int32)
    for v in range(4):
        current = -1
        for t, value in enumerate(grid[:, v].tolist()):
            current = value if value >= 0 else (current if value == HOLD else -1)
            out[t, v] = current
    return out


def chords(chorale: Chorale) -> np.ndarray:
    """The (N, 4) chords: the steps where some voice starts a note while all four sound."""
    pitches = sounding(chorale)
    onset = (chorale.grid >= 0).any(axis=1) & (pitches >= 0).all(axis=1)
    return pitches[onset]


def piece_stats(chorale: Chorale) -> dict[str, float]:
    """The raw counts and per-piece features of one piece."""
    pitches = sounding(chorale)
    chord_rows = chords(chorale)
    notes = chorale.voice_notes()
    out_of_range = sum(not lo <= p <= hi for voice, (lo, hi) in zip(notes, VOICE_RANGES, strict=True)
                       for _, _, p in voice)
    crossings = int(sum(np.any(row[:-1] < row[1:]) for row in chord_rows))
    parallels = 0
    for before, after in itertools.pairwise(chord_rows):
        for i, j in itertools.combinations(range(4), 2):
            moved = after[i] != before[i] and after[j] != before[j]
            same_direction = np.sign(after[i] - before[i]) == np.sign(after[j] - before[j])
            interval_before, interval_after = (before[i] - before[j]) % 12, (after[i] - after[j]) % 12
            if moved and same_direction and interval_before == interval_after and interval_after in (0, 7):
                parallels += 1
    standard = sum(frozenset(int(p) % 12 for p in row) in STANDARD_CHORDS for row in chord_rows)
    histogram = np.bincount(pitches[pitches >= 0] % 12, minlength=12).astype(float)
    soprano = [p for _, _, p in notes[0]]
    n_chords = max(len(chord_rows), 1)
    return {
        "notes": sum(len(v) for v in notes), "out_of_range": out_of_range, "chords": len(chord_rows),
        "crossings": crossings, "parallels": parallels, "standard_chords": standard, "histogram": histogram,
        "pitch_classes_used": float((histogram > 0).sum()),
        "pitch_range": float(pitches.max() - pitches[pitches >= 0].min()) if (pitches >= 0).any() else 0.0,
        "mean_soprano_interval": float(np.abs(np.diff(soprano)).mean()) if len(soprano) > 1 else 0.0,
        "notes_per_bar": sum(len(v) for v in notes) / max(len(chorale) / 16, 1),
        "parallels_per_100": 100 * parallels / n_chords, "crossings_per_100": 100 * crossings / n_chords,
        "standard_chord_share": standard / n_chords,
    }


def set_stats(pieces: Sequence[Chorale]) -> dict[str, Any]:
    """The statistics of a set of pieces, pooled over all its notes and chords."""
    stats = [piece_stats(p) for p in pieces]
    total = {k: sum(s[k] for s in stats) for k in ("notes", "out_of_range", "chords", "crossings", "parallels",
                                                   "standard_chords")}
    histogram = sum(s["histogram"] for s in stats)
    chords_ = max(total["chords"], 1)
    return {
        "pieces": len(pieces),
        "chords": total["chords"],
        "voice_range_violations": total["out_of_range"] / max(total["notes"], 1),
        "voice_crossings_per_100_chords": 100 * total["crossings"] / chords_,
        "parallel_fifths_octaves_per_100_chords": 100 * total["parallels"] / chords_,
        "standard_chord_share": total["standard_chords"] / chords_,
        "pitch_class_histogram": (histogram / max(histogram.sum(), 1)).round(4).tolist(),
        "features": {name: [s[name] for s in stats] for name in FEATURES},
    }


def overlapping_area(a: Sequence[float], b: Sequence[float], points: int = 512) -> float:
    """The area under the smaller of two Gaussian kernel density estimates (Silverman's bandwidth)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    lo, hi = min(a.min(), b.min()), max(a.max(), b.max())
    spread = hi - lo or 1.0
    grid = np.linspace(lo - spread / 2, hi + spread / 2, points)
    densities = [_kde(x, grid) for x in (a, b)]
    return float(np.trapezoid(np.minimum(*densities), grid))


def _kde(x: np.ndarray, grid: np.ndarray) -> np.ndarray:
    width = 1.06 * (x.std() or 1.0) * len(x) ** -0.2
    z = (grid[:, None] - x[None, :]) / width
    return np.exp(-0.5 * z ** 2).sum(axis=1) / (len(x) * width * np.sqrt(2 * np.pi))


def compare(generated: dict[str, Any], reference: dict[str, Any]) -> dict[str, Any]:
    """How far a set's statistics lie from the reference's: half the L1 distance of the pitch-class
    histograms (0 to 1) and the overlapping area of each feature (and their mean)."""
    hist_a, hist_b = np.array(generated["pitch_class_histogram"]), np.array(reference["pitch_class_histogram"])
    overlaps = {name: overlapping_area(generated["features"][name], reference["features"][name])
                for name in FEATURES}
    return {"pitch_class_histogram_distance": float(np.abs(hist_a - hist_b).sum() / 2),
            "overlapping_area": overlaps, "mean_overlapping_area": float(np.mean(list(overlaps.values())))}


def music_report(generated: Sequence[Chorale], held_out: Sequence[Chorale], training: Sequence[Chorale]) -> dict[str, Any]:
    """The generated pieces' statistics against the held-out chorales, with Bach's own numbers
    (held-out statistics; training chorales compared with held-out ones) as the floor."""
    reference = set_stats(held_out)
    floor = set_stats(training)
    return {"generated": {**_summary(set_stats(generated)), **compare(set_stats(generated), reference)},
            "bach": {**_summary(reference), **compare(floor, reference)}}


def _summary(stats: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in stats.items() if k != "features"}


def ngram_nll(training: Sequence[Sequence[int]], held_out: Sequence[Sequence[int]], order: int,
              vocab_size: int) -> float:
    """Held-out NLL per token (nats) of an add-one-smoothed unigram (order 1) or bigram (order 2)
    model of the training sequences: the floor a neural model has to beat. Every token after a
    sequence's first is scored, as for the neural model."""
    if order not in (1, 2):
        raise ValueError("order must be 1 or 2")
    counts = np.ones((vocab_size,) * order)
    for seq in training:
        ids = np.asarray(seq)
        np.add.at(counts, ids if order == 1 else (ids[:-1], ids[1:]), 1)
    log_p = np.log(counts / counts.sum(axis=-1, keepdims=True))
    total, scored = 0.0, 0
    for seq in held_out:
        ids = np.asarray(seq)
        total -= log_p[ids[1:]].sum() if order == 1 else log_p[ids[:-1], ids[1:]].sum()
        scored += len(ids) - 1
    return total / scored


def format_music_report(report: dict[str, Any]) -> str:
    rows = [("held-out NLL (nats/token)", "heldout_nll"), ("pitch-class histogram distance", "pitch_class_histogram_distance"),
            ("voice-range violations", "voice_range_violations"),
            ("voice crossings / 100 chords", "voice_crossings_per_100_chords"),
            ("parallel 5ths+8ves / 100 chords", "parallel_fifths_octaves_per_100_chords"),
            ("standard triads/sevenths", "standard_chord_share"), ("mean overlapping area", "mean_overlapping_area")]
    lines = [f"{'':34}{'model':>10}{'Bach':>10}"]
    for label, key in rows:
        values = [report[side].get(key) for side in ("generated", "bach")]
        lines.append(f"{label:34}" + "".join(f"{v:>10.3f}" if isinstance(v, float) else f"{'-':>10}" for v in values))
    baselines = report.get("baselines", {})
    if baselines:
        lines.append("held-out NLL of n-gram baselines: " + ", ".join(
            f"{name.split('_')[0]} {value:.3f}" for name, value in baselines.items()))
    return "\n".join(lines)


__all__ = ["FEATURES", "VOICE_RANGES", "chords", "compare", "format_music_report", "music_report", "ngram_nll",
           "overlapping_area", "piece_stats", "set_stats"]
