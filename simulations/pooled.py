"""A model trained on every site's data in one place: what a federation is measured against.

Simulation only, since it needs all sites' data on one machine. ``fedfuse
paper`` trains one per model and seed; a run's report compares its federated
SHAP importances with those of the same model trained on the pooled data
(:func:`importance_reference`), so users see what federation changes in what
the model relies on.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch

from shared import explain, learner
from shared.cache import fingerprint, write_json
from shared.config import Config, task_of
from shared.data import Samples, concat, ehr_statistics, pooled_moments
from shared.mimic import FEATURES
from shared.partition import site_samples

REFERENCE = "pooled_reference.json"


def with_steps(cfg: Config, steps: float) -> Config:
    """``cfg`` whose local update is ``steps`` optimiser steps (trees for XGBoost), rounded, at least 1."""
    steps = max(1, round(steps))
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=steps),
                               model=dataclasses.replace(cfg.model, xgb_local_rounds=steps))


def train_alone(cfg: Config, train: Samples, steps: float, seed: int) -> learner.Weights:
    """The model trained from ``cfg``'s seeded initialisation on ``train`` alone for ``steps`` steps (trees)."""
    mean, std = pooled_moments([ehr_statistics(train.ehr)])
    weights, _ = learner.initial_weights(cfg, mean, std)
    weights, _ = learner.local_update(with_steps(cfg, steps), weights, train, seed)
    return weights


def federated_steps(cfg: Config, trains: list[Samples], rounds: int) -> int:
    """Optimiser steps (trees for XGBoost) the sites took in all, over ``rounds`` rounds."""
    if cfg.model.name == "xgboost":
        return rounds * len(trains) * cfg.model.xgb_local_rounds
    if cfg.train.steps > 0:
        return rounds * len(trains) * cfg.train.steps
    return rounds * sum(cfg.train.local_epochs * math.ceil(len(t) / cfg.train.batch_size) for t in trains)


def _missing_data(cfg: Config) -> str | None:
    root = Path(cfg.data.root)
    if cfg.data.partition != "natural":
        return None if root.is_dir() else f"{root} is not on this machine"
    absent = [f"site-{k}" for k in range(cfg.data.sites) if k != cfg.data.leave_out
              and not (root / f"site-{k}").is_dir()]
    return f"{', '.join(absent)} not under {root} on this machine" if absent else None


def importance_reference(cfg: Config, run_dir: Path, metrics: dict) -> dict:
    """The pooled model's mean |SHAP| on the rows federated SHAP explained, and the rank correlation.

    The pooled model starts from the run's initial weights and takes as many
    optimiser steps (trees) on all sites' training data as the sites took in
    the rounds the run completed, without differential privacy. Cached in
    ``run_dir/pooled_reference.json`` while the run's model is unchanged.
    Returns ``{"why_not": ...}`` when it cannot be computed here.
    """
    from scipy.stats import spearmanr

    federated = (metrics.get("importance") or {}).get("mean_abs_shap")
    if not federated:
        return {"why_not": "no federated SHAP in this run"}
    if not cfg.report.pooled_reference:
        return {"why_not": "report.pooled_reference is false"}
    missing = _missing_data(cfg)
    if missing:
        return {"why_not": f"needs every site's data on one machine (a simulation): {missing}"}
    model_file = run_dir / ("model.json" if cfg.model.name == "xgboost" else "model.pt")
    key = fingerprint(model_file, json.dumps(federated, sort_keys=True))
    cached = run_dir / REFERENCE
    if cached.is_file() and json.loads(cached.read_text()).get("key") == key:
        return json.loads(cached.read_text())
    started = time.time()
    task = task_of(cfg)
    n_sites = cfg.data.sites - (cfg.data.leave_out is not None)
    trains, rows = [], []
    for pid in range(n_sites):
        index, _, train, test = site_samples(cfg, {"partition-id": pid}, task,  # as the site trained
                                             metrics.get("stain", {}).get("reference"))
        trains.append(train)
        rows.append(explain.explained_rows(test, cfg.report.shap_rows, cfg.seed + index))  # as the site did
    rounds = sum(1 for r in metrics["rounds"] if "train_loss" in r)  # rounds that trained
    steps = federated_steps(cfg, trains, rounds)
    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)  # one model now, where the sites were one thread each
    try:
        weights = train_alone(cfg, concat(trains), steps, cfg.seed)
    finally:
        torch.set_num_threads(threads)
    pooled = explain.combine([explain.importance(cfg, weights, r) for r in rows])
    names = list(federated)
    fed_values = np.array([federated[f] for f in names])
    pooled_values = np.array([pooled[FEATURES.index(f)] for f in names])
    rho = float(spearmanr(fed_values, pooled_values).statistic)
    top = 5
    reference = {
        "key": key, "steps": steps, "rounds": rounds, "seconds": round(time.time() - started, 1),
        "spearman": rho,
        "top5_shared": len(set(names[:top]) & set(np.array(names)[np.argsort(-pooled_values)[:top]])),
        "mean_abs_shap": dict(sorted(zip(names, pooled_values.tolist()), key=lambda fv: -fv[1])),
    }
    write_json(cached, reference)
    return reference
