"""`fedfuse predict`: a row per patch with its position and probabilities, a mitotic count per tile."""


import numpy as np
import pandas as pd

from shared.brecahad import inspect
from simulations.cli import main
from tests.helpers import saved_model


def test_patch_predictions_and_mitotic_counts(tmp_path, quick_data, capsys):
    run_dir = saved_model(tmp_path, quick_data, name="cnn")
    out = tmp_path / "pred" / "site0.csv"
    assert main(["predict", str(run_dir), str(quick_data / "site-0"), "--out", str(out)]) == 0
    rows = pd.read_csv(out)
    counts = inspect(quick_data / "site-0" / "BreCaHAD", ("mitosis", "tumor", "non_tumor"), 32, "reflect")
    assert len(rows) == sum(counts["patches"].values())
    assert rows["x"].between(0, 1).all() and rows["y"].between(0, 1).all()
    np.testing.assert_allclose(rows[["p_mitosis", "p_tumor", "p_non_tumor"]].sum(axis=1), 1.0, atol=1e-5)
    tiles = pd.read_csv(out.with_name("site0-tiles.csv"))
    assert tiles["annotated_mitoses"].sum() == counts["patches"]["mitosis"]
    assert tiles["predicted_mitoses"].sum() == (rows["predicted"] == "mitosis").sum()
    assert "per-tile mitotic counts" in capsys.readouterr().out


def test_ehr_predictions_are_per_subject(tmp_path, quick_data):
    run_dir = saved_model(tmp_path, quick_data, name="xgboost")
    out = tmp_path / "cohort.csv"
    assert main(["predict", str(run_dir), str(quick_data / "site-1"), "--out", str(out)]) == 0
    rows = pd.read_csv(out)
    assert list(rows.columns[:2]) == ["subject_id", "label"] and len(rows) == rows["subject_id"].nunique()
    assert (rows["p_breast_cancer"] == 0.5).all()  # an empty booster knows nothing yet


def test_not_a_run_folder(tmp_path, quick_data, capsys):
    assert main(["predict", str(tmp_path), str(quick_data / "site-0"), "--out", str(tmp_path / "x.csv")]) == 2
    assert "not a run folder" in capsys.readouterr().err


