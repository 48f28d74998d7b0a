"""``fedfuse predict``: apply a trained model to a hospital folder.

For the patch task: one row per annotated point (tile, x, y, the annotated
class, each class's probability, the predicted class) and a per-tile summary
with the predicted mitotic count, which is what a pathologist grades (the
Nottingham score counts mitoses per area). For the EHR task: one row per
subject with the probability of breast cancer.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from shared import learner
from shared.config import classes_of, load, task_of
from shared.data import folder_patches, load_folder


def predict_folder(run_dir: Path, folder: Path, out: Path) -> tuple[Path, Path | None]:
    """Write predictions for ``folder`` with the model of ``run_dir``; returns the CSV(s) written."""
    run_dir, folder = Path(run_dir), Path(folder)
    if not (run_dir / "config.yaml").is_file():
        raise FileNotFoundError(f"{run_dir}: not a run folder (no config.yaml); pass the folder `fedfuse simulate` "
                                "wrote, holding config.yaml and model.pt or model.json")
    cfg = load(run_dir / "config.yaml")
    classes, task = classes_of(cfg), task_of(cfg)
    # The stain reference the run trained with (the federation's, for data.stain_reference: federated).
    metrics = run_dir / "metrics.json"
    stain_reference = json.loads(metrics.read_text()).get("stain", {}).get("reference") if metrics.is_file() else None
    samples = load_folder(folder, cfg.data, cfg.seed, task, stain_reference)
    probs, _ = learner.predict(cfg, learner.load(cfg, run_dir), samples)
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
