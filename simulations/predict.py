"""``fedfuse predict``: apply a trained model to a hospital folder.

For the patch task: one row per annotated point (tile, x, y, the annotated
class, each class's probability, the predicted class) and a per-tile summary
with the predicted mitotic count, which is what a pathologist grades (the
Nottingham score counts mitoses per area). For the EHR task: one row per
subject with the probability of breast cancer.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pandas as pd

from shared import learner
from shared.config import Config, classes_of, load, task_of
from shared.data import folder_patches, load_folder
from shared.errors import DataFormatError


def load_model(cfg: Config, run_dir: Path) -> learner.Weights:
    """The final model of ``run_dir``; a missing, truncated or foreign model file is one error naming it."""
    path = Path(run_dir) / ("model.json" if cfg.model.name == "xgboost" else "model.pt")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no final model; expected the file `fedfuse simulate` writes when a run "
                                "ends")
    try:
        weights = learner.load(cfg, Path(run_dir))
        if cfg.model.name != "xgboost":
            learner.network(cfg, weights)  # the configured model's names and shapes, or a RuntimeError naming them
    # torch and xgboost raise any of these for a damaged file; the message's first line says what they found.
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, AttributeError, pickle.UnpicklingError) as err:
        found = str(err).strip().splitlines()[0].split(". ")[0] if str(err).strip() else type(err).__name__
        raise DataFormatError(f"{path}: not a readable {cfg.model.name} model ({found}); expected the file "
                              f"`fedfuse simulate` wrote with {run_dir / 'config.yaml'}") from None
    broken = [k for k, v in weights.items() if np.issubdtype(v.dtype, np.floating) and not np.isfinite(v).all()]
    if broken:
        raise DataFormatError(f"{path}: weight(s) {', '.join(broken[:4])} hold NaN or Inf; expected a trained model")
    return weights


def _stain_reference(metrics: Path) -> list | None:
    """The stain reference a run trained with, from its ``metrics.json`` (None: no file, or no stain section)."""
    if not metrics.is_file():
        return None
    try:
        stain = json.loads(metrics.read_text()).get("stain") or {}
        return stain.get("reference")
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError) as err:
        raise DataFormatError(f"{metrics}: not the JSON object `fedfuse simulate` writes ({err})") from None


def predict_folder(run_dir: Path, folder: Path, out: Path) -> tuple[Path, Path | None]:
    """Write predictions for ``folder`` with the model of ``run_dir``; returns the CSV(s) written."""
    run_dir, folder = Path(run_dir), Path(folder)
    if not (run_dir / "config.yaml").is_file():
        raise FileNotFoundError(f"{run_dir}: not a run folder (no config.yaml); pass the folder `fedfuse simulate` "
                                "wrote, holding config.yaml and model.pt or model.json")
    cfg = load(run_dir / "config.yaml")
    classes, task = classes_of(cfg), task_of(cfg)
    # The stain reference the run trained with (the federation's, for data.stain_reference: federated).
    stain_reference = _stain_reference(run_dir / "metrics.json")
    weights = load_model(cfg, run_dir)
    samples = load_folder(folder, cfg.data, cfg.seed, task, stain_reference)
    probs, _ = learner.predict(cfg, weights, samples)
    out.parent.mkdir(parents=True, exist_ok=True)
    table = pd.DataFrame({f"p_{c}": probs[:, i] for i, c in enumerate(classes)})
    table.insert(0, "predicted", np.array(classes)[probs.argmax(1)])
    if task == "ehr":
        table.insert(0, "label", samples.labels)
        table.insert(0, "subject_id", samples.cases)
        table.to_csv(out, index=False)
        return out, None
    # Same settings, same cache entry: the patches in the order load_folder used.
    patches = folder_patches(folder, cfg.data, stain_reference)
    table.insert(0, "annotated", np.array(classes)[patches.labels])
    table.insert(0, "y", patches.points[:, 1])
    table.insert(0, "x", patches.points[:, 0])
    table.insert(0, "tile", patches.tiles)
    table.to_csv(out, index=False)
    per_tile = table.groupby("tile").agg(
        patches=("predicted", "size"),
        predicted_mitoses=("predicted", lambda p: int((p == "mitosis").sum())),
        expected_mitoses=("p_mitosis", "sum"),
        annotated_mitoses=("annotated", lambda a: int((a == "mitosis").sum())),
    ).reset_index()
    summary = out.with_name(out.stem + "-tiles.csv")
    per_tile.to_csv(summary, index=False)
    return out, summary
