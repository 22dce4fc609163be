"""The Flower app: a ServerApp that runs the rounds and a ClientApp that trains and evaluates.

`flwr run` ships this app to the SuperLink, which starts the ServerApp; every SuperNode
starts the ClientApp for each message. A SuperNode's `--node-config` names its data folder
and partition id (`data-dir='/path' partition-id=0`); the app's run config names the run
directory on the SuperLink's host (`run-dir`).
"""

from __future__ import annotations

import json
from pathlib import Path

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from trustgen.federated.client import evaluate_locally, train_locally
from trustgen.federated.compress import encode_update
from trustgen.federated.server import run_rounds

server_app = ServerApp()
client_app = ClientApp()


@server_app.main()
def serve(grid: Grid, context: Context) -> None:
    run_rounds(grid, Path(str(context.run_config["run-dir"])))


def _inputs(msg: Message, context: Context) -> tuple[dict, dict, Path, int]:
    state = msg.content["arrays"].to_torch_state_dict()
    settings = json.loads(str(msg.content["config"]["settings"]))
    return state, settings, Path(str(context.node_config["data-dir"])), int(context.node_config["partition-id"])


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    state, settings, data_dir, partition_id = _inputs(msg, context)
    config = msg.content["config"]
    new_state, metrics = train_locally(state, settings, data_dir, partition_id, int(config["server-round"]),
                                       float(config.get("proximal-mu", 0.0)))
    sent = encode_update(new_state, state, settings["update_precision"])
    return Message(RecordDict({"arrays": ArrayRecord(sent), "metrics": MetricRecord(metrics)}), reply_to=msg)


@client_app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    state, settings, data_dir, partition_id = _inputs(msg, context)
    metrics = evaluate_locally(state, settings, data_dir, partition_id)
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
