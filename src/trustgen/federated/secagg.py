"""Secure aggregation with Flower's SecAgg+ (Bell et al. 2020, arXiv:2009.01338): the server
learns the weighted sum of the clients' updates and nothing about any one of them.

Flower 1.42 has SecAgg+ in its workflow API only (`SecAggPlusWorkflow`, which drives a legacy
`Strategy` through a `LegacyContext`, and `secaggplus_mod` on the client), so a secure round's
training runs through that workflow and speaks its message format (FitIns/FitRes); evaluation
and everything else stay as in `server`. Clients send their update (new weights minus the
global ones), not their weights: the protocol clips every value to +-8 before quantizing it to
22 bits, which an update fits comfortably and a weight may not. Each update is masked with
pairwise masks that cancel only in the sum; the server sees masked vectors, adds them, and
unmasks the total with the secret shares of the clients that answered.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.client.mod import secaggplus_mod
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common import recorddict_compat as compat
from flwr.server.client_manager import SimpleClientManager
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import FedAvg as LegacyFedAvg
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key
from flwr.serverapp import Grid

FITINS = "fitins.parameters"


def is_secure(msg: Message) -> bool:
    return FITINS in msg.content.array_records


def secure_when_asked(msg: Message, context: Context, call_next: Any) -> Message:
    """A ClientApp mod: SecAgg+'s protocol for the messages of a secure round, else nothing."""
    if msg.metadata.message_type == MessageType.TRAIN and RECORD_KEY_CONFIGS in msg.content.config_records:
        return secaggplus_mod(msg, context, call_next)
    return call_next(msg, context)


def secure_inputs(msg: Message) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The global weights and the round's config of a secure round's training message."""
    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    names = json.loads(str(fitins.config["names"]))
    arrays = parameters_to_ndarrays(fitins.parameters)
    return {n: torch.from_numpy(np.array(a)) for n, a in zip(names, arrays, strict=True)}, dict(fitins.config)


def secure_reply(msg: Message, old: dict[str, torch.Tensor], new: dict[str, torch.Tensor],
                 metrics: dict[str, Any]) -> Message:
    """The client's update in SecAgg+'s format; `secaggplus_mod` masks it before it leaves."""
    update = [(new[k].double() - old[k].double()).numpy() for k in old]
    fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(update), int(metrics["num-examples"]), metrics)
    return Message(compat.fitres_to_recorddict(fitres, keep_input=False), reply_to=msg)


class _Recording(LegacyFedAvg):
    """FedAvg over the unmasked total (every client's entry is already the weighted mean),
    keeping the clients' metrics, which SecAgg+ passes along unmasked."""

    def __init__(self, config: dict[str, Any], min_clients: int) -> None:
        super().__init__(fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=min_clients,
                         min_available_clients=min_clients, on_fit_config_fn=lambda _: config)
        self.metrics: list[dict[str, Any]] = []

    def aggregate_fit(self, server_round: int, results: list, failures: list) -> Any:
        self.metrics = [dict(fitres.metrics) for _, fitres in results]
        return super().aggregate_fit(server_round, results, failures)


def secure_train(grid: Grid, arrays: ArrayRecord, config: dict[str, Any], server_round: int, min_clients: int,
                 max_weight: float, timeout: float) -> tuple[ArrayRecord | None, list[dict[str, Any]]]:
    """One round's training under SecAgg+: the new global weights (None if the protocol could
    not finish) and the metrics of the clients whose updates are in them."""
    names = list(arrays.keys())
    strategy = _Recording({**config, "names": json.dumps(names)}, min_clients)
    manager = SimpleClientManager()
    for node in grid.get_node_ids():
        manager.register(GridClientProxy(node_id=node, grid=grid, run_id=0))
    context = LegacyContext(Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={}),
                            strategy=strategy, client_manager=manager)
    context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({Key.CURRENT_ROUND: server_round})
    context.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(
        ndarrays_to_parameters([a.numpy() for a in arrays.values()]), keep_input=True)
    # every client holds a share of every other's key; half of them can rebuild a dropped one's
    workflow = SecAggPlusWorkflow(num_shares=1.0, reconstruction_threshold=0.5,
                                  max_weight=max_weight, timeout=timeout)
    workflow(grid, context)
    if not strategy.metrics:
        return None, []
    mean_update = parameters_to_ndarrays(compat.arrayrecord_to_parameters(
        context.state.array_records[MAIN_PARAMS_RECORD], keep_input=True))
    new = {n: (a.numpy().astype(np.float64) + u).astype(a.numpy().dtype)
           for (n, a), u in zip(arrays.items(), mean_update, strict=True)}
    return ArrayRecord({n: torch.from_numpy(v) for n, v in new.items()}), strategy.metrics


__all__ = ["is_secure", "secure_inputs", "secure_reply", "secure_train", "secure_when_asked"]
