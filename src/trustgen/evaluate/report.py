"""The audit report as one self-contained HTML page: no scripts, no CDN, plots as base64 PNGs.

Every number in the page is written by `fmt`, from the same dict that goes to report.json, so
the two always agree. Sections of other audits plug in as {"metrics": [...], "figures":
[{"title", "png_base64"}], "details": {...}}: their metrics join the summary table (section
name on each row) and their figures are shown under their own heading (see `SECTIONS`).
"""

from __future__ import annotations

import base64
import html
import io as _io
from collections.abc import Sequence
from typing import Any

import numpy as np

SECTIONS = {  # id -> heading, in page order
    "summary": "Summary", "quality": "Quality", "diversity": "Diversity", "memorization": "Memorization",
    "canaries": "Canaries (exposure)", "privacy": "Membership inference", "fairness": "Fairness",
    "balance": "Class balance", "samples": "Samples"}
_STYLE = """body{font:14px/1.45 system-ui,sans-serif;max-width:1080px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.6em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}
td.num{text-align:right;font-variant-numeric:tabular-nums}tr.flag td{background:#fde2e2}
.fail{color:#b00;font-weight:600}pre{white-space:pre-wrap;background:#f6f6f6;padding:.5em;border-radius:4px}
img{max-width:100%}h2{border-bottom:1px solid #ddd;margin-top:1.6em}.note{color:#555}"""


def fmt(value: Any) -> str:
    """How a value is shown everywhere in the page (4 significant digits)."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return f"{int(value):,}"
    if isinstance(value, (float, np.floating)):
        return f"{float(value):.4g}"
    return str(value)


def png_base64(fig: Any) -> str:
    """A matplotlib figure as base64 PNG text, and the figure closed."""
    import matplotlib.pyplot as plt

    buffer = _io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _img(figure: dict[str, Any]) -> str:
    title = html.escape(figure.get("title", ""))
    return (f'<figure><img alt="{title}" src="data:image/png;base64,{figure["png_base64"]}">'
            f"<figcaption>{title}</figcaption></figure>")


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]], row_attrs: Sequence[str] | None = None) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = []
    for i, row in enumerate(rows):
        cells = "".join(f'<td class="num">{fmt(c)}</td>' if isinstance(c, (int, float, np.number)) and not isinstance(c, bool)
                        else f"<td>{html.escape(fmt(c))}</td>" for c in row)
        body.append(f"<tr{row_attrs[i] if row_attrs else ''}>{cells}</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def summary_table(rows: Sequence[dict[str, Any]]) -> str:
    """The summary: one row per metric, marked with data-metric for tools (and tests)."""
    out = ["<table><tr><th>metric</th><th>value</th><th>human-text reference</th><th>threshold</th>"
           "<th>flag</th><th>what it measures</th></tr>"]
    for row in rows:
        cls = ' class="flag"' if row["flag"] else ""
        out.append(f'<tr data-metric="{html.escape(row["name"])}"{cls}><td>{html.escape(row["name"])}</td>'
                   f'<td class="num value">{fmt(row["value"])}</td><td class="num reference">{fmt(row.get("reference"))}</td>'
                   f'<td>{html.escape(fmt(row.get("threshold")))}</td><td>{"FLAG" if row["flag"] else ""}</td>'
                   f'<td>{html.escape(row.get("description", ""))}</td></tr>')
    out.append("</table>")
    return "".join(out)


# -- text sections ---------------------------------------------------------------------------

def _diversity(report: dict[str, Any]) -> tuple[str, list[dict[str, Any]]]:
    model, human = report["diversity"]["model"], report["diversity"]["human"]
    table = _table(["measure", "samples", "human text"], [[k, model[k], human[k]] for k in model])
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 3))
    names = [f"distinct_{n}" for n in range(1, 5)] + ["self_bleu", "repetition_rate"]
    x = np.arange(len(names))
    ax.bar(x - 0.2, [model[n] for n in names], 0.4, label="samples")
    ax.bar(x + 0.2, [human[n] for n in names], 0.4, label="held-out human text")
    ax.set_xticks(x, names, rotation=20, fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=8)
    return table, [{"title": "Diversity of samples and of human text of the same lengths", "png_base64": png_base64(fig)}]


def _memorization(report: dict[str, Any]) -> tuple[str, list[dict[str, Any]]]:
    mem = report["memorization"]
    samples, human, extraction = mem["samples"], mem["human"], mem["extraction"]
    longest = samples["longest"]
    parts = [f'<p>Index: {fmt(mem["index"]["characters"])} characters of {fmt(mem["index"]["documents"])} training '
             f'documents, built in {fmt(mem["index"]["seconds"])} s. Spans of {fmt(samples["span"])} characters: '
             f'{fmt(samples["windows"])} in the samples, {fmt(samples["memorized_fraction"])} of them found verbatim '
             f'(human text: {fmt(human["memorized_fraction"])}).</p>']
    if longest["length"]:
        parts.append(f'<p>Longest copied span: {fmt(longest["length"])} characters, from '
                     f'<b>{html.escape(str(longest["document"]))}</b> at character {fmt(longest["offset"])}:</p>'
                     f'<pre>{html.escape(longest["text"])}</pre>')
    parts.append(f'<p>Extraction: {fmt(extraction["prompts"])} training prefixes of {fmt(extraction["prefix_chars"])} '
                 f'characters; greedy decoding reproduced the next {fmt(extraction["suffix_chars"])} exactly for '
                 f'{fmt(extraction["exact_rate"])} of them (mean matched: {fmt(extraction["mean_matched_chars"])} '
                 "characters).</p>")
    for example in extraction["examples"][:3]:
        parts.append(f'<pre>{html.escape(example["prompt"])}<b>{html.escape(example["output"])}</b></pre>')
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3))
    top = max(max(samples["per_text_longest"], default=1), max(human["per_text_longest"], default=1))
    bins = np.linspace(0, max(top, samples["span"]) + 1, 30)
    axes[0].hist([samples["per_text_longest"], human["per_text_longest"]], bins=bins, label=["samples", "human text"])
    axes[0].axvline(samples["span"], color="grey", ls="--", lw=0.8)
    axes[0].set_xlabel("longest verbatim training match per text (characters)")
    axes[0].legend(fontsize=8)
    axes[1].hist([samples["per_text_fraction"], human["per_text_fraction"]], bins=np.linspace(0, 1, 21),
                 label=["samples", "human text"])
    axes[1].set_xlabel(f"share of a text's {samples['span']}-character spans found in training")
    axes[1].set_yscale("log")
    return "".join(parts), [{"title": "Memorization per text: samples and held-out human text", "png_base64": png_base64(fig)}]


def _canaries(report: dict[str, Any]) -> tuple[str, list[dict[str, Any]]]:
    found = report["canaries"]
    rows = [[c["secret"], c["repetitions"], c["log_perplexity"], c["exposure_rank"], c["exposure_skewnorm"]]
            for c in found["canaries"]]
    text = (f'<p class="note">Synthetic secrets inserted by --canaries (repetitions 0 = never-inserted controls). '
            f'Exposure over |R| = 2^{fmt(found["space_bits"])} possible secrets; the rank estimate uses '
            f'{fmt(found["candidates"])} random candidates and cannot exceed {fmt(found["rank_limit_bits"])} bits.</p>')
    text += _table(["secret", "repetitions", "log-perplexity (bits)", "exposure by rank", "exposure (skew-normal)"], rows)
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3))
    canaries = sorted(found["canaries"], key=lambda c: (c["repetitions"], c["secret"]))
    colours = {0: "grey", 1: "tab:blue", 10: "tab:orange", 100: "tab:red"}
    ax.bar(range(len(canaries)), [c["exposure_skewnorm"] for c in canaries],
           color=[colours.get(c["repetitions"], "tab:green") for c in canaries])
    ax.set_xticks(range(len(canaries)), [str(c["repetitions"]) for c in canaries], fontsize=7)
    ax.set_xlabel("copies in the training data (0 = control)")
    ax.set_ylabel("exposure (bits)")
    return text, [{"title": "Exposure per canary", "png_base64": png_base64(fig)}]


def _privacy(report: dict[str, Any]) -> tuple[str, list[dict[str, Any]]]:
    mia = report["privacy"]
    verdict = "" if mia.get("comparable", True) else "<strong>Not comparable (distribution shift).</strong> "
    text = (f'<p>{verdict}Split: {html.escape(mia.get("split", "training vs held-out windows"))}.</p>'
            f'<p>{fmt(mia["members"])} training and {fmt(mia["non_members"])} held-out windows. AUC {fmt(mia["auc"])}; '
            f'TPR at 0.1% FPR {fmt(mia["tpr_at_0.1%_fpr"])}, at 1% FPR {fmt(mia["tpr_at_1%_fpr"])} (the FPR axis moves '
            f'in steps of {fmt(mia["fpr_resolution"])}). Mean loss: training {fmt(mia["member_loss_mean"])}, held-out '
            f'{fmt(mia["non_member_loss_mean"])} nats/token.</p>')
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    fpr, tpr = np.asarray(mia["roc"]["fpr"]), np.asarray(mia["roc"]["tpr"])
    axes[0].plot(np.maximum(fpr, 1e-4), np.maximum(tpr, 1e-4))
    axes[0].plot([1e-4, 1], [1e-4, 1], color="grey", ls="--", lw=0.8)
    axes[0].set_xscale("log")
    axes[0].set_yscale("log")
    axes[0].set_xlabel("false-positive rate")
    axes[0].set_ylabel("true-positive rate")
    axes[1].hist([mia["member_losses"], mia["non_member_losses"]], bins=30, label=["training", "held-out"])
    axes[1].set_xlabel("loss (nats/token)")
    axes[1].legend(fontsize=8)
    return text, [{"title": "Loss-based membership inference: ROC (log-log) and losses", "png_base64": png_base64(fig)}]


def _excerpts(report: dict[str, Any]) -> str:
    return "".join(f'<h3>sample {i + 1}</h3><pre>{html.escape(e["model"])}</pre>'
                   f'<details><summary>human text of the same length</summary><pre>{html.escape(e["human"])}</pre></details>'
                   for i, e in enumerate(report["excerpts"]))


# -- image sections -------------------------------------------------------------------------

def _image_quality(report: dict[str, Any]) -> str:
    evaluation = report["evaluation"]
    names = ["fid", "kid", "precision", "recall", "density", "coverage"]
    rows = [[name] + [evaluation[r][name] for r in ("model", "matched", "floor")] for name in names]
    return (f'<p>{fmt(evaluation["n_samples"])} samples against {fmt(evaluation["n_reference"])} training images of '
            f'{html.escape(evaluation["dataset"])}; the floor is {fmt(evaluation["n_matched"])} held-out real images.</p>'
            + _table(["metric", "samples", "samples (equal n)", "held-out floor"], rows))


def _balance(report: dict[str, Any]) -> tuple[str, list[dict[str, Any]]]:
    balance = report["class_balance"]
    rows = [[c, s, t] for c, s, t in zip(balance["classes"], balance["samples"], balance["training"], strict=True)]
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3))
    x = np.arange(len(balance["classes"]))
    ax.bar(x - 0.2, balance["samples"], 0.4, label="samples (predicted class)")
    ax.bar(x + 0.2, balance["training"], 0.4, label="training data")
    ax.set_xticks(x, balance["classes"], fontsize=8)
    ax.legend(fontsize=8)
    return (_table(["class", "share of samples", "share of training data"], rows),
            [{"title": "Class balance", "png_base64": png_base64(fig)}])


# -- the page ---------------------------------------------------------------------------------

def render_html(report: dict[str, Any], figures: Sequence[dict[str, Any]] = ()) -> str:
    """The whole page. `figures` are extra pictures, each with a "section" (default fairness)."""
    body: dict[str, list[str]] = {key: [] for key in SECTIONS}
    failed = report.get("failed") or []
    body["summary"].append(f'<p class="fail">--fail-on crossed: {html.escape("; ".join(failed))}</p>' if failed else "")
    body["summary"].append(summary_table(report["summary"]))
    if report["kind"] == "text":
        q = report["quality"]
        body["quality"].append(f'<p>Held-out text: {fmt(q["tokens"])} tokens ({fmt(q["chars"])} characters): perplexity '
                               f'{fmt(q["perplexity"])}, {fmt(q["bits_per_token"])} bits/token, '
                               f'{fmt(q["bits_per_char"])} bits/character.</p>')
        for key, build in (("diversity", _diversity), ("memorization", _memorization), ("privacy", _privacy)):
            text, pictures = build(report)
            body[key] += [text, *(_img(p) for p in pictures)]
        if report.get("canaries"):
            text, pictures = _canaries(report)
            body["canaries"] += [text, *(_img(p) for p in pictures)]
        body["samples"].append(_excerpts(report))
    else:
        body["quality"].append(_image_quality(report))
        if report.get("class_balance"):
            text, pictures = _balance(report)
            body["balance"] += [text, *(_img(p) for p in pictures)]
    fairness = report.get("fairness")
    if fairness and fairness.get("skipped"):
        body["fairness"].append(f'<p class="note">Not measured: {html.escape(fairness["skipped"])}</p>')
    elif fairness:
        rows = [row for row in report["summary"] if row.get("section") == "fairness"]
        body["fairness"].append(summary_table(rows))
    for figure in figures:
        body[figure.get("section", "fairness")].append(_img(figure))
    title = f"trustgen audit: {html.escape(str(report.get('run', '')))}"
    settings = ", ".join(f"{k} {fmt(v)}" for k, v in report.get("settings", {}).items())
    head = (f'<h1>{title}</h1><p class="note">{html.escape(report["kind"])} run, model id '
            f'{html.escape(str(report.get("model_id", "")))}; {html.escape(settings)}; written '
            f'{html.escape(str(report.get("created", "")))} by trustgen {html.escape(str(report.get("trustgen_version", "")))}</p>')
    sections = "".join(f'<section id="{key}"><h2>{SECTIONS[key]}</h2>{"".join(parts)}</section>'
                       for key, parts in body.items() if any(parts))
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
            f"<style>{_STYLE}</style></head><body>{head}{sections}</body></html>\n")


__all__ = ["SECTIONS", "fmt", "png_base64", "render_html", "summary_table"]
