"""Flower packs the project into an app bundle (FAB, capped at 10 MiB): data, caches and runs stay out."""

import io
import shutil
import subprocess
import zipfile
from pathlib import Path

from flwr.cli.build import build_fab_from_disk

ROOT = Path(__file__).resolve().parent.parent


def test_data_caches_and_runs_are_not_bundled(tmp_path):
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    app = tmp_path / "app"
    for f in files:
        if (ROOT / f).is_file():
            (app / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, app / f)
    # What a working checkout accumulates, in the extensions Flower would otherwise pack (.json, .yaml).
    for junk in ("data/quickstart/site-0/BreCaHAD/groundTruth/Case_1-01.json", "data/quickstart/notes.yaml",
                 "runs/quickstart-1/metrics.json", "runs/quickstart-1/config.yaml",
                 "data/quickstart/site-0/.fedfuse-cache/x.json", ".flwr/config.toml", "results/shift_study.md",
                 "coordinator/admissions.json", "coordinator/flwr-home/config.toml",
                 "deploy-try/data/site-0/BreCaHAD/groundTruth/Case_1-01.json"):
        (app / junk).parent.mkdir(parents=True, exist_ok=True)
        (app / junk).write_text("{}")
    names = zipfile.ZipFile(io.BytesIO(build_fab_from_disk(app))).namelist()
    assert "server/app.py" in names and "client/app.py" in names and "configs/quickstart.yaml" in names
    assert "pyproject.toml" in names
    assert "shared/assets/stain_reference.json" in names  # data.stain_reference: shipped, read at every site
    kept_out = ("data/", "runs/", ".flwr/", "results/", "coordinator/", "deploy-try/")
    leaked = [n for n in names if n.startswith(kept_out) or ".fedfuse-cache" in n]
    assert leaked == []
