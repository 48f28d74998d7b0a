"""Grad-CAM maps and federated SHAP (shared/explain.py, the ClientApp's ``query.shap``)."""

import time
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Context, Message, Metadata, RecordDict

from client.app import app as client_app
from shared import explain, learner
from shared.config import apply_overrides, flatten, load, task_of
from shared.data import concat, ehr_statistics, load_site, pooled_moments
from shared.wire import to_record

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs/quickstart.yaml"


def trained(quick_data, **changes):
    cfg = apply_overrides(load(CONFIG), {"data.root": str(quick_data), "train.steps": 20, **changes})
    train, test = load_site(quick_data / "site-0", cfg.data, cfg.seed, task_of(cfg))
    weights, _ = learner.initial_weights(cfg, *pooled_moments([ehr_statistics(train.ehr)]))
    weights, _ = learner.local_update(cfg, weights, train, seed=0)
    return cfg, weights, test


@pytest.mark.slow
@pytest.mark.parametrize("model", ["cnn", "fusion"])
def test_gradcam_maps_have_the_patch_size_vary_and_depend_on_the_class(quick_data, model):
    cfg, weights, test = trained(quick_data, **{"model.name": model})
    images, ehr = test.images[:8], test.ehr[:8]
    predicted = learner.predict(cfg, weights, test.subset(np.arange(len(test)) < 8))[0].argmax(1)
    net = learner.network(cfg, weights).eval()
    maps = explain.gradcam(net, images, ehr, predicted.tolist())
    other = explain.gradcam(net, images, ehr, ((predicted + 1) % 3).tolist())
    assert maps.shape == (8, cfg.data.patch_size, cfg.data.patch_size)
    assert all(m.max() - m.min() > 1e-3 for m in maps)  # the predicted class has evidence somewhere: not constant
    assert all(np.abs(a - b).max() > 1e-2 for a, b in zip(maps, other))  # another class, another map


def query(folder: Path, cfg, weights, index: int) -> Message:
    md = Metadata(run_id=1, message_id=f"q-{index}", src_node_id=1, dst_node_id=10 + index, reply_to_message_id="",
                  group_id="1", created_at=time.time(), ttl=3600.0, message_type="query.shap")
    context = Context(run_id=1, node_id=10 + index, node_config={"data-dir": str(folder), "site-index": index},
                      state=RecordDict(), run_config={"config": str(CONFIG), **flatten(cfg)})
    return client_app(Message(RecordDict({"arrays": to_record(weights)}), metadata=md), context)


@pytest.mark.slow
@pytest.mark.parametrize("model", ["fusion", "xgboost"])
def test_federated_shap_equals_pooled_and_only_aggregates_leave_a_site(quick_data, model):
    changes = {"report.shap_rows": 10_000, "data.test_fraction": 0.1}  # one test case a site: small, unequal
    if model == "xgboost":  # the cohort task: a site's test split is 30 % of its subjects
        changes = {"report.shap_rows": 10_000, "model.name": "xgboost", "federation.strategy": "xgb_bagging"}
    cfg, weights, _ = trained(quick_data, **changes)
    folders = [quick_data / "site-0", quick_data / "site-1", quick_data / "holdout"]
    parts, pooled = [], []
    for k, folder in enumerate(folders):
        reply = query(folder, cfg, weights, k)
        assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
        # Only a per-feature mean and a count leave the site: no record, array or list of per-row size.
        assert list(reply.content.keys()) == ["shap"] and not reply.content.array_records
        shap_record = reply.content["shap"]
        assert set(shap_record.keys()) == {"mean-abs", "rows"} and len(shap_record["mean-abs"]) == 27
        parts.append((np.asarray(shap_record["mean-abs"]), int(shap_record["rows"])))
        test = load_site(folder, cfg.data, cfg.seed + k, task_of(cfg))[1]
        pooled.append(explain.explained_rows(test, cfg.report.shap_rows, cfg.seed + k))
    sizes = [n for _, n in parts]
    if model == "fusion":  # unequal sites: the weighting matters (the generated cohorts are all of one size)
        assert len(set(sizes)) == 3, sizes
    federated = explain.combine(parts)
    central, n = explain.importance(cfg, weights, concat(pooled))
    assert n == sum(sizes)
    np.testing.assert_allclose(federated, central, rtol=0, atol=1e-6)
    assert federated.max() > 0
