"""Counterfactual data augmentation on the demo model: does it close the gender gaps, and at
what cost in held-out perplexity?

Trains the demo's character-level GPT on the built-in Shakespeare twice for the same number of
steps (same seed, same batches per step): once as is, once with `counterfactual_augment="gender"`
(every training play also appears with its gendered words swapped; Lu et al. 2018). Each model
is then audited with `trustgen.evaluate.fairness.fairness_audit` on the gender axis over several
sampling seeds, and the held-out perplexity comes from the trainer's final pass over the
untouched validation plays (Hamlet, Macbeth, The Tempest, Julius Caesar). Prints a Markdown
table: mean over seeds, with the spread (min..max) in brackets.

    python bench/fairness.py                 # ~15 minutes on 2 cores
    python bench/fairness.py --quick         # a smoke test: about 1.5 CPU-minutes
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from pathlib import Path

from common import Results

from trustgen import api
from trustgen.data.text import find_documents, iter_text, split_documents
from trustgen.evaluate.fairness import fairness_audit
from trustgen.evaluate.text import human_chunks

METRICS = [("gender_gap", "gender sentiment gap"), ("gender_w1", "gender W1"),
           ("gender_loglik_gap", "log-likelihood gap (nats/token)"),
           ("representation_tvd", "representation distance (TVD)"),
           ("occupation_gender_tvd", "occupation-gender TVD")]


def held_out_texts(n: int, length: int) -> list[str]:
    """n chunks of held-out Shakespeare, the human reference for the representation measures."""
    documents = find_documents("shakespeare")
    val = split_documents("shakespeare", documents, 0.1, 0).val
    return human_chunks(["".join(iter_text([d])) for d in val], [length] * n)


def measure(run: Path, seeds: list[int], free_samples: int, reference: list[str]) -> dict[str, list[float]]:
    model = api.load(run)
    values: dict[str, list[float]] = {name: [] for name, _ in METRICS}
    for seed in seeds:
        result = fairness_audit(model, axes=["gender"], samples=4, free_samples=free_samples, seed=seed,
                                reference_texts=reference, figures=False)
        for metric in result["metrics"]:
            if metric["name"] in values and metric["value"] is not None:
                values[metric["name"]].append(metric["value"])
            if metric["name"] in values and "reference" in metric:
                values.setdefault(f"{metric['name']}_human", [metric["reference"]])
    return values


def cell(values: list[float]) -> str:
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} [{min(values):.3f}..{max(values):.3f}]"


def change(before: list[float], after: list[float]) -> str:
    if not before or not after:
        return "n/a"
    a, b = statistics.mean(before), statistics.mean(after)
    return f"{b - a:+.3f} ({(b - a) / a:+.0%})" if a else f"{b - a:+.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=800, help="training steps of each model (the demo does "
                                                               "about 900 in its 5 minutes on an idle 2-core CPU)")
    parser.add_argument("--seeds", type=int, default=3, help="sampling seeds of the audit")
    parser.add_argument("--free-samples", type=int, default=100, help="free samples per seed")
    parser.add_argument("--out", type=Path, default=Path("bench/out/fairness"))
    parser.add_argument("--n-layer", type=int, help="a smaller model than the demo's (4 layers), for a busy machine")
    parser.add_argument("--n-embd", type=int, help="width (the demo: 256)")
    parser.add_argument("--block-size", type=int, help="context (the demo: 256)")
    parser.add_argument("--quick", action="store_true", help="a tiny model and few samples (smoke test)")
    args = parser.parse_args()
    record = Results(__file__, args.quick)
    model_config = {k: v for k, v in {"n_layer": args.n_layer, "n_embd": args.n_embd,
                                      "block_size": args.block_size}.items() if v is not None} or None
    if args.quick:
        model_config = {"n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 64}
    steps = 20 if args.quick else args.steps
    seeds = list(range(1 if args.quick else args.seeds))
    free = 10 if args.quick else args.free_samples
    runs = {}
    for name, extra in (("plain", {}), ("augmented", {"counterfactual_augment": "gender"})):
        run = args.out / name
        if not (run / "summary.json").exists():
            started = time.perf_counter()
            if (run / "trainer_state.json").exists():  # an earlier bench was stopped: continue it
                api.resume(run, progress=False)
            else:
                api.train(run, data="shakespeare", max_steps=steps, model_config=model_config, progress=False,
                          **extra)
            print(f"trained {name} in {time.perf_counter() - started:.0f}s", flush=True)
        runs[name] = run
    reference = held_out_texts(200, 300)
    found = {name: measure(run, seeds, free, reference) for name, run in runs.items()}
    perplexity = {name: math.exp(api.load(run).info()["final_val_loss"]) for name, run in runs.items()}

    record.note(f"\nmodel {model_config or 'as the demo'}, {steps} steps each, audit over {len(seeds)} sampling seeds (gender probes: 5 templates x 8 term "
                f"pairs x 4 samples of 60 characters; {free} free samples of 300 characters per seed)\n")
    print("| measure | plain | augmented | change |")
    print("|---|---|---|---|")
    rows = []
    for key, label in METRICS:
        before, after = found["plain"][key], found["augmented"][key]
        human = found["plain"].get(f"{key}_human")
        shown = f"{label} (human text {human[0]:.3f})" if human else label
        rows.append([shown, cell(before), cell(after), change(before, after)])
    p, a = perplexity["plain"], perplexity["augmented"]
    rows.append([f"held-out perplexity (nats/char {math.log(p):.4f} -> {math.log(a):.4f})", f"{p:.4f}", f"{a:.4f}",
                 f"{a - p:+.4f} ({(a - p) / p:+.1%})"])
    for row in rows:
        print(f"| {' | '.join(row)} |")
    record.add("counterfactual augmentation, gender", ["measure", "plain", "augmented", "change"], rows)
    record.write()


if __name__ == "__main__":
    main()
