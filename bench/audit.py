"""Audit numbers: memorization index build time, a full audit of the demo model, and canary
separation on a small model trained on Shakespeare with --canaries. Prints a Markdown table.

    python bench/audit.py                      # trains what it needs into runs/bench-audit-*
    python bench/audit.py --demo-run runs/demo --canary-run runs/canary
    python bench/audit.py --quick              # seconds-long smoke version
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from common import Results

from trustgen import api
from trustgen.config import TrainConfig
from trustgen.data.text import find_documents, split_documents
from trustgen.evaluate.memorization import CorpusIndex


def index_seconds(repeats: int) -> tuple[list[float], int]:
    config = TrainConfig.from_dict({"max_steps": 1})
    split = split_documents("shakespeare", find_documents("shakespeare"), config.val_fraction, config.seed)
    texts = [d.read() for d in split.train]
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        index = CorpusIndex([d.name for d in split.train], texts)
        times.append(time.perf_counter() - started)
    return times, len(index)


def ensure_run(path: Path, budget: str, **settings: object) -> Path:
    if not (path / "config.json").exists():
        print(f"training {path} for {budget} ...", flush=True)
        api.train(path, data="shakespeare", time_budget=budget, progress=False, **settings)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo-run", type=Path, default=Path("runs/bench-audit-demo"))
    parser.add_argument("--demo-train", default="5m", help="training time of the demo model when it is trained here")
    parser.add_argument("--canary-run", type=Path, default=Path("runs/bench-audit-canary"))
    parser.add_argument("--canary-train", default="10m")
    parser.add_argument("--canaries", type=int, default=9)
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    record = Results(__file__, args.quick)
    if args.quick:
        args.demo_train, args.canary_train, args.samples = "20s", "20s", 20
        args.demo_run, args.canary_run = Path("runs/bench-audit-quick-demo"), Path("runs/bench-audit-quick-canary")

    times, characters = index_seconds(1 if args.quick else 3)
    rows = [("memorization index over the built-in corpus (training split)", "< 10 s",
             f"**{min(times):.2f} s** best, {statistics.median(times):.2f} s median of {len(times)} "
             f"({characters:,} characters)")]

    demo = ensure_run(args.demo_run, args.demo_train)
    started = time.perf_counter()
    report = api.audit(demo, samples=args.samples, progress=True)
    total = time.perf_counter() - started
    values = {row["name"]: row for row in report["summary"]}
    parts = ", ".join(f"{k} {v:.0f}" for k, v in report["seconds"].items())
    rows.append((f"audit of the demo model, {args.samples} samples of 200 tokens, all sections", "< 5 min",
                 f"**{total:.0f} s** ({parts})"))
    for name in ("perplexity", "bits_per_char", "distinct_2", "self_bleu", "memorized_fraction",
                 "longest_copied_span", "extraction_rate", "mia_auc", "mia_tpr_at_0.1%_fpr"):
        row = values[name]
        reference = "" if row["reference"] is None else f" (human text {row['reference']:.4g})"
        rows.append((f"demo model: {name}", "", f"{row['value']:.4g}{reference}"))

    canary = ensure_run(args.canary_run, args.canary_train, canaries=args.canaries)
    found = api.audit(canary, samples=20, fairness=False, mia_examples=200)["canaries"]
    for reps, group in found["by_repetitions"].items():
        target = "≤ 2 bits" if reps == "0" else ("≥ 10 bits" if reps == "100" else "")
        per = sorted(c["exposure_skewnorm"] for c in found["canaries"] if str(c["repetitions"]) == reps)
        what = "never-inserted controls" if reps == "0" else f"canaries inserted {reps}x"
        rows.append((f"exposure of {what} (skew-normal; rank)", target,
                     f"**{group['mean_exposure_skewnorm']:.1f}** bits mean ({', '.join(f'{e:.1f}' for e in per)}); "
                     f"rank {group['mean_exposure_rank']:.1f} (limit {found['rank_limit_bits']:.1f})"))

    record.note(f"\ndemo model: {demo} ({args.demo_train} if trained here); canary model: {canary} "
                f"({args.canary_train}, --canaries {args.canaries}); {found['candidates']:,} candidates\n")
    print("| what | target | measured |\n| --- | --- | --- |")
    for what, target, measured in rows:
        print(f"| {what} | {target} | {measured} |")
    record.add("audit", ["what", "target", "measured"], rows)
    record.write()


if __name__ == "__main__":
    main()
