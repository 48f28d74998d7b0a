"""`fedfuse paper --quick`: six models x three modes at tiny budgets, cells cached, one table."""

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from simulations import paper as paper_mod
from simulations.cli import absolute_paths
from simulations.paper import load_paper, run_paper

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def quick_paper(quick_data, tmp_path_factory):
    base, paper = load_paper(ROOT / "configs/paper.yaml", quick=True)
    out = tmp_path_factory.mktemp("paper")
    base = absolute_paths(dataclasses.replace(base, data=dataclasses.replace(base.data, root=str(quick_data), sites=2)))
    paper = dataclasses.replace(paper, out=str(out))
    return base, paper, run_paper(base, paper, echo=lambda line: None)


def test_table_has_six_models_and_three_modes_filled(quick_paper):
    _, _, table = quick_paper
    rows = [line for line in table.read_text().splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [r.split("|")[1].strip() for r in rows] == ["majority class", "cnn", "resnet18", "majority class", "mlp",
                                                       "xgboost", "fusion", "late_fusion"]
    assert all(len(r.split("|")) == 2 + 3 + 9 and "nan" not in r for r in rows)
    # the majority row's accuracy is the largest class's share of the pooled test split, the same in every mode
    patch_majority = [float(x) for x in rows[0].split("|")[4:13:3]]
    assert len(set(patch_majority)) == 1 and 1 / 3 < patch_majority[0] < 1
    csv = table.with_suffix(".csv").read_text().splitlines()
    assert len(csv) == 1 + 6 * 3 * 3
    fusion_auc = next(line for line in csv if line.startswith("fusion,") and ",pooled,macro_auc," in line)
    mean, low, high = (float(x) for x in np.array(fusion_auc.split(","))[[5, 7, 8]])
    assert low <= high and low - 0.05 <= mean <= high + 0.05  # a bootstrap interval over patients
    assert "engine inprocess" in table.read_text() and "pairing linked" in table.read_text()


def test_cells_are_cached_so_a_rerun_trains_nothing(quick_paper, monkeypatch):
    base, paper, table = quick_paper

    def no_training(*args, **kwargs):
        raise AssertionError("a cached cell was trained again")

    monkeypatch.setattr(paper_mod, "run_cell", no_training)
    assert run_paper(base, paper, echo=lambda line: None) == table


def test_evaluation_matrix_shape(quick_paper):
    import json

    _, paper, _ = quick_paper
    local = json.loads(next((Path(paper.out) / "cells").glob("cnn-local-seed0-*.json")).read_text())
    # trained-where (each site alone) x tested-where (each site's test split and the pooled one)
    assert sorted(local["rows"]) == ["site-0", "site-1"]
    assert all(sorted(r) == ["pooled", "site-0", "site-1"] for r in local["rows"].values())
    pooled = json.loads(next((Path(paper.out) / "cells").glob("fusion-pooled-seed0-*.json")).read_text())
    assert sorted(pooled["rows"]) == ["pooled"]
    n = pooled["rows"]["pooled"]
    assert n["pooled"]["n"] == n["site-0"]["n"] + n["site-1"]["n"]


def test_protocol_table_reuses_the_case_linked_cells_and_measures_the_by_label_leak(quick_paper, monkeypatch):
    from simulations.protocol import run_protocol

    base, paper, _ = quick_paper
    trained = []
    real = paper_mod.run_cell
    monkeypatch.setattr(paper_mod, "run_cell", lambda cfg, *args: trained.append(
        (cfg.data.split, cfg.data.pairing)) or real(cfg, *args))
    table = run_protocol(base, paper, echo=lambda line: None)
    # (case, linked) is the paper table's own pooled cell, cached: only the three other conditions train
    assert sorted(trained) == sorted([("patch", "linked"), ("case", "by_label"), ("patch", "by_label")] * 2)
    text = table.read_text()
    rows = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [r.split("|")[1].strip() for r in rows] == ["cnn", "fusion"]
    leak = float(text.split("predicts the patch class with macro AUC ")[1].split(" ")[0])
    assert leak > 0.75  # by-label pairing writes the patch's class into its record
    csv = table.with_suffix(".csv").read_text().splitlines()
    assert len(csv) == 1 + 2 * 4


def test_a_subset_by_rows_modes_and_seeds_reuses_the_cells_and_tables_only_them(quick_paper, tmp_path, monkeypatch,
                                                                               capsys):
    import yaml

    from simulations.cli import main

    base, paper, _ = quick_paper
    raw = yaml.safe_load((ROOT / "configs/paper.yaml").read_text())
    raw["quick"]["set"].update({"data.root": base.data.root, "data.sites": 2})
    config = tmp_path / "paper.yaml"
    config.write_text(yaml.safe_dump(raw))
    monkeypatch.setattr(paper_mod, "run_cell", lambda *args: pytest.fail("a cached cell was trained again"))
    assert main(["paper", "--config", str(config), "--quick", "--models", "fusion,cnn", "--modes", "pooled",
                 "--seeds", "0", "--out", paper.out]) == 0
    text = (Path(paper.out) / "paper_table.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line]
    assert rows[0].count(" macro AUC") == 1 and "pooled macro AUC" in rows[0]
    assert [r.split("|")[1].strip() for r in rows[1:]] == ["majority class", "fusion", "cnn"]
    assert all(len(r.split("|")) == 2 + 3 + 3 for r in rows[1:])
    capsys.readouterr()
    assert main(["paper", "--config", str(config), "--quick", "--modes", "pooled,central"]) == 2
    assert "paper.modes ['pooled', 'central']" in capsys.readouterr().err
    assert main(["paper", "--config", str(config), "--quick", "--seeds", "0,one"]) == 2
    assert "--seeds '0,one': expected a comma-separated list of int" in capsys.readouterr().err
