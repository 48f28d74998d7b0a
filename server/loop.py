"""The round loop. The server owns it rather than calling Flower's ``Strategy.start``.

``Strategy.start`` always begins at round 1 and hands every reply to
``aggregate_train`` as it came. This loop runs the same steps with the
strategy's own hooks (``configure_train``, ``aggregate_train``,
``configure_evaluate``, ``aggregate_evaluate``, then the central evaluation),
so that:

* a run resumes at the round after its last checkpoint (server/checkpoint.py)
  with the strategy's state restored;
* every reply is checked before a strategy sees it (:func:`checked`,
  :func:`checked_evaluation`), because one dishonest or broken site must not
  crash the server or capture the model: a site that did not answer within
  ``federation.round_timeout``, or sent records other than a site sends,
  missing, extra, non-finite or out-of-range metrics, a ``num-examples`` above
  the training examples it declared before training, NaN/Inf (in the global
  model's dtype), missing or extra arrays, wrong shapes or dtypes, values far
  beyond the global model's (:data:`MAX_GROWTH`), an update farther from the
  global model than ``federation.max_relative_update`` times its norm, or
  (with 3 sites or more) than ``federation.max_update_ratio`` times the round's
  median, is replaced by an error reply, which every strategy's reply filter
  drops and the recording mixin prints and records under ``failed``
  (``evaluate_failed`` for an evaluation);
* the arrays training never changes (the EHR scaling, frozen layers) are the
  server's: in every reply they are overwritten with the values the server
  sent, before the checks and the aggregation, so no site can move them and
  no rounding on their way back (FedAdam's float64 global model, sent back as
  float32) can cost an honest site its round;
* the round closes with the server's own evaluation and the record's line
  (:func:`central_evaluation`), then the caller's checkpoint;
* replies are put in site order before aggregation (they arrive in any order,
  and a floating-point sum depends on its order);
* the run stops cleanly, with the last good model, when fewer than
  ``federation.min_sites`` usable replies remain.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MetricRecord
from flwr.serverapp import Grid

from server.record import RunRecord
from server.strategy import PRIVACY_KEYS, note_failures
from shared import learner
from shared.config import TREE_STRATEGIES, Config, classes_of, compacted_upload
from shared.data import Samples
from shared.evaluation import bootstrap_ci
from shared.learner import MAX_WEIGHT, bn_names, trained_names
from shared.metrics import classification_metrics
from shared.serde import flatten_metrics
from shared.wire import UNIFORM, expand, from_record, to_record

# Error codes of the replies the server makes up for a site (a site's own: 100 budget_exhausted, 103 local_dp_required)
TIMEOUT = 101
REJECTED = 102
# No value of an update beyond this many times max(1, the largest |value| of the global array): it holds the arrays
# the norm bound does not see (BatchNorm statistics) and keeps every sum of the aggregation far from overflow. The
# honest quickstart runs measured for federation.max_relative_update (shared/config.py) reach 2.2 (76 for BatchNorm
# variances at train.lr 0.01).
MAX_GROWTH = 1e3


@dataclass(frozen=True)
class Declared:
    """What a site reported before training (its ``query.ehr_stats`` reply): the bounds of its later replies."""

    examples: int  # its training split
    test_examples: int | None = None  # its test split, where the site reports it


class TooFewSites(RuntimeError):
    """Fewer usable replies than ``federation.min_sites``: the run ends with the previous round's model."""

    def __init__(self, server_round: int, usable: int, min_sites: int) -> None:
        super().__init__(f"round {server_round}: only {usable} site(s) sent a usable update; federation.min_sites "
                         f"is {min_sites}, so the run stops with the model of round {server_round - 1}")
        self.round = server_round


class AdmittedGrid(Grid):
    """``grid`` as the strategies see it: only the sites admitted to the run (their statistics were sound).

    A node left out (or one that joined after the statistics round, and so declared nothing) is never sampled.
    The order of the wrapped grid's node ids is kept: the strategies' sampling draws from it.
    """

    def __init__(self, grid: Grid, admitted: Iterable[int]) -> None:
        self.grid = grid
        self.admitted = frozenset(admitted)

    def get_node_ids(self):
        return [n for n in self.grid.get_node_ids() if n in self.admitted]

    def set_run(self, run) -> None:
        self.grid.set_run(run)

    @property
    def run(self):
        return self.grid.run

    def create_message(self, *args, **kwargs) -> Message:
        return self.grid.create_message(*args, **kwargs)

    def push_messages(self, messages):
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids):
        return self.grid.pull_messages(message_ids)

    def send_and_receive(self, messages, *, timeout=None):
        return self.grid.send_and_receive(messages, timeout=timeout)


def as_count(value) -> int | None:
    """``value`` as a whole number, or None when it is not one (a string, a list, a bool, NaN, 2.5)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return int(value) if value == int(value) else None


def _arrays(m: Message) -> dict[str, np.ndarray] | None:
    records = list(m.content.array_records.values())
    return {k: v.numpy() for k, v in records[0].items()} if len(records) == 1 else None


def _records(m: Message, arrays: bool) -> str | None:
    """Why the reply does not hold what a site sends: one MetricRecord ``metrics`` (and, to train, one ArrayRecord)."""
    if list(m.content.metric_records) != ["metrics"]:
        return f"expected one MetricRecord named 'metrics', got {sorted(m.content.metric_records)}"
    if arrays and len(m.content.array_records) != 1:
        return "expected exactly one ArrayRecord in the reply"
    return None


def _keys(metrics: MetricRecord, expected: set[str], lists: set[str]) -> str | None:
    """Why ``metrics`` does not have exactly the ``expected`` keys (Flower aggregates only replies that agree),
    numbers everywhere but in ``lists``."""
    missing, extra = sorted(expected - set(metrics)), sorted(set(metrics) - expected)
    if missing or extra:
        return f"metrics do not match: missing {missing}, unexpected {extra[:5]}"
    wrong = sorted(k for k in expected if isinstance(metrics[k], list) != (k in lists))
    return f"metrics {wrong[:5]}: expected {'lists' if wrong[0] in lists else 'numbers'}" if wrong else None


def _counted(metrics: MetricRecord, declared: Declared | None, split: str) -> str | None:
    """Why ``num-examples`` is not a positive integer within what the site ``declared`` before training for its
    ``split`` (``training`` or ``test``; no test size declared: no limit). A site that declared nothing has no
    count the server believes, in training and evaluation alike."""
    n = as_count(metrics["num-examples"])
    if n is None or n < 1:
        return f"num-examples {metrics['num-examples']!r}: expected a positive integer"
    if declared is None:
        return (f"num-examples {n}: the site reported no statistics before training (query.ehr_stats), so no count "
                "of its is believed")
    most = declared.examples if split == "training" else declared.test_examples
    if most is not None and n > most:
        return f"num-examples {n} is more than the {most} {split} examples the site declared before training"
    return None


def _common(cfg: Config, metrics: MetricRecord) -> str | None:
    """Why the metrics every reply carries (``site-index``, central DP's uniform weight) are not what a site sends."""
    index = as_count(metrics["site-index"])
    if index is None or index < 0:
        return f"site-index {metrics['site-index']!r}: expected a non-negative integer"
    if cfg.privacy.mode == "central" and metrics[UNIFORM] != 1.0:
        return f"{UNIFORM} {metrics[UNIFORM]!r}: central DP weighs every site 1 (what its accountant assumes)"
    return None


def _privacy(cfg: Config, metrics: MetricRecord) -> str | None:
    """Why a training reply's epsilons are not what a site sends: NaN without local DP, else numbers in range."""
    eps, eps_patient, delta_patient = (float(metrics[k]) for k in PRIVACY_KEYS)
    if cfg.privacy.mode != "local":
        if not all(math.isnan(v) for v in (eps, eps_patient, delta_patient)):
            return f"{', '.join(PRIVACY_KEYS)}: expected NaN (no local DP with privacy.mode {cfg.privacy.mode})"
        return None
    # NaN fails every comparison; Inf is honest (no noise: epsilon .inf; group privacy's delta for many patches).
    if not (eps >= 0 and eps_patient >= 0 and delta_patient >= 0):
        return (f"epsilon {eps!r}, epsilon-patient {eps_patient!r}, delta-patient {delta_patient!r}: expected "
                "epsilons and delta >= 0 (privacy.mode local)")
    return None


def check_train_metrics(cfg: Config, metrics: MetricRecord, declared: Declared | None) -> str | None:
    """Why a training reply's metrics cannot be used, or None when they can.

    ``declared``: what the site reported before training (None: nothing, so no count of its is believed).
    """
    expected = {"train_loss", "num-examples", "site-index", *PRIVACY_KEYS} | \
        ({UNIFORM} if cfg.privacy.mode == "central" else set())
    reason = _keys(metrics, expected, set()) or _counted(metrics, declared, "training")
    if reason is not None:
        return reason
    if not (math.isfinite(metrics["train_loss"]) and metrics["train_loss"] >= 0):
        return f"train_loss {metrics['train_loss']!r}: expected a finite number >= 0"
    return _common(cfg, metrics) or _privacy(cfg, metrics)


def check_evaluation(cfg: Config, metrics: MetricRecord, declared: Declared | None) -> str | None:
    """Why an evaluation reply's metrics cannot be recorded, or None when they can.

    Scores are NaN (a site that cannot score a class) or in [0, 1]; the loss a finite number >= 0; the confusion
    matrix ``classes x classes`` whole numbers summing to ``num-examples``.
    """
    classes = classes_of(cfg)
    scores = set(flatten_metrics({}, classes)) - {"confusion", "loss"}
    expected = {*scores, "loss", "confusion", "num-examples", "site-index"} | \
        ({UNIFORM} if cfg.privacy.mode == "central" else set())
    reason = _keys(metrics, expected, {"confusion"}) or \
        _counted(metrics, declared, "test")
    if reason is not None:
        return reason
    bad = sorted(k for k in scores if not (math.isnan(metrics[k]) or 0 <= metrics[k] <= 1))
    if bad:
        return f"metrics {bad[:5]}: expected NaN or a number in [0, 1]"
    if not (math.isfinite(metrics["loss"]) and metrics["loss"] >= 0):
        return f"loss {metrics['loss']!r}: expected a finite number >= 0"
    cells = [as_count(c) for c in metrics["confusion"]]
    if len(cells) != len(classes) ** 2 or any(c is None or c < 0 for c in cells) or sum(cells) != metrics["num-examples"]:
        return (f"confusion: expected {len(classes)}x{len(classes)} whole numbers >= 0 summing to num-examples "
                f"({metrics['num-examples']})")
    return _common(cfg, metrics)


def check_update(reference: dict[str, np.ndarray], update: dict[str, np.ndarray] | None, shapes: bool = True) -> str | None:
    """Why ``update`` cannot be aggregated with the global ``reference``, or None when it can.

    Floating-point values are judged in the global model's dtype (a float64 1e300 is Inf as float32) and against
    :data:`MAX_GROWTH` and ``shared.learner.MAX_WEIGHT``. ``shapes=False`` for XGBoost, whose one array is the
    serialised booster (its length changes every round).
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
        reason = _values(k, got, ref) if floats else None
        if reason is not None:
            return reason
    return None


def _values(name: str, got: np.ndarray, ref: np.ndarray) -> str | None:
    """Why a floating-point array's values do not fit the global array ``ref``: non-finite or far too large."""
    with np.errstate(over="ignore", invalid="ignore"):
        cast = got.astype(ref.dtype)
    if not np.isfinite(cast).all():
        return f"array {name!r} holds NaN or Inf (as {ref.dtype}, the global model's dtype)"
    bound = MAX_GROWTH * max(1.0, float(np.abs(ref).max(initial=0.0)))
    peak = float(np.abs(cast).max(initial=0.0))
    if peak > bound:
        return (f"array {name!r} reaches {peak:.4g}, above {MAX_GROWTH:g} x max(1, the global array's largest "
                f"value) = {bound:.4g}")
    if peak > MAX_WEIGHT:  # what a resume accepts: an aggregate of accepted updates stays within it
        return f"array {name!r} reaches {peak:.4g}, above {MAX_WEIGHT:g} (shared.learner.MAX_WEIGHT)"
    return None


def _floats(reference: dict[str, np.ndarray], names: set[str] | None = None) -> list[str]:
    """The floating-point arrays of ``reference`` (among ``names``, when given and any of them is there)."""
    floats = [k for k, v in reference.items() if np.issubdtype(v.dtype, np.floating)]
    return [k for k in floats if names is not None and k in names] or floats


def _distance(reference: dict[str, np.ndarray], update: dict[str, np.ndarray], names: list[str]) -> float:
    return float(np.sqrt(sum(np.sum((update[k].astype(np.float64) - reference[k]) ** 2) for k in names)))


def _norm(arrays: dict[str, np.ndarray], names: list[str]) -> float:
    return float(np.sqrt(sum(np.sum(arrays[k].astype(np.float64) ** 2) for k in names)))


def _too_far(cfg: Config, reference: dict[str, np.ndarray], updates: dict[int, dict[str, np.ndarray]]) -> dict[int, str]:
    """The updates (node -> why) too far from the global model.

    Beyond ``federation.max_relative_update`` times the norm of its trained weights, measured on those weights (a
    BatchNorm layer's statistics move far more, honestly; they are held by :data:`MAX_GROWTH`); a global model of
    norm 0 has no scale (a real one never is). Among 3 updates or more, also beyond ``federation.max_update_ratio``
    times the round's median (all floating-point arrays); between two, the larger is never above twice their median.
    """
    out, relative = {}, cfg.federation.max_relative_update
    trained = _floats(reference, trained_names(cfg))
    scale = _norm(reference, trained)
    if relative is not None and scale > 0:
        bound = relative * scale
        distance = {node: _distance(reference, u, trained) for node, u in updates.items()}
        out = {node: f"distance {d:.4g} from the global model is above {relative:g} x the norm of its trained "
                     f"weights ({bound:.4g}; federation.max_relative_update)"
               for node, d in distance.items() if d > bound}
    ratio = cfg.federation.max_update_ratio
    if ratio is not None and len(updates) >= 3:
        distance = {node: _distance(reference, u, _floats(reference)) for node, u in updates.items()}
        median = ratio * float(np.median(list(distance.values())))
        out.update({node: f"distance {d:.4g} from the global model is above {ratio:g} x the round's median "
                          f"({median:.4g}; federation.max_update_ratio)"
                    for node, d in distance.items() if d > median and node not in out})
    return out


def _untrained(cfg: Config, reference: dict[str, np.ndarray]) -> list[str]:
    """The floating-point arrays training never changes (the EHR scaling, frozen layers; not BatchNorm's
    statistics): a site returns them as it got them. None in a reference that is not this configuration's model
    (no trained array in it) or an XGBoost booster."""
    floats = _floats(reference)
    trained = trained_names(cfg) & set(floats)
    return [k for k in floats if k not in trained and k not in bn_names(cfg)] if trained else []


def _server_owned(cfg: Config, reference: dict[str, np.ndarray], update: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``update`` with its untrained arrays (:func:`_untrained`) set to the global values the server sent.

    They are the server's (the EHR scaling is pooled from the sites' statistics): a site that moved them would
    move every site's inputs, and an honest site cannot always send them back bit for bit (FedAdam's global
    model is float64, a site's float32; a float16 upload rounds them), so they are not judged but replaced. An
    array the update lacks stays missing, for :func:`check_update` to name.
    """
    return {**update, **{k: reference[k] for k in _untrained(cfg, reference) if k in update}}


def _judged(cfg: Config, reply: Message, ref: dict[str, np.ndarray],
            declared: Declared | None) -> tuple[dict[str, np.ndarray] | None, str | None]:
    """A training reply's update and why it cannot be aggregated, or None. The update is the whole model, its
    untrained arrays the server's (:func:`_server_owned`), and the reply holds it too: the strategy aggregates it."""
    reason = _records(reply, arrays=True) or check_train_metrics(cfg, reply.content["metrics"], declared)
    if reason is not None:
        return None, reason
    update = _arrays(reply)
    if cfg.federation.strategy in TREE_STRATEGIES:  # one array, the serialised booster: its length changes
        return update, check_update(ref, update, shapes=False)
    if update is not None:
        update = _server_owned(cfg, ref, expand(cfg, ref, update) if compacted_upload(cfg.federation) else update)
        reply.content[next(iter(reply.content.array_records))] = to_record(update)
    return update, check_update(ref, update)


def checked(cfg: Config, sent: list[Message], replies: list[Message], reference: ArrayRecord,
            site_of: Callable[[int], str], declared: Mapping[int, Declared]) -> list[Message]:
    """The round's training replies, one per site it was sent to, in site order; bad ones as error replies."""
    by_node = {m.metadata.src_node_id: m for m in replies}
    sent_to = {m.metadata.dst_node_id: m for m in sent}
    ref = {k: v.numpy() for k, v in reference.items()}
    out, updates = {}, {}
    for node, msg in sent_to.items():
        reply = by_node.get(node)
        if reply is None:
            reply = Message(Error(TIMEOUT, f"timeout: no reply within {cfg.federation.round_timeout:g} s "
                                           "(federation.round_timeout)"), reply_to=msg)
        elif not reply.has_error():
            update, reason = _judged(cfg, reply, ref, declared.get(node))
            if reason is not None:
                reply = Message(Error(REJECTED, f"rejected update: {reason}"), reply_to=msg)
            elif cfg.federation.strategy not in TREE_STRATEGIES:
                updates[node] = update
        out[node] = reply
    for node, reason in _too_far(cfg, ref, updates).items():
        out[node] = Message(Error(REJECTED, f"rejected update: {reason}"), reply_to=sent_to[node])
    return sorted(out.values(), key=lambda m: site_of(m.metadata.src_node_id))


def checked_evaluation(cfg: Config, sent: list[Message], replies: list[Message],
                       declared: Mapping[int, Declared]) -> list[Message]:
    """The round's evaluation replies in their order, bad ones as error replies (recorded under ``evaluate_failed``)."""
    sent_to = {m.metadata.dst_node_id: m for m in sent}
    out = []
    for m in replies:
        node = m.metadata.src_node_id
        reason = None if m.has_error() or node not in sent_to else \
            _records(m, arrays=False) or check_evaluation(cfg, m.content["metrics"], declared.get(node))
        out.append(Message(Error(REJECTED, f"rejected evaluation: {reason}"), reply_to=sent_to[node])
                   if reason is not None else m)
    return [m for m in out if m.metadata.src_node_id in sent_to]


def central_evaluation(cfg: Config, record: RunRecord, holdout: Samples | None,
                        latest: dict) -> Callable[[int, ArrayRecord], None]:
    """What closes each round: the server's own evaluation (when it has a test set), then the record's line.

    It keeps the round's model in ``latest["arrays"]``: the model to save if the run stops early.
    """
    classes = classes_of(cfg)

    def evaluate(server_round: int, arrays: ArrayRecord) -> None:
        latest["arrays"] = arrays
        if server_round == 0:
            return
        if holdout is not None:
            probs, loss = learner.predict(cfg, from_record(arrays), holdout)
            central = {**classification_metrics(holdout.labels, probs, classes), "loss": loss}
            if server_round == cfg.federation.rounds:  # the final model: 95 % intervals over patients
                central["ci95"] = bootstrap_ci(holdout, probs, classes, n=cfg.server.bootstrap, seed=cfg.seed)
            record.round(server_round)["central"] = central
        record.close_round(server_round, cfg.federation.rounds)

    return evaluate


def run_rounds(grid: Grid, strategy, arrays: ArrayRecord, cfg: Config, first: int, site_of: Callable[[int], str],
               declared: Mapping[int, Declared], evaluate_fn: Callable[[int, ArrayRecord], None],
               end_of_round: Callable[[int, ArrayRecord], None], message_config: dict | None = None):
    """Rounds ``first`` .. ``federation.rounds``; ``end_of_round`` follows the central evaluation (a checkpoint).

    ``declared``: what each site reported before training (node -> :class:`Declared`), the bounds of its replies.
    ``message_config`` goes into every training and evaluation message's config (the stain reference).
    """
    timeout = cfg.federation.round_timeout
    for server_round in range(first, cfg.federation.rounds + 1):
        sent = list(strategy.configure_train(server_round, arrays, ConfigRecord(message_config or {}), grid))
        replies = checked(cfg, sent, list(grid.send_and_receive(sent, timeout=timeout)), arrays, site_of, declared)
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
            evaluated = checked_evaluation(cfg, sent, list(grid.send_and_receive(sent, timeout=timeout)), declared)
            strategy.aggregate_evaluate(server_round, sorted(evaluated, key=lambda m: site_of(m.metadata.src_node_id)))
        evaluate_fn(server_round, arrays)
        end_of_round(server_round, arrays)
    return arrays
