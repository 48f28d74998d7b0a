"""The round loop. The server owns it rather than calling Flower's ``Strategy.start``.

``Strategy.start`` always begins at round 1 and hands every reply to
``aggregate_train`` as it came. This loop runs the same steps with the
strategy's own hooks (``configure_train``, ``aggregate_train``,
``configure_evaluate``, ``aggregate_evaluate``, then the central evaluation),
so that:

* a run resumes at the round after its last checkpoint (server/checkpoint.py)
  with the strategy's state restored;
* every training reply is checked before aggregation (:func:`check_update`):
  a site that did not answer within ``federation.round_timeout``, or sent
  NaN/Inf, missing or extra arrays, wrong shapes or dtypes, or an update
  farther from the global model than ``federation.max_update_ratio`` times the
  round's median, is replaced by an error reply, which every strategy's reply
  filter drops and the recording mixin prints and records under ``failed``;
* replies are put in site order before aggregation (they arrive in any order,
  and a floating-point sum depends on its order);
* the run stops cleanly, with the last good model, when fewer than
  ``federation.min_sites`` usable replies remain.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Error, Message
from flwr.serverapp import Grid

from client.wire import expand, to_record
from server.strategy import note_failures
from shared.config import TREE_STRATEGIES, Config, compacted_upload

TIMEOUT = 101  # error codes of the replies the server makes up for a site (100: a site's budget_exhausted)
REJECTED = 102


class TooFewSites(RuntimeError):
    """Fewer usable replies than ``federation.min_sites``: the run ends with the previous round's model."""

    def __init__(self, server_round: int, usable: int, min_sites: int) -> None:
        super().__init__(f"round {server_round}: only {usable} site(s) sent a usable update; federation.min_sites "
                         f"is {min_sites}, so the run stops with the model of round {server_round - 1}")
        self.round = server_round


def _arrays(m: Message) -> dict[str, np.ndarray] | None:
    records = list(m.content.array_records.values())
    return {k: v.numpy() for k, v in records[0].items()} if len(records) == 1 else None


def check_update(reference: dict[str, np.ndarray], update: dict[str, np.ndarray] | None, shapes: bool = True) -> str | None:
    """Why ``update`` cannot be aggregated with the global ``reference``, or None when it can.

    ``shapes=False`` for XGBoost, whose one array is the serialised booster
    (its length changes every round).
    """
    if update is None:
        return "expected exactly one ArrayRecord in the reply"
    missing, extra = sorted(set(reference) - set(update)), sorted(set(update) - set(reference))
    if missing or extra:
        return f"arrays do not match the model: missing {missing[:5]}, unexpected {extra[:5]}"
    for k, ref in reference.items():
        got = update[k]
        floats = np.issubdtype(got.dtype, np.floating) and np.issubdtype(ref.dtype, np.floating)
        if got.dtype != ref.dtype and not floats:  # FedAdam/FedYogi send float64; a site's model answers float32
            return f"array {k!r} has dtype {got.dtype}, expected {ref.dtype}"
        if shapes and got.shape != ref.shape:
            return f"array {k!r} has shape {got.shape}, expected {ref.shape}"
        if np.issubdtype(got.dtype, np.floating) and not np.isfinite(got).all():
            return f"array {k!r} holds NaN or Inf"
    return None


def _distance(reference: dict[str, np.ndarray], update: dict[str, np.ndarray]) -> float:
    return float(np.sqrt(sum(np.sum((update[k].astype(np.float64) - ref) ** 2) for k, ref in reference.items()
                             if np.issubdtype(ref.dtype, np.floating))))


def checked(cfg: Config, sent: list[Message], replies: list[Message], reference: ArrayRecord,
            site_of: Callable[[int], str]) -> list[Message]:
    """The round's training replies, one per site it was sent to, in site order; bad ones as error replies."""
    by_node = {m.metadata.src_node_id: m for m in replies}
    sent_to = {m.metadata.dst_node_id: m for m in sent}
    ref = {k: v.numpy() for k, v in reference.items()}
    trees = cfg.federation.strategy in TREE_STRATEGIES
    compacted = compacted_upload(cfg.federation)
    out, distance = {}, {}
    for node, msg in sent_to.items():
        reply = by_node.get(node)
        if reply is None:
            reply = Message(Error(TIMEOUT, f"timeout: no reply within {cfg.federation.round_timeout:g} s "
                                           "(federation.round_timeout)"), reply_to=msg)
        elif not reply.has_error():
            update = _arrays(reply)
            if update is not None and compacted:  # the strategy aggregates whole models at the global dtype
                update = expand(cfg, ref, update)
                reply.content[next(iter(reply.content.array_records))] = to_record(update)
            reason = check_update(ref, update, shapes=not trees)
            if reason is not None:
                reply = Message(Error(REJECTED, f"rejected update: {reason}"), reply_to=msg)
            elif cfg.federation.max_update_ratio is not None and not trees:
                distance[node] = _distance(ref, update)
        out[node] = reply
    if len(distance) >= 2:  # a bound relative to the round's median: only an outlier among several stands out
        bound = cfg.federation.max_update_ratio * float(np.median(list(distance.values())))
        for node, d in distance.items():
            if d > bound:
                out[node] = Message(Error(REJECTED, f"rejected update: distance {d:.4g} from the global model is "
                                                    f"above {cfg.federation.max_update_ratio:g} x the round's "
                                                    f"median ({bound:.4g}; federation.max_update_ratio)"),
                                    reply_to=sent_to[node])
    return sorted(out.values(), key=lambda m: site_of(m.metadata.src_node_id))


def run_rounds(grid: Grid, strategy, arrays: ArrayRecord, cfg: Config, first: int, site_of: Callable[[int], str],
               evaluate_fn: Callable[[int, ArrayRecord], None], end_of_round: Callable[[int, ArrayRecord], None],
               message_config: dict | None = None):
    """Rounds ``first`` .. ``federation.rounds``; ``end_of_round`` follows the central evaluation (a checkpoint).

    ``message_config`` goes into every training and evaluation message's config (the stain reference).
    """
    timeout = cfg.federation.round_timeout
    for server_round in range(first, cfg.federation.rounds + 1):
        sent = list(strategy.configure_train(server_round, arrays, ConfigRecord(message_config or {}), grid))
        replies = checked(cfg, sent, list(grid.send_and_receive(sent, timeout=timeout)), arrays, site_of)
        usable = sum(not m.has_error() for m in replies)
        needed = min(cfg.federation.min_sites, len(sent))  # xgb_cyclic sends to one site a round
        budget_only = all(m.error.reason.startswith("budget_exhausted") for m in replies if m.has_error())
        if usable < needed and not (usable == 0 and budget_only):  # all spent: the strategy's BudgetSpent says so
            note_failures(strategy.record, strategy.site_names, server_round, replies)
            raise TooFewSites(server_round, usable, cfg.federation.min_sites)
        new, _ = strategy.aggregate_train(server_round, replies)
        arrays = new if new is not None else arrays  # central DP voids a round with a failed site
        sent = list(strategy.configure_evaluate(server_round, arrays, ConfigRecord(message_config or {}), grid))
        if sent:
            evaluated = grid.send_and_receive(sent, timeout=timeout)
            strategy.aggregate_evaluate(server_round, sorted(evaluated, key=lambda m: site_of(m.metadata.src_node_id)))
        evaluate_fn(server_round, arrays)
        end_of_round(server_round, arrays)
    return arrays
