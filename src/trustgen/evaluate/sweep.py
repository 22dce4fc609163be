"""The quality–diversity trade-off of a text model's sampling settings, and the settings on its
Pareto frontier.

For every combination of temperature, top-p and min-p, N samples are drawn from the same prompt
and seed, and two numbers are measured:

- quality: the perplexity of the samples under the model itself, unchanged (temperature 1, no
  truncation) — how typical the text is of what the model learned. We chose it over a
  reference-based score because it needs nothing but the run and is exact for any tokenizer;
  its known bias is that it rewards low-temperature, repetitive text (Holtzman et al. 2020,
  "The Curious Case of Neural Text Degeneration", arXiv:1904.09751), which is exactly why it is
  read against diversity rather than alone. The perplexity of the held-out human text is shown
  beside it: samples far below it are blander than people write, far above it noisier.
- diversity: self-BLEU-4 between the samples (Zhu et al. 2018, Texygen; lower is more diverse)
  and distinct-n, from trustgen.evaluate.text.

A setting is on the frontier when no other setting has both lower perplexity and lower
self-BLEU (Caccia et al. 2018, "Language GANs Falling Short", arXiv:1811.02549, draw the same
curve by sweeping the temperature). The recommendation is the frontier's knee: the point
farthest from the straight line between its two ends, both axes scaled to [0, 1], where giving
up a little of one measure stops buying much of the other.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from trustgen.errors import TrustgenError

MAX_SETTINGS = 200  # a sweep larger than this is almost surely a typo in a step
_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)"


def parse_values(text: str, option: str) -> list[float]:
    """A range `start:stop:step` (stop included) or a list `x,y,z` -> the values, in order."""
    text = text.strip()
    if re.fullmatch(rf"{_NUMBER}:{_NUMBER}:{_NUMBER}", text):
        start, stop, step = (float(v) for v in text.split(":"))
        if step <= 0 or stop < start:
            raise TrustgenError(f"{option} {text}: a range start:stop:step needs a positive step and stop >= start.")
        count = math.floor((stop - start) / step + 1e-9) + 1
        if count > MAX_SETTINGS:
            raise TrustgenError(f"{option} {text} makes {count} values; the most a sweep takes is {MAX_SETTINGS}.")
        return [round(start + i * step, 10) for i in range(count)]
    if re.fullmatch(rf"{_NUMBER}(?:,{_NUMBER})*", text):
        return [float(v) for v in text.split(",")]
    raise TrustgenError(f"cannot read {option} {text!r}; write a range start:stop:step (like 0.5:1.5:0.1) or a "
                        "list (like 0.8,0.9,1.0).")


def pareto_front(costs: Sequence[Sequence[float]]) -> list[int]:
    """Indices of the points no other point beats on every axis and strictly on one (all axes
    are costs: lower is better), in input order."""
    points = np.asarray(costs, dtype=float)
    front = []
    for i, p in enumerate(points):
        dominated = np.any(np.all(points <= p, axis=1) & np.any(points < p, axis=1))
        if not dominated:
            front.append(i)
    return front


def knee(costs: Sequence[Sequence[float]], front: Sequence[int]) -> int:
    """The frontier point farthest from the line between the frontier's two ends (both axes
    scaled to [0, 1]); of two frontier points, the one with the lower sum of costs relative to
    their means."""
    points = np.asarray([costs[i] for i in front], dtype=float)
    if len(front) <= 2:  # min-max scaling would tie two points: compare costs relative to their mean
        return front[int(np.argmin((points / np.maximum(np.abs(points.mean(0)), 1e-12)).sum(1)))]
    span = points.max(0) - points.min(0)
    scaled = (points - points.min(0)) / np.where(span > 0, span, 1)
    order = np.argsort(scaled[:, 0])
    a, b = scaled[order[0]], scaled[order[-1]]
    direction = (b - a) / max(float(np.linalg.norm(b - a)), 1e-12)
    offsets = scaled - a
    distance = np.abs(offsets[:, 0] * direction[1] - offsets[:, 1] * direction[0])
    return front[int(np.argmax(distance))]


def sweep(model: Any, temperatures: Sequence[float], top_ps: Sequence[float | None] = (None,),
          min_ps: Sequence[float | None] = (None,), *, samples: int = 50, max_new_tokens: int = 200,
          prompt: str = "\n", seed: int = 0, out: str | Path | None = None) -> dict[str, Any]:
    """Sample `samples` continuations of `prompt` for every setting and measure the samples'
    perplexity under the model and their diversity; returns {"points", "frontier",
    "recommended", "human_perplexity"}, and with `out` writes sweep.json and sweep.png there."""
    # Imported here, not above, so that the CLI reads and rejects a bad range without torch.
    from trustgen import io
    from trustgen.config import sample_config
    from trustgen.evaluate.fairness import continuation_log_likelihoods
    from trustgen.evaluate.text import distinct_n, self_bleu

    if samples < 2:
        raise TrustgenError(f"a sweep compares samples with each other; samples must be at least 2, got {samples}.")
    grid = list(itertools.product(temperatures, top_ps, min_ps))
    if len(grid) > MAX_SETTINGS:
        raise TrustgenError(f"the sweep has {len(grid)} settings; the most it takes is {MAX_SETTINGS}.")
    settings_list = []
    for temperature, top_p, min_p in grid:
        settings = {"temperature": temperature, "top_p": top_p, "min_p": min_p}
        sample_config({**settings, "max_new_tokens": max_new_tokens})  # a bad value fails before any sampling
        settings_list.append(settings)
    points = []
    for settings in settings_list:
        texts = model.generate(prompt, n=samples, seed=seed, max_new_tokens=max_new_tokens,
                               **{k: v for k, v in settings.items() if v is not None})
        log_likelihood, tokens = continuation_log_likelihoods(model, [prompt] * len(texts), texts)
        points.append({**settings, "perplexity": math.exp(-log_likelihood.sum() / max(int(tokens.sum()), 1)),
                       "self_bleu": self_bleu(texts), "distinct_1": distinct_n(texts, 1),
                       "distinct_2": distinct_n(texts, 2), "distinct_4": distinct_n(texts, 4),
                       "example": texts[0][:200]})
    costs = [(p["perplexity"], p["self_bleu"]) for p in points]
    front = pareto_front(costs)
    for i, p in enumerate(points):
        p["on_frontier"] = i in front
    result = {"points": points, "frontier": [points[i] for i in front], "recommended": points[knee(costs, front)],
              "human_perplexity": _human_perplexity(model), "samples": samples, "max_new_tokens": max_new_tokens,
              "prompt": prompt, "seed": seed}
    if out is not None:
        folder = Path(out)
        folder.mkdir(parents=True, exist_ok=True)
        io.write_json(folder / "sweep.json", result)
        plot_sweep(result, folder / "sweep.png")
        result["files"] = [str(folder / "sweep.json"), str(folder / "sweep.png")]
    return result


def _human_perplexity(model: Any) -> float | None:
    """The perplexity of the held-out text, from the run's final evaluation, when it has one."""
    from trustgen import io

    run_dir = getattr(model, "run_dir", None)
    if run_dir is None or not (Path(run_dir) / "summary.json").exists():
        return None
    loss = io.read_json(Path(run_dir) / "summary.json").get("final_val_loss")
    return math.exp(loss) if loss is not None else None


def _label(point: dict[str, Any]) -> str:
    parts = [f"T={point['temperature']:g}"]
    parts += [f"{k.replace('_', '-')}={point[k]:g}" for k in ("top_p", "min_p") if point[k] is not None]
    return " ".join(parts)


def plot_sweep(result: dict[str, Any], path: Path) -> None:
    """Perplexity against self-BLEU, coloured by temperature, the frontier joined and labelled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = result["points"]
    fig, ax = plt.subplots(figsize=(7.5, 5), dpi=110)
    shown = ax.scatter([p["perplexity"] for p in points], [p["self_bleu"] for p in points],
                       c=[p["temperature"] for p in points], cmap="viridis", s=28, zorder=2)
    fig.colorbar(shown, ax=ax, label="temperature")
    front = sorted(result["frontier"], key=lambda p: p["perplexity"])
    ax.plot([p["perplexity"] for p in front], [p["self_bleu"] for p in front], color="crimson", lw=1.2,
            zorder=1, label="frontier")
    for p in front:
        ax.annotate(_label(p), (p["perplexity"], p["self_bleu"]), fontsize=7, xytext=(4, 4), textcoords="offset points")
    best = result["recommended"]
    ax.scatter([best["perplexity"]], [best["self_bleu"]], s=140, facecolors="none", edgecolors="crimson",
               label=f"recommended: {_label(best)}")
    if result.get("human_perplexity"):
        ax.axvline(result["human_perplexity"], color="grey", ls="--", lw=0.8, label="held-out text perplexity")
    ax.set_xlabel("perplexity of the samples under the model (lower: more typical)")
    ax.set_ylabel("self-BLEU-4 (lower: more diverse)")
    ax.set_title(f"Quality and diversity of {result['samples']} samples per setting")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)


def format_sweep(result: dict[str, Any]) -> str:
    """A plain-text table of every setting, frontier rows marked with *, the recommendation last."""
    lines = [f"{'':2}{'temperature':>11} {'top-p':>6} {'min-p':>6} {'perplexity':>10} {'self-BLEU':>9} "
             f"{'distinct-2':>10} {'distinct-4':>10}"]
    for p in result["points"]:
        top_p = "-" if p["top_p"] is None else f"{p['top_p']:g}"
        min_p = "-" if p["min_p"] is None else f"{p['min_p']:g}"
        lines.append(f"{'* ' if p['on_frontier'] else '  '}{p['temperature']:>11g} {top_p:>6} {min_p:>6} "
                     f"{p['perplexity']:>10.3f} {p['self_bleu']:>9.3f} {p['distinct_2']:>10.3f} {p['distinct_4']:>10.3f}")
    if result.get("human_perplexity"):
        lines.append(f"held-out text perplexity under the model: {result['human_perplexity']:.3f}")
    lines.append(f"* on the quality-diversity frontier; recommended: {_label(result['recommended'])}")
    return "\n".join(lines)


__all__ = ["format_sweep", "knee", "pareto_front", "parse_values", "plot_sweep", "sweep"]
