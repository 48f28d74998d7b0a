"""Classification metrics for the three-class patch task.

Macro AUC is one-vs-rest, the mean over the classes that have both positives
and negatives in the evaluated set; a class that cannot be scored gets NaN
and is left out of the mean, never counted as 0 or 1.
"""

from __future__ import annotations

import math

import numpy as np
from sklearn.metrics import confusion_matrix, f1_score, roc_auc_score


def focus_class(classes: tuple[str, ...] | list[str]) -> str:
    """The class users watch: mitosis on the patch task (rare, and what grading counts), else the positive one."""
    return "mitosis" if "mitosis" in classes else list(classes)[-1]


def sample_losses(labels: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """Each sample's cross-entropy."""
    return -np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, None))


def log_loss(labels: np.ndarray, probs: np.ndarray) -> float:
    """Mean cross-entropy of predicted probabilities (what ``predict`` reports for torch models)."""
    return float(np.mean(sample_losses(labels, probs))) if len(labels) else math.nan


def classification_metrics(labels: np.ndarray, probs: np.ndarray, classes: tuple[str, ...]) -> dict:
    """Accuracy, balanced accuracy, macro AUC, per-class AUC, macro F1 and the confusion matrix (rows: true class)."""
    labels = np.asarray(labels)
    pred = probs.argmax(1)
    auc = {}
    for ci, cls in enumerate(classes):
        y = labels == ci
        auc[cls] = float(roc_auc_score(y, probs[:, ci])) if 0 < y.sum() < len(y) else math.nan
    scored = [v for v in auc.values() if not math.isnan(v)]
    k = list(range(len(classes)))
    present = [c for c in k if (labels == c).any()]
    recalls = [float((pred[labels == c] == c).mean()) for c in present]
    return {
        "n": int(len(labels)),
        "accuracy": float((pred == labels).mean()) if len(labels) else math.nan,
        "balanced_accuracy": float(np.mean(recalls)) if recalls else math.nan,  # mean recall of present classes
        "macro_auc": float(np.mean(scored)) if scored else math.nan,
        "auc": auc,
        "macro_f1": float(f1_score(labels, pred, labels=k, average="macro", zero_division=0)),
        # Binary tasks (the EHR task): F1 of the positive, last class; NaN for more classes.
        "f1": float(f1_score(labels, pred, pos_label=1, average="binary", zero_division=0))
        if len(classes) == 2 else math.nan,
        "confusion": confusion_matrix(labels, pred, labels=k).tolist(),
    }


def weighted_mean(values: list[float], weights: list[float]) -> float:
    """Example-weighted mean that skips NaN entries (a site that could not score a class)."""
    pairs = [(v, w) for v, w in zip(values, weights) if not math.isnan(v) and w > 0]
    total = sum(w for _, w in pairs)
    return sum(v * w for v, w in pairs) / total if total else math.nan


def ehr_only_auc(samples, classes: tuple[str, ...], folds: int = 3) -> float:
    """Macro AUC of a logistic regression predicting the patch class from the EHR vector alone.

    Cross-validated by case. Under ``by_label`` pairing this measures how much
    of the label the pairing put into the EHR: the leakage, not a result.
    """
    from sklearn.impute import SimpleImputer
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GroupKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    n_groups = len(np.unique(samples.cases))
    if n_groups < 2:
        return math.nan
    clf = make_pipeline(SimpleImputer(), StandardScaler(), LogisticRegression(max_iter=1000))
    probs = cross_val_predict(clf, samples.ehr, samples.labels, groups=samples.cases,
                              cv=GroupKFold(min(folds, n_groups)), method="predict_proba")
    return classification_metrics(samples.labels, probs, classes)["macro_auc"]
