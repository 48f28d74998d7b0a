"""`fedfuse shift-study`: every condition scored on the held-out site, cached cells, the table and the picture."""

import csv
import re

import yaml

from simulations.cli import main


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
    assert all(0.0 <= float(r["mean"]) <= 1.0 for r in rows)
    table = (tmp_path / "out" / "shift_study.md").read_text()
    assert table.count("| cnn |") == 6 and "combined (" in table
    assert (tmp_path / "out" / "shift_study_patches.png").stat().st_size > 10_000
    assert main(["shift-study", "--config", str(config)]) == 0  # every cell cached: none runs again
    assert "unseen, seed 0: macro AUC" not in capsys.readouterr().out
