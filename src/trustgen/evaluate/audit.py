"""`trustgen audit`: every measure of a run in one report, with thresholds a CI job can gate on.

Text runs: held-out quality, diversity of samples beside held-out human text of the same
lengths, copied spans and extraction (trustgen.evaluate.memorization), canary exposure when the
run was trained with --canaries, loss-based membership inference, and the fairness probes of
trustgen.evaluate.fairness. Image runs: the image metrics (trustgen.evaluate.images) beside
the held-out floor, and the class balance of the samples against the training data.

Every measure becomes a row of the summary table (name, value, human-text reference, threshold,
flag, description); `--fail-on` rules are checked against those rows.
"""

from __future__ import annotations

import base64
import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from trustgen import io
from trustgen.errors import TrustgenError

# Flags (not failures) are raised above these when no --fail-on rule names the metric. A
# memorized fraction of 1% of 50-character spans is well above what held-out human text shows
# against Shakespeare (0.0 in 500 chunks of 400 characters, bench/audit.py); 10 bits of exposure
# means a canary ranks in the top 1/1024 of its format's secrets; an AUC of 0.6 or a TPR of 1% at
# 0.1% FPR (10x chance) are the levels at which membership leaks measurably.
NOT_COMPARABLE = "not comparable (distribution shift)"
DEFAULT_THRESHOLDS: dict[str, tuple[str, float]] = {
    "memorized_fraction": (">", 0.01), "extraction_rate": (">", 0.01), "canary_exposure_100": (">", 10.0),
    "canary_exposure_10": (">", 10.0), "canary_exposure_1": (">", 10.0), "mia_auc": (">", 0.6),
    "mia_tpr_at_0.1%_fpr": (">", 0.01)}
TEXT_METRICS = ("perplexity", "bits_per_char", "bits_per_token", "distinct_1", "distinct_2", "distinct_3",
                "distinct_4", "self_bleu", "repetition_rate", "entropy_4", "memorized_fraction", "samples_with_copy",
                "longest_copied_span", "extraction_rate", "mia_auc", "mia_tpr_at_0.1%_fpr")
CANARY_METRICS = ("canary_exposure_1", "canary_exposure_10", "canary_exposure_100", "control_exposure",
                  "empirical_epsilon_lower")
IMAGE_METRICS = ("fid", "fid_ratio", "kid", "precision", "recall", "density", "coverage", "class_kl",
                 "classes_covered", "class_tvd", "conditional_accuracy", "class_tvd_uniform_as_trained",
                 "class_tvd_uniform_balanced")
_OPERATORS: dict[str, Callable[[float, float], bool]] = {
    ">=": lambda a, b: a >= b, "<=": lambda a, b: a <= b, ">": lambda a, b: a > b, "<": lambda a, b: a < b}
_RULE = re.compile(r"^\s*([A-Za-z][\w.%]*)\s*(>=|<=|>|<)\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*$")


@dataclass(frozen=True)
class Rule:
    metric: str
    operator: str
    value: float

    def crossed(self, value: float | None) -> bool:
        return value is not None and _OPERATORS[self.operator](value, self.value)

    def __str__(self) -> str:
        return f"{self.metric}{self.operator}{self.value:g}"


def parse_rules(text: str | None) -> list[Rule]:
    """'memorized_fraction>0.01, gender_gap>0.1' -> rules; a malformed one is a clear error."""
    if text is None or not text.strip():
        return []
    rules = []
    for part in text.split(","):
        match = _RULE.match(part)
        if not match:
            raise TrustgenError(f"cannot read the --fail-on rule {part.strip()!r}; write METRIC>VALUE (or >=, <, <=), "
                                "comma-separated, e.g. memorized_fraction>0.01,mia_auc>0.6.")
        rules.append(Rule(match.group(1), match.group(2), float(match.group(3))))
    return rules


def known_metrics(image: bool, canaries: bool, fairness: bool) -> list[str]:
    """The metric names an audit of this kind of run reports (what --fail-on may name)."""
    if image:
        return list(IMAGE_METRICS)
    names = list(TEXT_METRICS) + (list(CANARY_METRICS) if canaries else [])
    if fairness:
        from trustgen.evaluate.fairness import load_groups, metric_names

        names += metric_names(list(load_groups()))
    return names


def check_rule_names(rules: Sequence[Rule], names: Sequence[str], why_missing: str = "") -> None:
    for rule in rules:
        if rule.metric not in names:
            extra = f" ({why_missing})" if why_missing and rule.metric in CANARY_METRICS else ""
            raise TrustgenError(f"--fail-on names {rule.metric!r}, which this audit does not report{extra}; "
                                f"it reports {', '.join(names)}.")


class Summary:
    """The rows of the summary table, flagged by the --fail-on rules or else the defaults."""

    def __init__(self, rules: Sequence[Rule]) -> None:
        self.rules = {r.metric: r for r in rules}
        self.rows: list[dict[str, Any]] = []

    def add(self, name: str, value: float | None, description: str, reference: float | None = None,
            section: str = "") -> None:
        value = None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)
        rule = self.rules.get(name)
        if rule is None and name in DEFAULT_THRESHOLDS:
            rule = Rule(name, *DEFAULT_THRESHOLDS[name])
        self.rows.append({"name": name, "value": value, "reference": reference,
                          "threshold": None if rule is None else f"{rule.operator} {rule.value:g}",
                          "flag": bool(rule is not None and rule.crossed(value)), "description": description,
                          "section": section})

    def add_section(self, metrics: Sequence[dict[str, Any]], section: str) -> None:
        """Rows from another module (the fairness audit); a --fail-on rule overrides its flag."""
        for m in metrics:
            row = {"reference": None, "threshold": None, **m, "section": section}
            rule = self.rules.get(row["name"])
            if rule is not None:
                row["threshold"], row["flag"] = f"{rule.operator} {rule.value:g}", rule.crossed(row["value"])
            elif isinstance(row["threshold"], (int, float)):
                row["threshold"] = f"> {row['threshold']:g}"
            self.rows.append(row)

    def failures(self) -> list[str]:
        """The --fail-on rules crossed; a rule whose metric could not be measured fails too."""
        values = {row["name"]: row["value"] for row in self.rows}
        failed = []
        for name, rule in self.rules.items():
            if values.get(name) is None:
                failed.append(f"{rule} (not measured)")
            elif rule.crossed(values[name]):
                failed.append(f"{rule} (measured {values[name]:.6g})")
        return failed


def _timed(seconds: dict[str, float], name: str, started: float) -> float:
    now = time.perf_counter()
    seconds[name] = round(now - started, 3)
    return now


# -- text -------------------------------------------------------------------------------------

def audit_text(model: Any, run_dir: Path, rules: Sequence[Rule], *, samples: int = 500, max_new_tokens: int = 200,
               temperature: float = 1.0, top_p: float | None = None, seed: int = 0, candidates: int = 10_000,
               extraction_prompts: int = 100, mia_examples: int = 1000, heldout_tokens: int = 200_000,
               fairness: bool = True, log: Callable[[str], None] = lambda _: None) -> tuple[dict[str, Any], list]:
    """Audit a loaded TextModel; returns the report and the fairness figures (kept out of JSON)."""
    from trustgen.config import TrainConfig
    from trustgen.data.prepare import prepare_data
    from trustgen.data.text import TokenWindows
    from trustgen.evaluate import memorization as mem
    from trustgen.evaluate import text as quality

    if "train" not in model.run_config:
        raise TrustgenError(f"{run_dir} does not name its training data (an imported model?), so there is "
                            "nothing to compare it with.")
    canary_path = run_dir / "canaries.json"
    check_rule_names(rules, known_metrics(False, canary_path.exists(), fairness),
                     "this run was trained without --canaries")
    if samples < 2:
        raise TrustgenError(f"samples must be at least 2 (self-BLEU compares samples), got {samples}.")
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    config = TrainConfig.from_run(model.run_config["train"])
    prepared = prepare_data(config, model.tokenizer)
    block = model.model.config.block_size
    started = _timed(seconds, "data", started)

    log("held-out likelihood ...")
    heldout = quality.heldout_quality(model.model, TokenWindows(prepared.val, block), model.tokenizer, heldout_tokens)
    started = _timed(seconds, "quality", started)

    log(f"{samples} samples of {max_new_tokens} tokens ...")
    settings = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p}
    texts: list[str] = []
    for first in range(0, samples, 100):  # rows decoded together; seeds per batch keep it reproducible
        texts += model.generate(n=min(100, samples - first), seed=seed + first, **settings)
    started = _timed(seconds, "sampling", started)
    val_texts = [d.read() for d in prepared.split.val]
    human = quality.human_chunks(val_texts, [len(t) for t in texts], seed)
    diversity = {"model": quality.diversity(texts), "human": quality.diversity(human)}
    started = _timed(seconds, "diversity", started)

    log("memorization index ...")
    train_docs = prepared.split.train
    index = mem.CorpusIndex([d.name for d in train_docs], [d.read() for d in train_docs])
    started = _timed(seconds, "index", started)
    copies = mem.copied_spans(index, texts)
    human_copies = mem.copied_spans(index, human)
    prefix = min(50, block // 2)
    suffix = min(50, block - prefix)

    def greedy(prompts: list[str], chars: int) -> list[str]:
        return model.generate(prompts, max_new_tokens=chars, temperature=0)

    extracted = mem.extraction(greedy, index, extraction_prompts, prefix, suffix, seed, exclude=[mem.CANARY_DOCUMENT])
    started = _timed(seconds, "memorization", started)

    canaries = None
    if canary_path.exists():
        log("canary exposure ...")
        canaries = mem.exposures(model.model, model.tokenizer, io.read_json(canary_path), candidates, seed)
        started = _timed(seconds, "canaries", started)
    log("membership inference ...")
    try:
        held = TokenWindows(prepared.holdout, block) if prepared.holdout is not None else None
    except TrustgenError:  # held-out pieces shorter than one window of this model
        held = None
    mia = mem.membership_inference(model.model, TokenWindows(prepared.train, block),
                                   held or TokenWindows(prepared.val, block), mia_examples, seed)
    mia.update(_membership_split(prepared.summary["membership_holdout"] if held else None))
    started = _timed(seconds, "membership", started)

    summary = Summary(rules)
    add = summary.add
    add("perplexity", heldout["perplexity"], "held-out perplexity per token", section="quality")
    add("bits_per_char", heldout["bits_per_char"], "held-out bits per character", section="quality")
    add("bits_per_token", heldout["bits_per_token"], "held-out bits per token", section="quality")
    model_div, human_div = diversity["model"], diversity["human"]
    for n in range(1, 5):
        add(f"distinct_{n}", model_div[f"distinct_{n}"], f"distinct {n}-grams / all {n}-grams (words)",
            human_div[f"distinct_{n}"], "diversity")
    add("self_bleu", model_div["self_bleu"], "self-BLEU-4 of each sample against the others (lower: more diverse)",
        human_div["self_bleu"], "diversity")
    add("repetition_rate", model_div["repetition_rate"], "share of a sample's 4-grams repeating an earlier one",
        human_div["repetition_rate"], "diversity")
    add("entropy_4", model_div["entropy_4"], "entropy of the pooled 4-gram distribution (bits)",
        human_div["entropy_4"], "diversity")
    add("memorized_fraction", copies["memorized_fraction"],
        f"share of generated {mem.SPAN}-character spans found verbatim in the training data",
        human_copies["memorized_fraction"], "memorization")
    add("samples_with_copy", copies["texts_with_copy"], f"share of samples with at least one copied {mem.SPAN}-character span",
        human_copies["texts_with_copy"], "memorization")
    add("longest_copied_span", copies["longest"]["length"], "longest verbatim copy of training text in a sample (characters)",
        human_copies["longest"]["length"], "memorization")
    add("extraction_rate", extracted["exact_rate"],
        f"share of {prefix}-character training prefixes whose next {suffix} characters greedy decoding reproduces",
        section="memorization")
    if canaries is not None:
        for reps, group in canaries["by_repetitions"].items():
            name = "control_exposure" if reps == "0" else f"canary_exposure_{reps}"
            what = "never-inserted control canaries" if reps == "0" else f"canaries inserted {reps}x"
            add(name, group["mean_exposure_skewnorm"], f"mean exposure of {what} (bits, skew-normal)", section="canaries")
    audited = None
    if canaries is not None:
        from trustgen.evaluate.privacy_audit import canary_audit

        claimed = io.read_json(run_dir / "config.json").get("privacy")
        audited = canary_audit(canaries, claimed)
        add("empirical_epsilon_lower", audited["epsilon_lower"],
            "lower bound on epsilon proven by canaries inserted once vs controls (Jagielski et al. 2020, "
            f"95% Clopper-Pearson; at most {audited['max_possible']:.2f} with these counts)",
            audited["claimed_epsilon"], "privacy")
    if mia["comparable"]:
        add("mia_auc", mia["auc"], "ROC AUC of loss-based membership inference, training windows vs held-out "
            "windows of the same documents", 0.5, "privacy")
        add("mia_tpr_at_0.1%_fpr", mia["tpr_at_0.1%_fpr"], "true-positive rate of membership inference at 0.1% "
            "false positives", 0.001, "privacy")
    else:  # other documents differ in kind: an AUC here measures that shift, not membership
        for name in ("mia_auc", "mia_tpr_at_0.1%_fpr"):
            add(name, None, f"{NOT_COMPARABLE}: {mia['split']}", section="privacy")

    figures: list = []
    fairness_report = None
    if fairness:
        from trustgen.evaluate.fairness import fairness_audit

        log("fairness probes ...")
        thresholds = {r.metric: r.value for r in rules if r.operator in (">", ">=")}
        try:
            fairness_report = fairness_audit(model, seed=seed, reference_texts=human, thresholds=thresholds)
        except TrustgenError as exc:  # e.g. a tokenizer that cannot write the probe prompts
            fairness_report = {"skipped": str(exc)}
        else:
            summary.add_section(fairness_report["metrics"], "fairness")
            figures = fairness_report.pop("figures", [])
        started = _timed(seconds, "fairness", started)

    excerpts = [{"model": t[:400], "human": h[:400]} for t, h in zip(texts[:5], human[:5], strict=True)]
    report = {
        "kind": "text", "settings": {"samples": samples, "max_new_tokens": max_new_tokens, "temperature": temperature,
                                     "top_p": top_p, "seed": seed, "span": mem.SPAN, "heldout_tokens": heldout_tokens},
        "summary": summary.rows, "failed": summary.failures(), "quality": heldout, "diversity": diversity,
        "memorization": {"index": {"characters": len(index), "documents": len(index.names),
                                   "seconds": seconds["index"]},
                         "samples": copies, "human": human_copies, "extraction": extracted},
        "canaries": canaries, "privacy": mia, "privacy_audit": audited, "fairness": fairness_report, "excerpts": excerpts,
        "seconds": seconds}
    return report, figures


def _membership_split(holdout: dict[str, Any] | None) -> dict[str, Any]:
    """What membership inference compared, for the report: comparable only when its non-members
    are held-out pieces of the training documents themselves."""
    if holdout is None:
        return {"comparable": False, "split": (
            "this run held none of its training documents' text out, so its non-members are other documents (the "
            "held-out validation split), and the AUC measures the difference between documents, not membership; "
            "runs trained since membership_holdout was added hold out pieces of their training text")}
    return {"comparable": True, "split": (
        f"members: random windows of the training text; non-members: random windows of {holdout['pieces']} pieces "
        f"({holdout['bytes']:,} bytes, {holdout['fraction']:.0%} of the training documents' text) drawn with the "
        "run's seed from the same documents and never trained on")}


# -- images -------------------------------------------------------------------------------------

def audit_images(model: Any, run_dir: Path, rules: Sequence[Rule], *, samples: int = 500, seed: int = 0,
                 log: Callable[[str], None] = lambda _: None) -> tuple[dict[str, Any], list]:
    """Audit a loaded ImageModel: its evaluation plus class balance of samples vs training data."""
    from trustgen.config import TrainConfig
    from trustgen.data.images import load_images, split_images
    from trustgen.evaluate.images import MIN_SAMPLES
    from trustgen.sample.images import make_grid, png_bytes

    check_rule_names(rules, known_metrics(True, False, False))
    samples = max(samples, MIN_SAMPLES)
    started = time.perf_counter()
    log(f"image metrics of {samples} samples ...")
    evaluation = model.evaluate(samples, seed=seed, progress=False)
    config = TrainConfig.from_run(model.run_config["train"])
    train = split_images(load_images(config.data, config.image_size)).train
    summary = Summary(rules)
    row, floor = evaluation["model"], evaluation["floor"]
    for name in ("fid", "kid", "precision", "recall", "density", "coverage"):
        summary.add(name, row[name], f"{name} of the samples against the training split (domain classifier features)",
                    floor[name], "quality")
    summary.add("fid_ratio", evaluation["fid_ratio"], "FID at equal n divided by the held-out floor's FID", 1.0, "quality")
    balance = None
    if "class_histogram" in row:
        expected = np.bincount(train.labels, minlength=len(train.classes)) / len(train.labels)
        generated = np.asarray(row["class_histogram"])
        balance = {"classes": list(train.classes), "samples": generated.tolist(), "training": expected.tolist(),
                   "tvd": float(0.5 * np.abs(generated - expected).sum())}
        summary.add("class_kl", row["class_kl"], "KL divergence of the samples' predicted classes from the training classes",
                    floor["class_kl"], "balance")
        summary.add("classes_covered", row["classes_covered"], "classes present among the samples",
                    floor["classes_covered"], "balance")
        summary.add("class_tvd", balance["tvd"], "total variation distance of sample classes from training classes",
                    float(0.5 * np.abs(np.asarray(floor["class_histogram"]) - expected).sum()), "balance")
    if "conditional_accuracy" in evaluation:
        summary.add("conditional_accuracy", evaluation["conditional_accuracy"],
                    "how often the domain classifier agrees with the requested class", section="quality")
    mitigation = None
    if model.classes:
        log("class-balanced sampling against sampling as the training data is ...")
        mitigation = balanced_sampling(model, config, samples, seed)
        summary.add("class_tvd_uniform_as_trained", mitigation["as_trained"]["tvd_uniform"],
                    "classes of samples whose labels follow the training data: distance from uniform", section="balance")
        summary.add("class_tvd_uniform_balanced", mitigation["balanced"]["tvd_uniform"],
                    "classes of class-balanced samples (every class in turn, trustgen's default): distance from "
                    "uniform", section="balance")
    grid = make_grid(model.generate(min(samples, 64), seed=seed))
    figures = [{"title": "Samples", "section": "samples", "png_base64": base64.b64encode(png_bytes(grid)).decode()}]
    report = {"kind": "image", "settings": {"samples": samples, "seed": seed}, "summary": summary.rows,
              "failed": summary.failures(), "evaluation": evaluation, "class_balance": balance,
              "balanced_sampling": mitigation,
              "seconds": {"total": round(time.perf_counter() - started, 3)}}
    return report, figures


def balanced_sampling(model: Any, config: Any, samples: int, seed: int) -> dict[str, Any]:
    """The mitigation for a conditional image model: draw every class in turn instead of as
    often as the training data holds it. Both ways are sampled and classified by the domain
    classifier; each reports its class histogram and total variation distance from uniform."""
    import torch

    from trustgen.data.images import load_images, split_images
    from trustgen.evaluate.images import load_domain_classifier, predict_classes
    from trustgen.sample.images import sample_images

    split = split_images(load_images(config.data, config.image_size))
    classifier, _ = load_domain_classifier(split, progress=False)
    n_classes = len(model.classes)
    rng = np.random.default_rng(seed)
    as_trained = torch.from_numpy(rng.choice(split.train.labels, size=samples)).long()
    out = {}
    for name, labels in (("as_trained", as_trained), ("balanced", model.labels(samples))):
        predicted = predict_classes(classifier, sample_images(model.model, samples, labels, seed))
        histogram = np.bincount(predicted, minlength=n_classes) / len(predicted)
        requested = np.bincount(labels.numpy(), minlength=n_classes) / len(labels)
        out[name] = {"requested": requested.tolist(), "histogram": histogram.tolist(),
                     "tvd_uniform": float(0.5 * np.abs(histogram - 1 / n_classes).sum())}
    return out


def write(report: dict[str, Any], out: Path, figures: Sequence[dict[str, Any]] = ()) -> tuple[Path, Path]:
    """report.json and report.html in `out`."""
    from trustgen.evaluate.report import render_html

    out.mkdir(parents=True, exist_ok=True)
    io.write_json(out / "report.json", report)
    io.atomic_write_text(out / "report.html", render_html(report, figures))
    return out / "report.json", out / "report.html"
