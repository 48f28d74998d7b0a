"""Every configured strategy runs two rounds (ServerApp in-process, real ClientApp, tiny patches)."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from client.app import app as client_app
from server.app import app as server_app
from server.strategy import STRATEGIES
from shared.config import ModelConfig, TrainConfig, apply_overrides, load, run_envelope
from shared.models import build_model
from shared.train import train_epochs
from simulations.cli import absolute_paths
from simulations.inprocess import run_server
from tests.helpers import rescored, toy

ROOT = Path(__file__).resolve().parent.parent


def federate(quick_data, tmp_path, model: str, strategy: str, rounds: int, holdout: bool = False) -> dict:
    cfg = absolute_paths(load(ROOT / "configs/quickstart.yaml"))
    cfg = dataclasses.replace(
        cfg,
        data=dataclasses.replace(cfg.data, root=str(quick_data), sites=2, patch_size=32),
        model=dataclasses.replace(cfg.model, name=model),
        train=dataclasses.replace(cfg.train, steps=4 if model != "xgboost" else 0, local_epochs=1),
        federation=dataclasses.replace(cfg.federation, rounds=rounds, strategy=strategy),
        report=dataclasses.replace(cfg.report, shap_rows=0),
        server=dataclasses.replace(cfg.server, eval_data=str(quick_data / "holdout") if holdout else None),
    )
    run_dir = tmp_path / "run"
    run_server(server_app, client_app, run_envelope(cfg, run_dir), num_nodes=2)
    return json.loads((run_dir / "metrics.json").read_text())


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_strategy_runs_two_rounds(strategy, quick_data, tmp_path):
    model = "xgboost" if strategy.startswith("xgb_") else "cnn"
    metrics = federate(quick_data, tmp_path, model, strategy, rounds=2, holdout=True)
    assert [r["round"] for r in metrics["rounds"]] == [1, 2]
    assert all(np.isfinite(r["train_loss"]) for r in metrics["rounds"])
    # FedXgbCyclic evaluates at the one site whose turn it is; the others at every site.
    assert all(len(r["sites"]) == (1 if strategy == "xgb_cyclic" else 2) for r in metrics["rounds"])
    again = rescored(tmp_path / "run", quick_data / "holdout")  # the saved model scores what the run reported
    assert metrics["final"]["source"] == "central"
    assert metrics["final"]["macro_auc"] == pytest.approx(again["macro_auc"], abs=1e-6)


def above_chance(metrics: dict) -> float:
    """The AUC a model must beat to be better than chance on this holdout: 0.5 plus two standard errors of an
    AUC of 0.5 (Hanley and McNeil, 1982) for its numbers of positives and negatives (66 patients here)."""
    (tn, fp), (fn, tp) = metrics["final"]["confusion"]
    pos, neg = fn + tp, tn + fp
    q1, q2 = 0.5 / 1.5, 2 * 0.25 / 1.5
    se = np.sqrt((0.25 + (pos - 1) * (q1 - 0.25) + (neg - 1) * (q2 - 0.25)) / (pos * neg))
    return 0.5 + 2 * float(se)


def test_federated_xgboost_bagging_on_the_cohort_task(quick_data, tmp_path):
    metrics = federate(quick_data, tmp_path, "xgboost", "xgb_bagging", rounds=5, holdout=True)
    assert metrics["task"] == "ehr" and metrics["classes"] == ["no_breast_cancer", "breast_cancer"]
    final = metrics["final"]
    print(f"federated XGBoost (bagging, 2 sites, 5 rounds): holdout cohort AUC {final['auc']['breast_cancer']:.3f}, "
          f"accuracy {final['accuracy']:.3f}, F1 {final['f1']:.3f} (n={final['n']})")
    assert final["source"] == "central" and final["auc"]["breast_cancer"] > above_chance(metrics)
    assert (tmp_path / "run" / "model.json").is_file()


def test_proximal_term_keeps_a_site_near_the_global_model():
    drift = {}
    for mu in (0.0, 10.0):
        torch.manual_seed(0)
        model = build_model(ModelConfig(name="cnn"), 5, 3)
        start = [p.detach().clone() for p in model.parameters()]
        train_epochs(model, toy(), TrainConfig(local_epochs=3, batch_size=16, lr=0.01), 3, seed=0, proximal_mu=mu)
        drift[mu] = sum(float(((p.detach() - s) ** 2).sum()) for p, s in zip(model.parameters(), start))
    assert drift[10.0] < 0.5 * drift[0.0]


def test_mlp_is_the_tabular_model_of_the_cohort_task(quick_data, tmp_path):
    metrics = federate(quick_data, tmp_path, "mlp", "fedavg", rounds=3, holdout=True)
    assert metrics["task"] == "ehr" and metrics["final"]["n"] == 66  # holdout subjects, not patches
    assert metrics["final"]["auc"]["breast_cancer"] > above_chance(metrics)


@pytest.mark.parametrize("model, strategy", [("mlp", "fedadam"), ("fusion", "fedadam"), ("mlp", "fedyogi")])
def test_adaptive_strategies_keep_every_site_with_unequal_sites(model, strategy, quick_data, tmp_path):
    # Sites of unequal size weigh the untrained EHR scaling unequally: its FedAvg step moves it by a float32 ulp,
    # which FedAdam turns into a float64 global no float32 site can send back (FedYogi's global stays float32).
    # The server owns those arrays: it must not refuse every site from round 2.
    cfg = apply_overrides(absolute_paths(load(ROOT / "configs/quickstart.yaml")), {
        "data.root": str(quick_data), "data.sites": 2, "data.partition": "quantity", "data.alpha": 1.0,
        "data.patch_size": 32, "model.name": model, "train.steps": 2, "federation.rounds": 3,
        "federation.strategy": strategy, "server.eval_data": None, "report.shap_rows": 0})
    run_dir = tmp_path / "run"
    run_server(server_app, client_app, run_envelope(cfg, run_dir),
               num_nodes=2)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    sizes = [site["n"] for site in metrics["rounds"][0]["sites"].values()]
    assert len(set(sizes)) == 2  # the sites differ in size, as the bug needs
    assert "stopped" not in metrics and [r["round"] for r in metrics["rounds"]] == [1, 2, 3]
    assert all("failed" not in r and len(r["sites"]) == 2 for r in metrics["rounds"])
