"""Every configured strategy runs two rounds (ServerApp in-process, real ClientApp, tiny patches)."""

from pathlib import Path

import numpy as np
import pytest
import torch

from server.strategy import STRATEGIES
from shared.config import ModelConfig, TrainConfig
from shared.models import build_model
from shared.train import train_epochs
from tests.helpers import RESCORED_AUC, rescored, toy

ROOT = Path(__file__).resolve().parent.parent


def settings(model: str, strategy: str, rounds: int) -> dict:
    """One model under one strategy: 4 steps a round (xgboost: one local epoch), scored on the holdout."""
    return {"model.name": model, "train.steps": 4 if model != "xgboost" else 0, "train.local_epochs": 1,
            "federation.rounds": rounds, "federation.strategy": strategy}


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_strategy_runs_two_rounds(strategy, federation, quick_data, tmp_path):
    model = "xgboost" if strategy.startswith("xgb_") else "cnn"
    metrics = federation(tmp_path / "run", settings(model, strategy, rounds=2))
    assert [r["round"] for r in metrics["rounds"]] == [1, 2]
    assert all(np.isfinite(r["train_loss"]) for r in metrics["rounds"])
    # FedXgbCyclic evaluates at the one site whose turn it is; the others at every site.
    assert all(len(r["sites"]) == (1 if strategy == "xgb_cyclic" else 2) for r in metrics["rounds"])
    again = rescored(tmp_path / "run", quick_data / "holdout")  # the saved model scores what the run reported
    assert metrics["final"]["source"] == "central"
    assert metrics["final"]["macro_auc"] == pytest.approx(again["macro_auc"], abs=RESCORED_AUC)


def above_chance(metrics: dict) -> float:
    """The AUC a model must beat to be better than chance on this holdout: 0.5 plus two standard errors of an
    AUC of 0.5 (Hanley and McNeil, 1982) for its numbers of positives and negatives (66 patients here)."""
    (tn, fp), (fn, tp) = metrics["final"]["confusion"]
    pos, neg = fn + tp, tn + fp
    q1, q2 = 0.5 / 1.5, 2 * 0.25 / 1.5
    se = np.sqrt((0.25 + (pos - 1) * (q1 - 0.25) + (neg - 1) * (q2 - 0.25)) / (pos * neg))
    return 0.5 + 2 * float(se)


def test_federated_xgboost_bagging_on_the_cohort_task(federation, tmp_path):
    metrics = federation(tmp_path / "run", settings("xgboost", "xgb_bagging", rounds=5))
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


def test_mlp_is_the_tabular_model_of_the_cohort_task(federation, tmp_path):
    metrics = federation(tmp_path / "run", settings("mlp", "fedavg", rounds=3))
    assert metrics["task"] == "ehr" and metrics["final"]["n"] == 66  # holdout subjects, not patches
    assert metrics["final"]["auc"]["breast_cancer"] > above_chance(metrics)


@pytest.mark.parametrize("model, strategy", [("mlp", "fedadam"), ("fusion", "fedadam"), ("mlp", "fedyogi")])
def test_adaptive_strategies_keep_every_site_with_unequal_sites(model, strategy, federation, tmp_path):
    # Sites of unequal size weigh the untrained EHR scaling unequally: its FedAvg step moves it by a float32 ulp,
    # which FedAdam turns into a float64 global no float32 site can send back (FedYogi's global stays float32).
    # The server owns those arrays: it must not refuse every site from round 2.
    metrics = federation(tmp_path / "run", {
        "data.partition": "quantity", "data.alpha": 1.0, "model.name": model, "federation.rounds": 3,
        "federation.strategy": strategy, "server.eval_data": None})
    sizes = [site["n"] for site in metrics["rounds"][0]["sites"].values()]
    assert len(set(sizes)) == 2  # the sites differ in size, as the bug needs
    assert "stopped" not in metrics and [r["round"] for r in metrics["rounds"]] == [1, 2, 3]
    assert all("failed" not in r and len(r["sites"]) == 2 for r in metrics["rounds"])
