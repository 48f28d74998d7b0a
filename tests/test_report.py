"""report.html: every section shows its plot or says why it does not apply."""

import json
import re
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

from simulations.cli import main
from simulations.report import build

FEDERATED_SHAP = "Federated SHAP (each site sends mean |SHAP| per feature and its row count)"


def sections(page: str) -> dict[str, str]:
    return dict(re.findall(r"<section><h2>(.*?)</h2>(.*?)</section>", page, flags=re.S))


def test_report_of_a_fusion_run_with_a_central_test_set(federation, tmp_path, capsys):
    federation(tmp_path / "run", {"federation.rounds": 2, "model.name": "fusion", "report.shap_rows": 40})
    assert main(["report", str(tmp_path / "run")]) == 0
    path = Path(capsys.readouterr().out.split("report: ", 1)[1].strip())
    page = path.read_text()
    found = sections(page)
    shown = [t for t, body in found.items() if body.startswith("<img")]
    for title in ("Metrics per round", "Confusion matrix", "Evaluation matrix", "ROC curves",
                  "Grad-CAM: mitosis", "Grad-CAM: tumor", "Grad-CAM: non_tumor"):
        assert title in shown, (title, list(found))
    assert any(t.startswith("SHAP of the EHR features") for t in shown)
    assert "no privacy ledger" in found["Privacy: epsilon per round"]
    assert 'src="http' not in page and "<script" not in page  # self-contained
    # The rank correlation with the same model trained on the pooled data, as many steps as the sites took.
    shap_section = found[FEDERATED_SHAP]
    shown_rho = float(re.search(r"Spearman rank correlation <b>(-?[0-9.]+)</b>", shap_section).group(1))
    reference = json.loads((tmp_path / "run" / "pooled_reference.json").read_text())
    federated = json.loads((tmp_path / "run" / "metrics.json").read_text())["importance"]["mean_abs_shap"]
    assert reference["steps"] == 2 * 2 * 2  # rounds x sites x train.steps
    names = list(federated)
    rho = spearmanr([federated[f] for f in names], [reference["mean_abs_shap"][f] for f in names]).statistic
    assert abs(shown_rho - rho) < 5e-4 and -1 <= rho <= 1
    assert reference["mean_abs_shap"] != federated  # a model of its own, not the federation's numbers again


def test_report_says_why_without_every_sites_data(federation, quick_data, tmp_path):
    federation(tmp_path / "run", {"federation.rounds": 1, "model.name": "mlp", "report.shap_rows": 20})
    config = tmp_path / "run" / "config.yaml"
    config.write_text(config.read_text().replace(str(quick_data), str(tmp_path / "elsewhere")))
    found = sections(build(tmp_path / "run").read_text())
    assert "needs every site&#x27;s data on one machine" in found[FEDERATED_SHAP]
    assert not (tmp_path / "run" / "pooled_reference.json").exists()


def test_tensorboard_scalars_equal_metrics_json(federation, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    metrics = federation(tmp_path / "run", {"federation.rounds": 2, "logging.tensorboard": True})
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard")).Reload()
    for tag, get in [("central/macro_auc", lambda r: r["central"]["macro_auc"]),
                     ("site-1/auc_mitosis", lambda r: r["sites"]["site-1"]["auc"]["mitosis"]),
                     ("train/loss", lambda r: r["train_loss"])]:
        logged = [(e.step, e.value) for e in events.Scalars(tag)]
        assert [s for s, _ in logged] == [1, 2], tag
        assert np.allclose([v for _, v in logged], [get(r) for r in metrics["rounds"]], rtol=1e-6), tag


def test_report_without_a_central_test_set_says_why(federation, tmp_path):
    federation(tmp_path / "run", {"federation.rounds": 1, "server.eval_data": None, "report.shap_rows": 0})
    found = sections(build(tmp_path / "run").read_text())
    for title in ("ROC curves", "Grad-CAM", "SHAP"):
        assert "no central test set" in found[title]
    assert found["Metrics per round"].startswith("<img") and "not computed" in found[FEDERATED_SHAP]
