"""ServerApp main, run in-process against the real ClientApp (no Ray, no SuperLink)."""

import json
import math
from pathlib import Path

import numpy as np
import pytest

from server.record import RunRecord
from tests.helpers import quick_config

ROOT = Path(__file__).resolve().parent.parent
CLASSES = ("mitosis", "tumor", "non_tumor")


FUSION = {"model.name": "fusion", "federation.rounds": 1}  # one round of the fusion model, the EHR joined by pairing


def test_without_a_server_test_set_final_is_the_federated_mean(federation, tmp_path):
    metrics = federation(tmp_path / "run", {**FUSION, "server.eval_data": None})
    assert metrics["central_eval"] is None and metrics["pairing"] == "linked"
    last = metrics["rounds"][-1]
    assert "central" not in last and set(last["sites"]) == {"site-0", "site-1"}
    final = metrics["final"]
    assert final["source"] == "federated" and final["n"] == sum(s["n"] for s in last["sites"].values())
    assert final["macro_auc"] == last["federated"]["macro_auc"]
    assert (tmp_path / "run" / "model.pt").is_file() and (tmp_path / "run" / "config.yaml").is_file()


def test_by_label_pairing_reports_its_leakage(federation, tmp_path):
    metrics = federation(tmp_path / "run", {**FUSION, "data.pairing": "by_label"})
    assert metrics["pairing"] == "by_label"
    leak = metrics["leakage"]["ehr_only_macro_auc"]
    # The pairing put the label into the EHR: non-tumour patches got negative records.
    assert leak > 0.65
    assert metrics["final"]["source"] == "central"
    low, high = metrics["final"]["ci95"]["macro_auc"]  # bootstrap over the holdout's patients
    assert low <= metrics["final"]["macro_auc"] <= high


def test_federated_mean_weights_sites_by_examples(tmp_path):
    record = RunRecord(tmp_path, CLASSES, {"name": "t"})
    site = {"loss": 1.0, "accuracy": 0.5, "balanced_accuracy": 0.5, "macro_auc": 0.6, "macro_f1": 0.4, "f1": math.nan,
            "auc": {"mitosis": math.nan, "tumor": 0.6, "non_tumor": 0.6}, "confusion": [[0, 0, 0]] * 3}
    record.round(1)["sites"] = {
        "a": {**site, "n": 30},
        "b": {**site, "accuracy": 1.0, "auc": {**site["auc"], "mitosis": 0.9}, "n": 10,
              "confusion": [[1, 0, 0], [0, 2, 0], [0, 0, 7]]},
    }
    record.close_round(1, total=1)
    final = record.finish({})
    assert final["source"] == "federated" and final["n"] == 40
    assert final["accuracy"] == (0.5 * 30 + 1.0 * 10) / 40
    assert final["auc"]["mitosis"] == 0.9  # the site that could not score mitosis is left out
    assert final["confusion"][2][2] == 7
    assert json.loads((tmp_path / "metrics.json").read_text())["final"]["n"] == 40


def test_resnet18_batchnorm_with_local_pretrained_weights(federation, quick_data, tmp_path):
    import torch
    from torchvision.models import resnet18

    from shared.mimic import FEATURES
    from shared.models import build_model

    weights = tmp_path / "imagenet.pth"
    torch.save(resnet18().state_dict(), weights)
    cfg = quick_config(quick_data, {"model.name": "resnet18", "model.resnet_norm": "batch",
                                    "model.pretrained": str(weights), "federation.rounds": 1, "server.eval_data": None})
    run_dir = tmp_path / "run"
    metrics = federation(run_dir, cfg)
    assert metrics["pretrained"]["path"] == str(weights) and "fc.weight" in metrics["pretrained"]["not_loaded"]
    model = build_model(cfg.model, len(FEATURES), 3)
    model.load_state_dict(torch.load(run_dir / "model.pt", weights_only=True))  # BN buffers survived FedAvg
    assert model.image.net.bn1.num_batches_tracked.dtype == torch.int64
    assert float(model.image.net.bn1.running_var.mean()) != 1.0  # the sites' batch statistics arrived


def test_seed_summary_is_mean_and_std_over_seeds():
    from simulations.cli import seed_summary

    finals = {s: {"source": "central", "accuracy": a, "macro_auc": m, "auc": {"mitosis": x, "tumor": 0.5}}
              for s, a, m, x in [(0, 0.8, 0.9, 0.95), (1, 0.6, 0.7, math.nan), (2, 0.7, 0.8, 0.85)]}
    summary = seed_summary(finals)
    assert summary["accuracy"]["mean"] == pytest.approx(0.7) and summary["accuracy"]["n"] == 3
    assert summary["macro_auc"]["std"] == pytest.approx(np.std([0.9, 0.7, 0.8]))
    assert summary["auc.mitosis"]["mean"] == pytest.approx(0.9)  # a seed that could not score it is skipped
