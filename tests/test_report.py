"""report.html: every section shows its plot or says why it does not apply."""

import re
from pathlib import Path

from simulations.cli import main
from simulations.report import build
from tests.test_reliability import federate


def sections(page: str) -> dict[str, str]:
    return dict(re.findall(r"<section><h2>(.*?)</h2>(.*?)</section>", page, flags=re.S))


def test_report_of_a_fusion_run_with_a_central_test_set(quick_data, tmp_path, capsys):
    federate(quick_data, tmp_path, {"federation.rounds": 2, "model.name": "fusion", "report.shap_rows": 40})
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
    assert "lab_" in found["Federated SHAP (per-site mean |SHAP| and row count, combined)"]
    assert 'src="http' not in page and "<script" not in page  # self-contained


def test_report_without_a_central_test_set_says_why(quick_data, tmp_path):
    federate(quick_data, tmp_path, {"federation.rounds": 1, "server.eval_data": None, "report.shap_rows": 0})
    found = sections(build(tmp_path / "run").read_text())
    for title in ("ROC curves", "Grad-CAM", "SHAP"):
        assert "no central test set" in found[title]
    assert found["Metrics per round"].startswith("<img") and "not computed" in found["Federated SHAP"]
