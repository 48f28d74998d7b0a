"""Malicious sites: no reply can crash the server or capture the global model (issue 14).

The replies are made by hand (as Flower's own handler tests do) and judged by
the server's reply checks and its real strategy; two runs of the in-process
server (tiny EHR model, one round) put lying sites among honest ones. Each
bad reply must be refused with its reason, the rest aggregated exactly as if
the liar had not been there.
"""

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
from server.loop import MAX_GROWTH, Declared, check_evaluation, check_train_metrics, checked, checked_evaluation
from server.record import RunRecord
from server.strategy import build_strategy, site_error
from shared import learner
from shared.config import apply_overrides, classes_of, load
from shared.data import pooled_moments
from shared.serde import flatten_metrics
from shared.wire import from_record, to_record

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
    assert distance <= load(CONFIG).federation.max_relative_update * 3.0


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
    assert "federation.max_relative_update" in reasons["site-e"]
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
    assert "above 10 x the norm of its trained weights" in refused(result)["site-b"]
    assert "federation.max_relative_update" in refused(result)["site-b"]
    np.testing.assert_array_equal(aggregate(result)["w"], honest(1.1)["w"])
    # null turns the bound off; a tighter one refuses an update the default lets through.
    loose = checked(apply_overrides(cfg, {"federation.max_relative_update": None}), list(out.values()),
                    [reply(out[11], honest(1.1)), reply(out[12], attacker)], to_record(GLOBAL), NAMES.get, DECLARED)
    assert refused(loose) == {}
    tight = checked(apply_overrides(cfg, {"federation.max_relative_update": 0.05}), list(out.values()),
                    [reply(out[11], honest(1.1)), reply(out[12], attacker)], to_record(GLOBAL), NAMES.get, DECLARED)
    assert "above 0.05 x the norm" in refused(tight)["site-a"]  # 0.3 from a model of norm 3


def test_an_update_beyond_the_largest_honest_weight_is_refused():
    # A global array of 5000 lets values grow to 5e6 (MAX_GROWTH); resume refuses a checkpoint beyond MAX_WEIGHT,
    # so the server never aggregates one.
    cfg = load(CONFIG)
    big = {"w": np.full((2, 3), 5000.0, np.float32), "b": np.ones(3, np.float32)}
    out = {n: sent(n) for n in (11, 12)}
    beyond = {**big, "w": np.full((2, 3), 2 * learner.MAX_WEIGHT, np.float32)}
    result = checked(apply_overrides(cfg, {"federation.max_relative_update": None}), list(out.values()),
                     [reply(out[11], big), reply(out[12], beyond)], to_record(big), NAMES.get, DECLARED)
    assert refused(result) == {"site-b": "rejected update: array 'w' reaches 2e+06, above 1e+06 "
                                         "(shared.learner.MAX_WEIGHT)"}


@pytest.mark.parametrize("upload_dtype", ["float32", "float16"])
def test_the_ehr_scaling_is_the_servers_whatever_a_site_sends(upload_dtype):
    # The scaling is the server's (pooled from the sites' statistics); training never changes it. A site's copy is
    # replaced by the one the server sent, not judged: under FedAdam the global is float64, which float32 (or a
    # float16 upload) cannot send back bit for bit.
    cfg = apply_overrides(load(CONFIG), {"model.name": "mlp", "federation.upload_dtype": upload_dtype})
    glob, _ = learner.initial_weights(cfg, np.full(27, 50.0, np.float32), np.full(27, 10.0, np.float32))
    glob = {k: v.astype(np.float64) + (1e-9 if k == "ehr.mean" else 0.0) for k, v in glob.items()}  # FedAdam's
    trained = learner.trained_names(cfg)
    update = {k: (v + 0.01 if k in trained else v).astype(upload_dtype) for k, v in glob.items()}
    out = {n: sent(n) for n in (11, 12)}
    replies = [reply(out[11], update), reply(out[12], {**update, "ehr.mean": glob["ehr.mean"] * 100})]
    result = checked(cfg, list(out.values()), replies, to_record(glob), NAMES.get, DECLARED)
    assert refused(result) == {}
    model = aggregate(result)
    np.testing.assert_array_equal(model["ehr.mean"], glob["ehr.mean"])
    np.testing.assert_array_equal(model["ehr.std"], glob["ehr.std"])
    assert not np.array_equal(model[sorted(trained)[0]], glob[sorted(trained)[0]])  # the trained arrays moved


def test_counts_of_a_site_that_declared_nothing_are_refused_in_training_and_evaluation_alike():
    cfg = load(CONFIG)
    train = {"train_loss": 0.5, "num-examples": 10, "site-index": 0, "epsilon": math.nan,
             "epsilon-patient": math.nan, "delta-patient": math.nan}
    classes = classes_of(cfg)
    evaluated = evaluation(sent(11, "evaluate"), classes).content["metrics"]
    why = "the site reported no statistics before training (query.ehr_stats)"
    assert why in check_train_metrics(cfg, MetricRecord(train), None)
    assert why in check_evaluation(cfg, evaluated, None)
    assert check_evaluation(cfg, evaluated, Declared(examples=100)) is None  # a test size not declared: no limit


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


def federate(federation, tmp_path, sites: int, attacks: dict, **overrides) -> tuple[dict, dict, dict]:
    """One round of the EHR model on ``sites`` sites re-dealt from the quick data, with ``attacks``: metrics.json,
    model, replies."""
    seen = {}
    metrics = federation(tmp_path / "run", {
        "data.sites": sites, "data.partition": "iid", "model.name": "mlp", "federation.rounds": 1,
        "server.eval_data": None, **overrides}, client=tampered(attacks, seen))
    return metrics, torch.load(tmp_path / "run" / "model.pt", weights_only=True), seen


def lying(msg: Message, reply: Message, shift: float | None = None, fill: float | None = None, **metrics) -> Message:
    """``reply`` with its floating-point arrays moved by ``shift`` or filled with ``fill``, and ``metrics`` changed."""
    arrays = {k: v + shift if shift is not None else np.full(v.shape, fill) if fill is not None else v
              for k, v in from_record(reply.content["arrays"]).items()}
    return Message(RecordDict({"arrays": to_record(arrays),
                               "metrics": MetricRecord({**dict(reply.content["metrics"]), **metrics})}), reply_to=msg)


def test_liars_in_a_run_are_refused_and_the_model_is_the_honest_sites_alone(federation, tmp_path, capsys):
    attacks = {2: ("train", lambda msg, r: lying(msg, r, shift=3.0, **{"num-examples": 10**12})),
               3: ("train", lambda msg, r: lying(msg, r, fill=1e300))}  # float64: finite, but not as float32
    metrics, model, _ = federate(federation, tmp_path / "liars", 4, attacks, **{"federation.min_sites": 2})
    failed = metrics["rounds"][0]["failed"]
    assert set(failed) == {"iid-2", "iid-3"} and "stopped" not in metrics
    assert "num-examples 1000000000000 is more than" in failed["iid-2"] and "NaN or Inf" in failed["iid-3"]
    assert "site iid-2 did not train: rejected update: num-examples" in capsys.readouterr().out
    # The same round with the liars crashing instead: the honest sites' aggregate alone.
    _, alone, _ = federate(federation, tmp_path / "alone", 4, {}, **{"federation.min_sites": 2,
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


def test_bad_statistics_and_names_leave_their_sites_out_and_the_scaling_honest(federation, tmp_path, capsys):
    n = 27  # len(shared.mimic.FEATURES)
    attacks = {2: ("query.ehr_stats", lambda msg, r: statistics(msg, r, count=[1.0] * (n - 3))),
               3: ("query.ehr_stats", lambda msg, r: statistics(msg, r, sum=[math.nan] * n)),
               4: ("query.ehr_stats", lambda msg, r: statistics(msg, r, name="iid-0")),  # iid-0 is node 1000's
               5: ("query.ehr_stats", lambda msg, r: statistics(msg, r, name="../../etc/x"))}
    metrics, model, seen = federate(federation, tmp_path, 6, attacks, **{"federation.min_sites": 2})
    assert metrics["sites"] == ["iid-0", "iid-1"] and len(metrics["rounds"]) == 1
    left_out = metrics["left_out"]["query.ehr_stats"]
    assert list(left_out) == ["iid-2", "iid-3", "node 1004", "node 1005"] and list(metrics["left_out"]) == [
        "query.ehr_stats"]
    assert left_out["iid-3"] == "stats 'sum' holds NaN or Inf: expected 27 finite numbers"
    assert "is node 1000's already" in left_out["node 1004"] and "'../../etc/x'" in left_out["node 1005"]
    out = capsys.readouterr().out
    assert "site iid-2 left out of the run: stats 'count': expected a list of 27 numbers" in out
    assert "site iid-3 left out of the run: stats 'sum' holds NaN or Inf: expected 27 finite numbers" in out
    assert "site node 1004 left out of the run: site name 'iid-0' is node 1000's already" in out
    assert "site name (ConfigRecord 'site', key 'name'" in out and "got '../../etc/x'" in out
    honest = [{k: np.asarray(v, np.float64) for k, v in seen[site, "query.ehr_stats"].content["stats"].items()}
              for site in (0, 1)]
    mean, std = pooled_moments(honest)
    np.testing.assert_array_equal(model["ehr.mean"].numpy(), mean)
    np.testing.assert_array_equal(model["ehr.std"].numpy(), std)


def stained(msg: Message, reply: Message, **stats) -> Message:
    """``reply`` to ``query.stain`` with ``stats`` changed."""
    return Message(RecordDict({"stain": MetricRecord({**dict(reply.content["stain"]), **stats})}), reply_to=msg)


@pytest.mark.parametrize("stats, expected", [
    ({"mean": [1e300] + [0.0] * 5}, "stain 'mean': expected 6 numbers (reinhard statistics), each from "
                                    "[0, -128, -128, 0, 0, 0] to [100, 127, 127, 50, 127.5, 127.5] in turn"),
    ({"mean": [50.0, 0.0, 0.0, 60.0, 10.0, 10.0]}, "to [100, 127, 127, 50, 127.5, 127.5]"),  # L's spread above 50
    ({"images": 10**12}, "stain 'images' 1000000000000: expected a whole number from 1 to 1000000"),
])
def test_stain_statistics_beyond_the_colour_space_leave_their_site_out_of_the_reference(federation, tmp_path, stats,
                                                                                        expected):
    attacks = {1: ("query.stain", lambda msg, r: stained(msg, r, **stats))}
    metrics, _, seen = federate(federation, tmp_path, 2, attacks, **{
        "data.partition": "natural", "federation.min_sites": 1, "data.stain_norm": "reinhard",
        "data.stain_reference": "federated"})
    assert list(metrics["left_out"]) == ["query.stain"]
    assert list(metrics["left_out"]["query.stain"]) == ["site-1"]
    assert expected in metrics["left_out"]["query.stain"]["site-1"]
    assert metrics["stain"]["images_per_site"] == {"site-0": seen[0, "query.stain"].content["stain"]["images"]}
    np.testing.assert_array_equal(metrics["stain"]["reference"], seen[0, "query.stain"].content["stain"]["mean"])
