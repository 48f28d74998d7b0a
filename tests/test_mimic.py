"""The cohort builder on a MIMIC-IV-layout folder written by hand (not by fedfuse's generator)."""


import numpy as np
import pandas as pd
import pytest

from shared.errors import DataFormatError
from shared.mimic import FEATURES, build_cohort
from simulations.cli import main
from tests.helpers import EXPECTED, make_mimic, write_table


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
    write_table(root / "hosp", "diagnoses_icd", df)
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
    write_table(root / "hosp", "patients", pd.concat([twice.iloc[:1], patients, twice.iloc[1:]]))  # before and after
    cohort = build_cohort(root)
    t = cohort.table.set_index("subject_id")
    assert sorted(t.index) == sorted(set(EXPECTED) - {2, 8})
    assert cohort.skipped["patients_conflicting_duplicates"] == 4 and cohort.skipped["patients_repeated_rows"] == 1
    pd.testing.assert_frame_equal(t, reference.drop(index=[2, 8]))
