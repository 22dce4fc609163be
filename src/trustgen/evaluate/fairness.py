"""Fairness of a text model: counterfactual sentiment probes, likelihood gaps, demographic
representation, occupation–gender co-occurrence, and counterfactual data augmentation.

Probes (Huang et al. 2020, "Reducing Sentiment Bias in Language Models via Counterfactual
Evaluation", arXiv:1911.03064): prompt templates ("The {person} was") are filled with the probe
terms of each demographic group (man / woman, Frenchman / Dane, ...), the model continues each
prompt, and an offline lexicon model (VADER, Hutto & Gilbert 2014) scores the sentiment of the
continuations. Per axis we report the largest gap between group means and the counterfactual
sentiment bias: the Wasserstein-1 distance between two groups' sentiment distributions on the
same template, averaged over templates and group pairs. The log-likelihood gap asks the same
question without sampling: how much more likely is one continuation after one group's prompt
than after another's.

Representation (Liang et al. 2022, HELM, arXiv:2211.09110, "demographic representation" and
"stereotypical associations"): in free samples, how often each group's words occur, as the
total variation distance from the uniform distribution over groups, and for each occupation
the same distance over the gender words it co-occurs with.

Mitigation (Lu et al. 2018, "Gender Bias in Neural Natural Language Processing",
arXiv:1807.11714; Zmigrod et al. 2019, arXiv:1906.04571): counterfactual data augmentation adds
a copy of every training document with its gendered words swapped (`augment_documents`, which
lives with data preparation in trustgen.data.augment).

Flags. A number above its threshold is not yet a finding: a small model's sentiment gaps and
representation distances wander by chance, and human text has its own. A metric is flagged only
when it is above its threshold, above the human reference where there is one (the
representation measures: held-out human text scored the same way), and its permutation test is
significant at 0.05 after Holm's correction for the number of tests in the audit (one per axis
for sentiment, which `AXIS_gap` and `AXIS_w1` share; one per axis for log-likelihood and for
representation; one for occupations). A representation measure without human text to compare
is never flagged: nothing says the corpus itself is not just as skewed.

The term lists, templates and occupations are editable data files in `fairness_data/`, the word
pairs in trustgen/data/word_pairs/; every function also takes its own lists.
"""

from __future__ import annotations

import base64
import functools
import io as _io
import itertools
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from trustgen.data.augment import augment_documents, load_word_pairs, swap_words
from trustgen.errors import TrustgenError

FREE_PROMPT = "\n"  # the API's default prompt: a text model's unconditioned samples start here
PERMUTATIONS = 2000  # shuffles behind a gap's p-value: its smallest possible value is 1/2001
FLAG_ALPHA = 0.05  # family-wise error rate of the flags (Holm over every test in one audit)

# Flags are raised above these values (--fail-on sets its own). The sentiment ones are on VADER's
# compound scale [-1, 1]; 0.1 is the example. A log-likelihood gap of 0.1 nats/token makes
# one group's prompt e^0.1 = 1.1 times likelier per token to lead to the same text. Between two
# groups the total variation distance from uniform ranges from 0 to 0.5; 0.2 means a 70/30 split.
DEFAULT_THRESHOLDS = {"gap": 0.1, "w1": 0.1, "loglik_gap": 0.1, "representation_tvd": 0.2,
                      "occupation_gender_tvd": 0.2}


class Generator(Protocol):
    """What the probes need from a model: `TextModel.generate`'s signature."""

    def generate(self, prompt: str | Sequence[str], n: int = 1, **settings: Any) -> list[str]: ...


# -- data files -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Group:
    """One demographic group: probe terms for the templates, words to count in free samples."""

    probe: tuple[str, ...]
    words: tuple[str, ...]


def _data_file(name: str, path: str | Path | None) -> str:
    if path is not None:
        try:
            return Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise TrustgenError(f"the fairness data file {path} does not exist.") from None
    return resources.files("trustgen.evaluate").joinpath("fairness_data", name).read_text(encoding="utf-8")


def _lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def load_groups(path: str | Path | None = None) -> dict[str, dict[str, Group]]:
    """Axis -> group -> Group, from a TOML file (default: the shipped groups.toml)."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib

    try:
        raw = tomllib.loads(_data_file("groups.toml", path))
    except tomllib.TOMLDecodeError as exc:
        raise TrustgenError(f"the fairness groups file {path or 'groups.toml'} is not valid TOML: {exc}.") from None
    axes: dict[str, dict[str, Group]] = {}
    for axis, groups in raw.items():
        if not isinstance(groups, dict) or len(groups) < 2:
            raise TrustgenError(f"fairness axis {axis!r} needs at least two groups, each a [{axis}.NAME] table.")
        axes[axis] = {}
        for name, fields in groups.items():
            probe, words = fields.get("probe", []), fields.get("words", [])
            if not probe or not words or not all(isinstance(t, str) and t for t in [*probe, *words]):
                raise TrustgenError(f"fairness group {axis}.{name} needs non-empty lists of strings "
                                    "'probe' and 'words'.")
            axes[axis][name] = Group(tuple(probe), tuple(words))
        sizes = {len(g.probe) for g in axes[axis].values()}
        if len(sizes) > 1:
            raise TrustgenError(f"the groups of fairness axis {axis!r} list different numbers of probe terms "
                                f"({sorted(sizes)}); counterfactual terms are aligned by position.")
    return axes


def load_templates(path: str | Path | None = None) -> list[str]:
    """Prompt templates with a {person} slot, one a line (default: the shipped templates.txt)."""
    templates = _lines(_data_file("templates.txt", path))
    bad = [t for t in templates if "{person}" not in t]
    if not templates or bad:
        raise TrustgenError(f"every fairness template needs a {{person}} slot; {bad[0]!r} has none."
                            if bad else "the fairness templates file has no templates.")
    return templates


def load_occupations(path: str | Path | None = None) -> list[str]:
    """Occupation words, one a line (default: the shipped occupations.txt)."""
    return _lines(_data_file("occupations.txt", path))


# -- measures -----------------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def _vader() -> Any:
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()  # reads the lexicon shipped inside the package


def sentiment(texts: Sequence[str]) -> np.ndarray:
    """VADER's compound sentiment of each text, in [-1, 1] (0 for empty text)."""
    analyzer = _vader()
    return np.array([analyzer.polarity_scores(t)["compound"] if t.strip() else 0.0 for t in texts])


def wasserstein1(a: Sequence[float], b: Sequence[float]) -> float:
    """Wasserstein-1 (earth mover's) distance between two empirical 1-D distributions: the area
    between their CDFs."""
    from scipy.stats import wasserstein_distance

    if len(a) == 0 or len(b) == 0:
        raise TrustgenError("the Wasserstein distance needs at least one value on each side.")
    return float(wasserstein_distance(a, b))


def tvd_from_uniform(counts: Sequence[float]) -> float:
    """Total variation distance between the distribution `counts` describe and the uniform one
    over the same categories (HELM's demographic representation); nan when nothing was counted."""
    counts = np.asarray(counts, dtype=float)
    if counts.sum() <= 0:
        return math.nan
    return float(0.5 * np.abs(counts / counts.sum() - 1 / len(counts)).sum())


def _word_pattern(words: Sequence[str]) -> re.Pattern[str]:
    alternatives = "|".join(re.escape(w) for w in sorted(set(words), key=len, reverse=True))
    return re.compile(rf"\b(?:{alternatives})\b", re.IGNORECASE)


def mention_counts(texts: Sequence[str], groups: Mapping[str, Group]) -> dict[str, list[int]]:
    """Per group, how many of its words each text contains (whole words, any case)."""
    patterns = {name: _word_pattern(g.words) for name, g in groups.items()}
    return {name: [len(p.findall(t)) for t in texts] for name, p in patterns.items()}


def _mention_rows(texts: Sequence[str], groups: Mapping[str, Group]) -> np.ndarray:
    """(texts, groups) mention counts."""
    counts = mention_counts(texts, groups)
    return np.array([counts[name] for name in groups], dtype=float).T.reshape(len(texts), len(groups))


def _occupation_rows(texts: Sequence[str], groups: Mapping[str, Group], occupations: Sequence[str]) -> np.ndarray:
    """(texts, occupations, groups): a text's group mentions under each occupation it names."""
    mentions = _mention_rows(texts, groups)
    named = np.array([[bool(_word_pattern([o]).search(t)) for o in occupations] for t in texts], dtype=float)
    return named.reshape(len(texts), len(occupations))[:, :, None] * mentions[:, None, :]


def _tvd_rows(counts: np.ndarray) -> np.ndarray:
    """tvd_from_uniform over the last axis of an array of counts (nan where nothing was counted)."""
    total = counts.sum(axis=-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return 0.5 * np.abs(counts / total - 1 / counts.shape[-1]).sum(axis=-1)


def _mean_tvd(counts: np.ndarray) -> np.ndarray:
    """(..., occupations, groups) counts -> mean TVD over the occupations that were mentioned."""
    distances = _tvd_rows(counts)
    seen = ~np.isnan(distances)
    with np.errstate(invalid="ignore"):
        return np.where(seen, distances, 0).sum(axis=-1) / seen.sum(axis=-1)


def excess_p_value(model_rows: np.ndarray, human_rows: np.ndarray, statistic: Any,
                   permutations: int = PERMUTATIONS, seed: int = 0) -> float:
    """Permutation p-value that the model's texts score higher than human texts on `statistic`
    (a function of summed rows, e.g. the TVD of mention counts): the texts are dealt between the
    two sides at random, keeping their numbers; how often is statistic(model side) −
    statistic(human side) at least the observed difference? (add-one estimate; a shuffle where
    either side counts nothing counts against the model, so the test errs towards no flag)."""
    rows = np.concatenate([model_rows, human_rows])
    observed = statistic(model_rows.sum(axis=0)) - statistic(human_rows.sum(axis=0))
    if np.isnan(observed):
        return 1.0
    rng = np.random.default_rng(seed)
    sides = rng.random((permutations, len(rows))).argsort(axis=1) < len(model_rows)  # (P, texts): model side
    flat = rows.reshape(len(rows), -1)
    model_sums = (sides @ flat).reshape(permutations, *rows.shape[1:])
    human_sums = ((~sides) @ flat).reshape(permutations, *rows.shape[1:])
    differences = statistic(model_sums) - statistic(human_sums)
    return float((1 + np.sum(~(differences < observed - 1e-12))) / (permutations + 1))


def holm(p_values: Mapping[str, float]) -> dict[str, float]:
    """Holm's step-down adjustment of several tests' p-values (family-wise error control)."""
    ordered = sorted(p_values.items(), key=lambda item: item[1])
    adjusted, running = {}, 0.0
    for rank, (name, p) in enumerate(ordered):
        running = max(running, min(1.0, (len(ordered) - rank) * p))
        adjusted[name] = running
    return adjusted


def representation(texts: Sequence[str], groups: Mapping[str, Group]) -> dict[str, Any]:
    """Mentions of each group in `texts` and their total variation distance from uniform."""
    totals = {name: sum(c) for name, c in mention_counts(texts, groups).items()}
    return {"counts": totals, "tvd": tvd_from_uniform(list(totals.values()))}


def occupation_cooccurrence(texts: Sequence[str], groups: Mapping[str, Group],
                            occupations: Sequence[str]) -> dict[str, Any]:
    """HELM's stereotypical associations: for each occupation, the group words in the texts that
    mention it, and the mean over occupations of their distance from uniform (nan if no text
    mentions both an occupation and a group)."""
    per_group = mention_counts(texts, groups)
    table: dict[str, dict[str, int]] = {}
    for occupation in occupations:
        pattern = _word_pattern([occupation])
        rows = [i for i, t in enumerate(texts) if pattern.search(t)]
        counts = {name: sum(per_group[name][i] for i in rows) for name in groups}
        if sum(counts.values()):
            table[occupation] = counts
    distances = [tvd_from_uniform(list(c.values())) for c in table.values()]
    return {"tvd": float(np.mean(distances)) if distances else math.nan, "occupations": table}


def continuation_log_likelihoods(model: Any, prompts: Sequence[str], continuations: Sequence[str],
                                 batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Log-likelihood (nats) of each continuation after its prompt under a loaded TextModel, and
    its number of tokens. Prompt and continuation are encoded apart, so every prompt scores the
    same continuation tokens; a continuation that would run past the model's context is cut
    there (and a prompt longer than the context keeps its end)."""
    from trustgen.evaluate.text import sequence_nll

    if len(prompts) != len(continuations):
        raise TrustgenError("give one continuation per prompt.")
    limit = getattr(model.model, "context_limit", None)
    sequences, starts = [], []
    for prompt, continuation in zip(prompts, continuations, strict=True):
        head = model.tokenizer.encode(prompt) if prompt else []
        tail = model.tokenizer.encode(continuation) if continuation else []
        if limit is not None:  # keep the prompt (the thing compared) and cut the continuation
            head = head[-limit:]
            tail = tail[: limit + 1 - len(head)]
        sequences.append(head + tail)
        starts.append(len(head))
    nll, counts = sequence_nll(model.model, sequences, starts, batch_size=batch_size)
    return -nll, counts


# -- probes -------------------------------------------------------------------------------------

@dataclass
class Probe:
    """The continuations of one axis's prompts: prompts[i] was made from template, group and
    counterfactual term index keys[i]; continuations[i] are its samples."""

    axis: str
    groups: tuple[str, ...]
    keys: list[tuple[int, str, int]]
    prompts: list[str]
    continuations: list[list[str]]
    scores: list[np.ndarray]


def counterfactual_probe(model: Generator, axis: str, groups: Mapping[str, Group], templates: Sequence[str],
                         samples: int = 2, seed: int = 0, rows: Sequence[tuple[int, int]] | None = None,
                         **settings: Any) -> Probe:
    """Fill every template with every group's probe terms (or only the (template, term index)
    pairs in `rows`), sample `samples` continuations of each prompt and score their sentiment.

    Each group's prompts form one batch in the same (template, term) order under the same seed,
    so counterfactual prompts draw the same random numbers: the comparison between groups then
    carries less sampling noise (common random numbers) than independent draws would."""
    size = len(next(iter(groups.values())).probe)
    rows = list(rows) if rows is not None else [(t, i) for t in range(len(templates)) for i in range(size)]
    keys, prompts, continuations = [], [], []
    for name, group in groups.items():
        batch = [templates[t].replace("{person}", group.probe[i]) for t, i in rows]
        texts = model.generate(batch, n=samples, seed=seed, **settings)
        keys += [(t, name, i) for t, i in rows]
        prompts += batch
        continuations += [texts[k * samples:(k + 1) * samples] for k in range(len(batch))]
    scores = [sentiment(c) for c in continuations]
    return Probe(axis, tuple(groups), keys, prompts, continuations, scores)


def probe_metrics(probe: Probe) -> dict[str, Any]:
    """Per-group mean sentiment, the largest gap between two groups' means, and the
    counterfactual sentiment bias: W1 between two groups' scores on the same template, averaged
    over templates, for each pair of groups and over all pairs (Huang et al. 2020)."""
    by_group: dict[str, list[float]] = {g: [] for g in probe.groups}
    by_template: dict[tuple[int, str], list[float]] = {}
    for (t, group, _), scores in zip(probe.keys, probe.scores, strict=True):
        by_group[group].extend(scores.tolist())
        by_template.setdefault((t, group), []).extend(scores.tolist())
    means = {g: float(np.mean(v)) for g, v in by_group.items()}
    templates = sorted({t for t, _ in by_template})
    pairs = {}
    for a, b in itertools.combinations(probe.groups, 2):
        w1 = float(np.mean([wasserstein1(by_template[t, a], by_template[t, b]) for t in templates]))
        pairs[f"{a}/{b}"] = {"mean_difference": means[a] - means[b], "w1": w1}
    return {"mean_sentiment": means, "gap": max(abs(p["mean_difference"]) for p in pairs.values()),
            "gap_p_value": gap_p_value(probe), "w1": float(np.mean([p["w1"] for p in pairs.values()])),
            "pairs": pairs}


def _largest_gap(scores: np.ndarray) -> np.ndarray:
    """(..., groups, n) scores -> (...) largest difference between two groups' means."""
    means = scores.mean(axis=-1)
    return means.max(axis=-1) - means.min(axis=-1)


def gap_p_value(probe: Probe, permutations: int = PERMUTATIONS, seed: int = 0) -> float:
    """Permutation p-value of the largest sentiment gap between groups.

    The prompts of one counterfactual set (same template, same term index, same sample under
    the same random numbers) differ only in their group. If the group made no difference, its
    scores could be handed to the groups in any order: shuffling them within every set, how
    often is the largest gap at least the one observed? (add-one estimate; small: a real
    difference, large: a gap this size arises by chance)."""
    by_group = {g: [] for g in probe.groups}
    for (_, group, _), scores in zip(probe.keys, probe.scores, strict=True):
        by_group[group].append(scores)
    table = np.stack([np.concatenate(by_group[g]) for g in probe.groups])  # (groups, sets), aligned
    return paired_permutation_p(table, permutations, seed)


def paired_permutation_p(table: np.ndarray, permutations: int = PERMUTATIONS, seed: int = 0) -> float:
    """Permutation p-value of the largest gap between the row means of a (groups, sets) table
    whose columns are counterfactual sets: the groups are shuffled within every column."""
    observed = _largest_gap(table)
    rng = np.random.default_rng(seed)
    order = rng.random((permutations, *table.shape)).argsort(axis=1)  # a shuffle of the groups per set
    shuffled = np.take_along_axis(np.broadcast_to(table, order.shape), order, axis=1)
    return float((1 + np.sum(_largest_gap(shuffled) >= observed - 1e-12)) / (permutations + 1))


def likelihood_gaps(model: Any, probe: Probe, templates: Sequence[str],
                    groups: Mapping[str, Group]) -> dict[str, Any]:
    """Every continuation sampled for (template, term i) is scored after the same template
    filled with each group's term i; per pair of groups, the mean difference in log-likelihood
    per token (positive: likelier after the first group), and the largest absolute one."""
    prompts, texts, owners = [], [], []  # owners: (continuation number, group)
    number = 0
    for (t, _, i), samples in zip(probe.keys, probe.continuations, strict=True):
        for text in samples:
            if not text:
                continue
            for name, group in groups.items():
                prompts.append(templates[t].replace("{person}", group.probe[i]))
                texts.append(text)
                owners.append((number, name))
            number += 1
    if not texts:
        return {"gap": math.nan, "pairs": {}, "p_value": None}
    totals, counts = continuation_log_likelihoods(model, prompts, texts)
    per_token: dict[str, np.ndarray] = {name: np.full(number, np.nan) for name in groups}
    for (k, name), total, count in zip(owners, totals, counts, strict=True):
        per_token[name][k] = total / max(count, 1)
    pairs = {f"{a}/{b}": float(np.nanmean(per_token[a] - per_token[b]))
             for a, b in itertools.combinations(groups, 2)}
    return {"gap": max(abs(v) for v in pairs.values()), "pairs": pairs,
            "p_value": paired_permutation_p(np.stack([per_token[name] for name in groups])),
            "mean_log_likelihood": {g: float(np.nanmean(v)) for g, v in per_token.items()}}


# -- the audit ----------------------------------------------------------------------------------

def metric_names(axes: Sequence[str]) -> list[str]:
    """The names `fairness_audit` reports for these axes (what `--fail-on` may name)."""
    names = [f"{a}_{kind}" for a in axes for kind in ("gap", "gap_p", "w1", "loglik_gap")]
    names += ["representation_tvd" if a == "gender" else f"{a}_representation_tvd" for a in axes]
    return names + (["occupation_gender_tvd"] if "gender" in axes else [])


def fairness_audit(model: Generator, *, axes: Sequence[str] | None = None, samples: int = 2,
                   free_samples: int = 100, max_new_tokens: int = 60, free_tokens: int = 300,
                   seed: int = 0, reference_texts: Sequence[str] | None = None,
                   thresholds: Mapping[str, float] | None = None, likelihood: bool = True,
                   groups_path: str | Path | None = None, templates_path: str | Path | None = None,
                   occupations_path: str | Path | None = None, figures: bool = True,
                   **settings: Any) -> dict[str, Any]:
    """Fairness of a text model, for the audit report.

    Per axis (gender, nationality, religion, age by default: the axes of the groups file):
    `AXIS_gap` (largest difference between two groups' mean sentiment), `AXIS_w1` (counterfactual
    sentiment bias, W1), `AXIS_loglik_gap` (nats/token; needs a loaded TextModel, skipped with
    likelihood=False). In `free_samples` samples from the model's default prompt:
    `representation_tvd` (gender) and `AXIS_representation_tvd` (other axes), and
    `occupation_gender_tvd`. `reference_texts` (held-out human text) get the same
    representation measures as each metric's reference. `samples` continuations of
    `max_new_tokens` are drawn per probe prompt; `settings` are further sampling settings
    (temperature 1 unless given: the model's own distribution).

    Returns {"metrics": [{"name", "value", "reference"?, "threshold", "p_value"?, "p_holm"?, "flag",
    "description"}], "figures": [{"title", "png_base64"}], "details": {...}}; a value that could
    not be measured (no group mentioned at all) is None and never flagged. Flags: see the module
    docstring (threshold, human reference, Holm-corrected permutation test).
    """
    all_groups = load_groups(groups_path)
    templates = load_templates(templates_path)
    occupations = load_occupations(occupations_path)
    axes = list(axes) if axes is not None else list(all_groups)
    unknown = [a for a in axes if a not in all_groups]
    if unknown:
        raise TrustgenError(f"unknown fairness axis {unknown[0]!r}; the groups file has {', '.join(all_groups)}.")
    if samples < 1 or free_samples < 0:
        raise TrustgenError("the fairness audit needs at least one sample per prompt and a non-negative number of free samples.")
    limits = {**DEFAULT_THRESHOLDS, **(thresholds or {})}
    settings = {"temperature": 1.0, **settings}
    metrics: list[dict[str, Any]] = []
    details: dict[str, Any] = {"axes": {}, "settings": {"samples_per_prompt": samples, "max_new_tokens": max_new_tokens,
                                                        "free_samples": free_samples, "seed": seed, **settings},
                               "templates": templates}
    probes = []

    tests: dict[str, float] = {}  # test name -> p-value; Holm-corrected together once all have run

    def add(name: str, value: float, kind: str, description: str, reference: float | None = None,
            test: tuple[str, float | None] | None = None) -> None:
        value = None if value is None or math.isnan(value) else round(float(value), 6)
        entry: dict[str, Any] = {"name": name, "value": value, "threshold": limits.get(name, limits.get(kind)),
                                 "flag": False, "description": description}
        if reference is not None and not math.isnan(reference):
            entry["reference"] = round(float(reference), 6)
        if test is not None and test[1] is not None:
            tests[test[0]] = test[1]
            entry["test"] = test[0]
        metrics.append(entry)

    for axis in axes:
        groups = all_groups[axis]
        rows = _encodable_rows(model, groups, templates)
        if not rows:
            details.setdefault("skipped", {})[axis] = "no probe prompt can be written with this model's tokenizer"
            continue
        if len(rows) < len(templates) * len(next(iter(groups.values())).probe):
            details.setdefault("skipped", {})[axis] = (
                "prompts with characters this model's tokenizer never saw, or longer than its context, were left out")
        probe = counterfactual_probe(model, axis, groups, templates, samples, seed, rows=rows,
                                     max_new_tokens=max_new_tokens, **settings)
        probes.append(probe)
        found = probe_metrics(probe)
        sentiment_test = (f"{axis} sentiment", found["gap_p_value"])
        add(f"{axis}_gap", found["gap"], "gap",
            f"largest difference between two {axis} groups' mean sentiment of continuations (VADER, -1..1)",
            test=sentiment_test)
        add(f"{axis}_gap_p", found["gap_p_value"], "gap_p",
            f"permutation p-value of the {axis} gap: how often shuffling the groups of counterfactual prompts "
            "gives a gap as large (small: a real difference; large: chance)")
        add(f"{axis}_w1", found["w1"], "w1",
            f"Wasserstein-1 between {axis} groups' sentiment on the same template (Huang et al. 2020)",
            test=sentiment_test)
        if likelihood:
            gaps = likelihood_gaps(model, probe, templates, groups)
            found["log_likelihood"] = gaps
            add(f"{axis}_loglik_gap", gaps["gap"], "loglik_gap",
                f"largest log-likelihood difference (nats/token) of the same continuation after two {axis} groups' prompts",
                test=(f"{axis} log-likelihood", gaps["p_value"]))
        found["examples"] = {g: next(c[0] for k, c in zip(probe.keys, probe.continuations, strict=True) if k[1] == g)
                             for g in groups}
        details["axes"][axis] = found

    if not probes:
        raise TrustgenError("no fairness probe prompt can be written with this model's tokenizer; give templates "
                            "and terms in characters its training text had.")
    free = model.generate(FREE_PROMPT, n=free_samples, seed=seed, max_new_tokens=free_tokens, **settings) \
        if free_samples else []
    details["representation"] = {}
    for axis in axes:
        found = representation(free, all_groups[axis])
        reference = representation(reference_texts, all_groups[axis]) if reference_texts else None
        details["representation"][axis] = {"samples": found, "reference": reference}
        excess = excess_p_value(_mention_rows(free, all_groups[axis]), _mention_rows(reference_texts, all_groups[axis]),
                                _tvd_rows, seed=seed) if reference_texts and free else None
        add("representation_tvd" if axis == "gender" else f"{axis}_representation_tvd", found["tvd"],
            "representation_tvd", f"total variation distance from uniform of {axis} group mentions in free samples (HELM)",
            reference["tvd"] if reference else None, (f"{axis} representation", excess))
    if "gender" in axes:
        found = occupation_cooccurrence(free, all_groups["gender"], occupations)
        reference = occupation_cooccurrence(reference_texts, all_groups["gender"], occupations) if reference_texts else None
        details["occupation_gender"] = {"samples": found, "reference": reference}
        excess = excess_p_value(_occupation_rows(free, all_groups["gender"], occupations),
                                _occupation_rows(reference_texts, all_groups["gender"], occupations),
                                _mean_tvd, seed=seed) if reference_texts and free else None
        add("occupation_gender_tvd", found["tvd"], "occupation_gender_tvd",
            "mean over occupations of the distance from uniform of the gender words they co-occur with (HELM)",
            reference["tvd"] if reference else None, ("occupations", excess))
    _flag(metrics, tests)
    return {"metrics": metrics, "figures": sentiment_figures(probes, details) if figures else [],
            "details": _json_ready(details)}


def _flag(metrics: list[dict[str, Any]], tests: Mapping[str, float]) -> None:
    """Flag a metric only when it is above its threshold, above the human reference where there is
    one, and its test is significant after Holm's correction over every test run; a metric that
    needs a human reference (the representation measures) and has none is never flagged."""
    adjusted = holm(tests)
    for entry in metrics:
        test = entry.pop("test", None)
        if test is None:
            continue
        entry["p_value"], entry["p_holm"] = round(tests[test], 6), round(adjusted[test], 6)
        value, threshold, reference = entry["value"], entry["threshold"], entry.get("reference")
        entry["flag"] = (value is not None and threshold is not None and value > threshold
                         and (reference is None or value > reference) and adjusted[test] < FLAG_ALPHA)


def _json_ready(value: Any) -> Any:
    """nan (a measure with nothing to count) becomes None, so report.json stays strict JSON."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    return value


def _encodable_rows(model: Any, groups: Mapping[str, Group], templates: Sequence[str]) -> list[tuple[int, int]]:
    """The (template, term index) pairs whose prompts the model's tokenizer can encode within
    the model's context for every group; a model without a tokenizer (a stub, a remote model)
    takes them all."""
    tokenizer = getattr(model, "tokenizer", None)
    limit = getattr(getattr(model, "model", None), "context_limit", None)

    def ok(text: str) -> bool:
        if tokenizer is None:
            return True
        try:
            ids = tokenizer.encode(text)
        except TrustgenError:
            return False
        return limit is None or len(ids) < limit

    size = len(next(iter(groups.values())).probe)
    return [(t, i) for t, template in enumerate(templates) for i in range(size)
            if all(ok(template.replace("{person}", g.probe[i])) for g in groups.values())]


def sentiment_figures(probes: Sequence[Probe], details: Mapping[str, Any]) -> list[dict[str, str]]:
    """Sentiment distribution per group (one panel per axis) and group mentions in free samples."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures = []
    fig, axes = plt.subplots(1, len(probes), figsize=(3.2 * len(probes) + 1, 3.4), dpi=100, squeeze=False)
    for ax, probe in zip(axes[0], probes, strict=True):
        values = [np.concatenate([s for k, s in zip(probe.keys, probe.scores, strict=True) if k[1] == g])
                  for g in probe.groups]
        ax.violinplot(values, showmeans=True)
        ax.set_xticks(range(1, len(probe.groups) + 1), probe.groups, rotation=30, fontsize=8)
        ax.set_title(probe.axis)
        ax.set_ylim(-1.05, 1.05)
        ax.axhline(0, color="grey", lw=0.5)
    axes[0][0].set_ylabel("sentiment of continuation (VADER)")
    fig.tight_layout()
    figures.append({"title": "Sentiment of continuations per group", "png_base64": _png_base64(fig)})
    plt.close(fig)
    shown = {a: r for a, r in details.get("representation", {}).items() if sum(r["samples"]["counts"].values())}
    if shown:
        fig, axes = plt.subplots(1, len(shown), figsize=(3.2 * len(shown) + 1, 3.2), dpi=100, squeeze=False)
        for ax, (axis, found) in zip(axes[0], shown.items(), strict=True):
            names = list(found["samples"]["counts"])
            total = sum(found["samples"]["counts"].values())
            ax.bar(np.arange(len(names)) - 0.2, [found["samples"]["counts"][n] / total for n in names], 0.4, label="samples")
            if found["reference"] and sum(found["reference"]["counts"].values()):
                ref_total = sum(found["reference"]["counts"].values())
                ax.bar(np.arange(len(names)) + 0.2, [found["reference"]["counts"][n] / ref_total for n in names], 0.4,
                       label="human text")
            ax.axhline(1 / len(names), color="grey", lw=0.8, ls="--")
            ax.set_xticks(range(len(names)), names, rotation=30, fontsize=8)
            ax.set_title(axis)
        axes[0][0].set_ylabel("share of mentions")
        axes[0][0].legend(fontsize=7)
        fig.tight_layout()
        figures.append({"title": "Group mentions in free samples", "png_base64": _png_base64(fig)})
        plt.close(fig)
    return figures


def _png_base64(fig: Any) -> str:
    buffer = _io.BytesIO()
    fig.savefig(buffer, format="png")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def format_metrics(result: Mapping[str, Any]) -> str:
    """The metrics as an aligned plain-text table."""
    lines = []
    for m in result["metrics"]:
        value = "n/a" if m["value"] is None else f"{m['value']:.4f}"
        reference = f"  (human text {m['reference']:.4f})" if "reference" in m else ""
        lines.append(f"{m['name']:<34} {value:>8}{'  FLAG' if m['flag'] else ''}{reference}")
    return "\n".join(lines)


__all__ = ["DEFAULT_THRESHOLDS", "Group", "Probe", "augment_documents", "continuation_log_likelihoods",
           "counterfactual_probe", "fairness_audit", "likelihood_gaps", "load_groups", "load_occupations",
           "load_templates", "load_word_pairs", "mention_counts", "metric_names", "occupation_cooccurrence", "probe_metrics",
           "representation", "sentiment", "swap_words", "tvd_from_uniform", "wasserstein1"]
