"""Federated vs centralized training on Shakespeare: IID and LEAF by-speaker splits, FedAvg,
FedProx, FedAdam and q-FedAvg (q = 0.1 and 1), with the spread of per-client held-out loss and
the bytes moved.

Every federation is a real one (`trustgen federate`: a SuperLink and one SuperNode per client
on loopback, TLS on). The centralized baseline trains the same initial model on the union of
the clients' training text for the same total client compute (clients x rounds x local steps
optimizer steps of the same batch size), and is scored on the same per-client held-out text.

    python bench/federated.py --quick      # 4 clients, 3 rounds, a tiny model
    python bench/federated.py              # 8 clients, 40 rounds, 50 local steps
    python bench/federated.py --fault      # a SuperNode killed mid-round, then rejoining
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import statistics
import threading
import time
from pathlib import Path
from typing import Any

from common import Results

from trustgen import api, io
from trustgen.config import TrainConfig
from trustgen.federated.client import client_data, evaluate_locally
from trustgen.federated.launch import Federation
from trustgen.federated.server import client_settings
from trustgen.models.registry import build_model, family_of
from trustgen.runs import read_run_config
from trustgen.runtime import private_rng, resolve_device
from trustgen.training.trainer import train_steps


def federation(out: Path, partition: str, strategy: str, args: argparse.Namespace, precision: str = "fp32") -> Path:
    """`strategy` may name q-FedAvg's q: "qfedavg:1"."""
    if not (out / "summary.json").exists():
        started = time.perf_counter()
        resume = (out / "config.json").exists()  # an earlier bench was stopped: continue it
        name, _, q = strategy.partition(":")
        api.federate(out, model_config=args.model, clients=args.clients, rounds=args.rounds, partition=partition,
                     strategy=name, local_steps=args.local_steps, batch_size=args.batch_size, resume=resume,
                     update_precision=precision, progress=False, **({"q": float(q)} if q else {}))
        print(f"{out.name}: {time.perf_counter() - started:.0f}s", flush=True)
    return out


def centralized(run_dir: Path, args: argparse.Namespace) -> dict[str, float]:
    """The federation's initial model trained on all its clients' training text at once."""
    run_config = read_run_config(run_dir)
    settings = json.loads(client_settings(run_dir, run_config))
    folders = sorted((run_dir / "clients").glob("client-*"), key=lambda p: int(p.name.split("-")[1]))
    union = run_dir.parent / f"{run_dir.name}-central-data"
    union.mkdir(exist_ok=True)
    io.atomic_write_text(union / "train.txt", "\n\n".join((f / "train.txt").read_text() for f in folders))
    io.atomic_write_text(union / "val.txt", (folders[0] / "val.txt").read_text())
    config = TrainConfig.from_dict(run_config["train"])
    with private_rng(config.seed):  # the same initial weights as the federation's
        model = build_model(run_config["family"], family_of(run_config["family"]).make_config(run_config["model"]))
    steps = args.clients * args.rounds * args.local_steps
    train_steps(model, client_data(union, settings).train, config, steps, resolve_device(config.device))
    state = model.state_dict()
    results = [evaluate_locally(state, settings, folder, i) for i, folder in enumerate(folders)]
    losses = [r["val_loss"] for r in results]
    tokens = [r["num-examples"] for r in results]
    return {"val_loss": sum(v * n for v, n in zip(losses, tokens, strict=True)) / sum(tokens),
            "worst_val_loss": max(losses), "best_val_loss": min(losses), "std_val_loss": statistics.pstdev(losses),
            "steps": steps}


def rows_of(run_dir: Path) -> list[dict[str, Any]]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def plot_curves(runs: dict[str, Path], central: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    for name, run in runs.items():
        rows = rows_of(run)
        ax.plot([int(r["step"]) for r in rows], [float(r["val_loss"]) for r in rows], marker="o", label=name)
    ax.axhline(central, color="gray", linestyle="--", label="centralized, same compute")
    ax.set_xlabel("round")
    ax.set_ylabel("global held-out loss (nats/char)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def fault_check(out: Path, record: Results) -> None:
    """Kill one of three SuperNodes 20 s into round 1 (min_clients=2), restart it once round 1
    is committed, and show who trained and evaluated in each round."""
    if out.exists():
        shutil.rmtree(out)
    events: list[str] = []
    started = time.monotonic()
    plain_run = Federation.run

    def run_with_a_crash(self: Federation, app: Path, on_poll: Any = None, **polling: float) -> dict:
        def crash_and_rejoin() -> None:
            time.sleep(20)
            self.kill_supernode(2)
            events.append(f"supernode 2 killed at {time.monotonic() - started:.0f}s")
            while not (out / "federation_state.json").exists():
                time.sleep(1)
            self.supernodes[2] = self.start_supernode(2)
            events.append(f"restarted at {time.monotonic() - started:.0f}s")
        threading.Thread(target=crash_and_rejoin, daemon=True).start()
        return plain_run(self, app, on_poll, **polling)

    Federation.run = run_with_a_crash
    try:
        api.federate(out, clients=3, rounds=3, min_clients=2, local_steps=5, batch_size=4, progress=False,
                     model_config={"n_layer": 1, "n_head": 2, "n_embd": 16, "block_size": 32})
    finally:
        Federation.run = plain_run
    record.note("fault: " + ", ".join(events))
    record.table("a SuperNode killed mid-round (3 clients, min 2)", ["round", "clients trained", "client 2 evaluated",
                                                                     "round ends at s", "global loss"],
                 [[r["step"], r["clients"], "yes" if r["client_2_val_loss"] else "no", r["time_s"],
                   f"{float(r['val_loss']):.4f}"] for r in rows_of(out)])


def precisions(fp32_run: Path, args: argparse.Namespace, record: Results) -> None:
    """FedAvg on the by-speaker split with the clients' updates sent in fp32, bf16 and int8."""
    table = []
    for precision in ("fp32", "bf16", "int8"):
        run = fp32_run if precision == "fp32" else federation(
            args.out / f"by-speaker-fedavg-{precision}", "by-speaker", "fedavg", args, precision)
        s = io.read_json(run / "summary.json")
        table.append([precision, f"{s['final_val_loss']:.4f}", f"{s['update_bytes_per_round'] / 1e6:.3f}",
                      f"{s['bytes_per_round'] / 1e6:.3f}"])
    record.table("update precision (by-speaker, fedavg)", ["updates sent as", "global loss",
                                                            "MB of updates/round", "MB/round, all traffic"], table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="4 clients, 3 rounds of 10 steps, a tiny model")
    parser.add_argument("--out", type=Path, default=Path("bench/out/federated"))
    parser.add_argument("--fault", action="store_true", help="only the crash check: a SuperNode killed mid-round")
    args = parser.parse_args()
    if args.fault:
        record = Results(__file__, True, variant="fault")
        fault_check(args.out / "fault", record)
        record.write()
        return
    if args.quick:
        args.clients, args.rounds, args.local_steps, args.batch_size = 4, 3, 10, 8
        args.model = {"n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 64}
    else:
        args.clients, args.rounds, args.local_steps, args.batch_size = 8, 40, 50, 16
        args.model = {"n_layer": 4, "n_head": 4, "n_embd": 128, "block_size": 128}
    record = Results(__file__, args.quick)
    record.note(f"\n{args.clients} clients, {args.rounds} rounds x {args.local_steps} local steps of batch "
                f"{args.batch_size}; model {args.model}; TLS on loopback\n")
    runs = {("iid", "fedavg"): None, ("by-speaker", "fedavg"): None, ("by-speaker", "fedprox"): None,
            ("by-speaker", "fedadam"): None, ("by-speaker", "qfedavg:0.1"): None, ("by-speaker", "qfedavg:1"): None}
    for partition, strategy in runs:
        runs[(partition, strategy)] = federation(args.out / f"{partition}-{strategy.replace(':', '-q')}", partition,
                                                 strategy, args)
    central = {p: centralized(runs[(p, "fedavg")], args) for p in ("iid", "by-speaker")}
    table = []
    for partition in ("iid", "by-speaker"):
        c = central[partition]
        table.append([partition, f"centralized ({c['steps']} steps)", f"{c['val_loss']:.4f}", "0",
                      f"{c['worst_val_loss']:.4f}", f"{c['best_val_loss']:.4f}", f"{c['std_val_loss']:.4f}", "-", "-"])
        for (p, strategy), run in runs.items():
            if p != partition:
                continue
            s = io.read_json(run / "summary.json")
            table.append([partition, strategy.replace(":", " q="), f"{s['final_val_loss']:.4f}", f"{s['final_val_loss'] - c['val_loss']:+.4f}",
                          f"{s['worst_client_val_loss']:.4f}", f"{s['best_client_val_loss']:.4f}",
                          f"{s['std_client_val_loss']:.4f}", f"{s['bytes_per_round'] / 1e6:.2f}",
                          f"{s['bytes_total'] / 1e6:.2f}"])
    record.table("federated vs centralized, global and per-client held-out loss (nats/char)",
                 ["partition", "training", "global loss", "vs central", "worst client", "best client", "std",
                  "MB/round", "MB total"], table)
    precisions(runs[("by-speaker", "fedavg")], args, record)
    curves = args.out / "curves-by-speaker.png"
    plot_curves({s: runs[("by-speaker", s)] for s in ("fedavg", "fedprox", "fedadam", "qfedavg:1")},
                central["by-speaker"]["val_loss"], curves)
    record.note(f"per-round curves: {curves}")
    record.write()


if __name__ == "__main__":
    main()
