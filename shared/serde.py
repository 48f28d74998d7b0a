"""Message payloads without Flower: flat metrics and XGBoost boosters, written once for both sides.

Flower's records carry flat ``str -> int | float | list`` maps and need every
reply to have the same keys. A site's evaluation (nested: per-class AUC, a
confusion matrix) is flattened here with a fixed key set, NaN where a value is
undefined, so replies always agree. No Flower import: the record classes wrap
these dicts in ``client/`` and ``server/``.
"""

from __future__ import annotations

import math

import numpy as np

FLAT_KEYS = ("loss", "accuracy", "balanced_accuracy", "macro_auc", "macro_f1", "f1")


def flatten_metrics(metrics: dict, classes: tuple[str, ...]) -> dict[str, float | list[int]]:
    """``classification_metrics`` output (plus ``loss``) -> flat scalars with a fixed key set."""
    flat: dict[str, float | list[int]] = {k: float(metrics.get(k, math.nan)) for k in FLAT_KEYS}
    for cls in classes:
        flat[f"auc.{cls}"] = float(metrics.get("auc", {}).get(cls, math.nan))
    flat["confusion"] = [int(v) for row in metrics.get("confusion", []) for v in row]
    return flat


def unflatten_metrics(flat: dict, classes: tuple[str, ...]) -> dict:
    """Inverse of :func:`flatten_metrics` (extra keys such as ``num-examples`` are kept as they are)."""
    out = {k: v for k, v in flat.items() if not k.startswith("auc.") and k != "confusion"}
    out["auc"] = {cls: float(flat.get(f"auc.{cls}", math.nan)) for cls in classes}
    cells = list(flat.get("confusion", []))
    k = len(classes)
    if len(cells) == k * k:
        out["confusion"] = [[int(c) for c in cells[i * k : (i + 1) * k]] for i in range(k)]
    return out


def booster_to_array(raw: bytes) -> np.ndarray:
    """An XGBoost model (its JSON bytes; empty before the first round) as a uint8 array for an ArrayRecord."""
    return np.frombuffer(raw, dtype=np.uint8)


def array_to_booster(array: np.ndarray) -> bytes:
    return np.asarray(array, dtype=np.uint8).tobytes()
