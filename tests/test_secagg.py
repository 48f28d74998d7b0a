"""Secure aggregation (SecAgg+) through the real ServerApp and ClientApp, in process."""

from pathlib import Path

import numpy as np
import pytest
import torch

from client.secagg import UnsafeUpdate, check_update
from shared import learner
from shared.config import ConfigError, apply_overrides, load, task_of
from shared.data import ehr_statistics, load_site, pooled_moments
from simulations.cli import absolute_paths
from tests.helpers import RESCORED_AUC, rescored

ROOT = Path(__file__).resolve().parent.parent


def secagg_config(quick_data, rounds=2, **changes):
    cfg = absolute_paths(load(ROOT / "configs/quickstart.yaml"))
    return apply_overrides(cfg, {"model.name": "fusion", "data.root": str(quick_data), "data.sites": 2,
                                 "data.patch_size": 32, "train.steps": 3, "federation.rounds": rounds,
                                 "server.eval_data": None, "privacy.secure_aggregation": True, **changes})


def test_a_secagg_run_of_the_fusion_model_completes_two_rounds(federation, quick_data, tmp_path, capsys):
    cfg = secagg_config(quick_data, **{"server.eval_data": "holdout"})
    metrics = federation(tmp_path / "run", cfg)
    assert [r["round"] for r in metrics["rounds"]] == [1, 2] and "stopped" not in metrics
    assert all(np.isfinite(r["train_loss"]) and len(r["sites"]) == 2 for r in metrics["rounds"])
    assert all("central" in r and "dropped" not in r for r in metrics["rounds"])
    again = rescored(tmp_path / "run", quick_data / "holdout")  # the saved model scores what the run reported
    assert metrics["final"]["source"] == "central"
    assert metrics["final"]["macro_auc"] == pytest.approx(again["macro_auc"], abs=RESCORED_AUC)
    settings = metrics["secure_aggregation"]
    sizes = [len(load_site(quick_data / f"site-{k}", cfg.data, cfg.seed + k, "patch")[0]) for k in range(2)]
    assert settings["max_weight"] == max(sizes) and settings["clipping_range"] == 8.0
    assert settings["initial_reach"] < settings["clipping_range"]
    assert (tmp_path / "run" / "model.pt").is_file()
    out = capsys.readouterr().out
    assert f"max_weight {max(sizes)}" in out and "clipping range +-8" in out


def test_the_secure_aggregate_is_fedavgs_within_the_quantisation_error(federation, quick_data, tmp_path):
    cfg = secagg_config(quick_data, rounds=1)
    metrics = federation(tmp_path / "run", cfg)
    aggregate = learner.load(cfg, tmp_path / "run")

    # The same round without SecAgg+: each site's update from the same first model and seed, FedAvg's weighted mean.
    trains = [load_site(quick_data / f"site-{k}", cfg.data, cfg.seed + k, task_of(cfg))[0] for k in range(2)]
    first, _ = learner.initial_weights(cfg, *pooled_moments([ehr_statistics(t.ehr) for t in trains]))
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.train.threads)  # what each site sets (the float sums follow the thread count)
    try:
        updates = [learner.local_update(cfg, first, t, int(np.random.SeedSequence([cfg.seed, k, 1]).generate_state(1)[0]))[0]
                   for k, t in enumerate(trains)]
    finally:
        torch.set_num_threads(threads)
    n = np.array([len(t) for t in trains], float)
    fedavg = {k: sum(w * u[k] for w, u in zip(n, updates)) / n.sum() for k in first}

    # Each site's quantisation error is below one level, 2c/Q, of its scaled values; the sum of two,
    # divided by the total weight (>= 1: the largest site has weight 1), is below 2 * 2c/Q.
    bound = metrics["secure_aggregation"]["error_bound"]
    assert bound == pytest.approx(2 * 2 * 8.0 / 2**22)
    trained = learner.trained_names(cfg)
    error = max(float(np.abs(aggregate[k] - fedavg[k]).max()) for k in trained)
    assert error <= bound
    # ... far below what a round changes: the comparison could fail.
    step = np.median(np.concatenate([np.abs(fedavg[k] - first[k]).ravel() for k in trained]))
    assert step > 100 * bound
    assert max(float(np.abs(aggregate[k] - updates[0][k]).max()) for k in trained) > 100 * bound
    # The EHR scaling never enters the sum: it stays exactly the server's.
    assert all(np.array_equal(aggregate[k], first[k]) for k in first if k not in trained)


def test_a_site_refuses_an_update_it_cannot_safely_mask():
    received = {"w": np.zeros((2, 3), np.float32), "b": np.zeros(3, np.float32)}
    ok = {"w": np.full((2, 3), 0.5, np.float32), "b": np.ones(3, np.float32)}
    check_update(ok, received, clipping_range=8.0, examples=10, max_weight=10.0)
    nan = {**ok, "b": np.array([0.0, np.nan, 1.0], np.float32)}
    with pytest.raises(UnsafeUpdate, match=r"array b: 1 values are NaN or infinite"):
        check_update(nan, received, 8.0, 10, 10.0)
    with pytest.raises(UnsafeUpdate, match=r"array w reaches 9, past SecAgg\+'s clipping range 8"):
        check_update({**ok, "w": np.full((2, 3), -9.0, np.float32)}, received, 8.0, 10, 10.0)
    with pytest.raises(UnsafeUpdate, match=r"array w: shape \(3, 2\), expected \(2, 3\)"):
        check_update({**ok, "w": np.zeros((3, 2), np.float32)}, received, 8.0, 10, 10.0)
    with pytest.raises(UnsafeUpdate, match=r"11 training examples exceed SecAgg\+'s max_weight 10"):
        check_update(ok, received, 8.0, 11, 10.0)


@pytest.mark.parametrize("overrides,conflict", [
    ({"federation.strategy": "fedprox"}, r"FedAvg only; federation\.strategy 'fedprox'"),
    ({"privacy.mode": "central"}, r"cannot be combined with privacy\.mode: central"),
    ({"model.name": "xgboost", "federation.strategy": "xgb_bagging"}, r"XGBoost's model is a tree ensemble"),
    ({"model.name": "resnet18", "model.resnet_norm": "batch"}, r"BatchNorm's running statistics"),
    ({"federation.min_sites": 1}, r"needs federation\.min_sites of at least 2"),
    ({"privacy.secagg_quantization_range": 2**31}, r"must stay below SecAgg\+'s modulus 2\*\*32"),
])
def test_secure_aggregation_refuses_what_it_cannot_sum(overrides, conflict):
    cfg = load(ROOT / "configs/quickstart.yaml")
    with pytest.raises(ConfigError, match=r"privacy\.secagg_quantization_range|privacy\.secure_aggregation") as err:
        apply_overrides(cfg, {"privacy.secure_aggregation": True, **overrides})
    assert err.match(conflict)


def test_local_dp_sites_mask_their_private_updates(federation, quick_data, tmp_path):
    cfg = secagg_config(quick_data, rounds=1, **{"privacy.mode": "local", "privacy.ledger_dir": str(tmp_path / "ledgers")})
    metrics = federation(tmp_path / "run", cfg)
    assert "stopped" not in metrics and set(metrics["rounds"][0]["privacy"]) == {"site-0", "site-1"}
    assert all(0 < s["epsilon"] <= 8.0 for s in metrics["privacy"]["sites"].values())
    assert len(list((tmp_path / "ledgers").glob("ledger-*.json"))) == 2
