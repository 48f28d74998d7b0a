"""Bad input to the CLI gets one line naming the file or flag and what was expected: exit 2, no traceback."""

import json

import pytest

from shared.config import Config, dump
from simulations.cli import main
from tests.helpers import saved_model


def error_line(capsys) -> str:
    """The one line a refused command printed on stderr."""
    err = capsys.readouterr().err.strip()
    assert err.startswith("fedfuse: error: ") and "\n" not in err, err
    return err


def test_cohort_out_a_folder(quick_data, tmp_path, capsys):
    assert main(["data", "cohort", "--mimic", str(quick_data / "site-0" / "mimic-iv"), "--out", str(tmp_path)]) == 2
    err = error_line(capsys)
    assert f"--out {tmp_path}: a folder; expected the path of a CSV file" in err


def test_predict_out_a_folder(quick_data, tmp_path, capsys):
    run_dir = saved_model(tmp_path, quick_data, name="cnn")
    assert main(["predict", str(run_dir), str(quick_data / "site-0"), "--out", str(tmp_path)]) == 2
    assert f"--out {tmp_path}: a folder; expected the path of a CSV file" in error_line(capsys)


def test_predict_with_a_truncated_model(quick_data, tmp_path, capsys):
    run_dir = saved_model(tmp_path, quick_data, name="cnn")
    model = run_dir / "model.pt"
    model.write_bytes(model.read_bytes()[:1000])
    assert main(["predict", str(run_dir), str(quick_data / "site-0"), "--out", str(tmp_path / "p.csv")]) == 2
    err = error_line(capsys)
    assert f"{model}: not a readable cnn model" in err and "expected the file `fedfuse simulate` wrote" in err
    assert not (tmp_path / "p.csv").exists()


def test_predict_with_another_models_weights(quick_data, tmp_path, capsys):
    run_dir = saved_model(tmp_path, quick_data, name="cnn")
    dump(Config(), run_dir / "config.yaml")  # the default model is fusion: names and shapes differ
    assert main(["predict", str(run_dir), str(quick_data / "site-0"), "--out", str(tmp_path / "p.csv")]) == 2
    assert f"{run_dir / 'model.pt'}: not a readable fusion model" in error_line(capsys)


@pytest.mark.parametrize("metrics", [{}, {"name": "x", "rounds": "none"}, [], "not json"])
def test_report_on_a_metrics_file_without_its_keys(tmp_path, capsys, metrics):
    dump(Config(), tmp_path / "config.yaml")
    (tmp_path / "metrics.json").write_text(metrics if isinstance(metrics, str) else json.dumps(metrics))
    assert main(["report", str(tmp_path)]) == 2
    err = error_line(capsys)
    assert f"{tmp_path / 'metrics.json'}: " in err
    expected = {"{}": "missing key(s) name, model, task, classes, sites, rounds",
                "{\"name\": \"x\", \"rounds\": \"none\"}": "wrong type for rounds", "[]": "expected a JSON object",
                "not json": "not readable JSON"}
    assert expected[metrics if isinstance(metrics, str) else json.dumps(metrics)] in err
    assert not (tmp_path / "report.html").exists()


@pytest.mark.parametrize("days", ["1000000000", "0", "-5"])
def test_certificate_days_out_of_range(tmp_path, capsys, days):
    assert main(["deploy", "certs", "--out", str(tmp_path / "c"), "--host", "localhost", "--days", days]) == 2
    assert f"--days {days}: expected a validity from 1 to 36500 days" in error_line(capsys)
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("names", ["../X", "a,{tmp}/b", "a,,b", "a,a"])
def test_key_names_that_leave_the_folder_or_repeat(tmp_path, capsys, names):
    out = tmp_path / "keys"
    assert main(["deploy", "keys", "--out", str(out), "--names", names.format(tmp=tmp_path)]) == 2
    assert "--names" in error_line(capsys)
    assert list(tmp_path.iterdir()) == []


def test_paper_model_that_is_not_one(tmp_path, capsys):
    config = tmp_path / "paper.yaml"
    config.write_text("paper:\n  models: [cnn, ../../x]\n  budgets: {cnn: 4, ../../x: 4}\n")
    assert main(["paper", "--config", str(config)]) == 2
    assert f"{config}: paper.models / paper.protocol.models: unknown row(s) '../../x'; expected some of cnn" \
        in error_line(capsys)
    assert list(tmp_path.iterdir()) == [config]


def test_paper_variant_named_like_a_path_or_with_a_bad_setting(tmp_path, capsys):
    config = tmp_path / "paper.yaml"
    config.write_text("paper:\n  models: [../x]\n  variants: {../x: {model.name: cnn}}\n  budgets: {cnn: 4}\n")
    assert main(["paper", "--config", str(config)]) == 2
    line = error_line(capsys)
    assert "unknown row(s) '../x'" in line and "letters, digits, _ and -" in line
    config.write_text("paper:\n  models: [big]\n  variants: {big: {model.hidden: -3}}\n  budgets: {fusion: 4}\n")
    assert main(["paper", "--config", str(config)]) == 2
    assert f"{config}: paper.variants.big: overrides: model.hidden: expected between 1 and 4096, got -3" \
        in error_line(capsys)
    assert list(tmp_path.iterdir()) == [config]
