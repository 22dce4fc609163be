"""`federate`: train one model across data owners with Flower, into a normal run directory.

The corpus or image set is partitioned into one data folder per client (`clients/client-i/`),
the tokenizer is agreed up front (a char vocabulary over all clients' text, as a federation
would publish one), the model is built and its initial weights committed, and then a SuperLink
and one SuperNode per client run the rounds (see `launch` and `server`). The run directory
ends up like any other: config.json, model.safetensors, tokenizer.json (text), metrics.csv,
TensorBoard events and loss.png, so `generate`, `serve`, `audit` and `export` load it unchanged.

Image models train with their family's `federated_defaults`: whatever a family fits from the
pooled training images before or after its gradient steps (a GAN's clusters and their
calibration, a VAE's mixture prior, temperature and calibration) is off, since no server holds
those images, and the family's post-training fitting is not run.
"""

from __future__ import annotations

import itertools
import logging
from pathlib import Path
from typing import Any

from trustgen import io
from trustgen.config import Config, TrainConfig
from trustgen.data.images import load_images
from trustgen.data.text import DOCUMENT_SEPARATOR, find_documents
from trustgen.data.tokenizers import Tokenizer, train_tokenizer
from trustgen.errors import TrustgenError
from trustgen.federated.launch import Federation, require_flower, write_app
from trustgen.federated.partition import (
    ClientImages,
    ClientText,
    partition,
    partition_images,
    write_client_folders,
)
from trustgen.federated.settings import STATE_FILE
from trustgen.models.registry import build_model, family_of, model_config
from trustgen.runs import image_model_config, read_run_config, required_settings, write_run_config
from trustgen.runtime import private_rng

log = logging.getLogger("trustgen")


def prepare_federation(run_dir: Path, config: TrainConfig, family: str, model_settings: dict[str, Any] | None,
                       fed: dict[str, Any]) -> list[Path]:
    """Write the clients' data folders and the run directory's starting point; returns the
    data folders."""
    kind = family_of(family)
    if (run_dir / "config.json").exists():
        raise TrustgenError(f"{run_dir} already holds a run; choose another directory or use --resume.")
    if fed["strategy"] == "qfedavg" and kind.objective != "likelihood":
        raise TrustgenError(f"--strategy qfedavg weighs each client by the global model's loss on its data; a {family} "
                            "has no such loss. Use fedavg, fedprox or fedadam.")
    tokenizer = None
    if kind.modality == "image":
        parts, model_cfg, extra = _image_clients(config, family, model_settings or {}, fed)
    else:
        parts, tokenizer = _text_clients(config, fed)
        model_cfg = model_config(family, {**(model_settings or {}), "vocab_size": tokenizer.vocab_size})
        extra = {}
    run_dir.mkdir(parents=True, exist_ok=True)
    folders = write_client_folders(parts, run_dir / "clients")
    if tokenizer is not None:
        tokenizer.save(run_dir / "tokenizer.json")
    with private_rng(config.seed):  # the clients build the same initial weights (client.global_model)
        model = build_model(family, model_cfg)
    write_run_config(run_dir, family, model_cfg, tokenizer.kind if tokenizer is not None else None,
                     {"train": config.to_dict(), **extra, "federated": fed, "clients": [p.name for p in parts]})
    io.atomic_write_bytes(run_dir / "model.safetensors", io.weights_bytes(model))
    return folders


def _text_clients(config: TrainConfig, fed: dict[str, Any]) -> tuple[list[ClientText], Tokenizer]:
    parts = partition(find_documents(config.data), fed["clients"], fed["partition"], config.seed)
    chunks = itertools.chain((p.train for p in parts), (p.val for p in parts), [DOCUMENT_SEPARATOR])
    return parts, train_tokenizer(config.tokenizer, chunks, config.vocab_size)


def _image_clients(config: TrainConfig, family: str, model_settings: dict[str, Any],
                   fed: dict[str, Any]) -> tuple[list[ClientImages], Config, dict[str, Any]]:
    settings = required_settings(model_settings, family_of(family).federated_defaults, f"federated {family} training",
                                 "no server holds the pooled training images those are fitted to")
    dataset = load_images(config.data, config.image_size)
    model_cfg = image_model_config(family, settings, dataset.classes, dataset.image_size, dataset.channels,
                                   config.data)
    parts = partition_images(dataset, fed["clients"], fed["partition"], config.seed)
    return parts, model_cfg, {"classes": list(dataset.classes)}


def federate(out: str | Path, config: TrainConfig | None = None, family: str = "gpt",
             model_settings: dict[str, Any] | None = None, fed: dict[str, Any] | None = None,
             resume: bool = False, rounds: int | None = None, progress: bool = True) -> dict[str, Any]:
    """Run (or, with `resume`, continue) a federation into the run directory `out`; returns
    the summary: rounds done, final global and per-client held-out loss, bytes moved.
    `rounds`, when resuming, may raise the number of rounds."""
    run_dir = Path(out)
    require_flower()
    if resume:
        fed, folders = resume_settings(run_dir, rounds)
    else:
        if config is None or fed is None:
            raise TrustgenError("federate needs the training and federation settings.")
        folders = prepare_federation(run_dir, config, family, model_settings, fed)
    done = _rounds_done(run_dir)
    if done >= fed["rounds"]:
        log.info(f"{run_dir}: all {fed['rounds']} rounds are done already")
    else:
        with Federation(run_dir / "federation", folders, tls=fed["tls"]) as federation:
            app = write_app(run_dir / "federation" / "app", run_dir)
            reported = [done]

            def report() -> bool:
                now = _rounds_done(run_dir)
                if progress and now > reported[0]:
                    print(f"round {now}/{fed['rounds']} committed", flush=True)
                    reported[0] = now
                return now >= fed["rounds"]

            federation.run(app, on_poll=report)
    return summarize(run_dir)


def resume_settings(run_dir: Path, rounds: int | None) -> tuple[dict[str, Any], list[Path]]:
    """A federated run's settings, its number of rounds raised to `rounds` where given, and its
    clients' data folders."""
    run_config = read_run_config(run_dir)
    if "federated" not in run_config:
        raise TrustgenError(f"{run_dir} is not a federated run; resume it with trustgen train --resume.")
    fed = run_config["federated"]
    if rounds is not None and rounds != fed["rounds"]:
        fed = run_config["federated"] = {**fed, "rounds": rounds}
        io.write_json(run_dir / "config.json", run_config)
    return fed, sorted((run_dir / "clients").glob("client-*"), key=lambda p: int(p.name.split("-")[1]))


def _rounds_done(run_dir: Path) -> int:
    path = run_dir / STATE_FILE
    return int(io.read_json(path)["round"]) if path.exists() else 0


def summarize(run_dir: Path) -> dict[str, Any]:
    """The summary of a federated run from its metrics.csv, also written to summary.json."""
    import csv

    with open(run_dir / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise TrustgenError(f"{run_dir} has no completed round.")
    last = rows[-1]

    def held_out(column: str) -> float | None:  # a GAN has no held-out loss
        return float(last[column]) if last.get(column) else None

    summary = {"rounds": int(last["step"]), "final_val_loss": held_out("val_loss"),
               "worst_client_val_loss": held_out("worst_val_loss"),
               "best_client_val_loss": held_out("best_val_loss"), "std_client_val_loss": held_out("val_loss_std"),
               "bytes_per_round": sum(int(r["bytes"]) for r in rows) / len(rows),
               "bytes_total": sum(int(r["bytes"]) for r in rows),
               "update_bytes_per_round": sum(int(r.get("update_bytes") or 0) for r in rows) / len(rows), "elapsed_s": float(last["time_s"]),
               **{f"final_{k}": float(last[k]) for k in ("train_loss", "d_loss", "g_loss") if last.get(k)}}
    dp = read_run_config(run_dir)["federated"].get("client_dp")
    if dp:  # each client's budget, from the committed rounds it trained in
        epsilons = io.read_json(run_dir / STATE_FILE).get("dp_epsilon", {})
        summary["client_dp"] = {**dp, "epsilon_spent": {f"client_{k}": v for k, v in epsilons.items()},
                                "delta_spent": {f"client_{k}": dp["delta"] * round(v / dp["epsilon"])
                                                for k, v in epsilons.items()}}
    io.write_json(run_dir / "summary.json", summary)
    return summary


__all__ = ["federate", "summarize"]
