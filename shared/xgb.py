"""XGBoost on the cohort (the EHR task), as plain functions over raw booster bytes.

Federation follows Flower's tree-based strategies: with **bagging**
(FedXgbBagging) each site adds ``xgb_local_rounds`` trees to the global model
on its own data and returns only those new trees, which the server appends;
with **cyclic** training (FedXgbCyclic) one site a round continues the whole
model and returns it. One local boosting round per server round keeps
bagging's model at one tree per site per round. Missing values stay NaN:
XGBoost learns a default direction for them, so no scaling or imputation is
needed (and none is shared).
"""

from __future__ import annotations

import numpy as np
import xgboost as xgb

from shared.config import ModelConfig
from shared.metrics import log_loss


def params(cfg: ModelConfig, seed: int) -> dict:
    return {
        "objective": "binary:logistic", "eval_metric": "logloss", "tree_method": "hist",
        "max_depth": cfg.xgb_max_depth, "eta": cfg.xgb_eta, "seed": seed, "nthread": 1,
    }


def boost(
    global_model: bytes, x: np.ndarray, y: np.ndarray, cfg: ModelConfig, seed: int, bagging: bool
) -> tuple[bytes, float]:
    """One site's turn: ``cfg.xgb_local_rounds`` more trees on ``(x, y)``.

    Returns the model to send (only the new trees under bagging, else all of
    them) and the training log-loss of the updated whole model.
    """
    data = xgb.DMatrix(x, label=y, missing=np.nan)
    p = params(cfg, seed)
    if not global_model:
        booster = xgb.train(p, data, num_boost_round=cfg.xgb_local_rounds)
    else:
        booster = xgb.Booster(params=p, model_file=bytearray(global_model))
        for _ in range(cfg.xgb_local_rounds):
            booster.update(data, booster.num_boosted_rounds())
    p1 = booster.predict(data)
    loss = log_loss(np.asarray(y, np.int64), np.column_stack([1.0 - p1, p1]))
    if bagging and global_model:
        n = booster.num_boosted_rounds()
        booster = booster[n - cfg.xgb_local_rounds : n]
    return bytes(booster.save_raw("json")), loss


def load_booster(model: bytes) -> xgb.Booster:
    return xgb.Booster(model_file=bytearray(model))


def predict_proba(model: bytes, x: np.ndarray) -> np.ndarray:
    """``(n, 2)`` probabilities of no / yes; 0.5 for everyone while the model is still empty."""
    if not model:
        return np.full((len(x), 2), 0.5)
    booster = load_booster(model)
    p1 = booster.predict(xgb.DMatrix(x, missing=np.nan))
    return np.column_stack([1.0 - p1, p1])
