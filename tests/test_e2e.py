"""End to end: `fedfuse simulate` runs the real Flower app in the simulation engine and cleans up."""

import json
from pathlib import Path

import pytest

from simulations.cli import main

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.e2e
def test_refuses_to_overwrite_a_run(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.json").write_text("{}")
    assert main(["simulate", str(ROOT / "configs/quickstart.yaml"), "--out", str(tmp_path / "run")]) == 2
    assert "exists and is not empty" in capsys.readouterr().err


@pytest.mark.e2e
def test_flwr_run_runs_the_same_app(quick_data, tmp_path):
    """`flwr run .` with Flower's own local SuperLink, as `make flwr-run` does (on a free port here)."""
    import shutil
    import subprocess
    import sys

    from simulations.flower import flower_env, free_port, local_superlink_pid, ray_tmpdir, stop_tree

    port = free_port()
    ray_tmp, _ = ray_tmpdir(tmp_path / "ray")
    env = {**flower_env(tmp_path / "flwr-home", ray_tmp), "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(port)}
    run_dir = tmp_path / "run"
    overrides = (f'data.root="{quick_data}" data.sites=2 server.eval_data="{quick_data / "holdout"}" '
                 f'federation.rounds=1 train.local_epochs=1 report.shap_rows=0 run-dir="{run_dir}"')
    try:
        done = subprocess.run(
            [str(Path(sys.executable).parent / "flwr"), "run", ".", "local", "--stream", "--run-config", overrides,
             "--federation-config", "num-supernodes=2 client-resources-num-cpus=1"],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    finally:
        pid = local_superlink_pid(port)
        if pid is not None:
            stop_tree(pid)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert "[fedfuse] round  1/1" in done.stdout + done.stderr, done.stdout[-3000:] + done.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["final"]["source"] == "central" and set(metrics["sites"]) == {"site-0", "site-1"}
