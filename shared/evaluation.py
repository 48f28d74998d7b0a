"""One evaluation protocol for every model and training mode (FLamby's cross-silo matrix).

A trained model is scored on each site's test split and on their union, the
pooled test split: one row of the evaluation matrix (trained-where x
tested-where). Confidence intervals come from a bootstrap over patients, not
patches: patches of one patient are correlated, and resampling them alone
would make the intervals too narrow.
"""

from __future__ import annotations

import math

import numpy as np

from shared.data import Samples, concat
from shared.metrics import classification_metrics


def matrix_row(predict, tests: dict[str, Samples], classes: tuple[str, ...], bootstrap: int = 0,
               seed: int = 0) -> dict[str, dict]:
    """Metrics of ``predict(samples) -> probs`` on every test split and on the pooled one (key ``pooled``).

    Case names are prefixed with the site's name so that the pooled split
    never merges two sites' ``Case_1``. With ``bootstrap`` resamples, the
    pooled split's metrics get ``ci95`` intervals (over patients).
    """
    named = {site: s.prefixed(site) for site, s in tests.items()}
    pooled = concat(list(named.values()))
    pooled_probs = predict(pooled)  # once; each site's rows are a slice of it
    bounds = np.cumsum([0] + [len(s) for s in named.values()])
    parts = {site: (s, pooled_probs[a:b]) for (site, s), a, b in zip(named.items(), bounds[:-1], bounds[1:])}
    row = {}
    for site, (samples, probs) in {**parts, "pooled": (pooled, pooled_probs)}.items():
        metrics = classification_metrics(samples.labels, probs, classes)
        if bootstrap and site == "pooled":
            metrics["ci95"] = bootstrap_ci(samples, probs, classes, bootstrap, seed)
        row[site] = metrics
    return row


def bootstrap_ci(samples: Samples, probs: np.ndarray, classes: tuple[str, ...], n: int, seed: int) -> dict:
    """95 % percentile intervals of accuracy, macro AUC and each class's AUC, resampling whole cases."""
    rng = np.random.default_rng(seed)
    cases, inverse = np.unique(samples.cases, return_inverse=True)
    members = [np.flatnonzero(inverse == i) for i in range(len(cases))]
    draws: dict[str, list[float]] = {"accuracy": [], "macro_auc": [], **{f"auc.{c}": [] for c in classes}}
    for _ in range(n):
        idx = np.concatenate([members[i] for i in rng.integers(0, len(cases), len(cases))])
        m = classification_metrics(samples.labels[idx], probs[idx], classes)
        draws["accuracy"].append(m["accuracy"])
        draws["macro_auc"].append(m["macro_auc"])
        for c in classes:
            draws[f"auc.{c}"].append(m["auc"][c])
    out = {}
    for key, values in draws.items():
        v = np.array([x for x in values if not math.isnan(x)])
        out[key] = [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))] if len(v) else [math.nan, math.nan]
    return out
