"""The cohort builder on a MIMIC-IV-layout folder written by hand (not by fedfuse's generator)."""

import gzip
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from shared.errors import DataFormatError
from shared.mimic import FEATURES, build_cohort
from simulations.cli import main

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


def _write(hosp: Path, name: str, rows: list[dict] | pd.DataFrame) -> None:
    df = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(rows)
    with gzip.open(hosp / f"{name}.csv.gz", "wt") as f:
        df.to_csv(f, index=False)


def make_mimic(root: Path, extra_dx: list[tuple] = ()) -> Path:
    hosp = root / "hosp"
    hosp.mkdir(parents=True)
    _write(hosp, "patients", [
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
    _write(hosp, "admissions", pd.DataFrame(adm).assign(
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
    _write(hosp, "diagnoses_icd", pd.DataFrame(dx, columns=["subject_id", "hadm_id", "seq_num", "icd_code",
                                                             "icd_version"]))
    _write(hosp, "d_icd_diagnoses", [{"icd_code": "C50911", "icd_version": 10, "long_title": "breast"}])
    _write(hosp, "d_labitems", [{"itemid": 50912, "label": "Creatinine", "fluid": "Blood", "category": "Chemistry"},
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
    _write(hosp, "labevents", [
        {"labevent_id": i, "subject_id": s, "hadm_id": h, "specimen_id": i, "itemid": it, "order_provider_id": "",
         "charttime": t, "storetime": t, "value": v or "___", "valuenum": v, "valueuom": "mg/dL",
         "ref_range_lower": "", "ref_range_upper": "", "flag": "", "priority": "", "comments": ""}
        for i, (s, h, it, t, v) in enumerate(labs)])
    _write(hosp, "omr", [
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


def test_labels_by_icd_code_and_version(tmp_path):
    cohort = build_cohort(make_mimic(tmp_path / "m"))
    labels = dict(zip(cohort.table["subject_id"], cohort.table["label"]))
    for subject, (label, why) in EXPECTED.items():
        assert labels[subject] == label, why


def test_every_subject_has_a_row_and_messy_rows_are_counted(tmp_path):
    cohort = build_cohort(make_mimic(tmp_path / "m"))
    t = cohort.table.set_index("subject_id")
    assert sorted(t.index) == sorted(EXPECTED)
    assert t.loc[7, "n_admissions"] == 0 and t.loc[7, "age"] == 47 and t.loc[7, "lab_potassium"] == pytest.approx(3.9)
    assert cohort.skipped["lab_empty_valuenum"] == 1
    assert cohort.skipped["lab_unknown_itemid"] == 1
    assert cohort.skipped["lab_implausible"] == 1
    assert cohort.skipped["omr_bad_blood_pressure"] == 3
    assert t.loc[10, "sbp"] == 130 and t.loc[10, "dbp"] == 85
    assert t.loc[2, "lab_potassium"] == pytest.approx(4.4)
    assert t.loc[1, "gender_male"] == 0 and t.loc[8, "gender_male"] == 1


def test_nothing_after_the_index_admission_reaches_the_features(tmp_path):
    t = build_cohort(make_mimic(tmp_path / "m")).table.set_index("subject_id")
    assert t.loc[1, "lab_creatinine"] == pytest.approx((1.0 + 1.2) / 2)  # not the planted 9.0
    assert t.loc[1, "bmi"] == pytest.approx(31.2)  # not the later 24.0
    assert t.loc[1, "comorb_ckd"] == 0  # coded only after the index
    assert t.loc[1, "comorb_hypertension"] == 1 and t.loc[1, "comorb_diabetes"] == 1
    assert t.loc[1, "n_admissions"] == 1
    assert t.loc[1, "age"] == 41 + 2  # anchor_age at anchor_year, index admission two years later


def test_breast_related_codes_never_become_features(tmp_path):
    base = build_cohort(make_mimic(tmp_path / "a")).table
    # ER status, history and family history added to a negative's and a positive's index admissions.
    planted = [(5, 501, 9, "Z170", 10), (5, 501, 10, "Z803", 10), (1, 101, 9, "V103", 9), (10, 1001, 5, "Z171", 10)]
    more = build_cohort(make_mimic(tmp_path / "b", planted)).table
    pd.testing.assert_frame_equal(base, more)


def test_missing_column_names_file_and_column(tmp_path):
    root = make_mimic(tmp_path / "m")
    df = pd.read_csv(root / "hosp" / "diagnoses_icd.csv.gz").drop(columns=["icd_version"])
    _write(root / "hosp", "diagnoses_icd", df)
    with pytest.raises(DataFormatError, match=r"diagnoses_icd\.csv\.gz: missing column\(s\) icd_version"):
        build_cohort(root)


def test_missing_table_names_it(tmp_path):
    root = make_mimic(tmp_path / "m")
    (root / "hosp" / "omr.csv.gz").unlink()
    with pytest.raises(DataFormatError, match=r"missing table omr\.csv\.gz"):
        build_cohort(root)


def test_cohort_command_writes_every_subject(tmp_path, capsys):
    root = make_mimic(tmp_path / "m")
    out = tmp_path / "cohort.csv"
    assert main(["data", "cohort", "--mimic", str(root), "--out", str(out)]) == 0
    table = pd.read_csv(out)
    assert list(table.columns[:2]) == ["subject_id", "label"] and list(table.columns[2:]) == list(FEATURES)
    assert len(table) == len(EXPECTED) and table["label"].sum() == sum(v[0] for v in EXPECTED.values())
    assert main(["data", "inspect", str(root), "--json"]) == 0
    assert '"subjects": 10, "positives": 5' in capsys.readouterr().out
    assert np.isnan(table.set_index("subject_id").loc[5, "lab_creatinine"])


def test_a_subject_listed_twice_with_another_age_or_sex_is_left_out_and_counted(tmp_path):
    reference = build_cohort(make_mimic(tmp_path / "a")).table.set_index("subject_id")
    root = make_mimic(tmp_path / "b")
    patients = pd.read_csv(root / "hosp" / "patients.csv.gz", dtype=str, keep_default_na=False)
    again = patients.set_index("subject_id", drop=False)
    twice = pd.concat([again.loc[["2"]].assign(anchor_age="70"),  # 2: another age
                       again.loc[["8"]].assign(gender="F"),  # 8: another sex
                       again.loc[["5"]].assign(gender=" f", anchor_age="45.0")])  # 5: the same facts, written apart
    _write(root / "hosp", "patients", pd.concat([twice.iloc[:1], patients, twice.iloc[1:]]))  # before and after
    cohort = build_cohort(root)
    t = cohort.table.set_index("subject_id")
    assert sorted(t.index) == sorted(set(EXPECTED) - {2, 8})
    assert cohort.skipped["patients_conflicting_duplicates"] == 4 and cohort.skipped["patients_repeated_rows"] == 1
    pd.testing.assert_frame_equal(t, reference.drop(index=[2, 8]))
