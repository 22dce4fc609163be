"""What differential privacy costs and what it buys: a char GPT on the built-in Shakespeare,
trained for the same wall clock without DP and at epsilon = 8, 4 and 1 (DP-SGD through Opacus,
unit: one window of block_size + 1 characters, delta = 1/N^1.1, RDP accountant), each run with
30 canaries inserted 1, 10 and 100 times.

For each run: held-out loss (nats/char on Hamlet, Macbeth, The Tempest and Julius Caesar),
training tokens per second (the same model and batch; a private step's batch is Poisson, of
the same expected size), the mean exposure of canaries inserted 1 and 10 times and of
never-inserted controls (skew-normal, bits), and the empirical epsilon lower bound from the
once-inserted canaries against the controls (Jagielski et al. 2020 with Clopper-Pearson,
trustgen.evaluate.privacy_audit).

With --images, the VAE and the GAN on the built-in mnist instead, each trained for the same
wall clock without DP and at each epsilon (unit: one image; the GAN's discriminator is the
private part), measured by `evaluate`'s FID against the floor of held-out real digits.

    python bench/privacy.py            # the default GPT, 10 minutes per run (40 minutes)
    python bench/privacy.py --quick    # a tiny GPT, 20 seconds per run (smoke test)
    python bench/privacy.py --epsilons none 8   # the baseline and one budget (20 minutes)
    python bench/privacy.py --images --epsilons none 8 --budget 5m   # VAE and GAN (20 minutes)
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import common

import trustgen
from trustgen import io
from trustgen.config import parse_duration
from trustgen.evaluate.memorization import exposures
from trustgen.evaluate.privacy_audit import canary_audit

EPSILONS = (None, 8.0, 4.0, 1.0)
CANARIES = 30


def run_one(out: Path, epsilon: float | None, quick: bool, budget: float) -> list:
    settings = {"data": "shakespeare", "time_budget": budget, "batch_size": 32 if quick else 64,
                "canaries": CANARIES, "progress": False, "eval_interval": 10_000}
    if epsilon is not None:
        settings.update(dp_epsilon=epsilon, dp_accountant="rdp", learning_rate=3e-3)
    shape = {"n_layer": 2, "n_head": 2, "n_embd": 64, "block_size": 64} if quick else None
    summary = trustgen.train(out, model_config=shape, **settings)
    state = io.read_json(out / "trainer_state.json")
    model = trustgen.load(out, device="cpu", precision="fp32")
    exposure = exposures(model.model, model.tokenizer, io.read_json(out / "canaries.json"),
                         candidates=1000 if quick else 10_000)
    bound = canary_audit(exposure, summary.get("privacy"))
    groups = exposure["by_repetitions"]
    spent = summary["privacy"]["epsilon"] if epsilon is not None else None
    return ["none" if epsilon is None else f"{epsilon:g}", "" if spent is None else f"{spent:.2f}",
            f"{summary['final_val_loss']:.3f}", f"{state['tokens_seen'] / summary['elapsed_s']:,.0f}",
            summary["step"], f"{groups['1']['mean_exposure_skewnorm']:.1f}",
            f"{groups['10']['mean_exposure_skewnorm']:.1f}", f"{groups['0']['mean_exposure_skewnorm']:.1f}",
            f"{bound['epsilon_lower']:.2f}"]


def run_image(out: Path, family: str, epsilon: float | None, budget: float, samples: int) -> list:
    settings = {"model": family, "data": "mnist", "time_budget": budget, "progress": False}
    if epsilon is not None:
        settings["dp_epsilon"] = epsilon
    summary = trustgen.train(out, **settings)
    report = trustgen.load(out).evaluate(samples, progress=False)
    model, floor = report["model"], report["floor"]
    spent = summary["privacy"]["epsilon"] if epsilon is not None else None
    return [family, "none" if epsilon is None else f"{epsilon:g}", "" if spent is None else f"{spent:.2f}",
            summary["step"], f"{model['fid']:.3f}", f"{floor['fid']:.3f}", f"{report['fid_ratio']:.2f}",
            f"{model['precision']:.3f}", f"{model['recall']:.3f}", f"{model['classes_covered']}/{model['classes']}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a tiny GPT for 20 seconds per run")
    parser.add_argument("--epsilons", nargs="+", default=["none"] + [f"{e:g}" for e in EPSILONS[1:]],
                        help="target epsilons to run, 'none' for the non-private baseline (the first row's ratios)")
    parser.add_argument("--images", action="store_true", help="the VAE and the GAN on mnist instead of the char GPT")
    parser.add_argument("--budget", default=None, help="training time per run (default 10m; 20s with --quick)")
    parser.add_argument("--samples", type=int, default=5000, help="--images: samples measured per model")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    args = parser.parse_args()
    epsilons = [None if e == "none" else float(e) for e in args.epsilons]
    budget = parse_duration(args.budget or ("20s" if args.quick else "10m"))
    common.set_threads(args.threads)
    record = common.Results(__file__, args.quick, "images" if args.images else None)
    if args.images:
        with tempfile.TemporaryDirectory() as folder:
            rows = [run_image(Path(folder) / f"{family}-{e}", family, e, budget, 200 if args.quick else args.samples)
                    for family in ("vae", "gan") for e in epsilons]
        record.table(f"mnist, {budget:.0f} s of training per run: FID against the floor of held-out digits",
                     ["model", "target epsilon", "epsilon spent", "steps", "FID", "floor FID", "FID/floor",
                      "precision", "recall", "classes"], rows)
        record.write()
        return
    with tempfile.TemporaryDirectory() as folder:
        rows = [run_one(Path(folder) / f"eps-{e}", e, args.quick, budget) for e in epsilons]
    record.table("held-out loss, throughput and canaries by epsilon, same wall clock",
                 ["target epsilon", "epsilon spent", "held-out loss (nats/char)", "tokens/s", "steps",
                  "exposure 1x (bits)", "exposure 10x (bits)", "exposure never (bits)", "empirical epsilon lower"],
                 rows)
    baseline = float(rows[0][3].replace(",", ""))
    for row in rows[1:] if epsilons[0] is None else []:
        record.note(f"epsilon {row[0]}: {float(row[3].replace(',', '')) / baseline:.2f}x the non-private tokens/s, "
                    f"held-out loss {float(row[2]) - float(rows[0][2]):+.3f} nats/char")
    record.write()


if __name__ == "__main__":
    main()
