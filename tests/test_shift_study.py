"""`fedfuse shift-study`: every condition scored on the held-out site, cached cells, the table and the picture."""

import csv
import json
import re

import pytest
import yaml

from simulations.cli import main


@pytest.mark.slow
def test_quick_shift_study_writes_table_csv_and_picture(quick_data, tmp_path, capsys):
    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump({
        "base": {"data": {"root": str(quick_data), "sites": 2, "patch_size": 32},
                 "train": {"steps": 2}, "federation": {"rounds": 1, "fraction_evaluate": 0.0}},
        "study": {"models": ["cnn", "fusion"], "seeds": [0], "held_out": [0], "out": str(tmp_path / "out")},
    }))
    assert main(["shift-study", "--config", str(config)]) == 0
    printed = capsys.readouterr().out
    assert len(re.findall(r"site-0 unseen, seed 0: macro AUC", printed)) == 12  # 2 models x 6 conditions
    rows = list(csv.DictReader((tmp_path / "out" / "shift_study.csv").open()))
    assert {(r["model"], r["condition"]) for r in rows} == {
        (m, c) for m in ("cnn", "fusion") for c in ("none", "reinhard", "macenko", "augmentation", "fedbn", "combined")}
    cells = {}
    for path in (tmp_path / "out" / "cells").glob("*.json"):  # each cell: what its own run scored on site-0
        cell = json.loads(path.read_text())
        run = json.loads((path.parent / f"work-{path.stem}" / "metrics.json").read_text())
        assert run["sites"] == ["site-1"] and run["final"]["source"] == "central"  # trained without the unseen site
        assert cell["macro_auc"] == run["final"]["macro_auc"] and cell["held_out"] == 0
        cells[cell["model"], cell["condition"]] = cell
    for r in rows:  # one seed, one held-out site: the mean is the cell's score, the spread 0
        cell = cells[r["model"], r["condition"]]
        value = cell["macro_auc"] if r["metric"] == "macro_auc" else cell["auc"][r["metric"].removeprefix("auc.")]
        assert (float(r["mean"]), float(r["std"])) == (round(value, 4), 0.0)
    table = (tmp_path / "out" / "shift_study.md").read_text()
    assert table.count("| cnn |") == 6 and "combined (" in table
    assert (tmp_path / "out" / "shift_study_patches.png").stat().st_size > 10_000
    assert main(["shift-study", "--config", str(config)]) == 0  # every cell cached: none runs again
    assert "unseen, seed 0: macro AUC" not in capsys.readouterr().out
