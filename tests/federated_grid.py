"""A Flower Grid that delivers each message to trustgen's ClientApp in this process: the
ServerApp's rounds, aggregation and commits run exactly as under a SuperLink, without one."""

from __future__ import annotations

import copy
from collections.abc import Iterable
from pathlib import Path

from flwr.app import Context, Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents
from flwr.supercore.task_identity import TaskIdentity

from trustgen.federated.app import client_app


def over_the_wire(message: Message) -> Message:
    """The message as a SuperNode receives it: deflated to bytes and inflated again, so the
    client's changes to it stay its own (and the metadata's ids survive)."""
    objects = get_all_nested_objects(message)
    copy_ = inflate_object_from_contents(message.object_id, {i: o.deflate() for i, o in objects.items()})
    copy_.metadata.__dict__.update(message.metadata.__dict__)
    return copy_


class LocalGrid(Grid):
    def __init__(self, data_dirs: list[Path]) -> None:
        self.data_dirs = data_dirs
        self.replies: dict[str, Message] = {}
        self.sent: list[Message] = []  # every message the server sent, as a SuperLink would see it
        self.received: list[RecordDict] = []  # every reply's content, as it reached the server
        # a SuperNode's context lives as long as the run (SecAgg+ keeps its keys in its state)
        self.contexts = [Context(run_id=1, node_id=i + 1, state=RecordDict(), run_config={},
                                 node_config={"data-dir": str(d), "partition-id": i}) for i, d in enumerate(data_dirs)]
        # what flwr-serverapp sets before a ServerApp makes its first message
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1

    def set_run(self, run: object) -> None:
        pass

    @property
    def run(self) -> object:
        raise NotImplementedError

    def create_message(self, *args: object, **kwargs: object) -> Message:
        raise NotImplementedError

    def get_node_ids(self) -> Iterable[int]:
        return range(1, len(self.data_dirs) + 1)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = message.object_id
            node = message.metadata.dst_node_id
            self.sent.append(message)
            delivered = over_the_wire(message)
            self.replies[message.metadata.message_id] = client_app(delivered, self.contexts[node - 1])
            ids.append(message.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        found = [self.replies.pop(i) for i in list(message_ids) if i in self.replies]
        self.received += [copy.deepcopy(m.content) for m in found]
        return found

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))  # SecAgg+'s workflow calls this
