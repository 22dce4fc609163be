"""Quality at a fixed time budget: validation loss on the held-out Shakespeare plays.

Trains with the defaults `trustgen demo` uses (character tokenizer, the default GPT and training
settings) for 2 and 5 minutes of training time, and reports the loss over the whole validation
split (Hamlet, Macbeth, The Tempest, Julius Caesar) in nats per character. As a reference, the
same run measures nanoGPT's CPU recipe for Shakespeare-char (4 layers, 4 heads, 128 wide,
context 64, batch 12, 2,000 iterations, learning rate 1e-3 decaying to 1e-4, float32) through
trustgen's loop, on the same split.

    python bench/quality.py            # about 9 minutes on 2 cores
    python bench/quality.py --quick    # tiny budgets, only checks that it runs; each run still ends
                                       # with a pass over the whole validation split (6 CPU-minutes)

Run it on an otherwise idle machine: the budgets are wall-clock time.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from common import Results, environment, set_threads

import trustgen

NANOGPT_CPU_MODEL = {"n_layer": 4, "n_head": 4, "n_embd": 128, "block_size": 64}
NANOGPT_CPU_TRAIN = {"batch_size": 12, "max_steps": 2000, "learning_rate": 1e-3, "min_learning_rate": 1e-4,
                     "warmup_steps": 100, "beta2": 0.99, "precision": "fp32"}
TARGETS = {120: 1.85, 300: 1.60}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny budgets: a smoke test")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    record = Results(__file__, args.quick)
    set_threads(args.threads)

    budgets = [5, 10] if args.quick else [120, 300]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for budget in budgets:
            started = time.perf_counter()
            summary = trustgen.train(Path(tmp) / f"demo-{budget}", data="shakespeare", time_budget=budget,
                                     progress=False)
            target = TARGETS.get(budget)
            rows.append([f"trustgen demo defaults, {budget}s", summary["step"], f"{summary['elapsed_s']:.0f}",
                         f"{time.perf_counter() - started:.0f}", f"{summary['final_val_loss']:.3f}",
                         "" if target is None else f"≤ {target}",
                         "" if target is None else ("yes" if summary["final_val_loss"] <= target else "no")])
        reference = dict(NANOGPT_CPU_TRAIN, max_steps=50 if args.quick else NANOGPT_CPU_TRAIN["max_steps"])
        started = time.perf_counter()
        summary = trustgen.train(Path(tmp) / "nanogpt", data="shakespeare", model_config=NANOGPT_CPU_MODEL,
                                 progress=False, **reference)
        rows.append(["nanoGPT CPU recipe (reference)", summary["step"], f"{summary['elapsed_s']:.0f}",
                     f"{time.perf_counter() - started:.0f}", f"{summary['final_val_loss']:.3f}", "", ""])

    print(environment())
    print("Validation loss over the whole held-out split (nats/char; lower is better).\n")
    record.table("validation loss at a time budget", ["run", "steps", "train s", "wall s", "val loss", "target",
                                                      "met"], rows)
    record.write()


if __name__ == "__main__":
    main()
