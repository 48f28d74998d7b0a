"""Helpers several test files share (fixtures are in conftest.py): toy data, a saved model, a generated MIMIC-IV
root, Opacus's epsilon for comparison, the small config a federation in process runs, and the processes a run
left behind."""

from __future__ import annotations

import dataclasses
import gzip
import os
from pathlib import Path

import numpy as np
import pandas as pd
from opacus.accountants import RDPAccountant

from shared import learner
from shared.config import Config, apply_overrides, dump, load
from shared.data import Samples
from shared.metrics import classification_metrics
from simulations.cli import absolute_paths
from simulations.predict import predict_folder

ROOT = Path(__file__).resolve().parent.parent
CONFIG = str(ROOT / "configs/quickstart.yaml")
DELTA = 1e-5
# How far a rescored macro AUC may sit from the run's own: the run evaluated on the sites' one torch thread, the
# rescoring on the test's; a forward pass on other threads sums in another order, which can swap one near-tied pair
# of patches (measured: 1.8e-6 for FedMedian's CNN on the quick holdout; one swapped pair moves a class's AUC by
# 1 / (positives x negatives)). Another model differs by far more.
RESCORED_AUC = 1e-4


def processes_mentioning(text: str) -> list[int]:
    """Pids whose environment, command line or working folder mentions ``text`` (our run folder is in FLWR_HOME;
    Ray's agents rewrite their environment and title, but keep the run folder as their working folder)."""
    found = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit() and int(p.name) != os.getpid():
            try:
                if (text.encode() in (p / "environ").read_bytes() or text.encode() in (p / "cmdline").read_bytes()
                        or text in os.readlink(p / "cwd")):
                    found.append(int(p.name))
            except OSError:
                pass
    return found


def toy(n=48, seed=0) -> Samples:
    """Bright centre = class 0, dark centre = class 1, grey = class 2; EHR feature 0 tracks the class."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 3
    images = rng.integers(90, 110, (n, 32, 32, 3)).astype(np.uint8)
    images[:, 12:20, 12:20] = np.array([250, 10, 128], np.uint8)[labels][:, None, None, None]
    ehr = rng.normal(size=(n, 5)).astype(np.float32)
    ehr[:, 0] += labels
    ehr[0, 2] = np.nan
    return Samples(images, ehr, labels.astype(np.int64), np.array([f"Case_{i % 4}" for i in range(n)]))


def saved_model(tmp_path, quick_data, **model_changes) -> object:
    cfg = Config()
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, root=str(quick_data), patch_size=32),
                              model=dataclasses.replace(cfg.model, **model_changes),
                              federation=dataclasses.replace(
                                  cfg.federation,
                                  strategy="xgb_bagging" if model_changes.get("name") == "xgboost" else "fedavg"))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    weights, _ = learner.initial_weights(cfg, np.zeros(27, np.float32), np.ones(27, np.float32))
    learner.save(cfg, weights, run_dir)
    dump(cfg, run_dir / "config.yaml")
    return run_dir


def opacus_after(entries: list[tuple[float, float, int]], delta: float = DELTA) -> float:
    """A fresh Opacus accountant's epsilon, stepped once per optimiser step through ``entries`` in order."""
    accountant = RDPAccountant()
    for sigma, q, steps in entries:
        for _ in range(steps):
            accountant.step(noise_multiplier=sigma, sample_rate=q)
    return accountant.get_epsilon(delta)


# subject -> (expected label, why)
EXPECTED = {
    1: (1, "ICD-10 C50911 at seq_num 3"),
    2: (1, "ICD-9 1749 at seq_num 2"),
    3: (1, "ICD-9 2330, carcinoma in situ"),
    4: (1, "ICD-10 D0511, in situ"),
    5: (0, "distractors C519 (vulva) and C800"),
    6: (0, "personal and family history only (Z853, Z803, V103)"),
    7: (0, "no admissions at all"),
    8: (1, "ICD-9 1759, male breast"),
    9: (0, "code 1749 under ICD-10 is not ICD-9 174.9; V860 is ER status"),
    10: (0, "hypertension only; malformed blood pressures"),
}


def write_table(hosp: Path, name: str, rows: list[dict] | pd.DataFrame) -> None:
    df = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(rows)
    with gzip.open(hosp / f"{name}.csv.gz", "wt") as f:
        df.to_csv(f, index=False)


def make_mimic(root: Path, extra_dx: list[tuple] = ()) -> Path:
    hosp = root / "hosp"
    hosp.mkdir(parents=True)
    write_table(hosp, "patients", [
        {"subject_id": s, "gender": "M" if s == 8 else "F", "anchor_age": 40 + s, "anchor_year": 2150,
         "anchor_year_group": "2014 - 2016", "dod": ""} for s in EXPECTED])
    adm = []
    for s in EXPECTED:
        if s == 7:
            continue
        adm.append({"subject_id": s, "hadm_id": 100 * s + 1, "admittime": "2152-03-01 10:00:00",
                    "dischtime": "2152-03-05 12:00:00"})
        adm.append({"subject_id": s, "hadm_id": 100 * s + 2, "admittime": "2153-06-01 10:00:00",
                    "dischtime": "2153-06-03 12:00:00"})
    write_table(hosp, "admissions", pd.DataFrame(adm).assign(
        deathtime="", admission_type="ELECTIVE", admit_provider_id="P1", admission_location="REFERRAL",
        discharge_location="HOME", insurance="Other", language="ENGLISH", marital_status="SINGLE", race="WHITE",
        edregtime="", edouttime="", hospital_expire_flag=0))
    dx = [
        (1, 101, 1, "I10", 10), (1, 101, 2, "E119", 10), (1, 101, 3, "C50911", 10), (1, 101, 4, "Z170", 10),
        (1, 102, 1, "Z853", 10), (1, 102, 2, "Z170", 10), (1, 102, 3, "N183", 10),  # after the index
        (2, 201, 1, "4019", 9), (2, 201, 2, "1749", 9),
        (3, 302, 1, "2330", 9),
        (4, 401, 1, "D0511", 10),
        (5, 501, 1, "C519", 10), (5, 502, 1, "C800", 10),
        (6, 601, 1, "Z853", 10), (6, 601, 2, "Z803", 10), (6, 602, 1, "V103", 9),
        (8, 801, 1, "1759", 9),
        (9, 901, 1, "1749", 10), (9, 901, 2, "V860", 9),
        (10, 1001, 1, "I10", 10),
        *extra_dx,
    ]
    write_table(hosp, "diagnoses_icd", pd.DataFrame(dx, columns=["subject_id", "hadm_id", "seq_num", "icd_code",
                                                             "icd_version"]))
    write_table(hosp, "d_icd_diagnoses", [{"icd_code": "C50911", "icd_version": 10, "long_title": "breast"}])
    write_table(hosp, "d_labitems", [{"itemid": 50912, "label": "Creatinine", "fluid": "Blood", "category": "Chemistry"},
                                {"itemid": 50971, "label": "Potassium", "fluid": "Blood", "category": "Chemistry"}])
    labs = [
        (1, 101, 50912, "2152-03-02 08:00:00", "1.0"),
        (1, 102, 50912, "2153-06-02 08:00:00", "9.0"),  # planted after the index admission
        (1, "", 50912, "2152-01-15 08:00:00", "1.2"),  # outpatient, before: counts, hadm_id empty
        (2, 201, 50971, "2152-03-02 08:00:00", ""),  # empty valuenum
        (2, 201, 99999, "2152-03-02 08:00:00", "5.0"),  # itemid not in d_labitems
        (2, 201, 50971, "2152-03-02 09:00:00", "80"),  # impossible potassium
        (2, 201, 50971, "2152-03-02 10:00:00", "4.4"),
        (7, "", 50971, "2150-02-01 08:00:00", "3.9"),  # subject without admissions
    ]
    write_table(hosp, "labevents", [
        {"labevent_id": i, "subject_id": s, "hadm_id": h, "specimen_id": i, "itemid": it, "order_provider_id": "",
         "charttime": t, "storetime": t, "value": v or "___", "valuenum": v, "valueuom": "mg/dL",
         "ref_range_lower": "", "ref_range_upper": "", "flag": "", "priority": "", "comments": ""}
        for i, (s, h, it, t, v) in enumerate(labs)])
    write_table(hosp, "omr", [
        {"subject_id": 10, "chartdate": "2152-02-01", "seq_num": 1, "result_name": "Blood Pressure",
         "result_value": "130/85"},
        {"subject_id": 10, "chartdate": "2152-02-02", "seq_num": 1, "result_name": "Blood Pressure",
         "result_value": "120/"},
        {"subject_id": 10, "chartdate": "2152-02-03", "seq_num": 1, "result_name": "Blood Pressure Sitting",
         "result_value": "abc"},
        {"subject_id": 10, "chartdate": "2152-02-04", "seq_num": 1, "result_name": "Blood Pressure",
         "result_value": "80/120"},
        {"subject_id": 1, "chartdate": "2152-02-20", "seq_num": 1, "result_name": "BMI (kg/m2)", "result_value": "31.2"},
        {"subject_id": 1, "chartdate": "2153-07-01", "seq_num": 1, "result_name": "BMI (kg/m2)", "result_value": "24.0"},
        {"subject_id": 1, "chartdate": "2152-02-20", "seq_num": 2, "result_name": "Weight (Lbs)", "result_value": "180"},
    ])
    return root


def quick_config(quick_data: Path, overrides: dict) -> Config:
    """configs/quickstart.yaml made small on the quick data: 2 sites, 32 px patches, a CNN at 2 optimiser steps a
    round, the holdout as the server's test set, no SHAP; then ``overrides`` (dotted keys)."""
    return apply_overrides(absolute_paths(load(CONFIG)), {
        "data.root": str(quick_data), "data.sites": 2, "data.patch_size": 32, "model.name": "cnn",
        "train.steps": 2, "server.eval_data": str(quick_data / "holdout"), "report.shap_rows": 0, **overrides})


def rescored(run_dir: Path, folder: Path) -> dict:
    """The saved final model of ``run_dir`` scored again on ``folder`` through ``fedfuse predict``'s CSV: what a
    run reports as its final central scores must be what its saved model scores (to :data:`RESCORED_AUC`)."""
    out, _ = predict_folder(run_dir, folder, run_dir.parent / f"{run_dir.name}-rescored.csv")
    table = pd.read_csv(out)
    classes = tuple(c[2:] for c in table.columns if c.startswith("p_"))
    labels = (table["label"].to_numpy() if "label" in table else
              np.array([classes.index(a) for a in table["annotated"]]))
    return classification_metrics(labels, table[[f"p_{c}" for c in classes]].to_numpy(), classes)
