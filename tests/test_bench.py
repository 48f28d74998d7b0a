"""The benchmarks' smoke run: `bench.run --tiny` runs every script and each writes valid JSON with the expected keys.

Nothing here asserts a timing: the machines are shared and noisy, and the tiny
size measures nothing worth comparing. About a minute on 2 cores.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench import common
from bench.run import SCRIPTS

ROOT = Path(__file__).resolve().parent.parent


def _strict(constant: str):
    raise ValueError(f"{constant} is not JSON")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[subprocess.CompletedProcess, dict[str, dict]]:
    """One `python -m bench.run --tiny` into a temporary folder: its process and every result file."""
    tmp = tmp_path_factory.mktemp("bench")
    done = subprocess.run([sys.executable, "-m", "bench.run", "--tiny", "--results", str(tmp / "results"),
                           "--data", str(tmp / "data")], cwd=ROOT, capture_output=True, text=True, timeout=600)
    results = {name: json.loads((tmp / "results" / f"{name}.json").read_text(), parse_constant=_strict)
               for name in SCRIPTS if (tmp / "results" / f"{name}.json").is_file()}
    return done, results


def test_every_benchmark_runs_and_the_summary_is_printed(tiny):
    done, results = tiny
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert sorted(results) == sorted(SCRIPTS)
    summary = done.stdout.split("=== summary", 1)[1]
    assert "benchmark" in summary and "met?" in summary
    for name in SCRIPTS:
        assert name in summary


@pytest.mark.parametrize("name", SCRIPTS)
def test_result_file_has_the_common_keys(tiny, name):
    result = tiny[1][name]
    assert tuple(result) == common.KEYS
    assert result["name"] == name and result["size"] == "tiny"
    machine = result["machine"]
    assert machine["cpu_count"] >= 1 and machine["memory_gib"] > 0
    assert machine["torch"] and machine["flwr"]
    for row in result["targets"]:
        assert set(row) == {"figure", "measured", "target", "unit", "met", "note"}
        assert row["met"] in (None, True, False)


def test_figures_of_each_benchmark(tiny):
    r = {name: result["figures"] for name, result in tiny[1].items()}
    fed = r["federation_overhead"]
    assert set(fed["runs"]) == {"plain", "inprocess"} and set(fed["versus_plain"]) == {"inprocess"}
    assert {"wall_s", "round_ends_s", "start_s", "first_round_s", "round_s", "end_s", "macro_auc"} <= set(
        fed["runs"]["inprocess"])
    assert set(fed["runs"]["inprocess"]["inside"]) == {"config_parsing", "site_reloading", "serialisation",
                                                      "checkpoints"}
    assert all(spot["calls"] > 0 for spot in fed["runs"]["inprocess"]["inside"].values())
    # the same steps: the plain loop ends where the federation does
    assert fed["runs"]["plain"]["macro_auc"] == pytest.approx(fed["runs"]["inprocess"]["macro_auc"], abs=1e-3)

    data = r["data_pipeline"]
    assert data["extraction"]["patches"] > 0 and data["extraction"]["tiles"] == 48
    assert {"loader_s", "compute_s", "loader_share_pct", "reload_s", "hed_jitter_loader_share_pct"} <= set(
        data["loader"])

    assert set(r["dp_cost"]["cnn"]) == {"plain", "hooks"}
    assert {"step_s", "peak_mb", "x_time", "agrees_with_hooks"} <= set(r["dp_cost"]["cnn"]["hooks"])

    scale = r["scale"]
    assert set(scale["runs"]) == {"2", "4"}
    assert all(run["peak_pss_gib"] > 0 and len(run["round_ends_s"]) == 2 for run in scale["runs"].values())
    assert set(scale["growth"]) == {"round_s", "peak_pss_gib"}

    comm = r["communication"]
    assert set(comm["models"]) == {"cnn", "resnet18", "mlp", "xgboost", "fusion", "late_fusion", "resnet18 (freeze)"}
    fusion = comm["models"]["fusion"]
    assert fusion["float16"]["up"] < fusion["float32"]["up"]  # byte counts, not timings
    assert comm["models"]["resnet18 (freeze)"]["trainable"]["up"] < comm["models"]["resnet18"]["float32"]["up"]
    assert len(comm["models"]["xgboost"]["rounds"]) == 2
    aucs = comm["macro_auc_by_upload"]["fusion"]
    assert set(aucs) == {"float32", "float16", "trainable_float16"}
    headline = next(t for t in tiny[1]["communication"]["targets"]
                    if t["figure"].startswith("fusion: macro AUC with float16"))
    assert headline["measured"] == aucs["float16"] - aucs["float32"]  # the headline is the two runs' difference
    assert abs(headline["measured"]) < 0.05  # the same seeded run: half-precision uploads, not another model

    compute = r["compute"]
    assert set(compute) == {"cnn"}
    assert {s["name"] for s in compute["cnn"]["settings"]} >= {"default", "threads 2", "as loaded", "batch 128"}
    assert compute["cnn"]["best"]["samples_per_s"] > 0


def test_a_target_row():
    assert common.target("x", 1.2, 1.3, "x")["met"] is True
    assert common.target("x", 1.4, 1.3, "x")["met"] is False
    assert common.target("x", None, 1.3)["met"] is None
    assert common.target("x", 2.0, None)["target"] == "-"


def test_steady_round_leaves_out_the_first_and_a_different_last():
    assert common.steady_round([3.0, 5.0, 7.0]) == 2.0
    assert common.steady_round([3.0, 5.0, 9.0], last_differs=True) == 2.0
    assert common.steady_round([3.0, 5.0], last_differs=True) == 2.0  # too few rounds to leave one out
    assert common.steady_round([3.0]) is None


def test_run_refuses_an_unknown_benchmark(capsys):
    from bench.run import main

    with pytest.raises(SystemExit):
        main(["--only", "nonsense"])
    assert "unknown benchmark" in capsys.readouterr().err
