"""Leave one site out: the federation trains without a site, which then scores the model on all its cases."""

import dataclasses
import json
from pathlib import Path

import pytest

from shared.config import ConfigError, apply_overrides, load
from shared.data import load_folder
from simulations.cli import absolute_paths
from simulations.loso import run_loso

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_each_site_is_scored_by_a_model_it_never_trained(quick_data, tmp_path):
    cfg = absolute_paths(load(ROOT / "configs/quickstart.yaml"))
    cfg = dataclasses.replace(
        cfg,
        data=dataclasses.replace(cfg.data, root=str(quick_data), sites=2, patch_size=32),
        model=dataclasses.replace(cfg.model, name="cnn"),
        train=dataclasses.replace(cfg.train, local_epochs=1),
        federation=dataclasses.replace(cfg.federation, rounds=1),
    )
    summary = run_loso(cfg, tmp_path / "loso", engine="inprocess", echo=lambda line: None)
    assert sorted(summary["folds"]) == ["site-0", "site-1"]
    for k in (0, 1):
        metrics = json.loads((tmp_path / "loso" / f"without-site-{k}" / "metrics.json").read_text())
        assert metrics["sites"] == [f"site-{1 - k}"]  # trained only at the other site
        assert metrics["final"]["source"] == "central"
        assert metrics["final"]["n"] == len(load_folder(quick_data / f"site-{k}", cfg.data))  # all its cases
    assert "| mean |" in (tmp_path / "loso" / "loso.md").read_text()


def test_leave_out_must_name_a_site():
    cfg = load(ROOT / "configs/quickstart.yaml")
    with pytest.raises(ConfigError, match=r"data\.leave_out: expected a site index in 0\.\.2, got 3"):
        apply_overrides(cfg, {"data.leave_out": "3"})
