"""A Flower Grid that delivers messages to the ClientApp in this process: the apps without Ray.

The SuperLink normally assigns message ids and carries replies; here
``push_messages`` calls the ClientApp directly and keeps its reply (an error
reply if it raised), so ``ServerApp`` main runs unchanged, in tests and in
``paper``'s ``engine: inprocess``. It sets what a Flower process would
(``TaskIdentity``, the message id in the metadata, a ``Run``) and passes
every message through Flower's protobuf form, as the SuperLink does, so a site
never shares an object with the server or another site (SecAgg+'s workflow
sends one record to every site and its mod edits what it receives): Flower
internals, pinned with flwr 1.42.0.
"""

from __future__ import annotations

import time
import uuid

from flwr.app import Context, Error, Message, RecordDict
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity


def _transmitted(message: Message) -> Message:
    """The message as its receiver gets it: serialised and rebuilt, sharing nothing with the sender's."""
    return message_from_proto(message_to_proto(message))


class InProcessGrid(Grid):
    def __init__(self, client_app, run_config: dict, num_nodes: int) -> None:
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1  # what a Flower process sets
        self.client_app = client_app
        self.node_ids = [1000 + i for i in range(num_nodes)]
        self.contexts = {
            nid: Context(run_id=1, node_id=nid, node_config={"partition-id": i, "num-partitions": num_nodes},
                         state=RecordDict(), run_config=dict(run_config))
            for i, nid in enumerate(self.node_ids)
        }
        self._replies: dict[str, Message] = {}

    def set_run(self, run) -> None:
        pass

    @property
    def run(self) -> Run:
        return Run.create_empty(run_id=1)  # the legacy API's client manager asks for its id

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        return Message(content=content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id,
                       ttl=ttl)

    def get_node_ids(self):
        return list(self.node_ids)

    def push_messages(self, messages):
        ids = []
        for m in messages:
            m.metadata.__dict__["_message_id"] = mid = uuid.uuid4().hex
            try:
                reply = self.client_app(_transmitted(m), self.contexts[m.metadata.dst_node_id])
                self._replies[mid] = _transmitted(reply)
            except Exception as err:  # a failing site answers with an error reply
                self._replies[mid] = Message(Error(code=0, reason=repr(err)), reply_to=m)
            ids.append(mid)
        return ids

    def pull_messages(self, message_ids):
        return [self._replies.pop(i) for i in message_ids]

    def send_and_receive(self, messages, *, timeout=None):
        """Every reply that took at most ``timeout`` (sites run in parallel in Flower: each has its own clock)."""
        replies = []
        for m in messages:
            started = time.monotonic()
            reply = self.pull_messages(self.push_messages([m]))
            if timeout is None or time.monotonic() - started <= timeout:
                replies += reply
        return replies


def run_server(server_app, client_app, run_config: dict, num_nodes: int) -> None:
    """Run ``server_app`` against ``num_nodes`` in-process sites (each message as a SuperNode would)."""
    import torch

    threads = torch.get_num_threads()  # sites set their own; the caller's setting is restored after
    grid = InProcessGrid(client_app, run_config, num_nodes)
    try:
        server_app(grid, Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config=run_config))
    finally:
        torch.set_num_threads(threads)
