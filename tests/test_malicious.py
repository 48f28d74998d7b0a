"""Malicious sites: no reply can crash the server or capture the global model (issue 14).

The replies are made by hand (as Flower's own handler tests do) and judged by
the server's reply checks and its real strategy; two runs of the in-process
server (tiny EHR model, one round) put lying sites among honest ones. Each
bad reply must be refused with its reason, the rest aggregated exactly as if
the liar had not been there.
"""

import json
import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Message, Metadata, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg
from flwr.supercore.task_identity import TaskIdentity

from client.app import app as client_app
from client.wire import from_record, to_record
from server.app import app as server_app
from server.loop import MAX_GROWTH, MAX_RELATIVE_UPDATE, Declared, checked, checked_evaluation
from server.record import RunRecord
from server.strategy import build_strategy, site_error
from shared import learner
from shared.config import apply_overrides, classes_of, flatten, load
from shared.data import pooled_moments
from shared.serde import flatten_metrics
from simulations.cli import _absolute
from simulations.inprocess import run_server

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs/quickstart.yaml"
GLOBAL = {"w": np.ones((2, 3), np.float32), "b": np.ones(3, np.float32)}  # norm 3
NAMES = {11: "site-a", 12: "site-b", 13: "site-c", 14: "site-d", 15: "site-e"}
DECLARED = {node: Declared(examples=100, test_examples=50) for node in NAMES}


def sent(node: int, kind: str = "train") -> Message:
    md = Metadata(run_id=1, message_id=f"m-{node}", src_node_id=1, dst_node_id=node, reply_to_message_id="",
                  group_id="1", created_at=time.time(), ttl=3600.0, message_type=kind)
    return Message(content=RecordDict(), metadata=md)


def reply(to: Message, arrays: dict[str, np.ndarray], **changes) -> Message:
    """An honest site's training reply, with ``changes`` to its metrics (None: the key left out)."""
    metrics = {"train_loss": 0.5, "num-examples": 10, "site-index": 0, "epsilon": math.nan,
               "epsilon-patient": math.nan, "delta-patient": math.nan, **changes}
    metrics = {k: v for k, v in metrics.items() if v is not None}
    return Message(RecordDict({"arrays": to_record(arrays), "metrics": MetricRecord(metrics)}), reply_to=to)


def honest(scale: float) -> dict[str, np.ndarray]:
    return {k: v * scale for k, v in GLOBAL.items()}


def judge(cfg, attacks: dict[int, Message | None]) -> tuple[list[Message], list[Message]]:
    """Two honest sites (11, 12) and ``attacks`` (node -> its reply), checked: (all checked replies, honest)."""
    out = {n: sent(n) for n in (11, 12, *attacks)}
    good = [reply(out[11], honest(1.1)), reply(out[12], honest(0.9), **{"num-examples": 30})]
    bad = [make(out[n]) for n, make in attacks.items()]
    return checked(cfg, list(out.values()), bad + good, to_record(GLOBAL), NAMES.get, DECLARED), good


class Sites:
    """What a strategy's ``configure_train`` asks of a grid: the nodes to sample."""

    def __init__(self, nodes: list[int]) -> None:
        self.nodes = nodes

    def get_node_ids(self) -> list[int]:
        return self.nodes


def aggregate(replies: list[Message]) -> dict[str, np.ndarray]:
    arrays, _ = FedAvg().aggregate_train(1, replies)
    return from_record(arrays)


def assert_honest_model(result: list[Message], good: list[Message]) -> None:
    """The aggregate is the honest sites' alone, finite and within the update bound of the global model."""
    model, expected = aggregate(result), aggregate(good)
    for k in GLOBAL:
        np.testing.assert_array_equal(model[k], expected[k])
        assert np.isfinite(model[k]).all()
    distance = math.sqrt(sum(float(np.sum((model[k] - GLOBAL[k]) ** 2)) for k in GLOBAL))
    assert distance <= MAX_RELATIVE_UPDATE * 3.0


def refused(result: list[Message]) -> dict[str, str]:
    return {NAMES[m.metadata.src_node_id]: m.error.reason for m in result if m.has_error()}


def test_overflowing_huge_and_far_arrays_are_refused_and_the_model_is_the_honest_mean():
    cfg = load(CONFIG)
    result, good = judge(cfg, {
        13: lambda to: reply(to, {"w": np.full((2, 3), 1e300), "b": np.ones(3)}),  # finite as float64 only
        14: lambda to: reply(to, {"w": np.full((2, 3), 3e38, np.float32), "b": np.ones(3, np.float32)}),
        15: lambda to: reply(to, honest(40.0)),  # finite, within MAX_GROWTH, 117 from a model of norm 3
    })
    reasons = refused(result)
    assert set(reasons) == {"site-c", "site-d", "site-e"}
    assert "'w' holds NaN or Inf (as float32" in reasons["site-c"]
    assert f"above {MAX_GROWTH:g} x max(1, the global array's largest value)" in reasons["site-d"]
    assert "MAX_RELATIVE_UPDATE" in reasons["site-e"]
    assert_honest_model(result, good)


@pytest.mark.parametrize("count, expected", [
    (10**12, "more than the 100 training examples the site declared"),
    (0, "expected a positive integer"),
    (-5, "expected a positive integer"),
    (2.5, "expected a positive integer"),
])
def test_num_examples_is_a_positive_integer_within_what_the_site_declared(count, expected):
    # The liar's model is the global one moved by 1.5 (within every bound): only its weight could capture.
    result, good = judge(load(CONFIG), {13: lambda to: reply(to, honest(1.5), **{"num-examples": count})})
    assert expected in refused(result)["site-c"]
    assert_honest_model(result, good)


@pytest.mark.parametrize("mode, changes, expected", [
    ("none", {"epsilon": None}, "missing ['epsilon']"),
    ("none", {"num-examples": None}, "missing ['num-examples']"),
    ("none", {"train_loss": None, "site-index": None}, "missing ['site-index', 'train_loss']"),
    ("none", {"extra": 1.0}, "unexpected ['extra']"),
    ("none", {"train_loss": [0.5, 0.5]}, "expected numbers"),
    ("none", {"train_loss": math.nan}, "train_loss nan"),
    ("none", {"epsilon": 3.0}, "expected NaN (no local DP"),
    ("local", {"epsilon": math.nan}, "expected epsilons and delta >= 0"),  # no local DP, when the run asked for it
    ("local", {"epsilon": -291.0, "epsilon-patient": -291.0, "delta-patient": 1e-5}, "expected epsilons and delta >= 0"),
    ("central", {"uniform-weight": None}, "missing ['uniform-weight']"),
    ("central", {"uniform-weight": 50.0}, "central DP weighs every site 1"),
])
def test_missing_extra_and_out_of_range_metrics_are_recorded_not_a_crash(tmp_path, mode, changes, expected):
    cfg = apply_overrides(load(CONFIG), {"privacy.mode": mode, "data.sites": 2})
    honest_dp = {"local": {"epsilon": 1.0, "epsilon-patient": 1.0, "delta-patient": 1e-5},
                 "central": {"uniform-weight": 1.0}}.get(mode, {})
    out = {n: sent(n) for n in (11, 12, 13)}
    replies = [reply(out[11], honest(1.1), **honest_dp), reply(out[12], honest(0.9), **honest_dp),
               reply(out[13], honest(1.2), **{**honest_dp, **changes})]
    result = checked(cfg, list(out.values()), replies, to_record(GLOBAL), NAMES.get, DECLARED)
    header = {"privacy": {"sites": {}, "central": None}} if mode != "none" else {}
    record = RunRecord(tmp_path, classes_of(cfg), header)
    strategy = build_strategy(cfg, record, {n: NAMES[n] for n in out}, {"w", "b"})
    if mode == "central":  # Flower's DP wrapper aggregates only a round it configured
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1  # what a Flower process sets
        strategy.configure_train(1, to_record(GLOBAL), ConfigRecord({}), Sites([11, 12, 13]))
    strategy.aggregate_train(1, result)  # the real strategy (central DP: voids the round): no crash
    assert expected in record.round(1)["failed"]["site-c"]
    assert set(record.round(1)["failed"]) == {"site-c"}


def test_with_two_sites_an_update_far_from_the_global_model_is_refused():
    # max_update_ratio compares with the round's median: between two sites it can never refuse either.
    cfg = apply_overrides(load(CONFIG), {"federation.max_update_ratio": 5.0})
    out = {n: sent(n) for n in (11, 12)}
    attacker = {k: v + 20.0 for k, v in GLOBAL.items()}  # 60 from a model of norm 3, each value within MAX_GROWTH
    result = checked(cfg, list(out.values()), [reply(out[11], honest(1.1)), reply(out[12], attacker)],
                     to_record(GLOBAL), NAMES.get, DECLARED)
    assert "server/loop.py MAX_RELATIVE_UPDATE" in refused(result)["site-b"]
    np.testing.assert_array_equal(aggregate(result)["w"], honest(1.1)["w"])


def test_a_site_that_moves_the_ehr_scaling_is_refused():
    # The scaling is the server's (pooled from the sites' statistics); training never changes it.
    cfg = apply_overrides(load(CONFIG), {"model.name": "mlp"})
    glob, _ = learner.initial_weights(cfg, np.full(27, 50.0, np.float32), np.full(27, 10.0, np.float32))
    trained = learner.trained_names(cfg)
    update = {k: v + np.float32(0.01) if k in trained else v for k, v in glob.items()}
    out = {n: sent(n) for n in (11, 12)}
    replies = [reply(out[11], update), reply(out[12], {**update, "ehr.mean": glob["ehr.mean"] * 100})]
    result = checked(cfg, list(out.values()), replies, to_record(glob), NAMES.get, DECLARED)
    assert refused(result) == {"site-b": "rejected update: array 'ehr.mean' is not trained, yet differs from the "
                                         "global model's"}
    np.testing.assert_array_equal(aggregate(result)["ehr.mean"], glob["ehr.mean"])


def evaluation(to: Message, classes: tuple[str, ...], **changes) -> Message:
    """An honest site's evaluation reply of 12 examples, with ``changes`` to its metrics (None: left out)."""
    k = len(classes)
    confusion = np.zeros((k, k), int)
    confusion[np.arange(k), np.arange(k)] = 12 // k
    flat = flatten_metrics({"loss": 0.4, "accuracy": 1.0, "balanced_accuracy": 1.0, "macro_auc": 1.0,
                            "macro_f1": 1.0, "auc": {c: 1.0 for c in classes}, "confusion": confusion.tolist()},
                           classes)
    metrics = {**flat, "num-examples": 12, "site-index": 0, **changes}
    metrics = {k: v for k, v in metrics.items() if v is not None}
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=to)


def test_bad_evaluation_replies_are_recorded_under_evaluate_failed(tmp_path):
    cfg = load(CONFIG)
    classes = classes_of(cfg)
    out = {n: sent(n, "evaluate") for n in NAMES}
    replies = [evaluation(out[11], classes), evaluation(out[12], classes, loss=None),
               evaluation(out[13], classes, confusion=[1, 2, 3]),
               evaluation(out[14], classes, accuracy=7.0),
               evaluation(out[15], classes, **{"num-examples": 10**12})]
    record = RunRecord(tmp_path, classes, {})
    strategy = build_strategy(cfg, record, NAMES, {"w", "b"})
    strategy.aggregate_evaluate(1, checked_evaluation(cfg, list(out.values()), replies, DECLARED))
    entry = record.round(1)
    assert list(entry["sites"]) == ["site-a"] and entry["sites"]["site-a"]["n"] == 12
    failed = entry["evaluate_failed"]
    assert "missing ['loss']" in failed["site-b"]
    assert "confusion: expected 3x3 whole numbers" in failed["site-c"]
    assert "['accuracy']: expected NaN or a number in [0, 1]" in failed["site-d"]
    assert "more than the 50 test examples the site declared" in failed["site-e"]


def test_a_sites_error_is_its_own_last_line_not_flowers_wrapping():
    # What Flower 1.42's simulation puts in the error reply: Ray's error around ClientAppException, coloured.
    ray = ("<class 'ray.exceptions.RayTaskError(ClientAppException)'>:<'\x1b[36mray::ClientAppActor.run()\x1b[39m "
           "(pid=1, ip=127.0.0.1)\n  File \"client/app.py\", line 9, in ehr_stats\nFileNotFoundError: [Errno 2] No "
           "such file: 'linkage.csv'\n\nThe above exception was the direct cause of the following exception:\n\n"
           "flwr.clientapp.client_app.ClientAppException: \nException ClientAppException occurred. Message: "
           "[Errno 2] No such file: 'linkage.csv''>")
    assert site_error(ray) == "FileNotFoundError: [Errno 2] No such file: 'linkage.csv'"
    deployed = "<class 'ValueError'>:<'linkage.csv row 3: expected a case id'>"  # a SuperNode's ClientApp process
    assert site_error(deployed) == "ValueError: linkage.csv row 3: expected a case id"


# In-process runs: the real ClientApp at every site, some replies altered on their way to the server.

def tampered(attacks: dict[int, tuple[str, object]], seen: dict[tuple[int, str], Message]):
    """The ClientApp, with site ``k``'s reply to a message of type ``kind`` replaced by ``change(message, reply)``
    (``attacks``: k -> (kind, change)); the true replies are kept in ``seen`` ((site, type) -> reply)."""
    def app(msg: Message, context) -> Message:
        answer = client_app(msg, context)
        site, kind = int(context.node_config["partition-id"]), msg.metadata.message_type
        seen[site, kind] = answer
        attack, change = attacks.get(site, (None, None))
        return change(msg, answer) if kind == attack else answer
    return app


def federate(quick_data, tmp_path, sites: int, attacks: dict, **overrides) -> tuple[dict, dict, dict]:
    """One round of the EHR model on ``sites`` sites re-dealt from the quick data: metrics.json, model, replies."""
    cfg = apply_overrides(_absolute(load(CONFIG)), {
        "data.root": str(quick_data), "data.sites": sites, "data.partition": "iid", "model.name": "mlp",
        "train.steps": 2, "federation.rounds": 1, "server.eval_data": None, "report.shap_rows": 0, **overrides})
    run_dir, seen = tmp_path / "run", {}
    run_server(server_app, tampered(attacks, seen), {"config": str(CONFIG), "run-dir": str(run_dir), **flatten(cfg)},
               num_nodes=sites)
    model = torch.load(run_dir / "model.pt", weights_only=True)
    return json.loads((run_dir / "metrics.json").read_text()), model, seen


def lying(msg: Message, reply: Message, shift: float | None = None, fill: float | None = None, **metrics) -> Message:
    """``reply`` with its floating-point arrays moved by ``shift`` or filled with ``fill``, and ``metrics`` changed."""
    arrays = {k: v + shift if shift is not None else np.full(v.shape, fill) if fill is not None else v
              for k, v in from_record(reply.content["arrays"]).items()}
    return Message(RecordDict({"arrays": to_record(arrays),
                               "metrics": MetricRecord({**dict(reply.content["metrics"]), **metrics})}), reply_to=msg)


def test_liars_in_a_run_are_refused_and_the_model_is_the_honest_sites_alone(quick_data, tmp_path, capsys):
    attacks = {2: ("train", lambda msg, r: lying(msg, r, shift=3.0, **{"num-examples": 10**12})),
               3: ("train", lambda msg, r: lying(msg, r, fill=1e300))}  # float64: finite, but not as float32
    metrics, model, _ = federate(quick_data, tmp_path / "liars", 4, attacks, **{"federation.min_sites": 2})
    failed = metrics["rounds"][0]["failed"]
    assert set(failed) == {"iid-2", "iid-3"} and "stopped" not in metrics
    assert "num-examples 1000000000000 is more than" in failed["iid-2"] and "NaN or Inf" in failed["iid-3"]
    assert "site iid-2 did not train: rejected update: num-examples" in capsys.readouterr().out
    # The same round with the liars crashing instead: the honest sites' aggregate alone.
    _, alone, _ = federate(quick_data, tmp_path / "alone", 4, {}, **{"federation.min_sites": 2,
                                                                        "faults.crash": ["2@1", "3@1"]})
    assert model.keys() == alone.keys()
    for k in model:
        assert torch.isfinite(model[k].float()).all()
        torch.testing.assert_close(model[k], alone[k], rtol=0, atol=0)


def statistics(msg: Message, reply: Message, name: str | None = None, **stats) -> Message:
    """``reply`` to ``query.ehr_stats`` with another site name or ``stats`` changed."""
    site = dict(reply.content["site"])
    return Message(RecordDict({"stats": MetricRecord({**dict(reply.content["stats"]), **stats}),
                               "site": ConfigRecord({**site, "name": name or site["name"]})}), reply_to=msg)


def test_bad_statistics_and_names_leave_their_sites_out_and_the_scaling_honest(quick_data, tmp_path, capsys):
    n = 27  # len(shared.mimic.FEATURES)
    attacks = {2: ("query.ehr_stats", lambda msg, r: statistics(msg, r, count=[1.0] * (n - 3))),
               3: ("query.ehr_stats", lambda msg, r: statistics(msg, r, sum=[math.nan] * n)),
               4: ("query.ehr_stats", lambda msg, r: statistics(msg, r, name="iid-0")),  # iid-0 is node 1000's
               5: ("query.ehr_stats", lambda msg, r: statistics(msg, r, name="../../etc/x"))}
    metrics, model, seen = federate(quick_data, tmp_path, 6, attacks, **{"federation.min_sites": 2})
    assert metrics["sites"] == ["iid-0", "iid-1"] and len(metrics["rounds"]) == 1
    out = capsys.readouterr().out
    assert "site iid-2 left out of the run: stats 'count': expected a list of 27 numbers" in out
    assert "site iid-3 left out of the run: stats 'sum' holds NaN or Inf" in out
    assert "site node 1004 left out of the run: site name 'iid-0' is node 1000's already" in out
    assert "site name (ConfigRecord 'site', key 'name'" in out and "got '../../etc/x'" in out
    honest = [{k: np.asarray(v, np.float64) for k, v in seen[site, "query.ehr_stats"].content["stats"].items()}
              for site in (0, 1)]
    mean, std = pooled_moments(honest)
    np.testing.assert_array_equal(model["ehr.mean"].numpy(), mean)
    np.testing.assert_array_equal(model["ehr.std"].numpy(), std)
