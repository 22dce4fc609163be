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
from trustgen.federated.secagg import is_secure, secure_inputs, secure_reply, secure_when_asked
from trustgen.federated.server import run_rounds

server_app = ServerApp()
client_app = ClientApp()


@server_app.main()
def serve(grid: Grid, context: Context) -> None:
    run_rounds(grid, Path(str(context.run_config["run-dir"])))


def _where(context: Context) -> tuple[Path, int]:
    return Path(str(context.node_config["data-dir"])), int(context.node_config["partition-id"])


@client_app.train(mods=[secure_when_asked])
def train(msg: Message, context: Context) -> Message:
    secure = is_secure(msg)
    if secure:
        state, config = secure_inputs(msg)
    else:
        state, config = msg.content["arrays"].to_torch_state_dict(), msg.content["config"]
    settings = json.loads(str(config["settings"]))
    new_state, metrics = train_locally(state, settings, *_where(context), int(config["server-round"]),
                                       float(config.get("proximal-mu", 0.0)))
    if secure:
        return secure_reply(msg, state, new_state, metrics)
    sent = encode_update(new_state, state, settings["update_precision"])
    return Message(RecordDict({"arrays": ArrayRecord(sent), "metrics": MetricRecord(metrics)}), reply_to=msg)


@client_app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    settings = json.loads(str(msg.content["config"]["settings"]))
    metrics = evaluate_locally(msg.content["arrays"].to_torch_state_dict(), settings, *_where(context))
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
