"""What the ServerApp does: run the rounds, aggregate with a Flower strategy, commit each round.

The rounds are driven here rather than by `Strategy.start` so that a federation can start at
any round: after every round the global weights, the round number and the server optimizer's
state (FedAdam's moments) are committed to the run directory as one atomic unit, and
`trustgen federate --resume` continues from the last committed round. Replies are aggregated
in the order of the clients' partition ids, not their arrival, so the floating-point sums —
and with them a resumed run — repeat bit for bit.

Each round records the global held-out loss (token- or image-weighted over the clients that
answered) and every client's own, with the worst, best and standard deviation across clients.
A GAN has no held-out loss: its rounds skip evaluation and record the players' training losses.

What a family keeps local (`Family.local_state`, a GAN's discriminator) is neither sent nor
averaged: the run directory keeps the initial values of those weights, and each client its own
(see `client`).

q-FedAvg (Li et al. 2020, "Fair resource allocation in federated learning", arXiv:1905.10497)
is Flower's `QFedAvg`: each client's update is weighted by F_k^q, F_k the received model's loss
on that client (its first local batch, `global-train-loss`), so clients the global model
serves worse pull it harder; q = 0 is FedAvg with equal client weights. Its step size uses the
Lipschitz estimate L = 1 / the clients' learning rate, as in the paper.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx, QFedAvg

from trustgen import io
from trustgen.errors import TrustgenError
from trustgen.federated.compress import decode_update
from trustgen.federated.settings import SERVER_OPTIMIZER_FILE, STATE_FILE
from trustgen.models.registry import Family, family_of
from trustgen.runs import load_run_model
from trustgen.training.logs import MetricsLog, plot_losses

log = logging.getLogger("trustgen")


def make_strategy(fed: dict[str, Any], client_lr: float) -> FedAvg:
    """The Flower strategy a federation's settings name; every connected client trains each
    round, and a round goes ahead with `min_clients` of them."""
    common = {"fraction_train": 1.0, "fraction_evaluate": 1.0, "min_train_nodes": fed["min_clients"],
              "min_evaluate_nodes": fed["min_clients"], "min_available_nodes": fed["min_clients"]}
    if fed["strategy"] == "qfedavg":
        return QFedAvg(client_learning_rate=client_lr, q=fed["q"], train_loss_key="global-train-loss", **common)
    if fed["strategy"] == "fedprox":
        return FedProx(proximal_mu=fed["proximal_mu"], **common)
    if fed["strategy"] == "fedadam":
        return FedAdam(eta=fed["server_lr"], **common)
    return FedAvg(**common)


def _moments(strategy: FedAvg) -> dict[str, torch.Tensor]:
    """FedAdam's first and second moments, as tensors to commit (empty for the others)."""
    found = {}
    for name in ("m_t", "v_t"):
        for key, value in (getattr(strategy, name, None) or {}).items():
            found[f"{name}/{key}"] = torch.from_numpy(np.ascontiguousarray(value))
    return found


def _restore_moments(strategy: FedAvg, tensors: dict[str, torch.Tensor]) -> None:
    for name in ("m_t", "v_t"):
        values = {k.split("/", 1)[1]: v.numpy() for k, v in tensors.items() if k.startswith(name + "/")}
        if values:
            setattr(strategy, name, values)


def client_settings(run_dir: Path, run_config: dict[str, Any]) -> str:
    """What every client needs besides the weights, as one JSON string: the model family and
    settings, the training settings, the tokenizer and the number of local steps."""
    fed = run_config["federated"]
    tokenizer = run_dir / "tokenizer.json"
    return json.dumps({"family": run_config["family"], "model": run_config["model"], "train": run_config["train"],
                       "tokenizer": tokenizer.read_text(encoding="utf-8") if tokenizer.exists() else None,
                       "local_steps": fed["local_steps"], "client_dp": fed.get("client_dp"),
                       "update_precision": fed.get("update_precision", "fp32")})


def _by_partition(replies: list[Message]) -> list[Message]:
    ok = [r for r in replies if not r.has_error()]
    for reply in replies:
        if reply.has_error():
            log.warning(f"a client failed this round and is left out: {reply.error.reason}")
    return sorted(ok, key=lambda r: int(r.content["metrics"]["partition-id"]))


def spread(losses: dict[int, float]) -> dict[str, float]:
    values = np.array(list(losses.values()))
    return {"worst_val_loss": float(values.max()), "best_val_loss": float(values.min()),
            "val_loss_std": float(values.std())}


def spent(total: dict[str, float], this_round: dict[str, float]) -> dict[str, float]:
    """Each client's privacy budget spent so far: the epsilons of the rounds it trained in,
    added up (basic composition; its deltas add up the same way)."""
    return {k: total.get(k, 0.0) + this_round.get(k, 0.0) for k in sorted({*total, *this_round}, key=int)}


def loss_columns(family: Family) -> list[str]:
    """The training losses a round records: the GAN players' two, or the likelihood loss."""
    return ["d_loss", "g_loss"] if family.objective == "adversarial" else ["train_loss"]


def has_held_out_loss(family: Family) -> bool:
    return family.objective == "likelihood"


def unit_of(family: Family) -> str:
    """What the clients train on, as metrics.csv counts it."""
    return "tokens" if family.modality == "text" else "images"


def metric_fields(clients: int, family: Family) -> list[str]:
    # "tokens" or "images" (trained by all clients so far) also tells plot_losses the unit; the
    # spread's name does not end in "loss", so the plot leaves it out.
    unit = unit_of(family)
    held_out = (["val_loss", "worst_val_loss", "best_val_loss", "val_loss_std"] if has_held_out_loss(family) else [])
    clients_loss = [f"client_{i}_val_loss" for i in range(clients)] if has_held_out_loss(family) else []
    return ["step", "time_s", unit, "clients", *loss_columns(family), *held_out, "bytes", "update_bytes",
            *clients_loss]


def shared_state(model: torch.nn.Module, family: Family) -> dict[str, torch.Tensor]:
    """The weights a federation averages: all but the family's local state."""
    return {k: v for k, v in model.state_dict().items() if not (family.local_state and k.startswith(family.local_state))}


def run_rounds(grid: Grid, run_dir: Path) -> None:
    """Run the federation of the run directory from its last committed round to the last."""
    run_dir = Path(run_dir)
    model, _, run_config = load_run_model(run_dir)
    fed = run_config["federated"]
    family = family_of(run_config["family"])
    per_row = run_config["model"]["block_size"] if family.modality == "text" else 1
    unit = unit_of(family)
    state = (io.read_json(run_dir / STATE_FILE) if (run_dir / STATE_FILE).exists()
             else {"round": 0, "elapsed": 0.0, unit: 0})
    strategy = make_strategy(fed, run_config["train"]["learning_rate"])
    if (run_dir / SERVER_OPTIMIZER_FILE).exists():
        _restore_moments(strategy, io.read_tensors(run_dir / SERVER_OPTIMIZER_FILE))
    arrays = ArrayRecord(shared_state(model, family))
    settings = client_settings(run_dir, run_config)
    metrics = MetricsLog(run_dir, state["round"], metric_fields(fed["clients"], family))
    try:
        for server_round in range(state["round"] + 1, fed["rounds"] + 1):
            started = time.monotonic()
            arrays, row = one_round(grid, strategy, arrays, settings, server_round, fed, family)
            state = {"round": server_round, "elapsed": state["elapsed"] + time.monotonic() - started,
                     unit: state[unit] + row.pop("rows") * per_row,
                     "dp_epsilon": spent(state.get("dp_epsilon", {}), row.pop("dp_epsilon"))}
            metrics.write({**row, "step": server_round, "time_s": round(state["elapsed"], 2), unit: state[unit]})
            model.load_state_dict(arrays.to_torch_state_dict(), strict=not family.local_state)
            _commit(run_dir, model, strategy, state)
            held_out = (f"global held-out loss {row['val_loss']:.4f} (worst client {row['worst_val_loss']:.4f})"
                        if "val_loss" in row else ", ".join(f"{k} {row[k]:.4f}" for k in loss_columns(family)))
            log.info(f"round {server_round}/{fed['rounds']}: {held_out}, {row['clients']} clients")
    finally:
        metrics.close()
    plot_losses(run_dir)


def exchange(grid: Grid, messages: Iterable[Message], timeout: float, poll_s: float = 0.2) -> list[Message]:
    """Send the messages and collect the replies that arrive within `timeout` seconds.

    `Grid.send_and_receive` looks for replies every 3 s, which on a small model is most of a
    round; the replies are checked for every `poll_s` here instead."""
    waiting = {i for i in grid.push_messages(list(messages)) if i}
    replies: list[Message] = []
    deadline = time.monotonic() + timeout
    while waiting and time.monotonic() < deadline:
        arrived = list(grid.pull_messages(waiting))
        replies += arrived
        waiting -= {r.metadata.reply_to_message_id for r in arrived}
        if waiting:
            time.sleep(poll_s)
    return replies


def one_round(grid: Grid, strategy: FedAvg, arrays: ArrayRecord, settings: str, server_round: int,
              fed: dict[str, Any], family: Family) -> tuple[ArrayRecord, dict[str, Any]]:
    """Train on every available client, aggregate, then (where the family has a held-out loss)
    evaluate the new global model on every client's held-out data. Returns the new weights and
    the round's metrics row."""
    train = _secure_train if fed.get("secure_aggregation") else _plain_train
    new_arrays, trained, received = train(grid, strategy, arrays, settings, server_round, fed)
    rows = [int(m["num-examples"]) for m in trained]
    row = {"dp_epsilon": {str(m["partition-id"]): float(m["dp-epsilon"]) for m in trained if "dp-epsilon" in m},
           "clients": len(trained), "rows": sum(rows),
           **{key: sum(float(m[key]) * n for m, n in zip(trained, rows, strict=True)) / sum(rows)
              for key in loss_columns(family)},
           "bytes": arrays.count_bytes() * len(trained) + received, "update_bytes": received}
    if has_held_out_loss(family):
        evaluation = evaluate_round(grid, strategy, new_arrays, settings, server_round, fed)
        row["bytes"] += arrays.count_bytes() * evaluation.pop("evaluated")
        row |= evaluation
    return _float32(new_arrays), row


def evaluate_round(grid: Grid, strategy: FedAvg, arrays: ArrayRecord, settings: str, server_round: int,
                   fed: dict[str, Any]) -> dict[str, Any]:
    """The global held-out loss of `arrays` over the clients that answer, each one's own, their
    spread, and how many evaluated (`evaluated`)."""
    evaluated = _by_partition(exchange(
        grid, strategy.configure_evaluate(server_round, arrays, ConfigRecord({"settings": settings}), grid),
        fed["round_timeout"]))
    losses = {int(r.content["metrics"]["partition-id"]): float(r.content["metrics"]["val_loss"]) for r in evaluated}
    weights = {int(r.content["metrics"]["partition-id"]): float(r.content["metrics"]["num-examples"])
               for r in evaluated}
    if not losses:
        raise TrustgenError(f"round {server_round}: no client evaluated the global model.")
    global_loss = sum(losses[i] * weights[i] for i in losses) / sum(weights.values())
    return {"val_loss": global_loss, **spread(losses), "evaluated": len(evaluated),
            **{f"client_{i}_val_loss": v for i, v in losses.items()}}


def _plain_train(grid: Grid, strategy: FedAvg, arrays: ArrayRecord, settings: str, server_round: int,
                 fed: dict[str, Any]) -> tuple[ArrayRecord, list[dict[str, Any]], int]:
    """Training through the Flower strategy: the new weights, the metrics of the clients in
    them (in partition order) and the bytes of their replies."""
    config = ConfigRecord({"settings": settings})
    sent = exchange(grid, strategy.configure_train(server_round, arrays, config, grid), fed["round_timeout"])
    trained = _by_partition(sent)
    received = sum(r.content["arrays"].count_bytes() for r in trained)
    _decode_updates(trained, arrays, json.loads(settings)["update_precision"])
    new_arrays, _ = strategy.aggregate_train(server_round, trained)
    if new_arrays is None:
        reasons = {r.error.reason for r in sent if r.has_error()}
        raise TrustgenError(f"round {server_round}: no client returned an update"
                            + (f" (a client said: {sorted(reasons)[0]})" if reasons else "") + ".")
    return new_arrays, [dict(r.content["metrics"]) for r in trained], received


def _secure_train(grid: Grid, strategy: FedAvg, arrays: ArrayRecord, settings: str, server_round: int,
                  fed: dict[str, Any]) -> tuple[ArrayRecord, list[dict[str, Any]], int]:
    """Training under SecAgg+ (see `secagg`); the bytes of the masked replies are not
    counted (the protocol's four exchanges are Flower's)."""
    from trustgen.federated.secagg import secure_train

    config = {"settings": settings, "server-round": server_round}
    if fed["strategy"] == "fedprox":
        config["proximal-mu"] = fed["proximal_mu"]
    client = json.loads(settings)
    rows = client["local_steps"] * client["train"]["batch_size"]
    new_arrays, metrics = secure_train(grid, arrays, config, server_round, fed["min_clients"], rows,
                                       fed["round_timeout"])
    if new_arrays is None:
        raise TrustgenError(f"round {server_round}: secure aggregation did not finish (too few clients "
                            "answered every stage).")
    return new_arrays, sorted(metrics, key=lambda m: int(m["partition-id"])), 0


def _decode_updates(replies: list[Message], arrays: ArrayRecord, precision: str) -> None:
    """Replace each compressed update by the client's new weights (see `compress`)."""
    if precision == "fp32":
        return
    old = arrays.to_torch_state_dict()
    for reply in replies:
        sent = reply.content["arrays"].to_torch_state_dict()
        reply.content["arrays"] = ArrayRecord(decode_update(sent, old, precision))


def _float32(arrays: ArrayRecord) -> ArrayRecord:
    """Aggregation in numpy may widen float32 weights; the model keeps its own dtype."""
    return ArrayRecord({k: Array(np.asarray(a.numpy(), dtype=np.float32)) if a.numpy().dtype == np.float64 else a
                        for k, a in arrays.items()})


def _commit(run_dir: Path, model: torch.nn.Module, strategy: FedAvg, state: dict[str, Any]) -> None:
    files = {"model.safetensors": io.weights_bytes(model),
             STATE_FILE: json.dumps(state).encode()}
    moments = _moments(strategy)
    if moments:
        files[SERVER_OPTIMIZER_FILE] = io.tensors_to_bytes(moments)
    io.commit_files(run_dir, files)


__all__ = ["make_strategy", "run_rounds"]
