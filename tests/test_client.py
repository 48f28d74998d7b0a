"""ClientApp handlers called in-process with hand-built Message and Context (as Flower's own tests do)."""

import dataclasses
import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, Metadata, RecordDict

from client.app import app
from shared.config import flatten, load
from shared.data import load_site
from shared.mimic import FEATURES
from shared.models import build_model
from shared.serde import flatten_metrics
from simulations.cli import absolute_paths

ROOT = Path(__file__).resolve().parent.parent


def message(content: RecordDict, kind: str) -> Message:
    md = Metadata(run_id=1, message_id=f"m-{kind}", src_node_id=1, dst_node_id=7, reply_to_message_id="",
                  group_id="1", created_at=time.time(), ttl=3600.0, message_type=kind)
    return Message(content=content, metadata=md)


@pytest.fixture()
def context(quick_data):
    cfg = absolute_paths(load(ROOT / "configs/quickstart.yaml"))
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, root=str(quick_data)))
    run_config = {"config": str(ROOT / "configs/quickstart.yaml"), **flatten(cfg), "train.local_epochs": 1}
    return Context(run_id=1, node_id=7, node_config={"partition-id": 1, "num-partitions": 2}, state=RecordDict(),
                   run_config=run_config)


def global_model():
    torch.manual_seed(0)
    return build_model(load(ROOT / "configs/quickstart.yaml").model, len(FEATURES), 3)


def test_train_returns_updated_weights_and_example_count(context):
    model = global_model()
    sent = ArrayRecord(model.state_dict())
    reply = app(message(RecordDict({"arrays": sent, "config": ConfigRecord({"server-round": 1})}), "train"),
                context)
    assert not reply.has_error()
    new = reply.content["arrays"].to_torch_state_dict()
    old = model.state_dict()
    assert set(new) == set(old)
    assert any(not torch.equal(new[k], old[k]) for k in old if k.endswith("weight"))
    metrics = reply.content["metrics"]
    assert metrics["num-examples"] > 100 and math.isfinite(metrics["train_loss"])


def test_evaluate_replies_with_the_fixed_metric_keys(context):
    content = RecordDict({"arrays": ArrayRecord(global_model().state_dict()), "config": ConfigRecord({})})
    reply = app(message(content, "evaluate"), context)
    metrics = dict(reply.content["metrics"])
    expected = set(flatten_metrics({}, ("mitosis", "tumor", "non_tumor"))) | {"num-examples", "site-index"}
    assert set(metrics) == expected
    assert metrics["site-index"] == 1 and sum(metrics["confusion"]) == metrics["num-examples"]
    confusion = np.reshape(metrics["confusion"], (3, 3))  # rows: the true class
    assert metrics["accuracy"] == pytest.approx(np.trace(confusion) / metrics["num-examples"])


def test_query_shares_only_feature_sums(context, quick_data):
    reply = app(message(RecordDict(), "query.ehr_stats"), context)
    stats = reply.content["stats"]
    assert set(stats) == {"count", "sum", "sumsq"} and reply.content["site"]["name"] == "site-1"
    cfg = load(ROOT / "configs/quickstart.yaml")  # the site's own training rows, summed here over what is observed
    ehr = load_site(quick_data / "site-1", cfg.data, cfg.seed + 1, "patch")[0].ehr.astype(np.float64)
    assert list(stats["count"]) == (~np.isnan(ehr)).sum(0).tolist() and len(stats["count"]) == len(FEATURES)
    np.testing.assert_allclose(stats["sum"], np.nansum(ehr, 0), rtol=1e-12)
    np.testing.assert_allclose(stats["sumsq"], np.nansum(ehr**2, 0), rtol=1e-12)


def test_deployment_reads_the_data_dir_from_node_config(context, quick_data):
    node = Context(run_id=1, node_id=9, node_config={"data-dir": str(quick_data / "site-0"), "site-name": "oslo"},
                   state=RecordDict(), run_config=context.run_config)
    reply = app(message(RecordDict(), "query.ehr_stats"), node)
    assert reply.content["site"]["name"] == "oslo"
