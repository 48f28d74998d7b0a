"""The generator writes the real layouts; site data splits by case and pairs EHR rows as configured."""

import dataclasses
import gzip
import json

import numpy as np
import pandas as pd
import pytest

from shared.brecahad import POINT_KEYS, inspect, list_tiles
from shared.config import DataConfig
from shared.data import ehr_statistics, load_folder, load_site, pooled_moments
from shared.errors import DataFormatError
from shared.mimic import build_cohort

CFG = DataConfig()


def test_site_folders_have_the_real_layouts(quick_data):
    for name in ("site-0", "site-1", "holdout"):
        site = quick_data / name
        tiles = list_tiles(site / "BreCaHAD")
        truth = json.loads(tiles[0].truth.read_text())
        assert list(truth) == list(POINT_KEYS) and truth["non_mitosis"] == []
        assert all(0 <= p["x"] <= 1 and 0 <= p["y"] <= 1 for k in POINT_KEYS for p in truth[k])
        for table in ("patients", "admissions", "diagnoses_icd", "d_icd_diagnoses", "labevents", "d_labitems",
                      "omr"):
            assert (site / "mimic-iv" / "hosp" / f"{table}.csv.gz").is_file()
        with gzip.open(site / "mimic-iv" / "hosp" / "diagnoses_icd.csv.gz", "rt") as f:
            dx = pd.read_csv(f, dtype=str)
        assert not dx["icd_code"].str.contains(".", regex=False).any()
        assert set(dx["icd_version"]) == {"9", "10"}
        link = pd.read_csv(site / "linkage.csv")
        assert set(link["case_id"]) == {t.case for t in tiles}


def test_quick_holdout_has_enough_mitoses_and_sites_differ_in_stain(quick_data):
    counts = inspect(quick_data / "holdout" / "BreCaHAD", CFG.classes, 64, "reflect")
    assert counts["patches"]["mitosis"] >= 30
    means = [load_folder(quick_data / s, CFG).images.reshape(-1, 3).mean(0) for s in ("site-0", "site-1")]
    assert np.abs(means[0] - means[1]).max() > 2.0  # per-site stain: mean colour differs


def test_imaged_cases_are_positive_in_the_cohort(quick_data):
    site = quick_data / "site-0"
    cohort = build_cohort(site / "mimic-iv").table.set_index("subject_id")
    link = pd.read_csv(site / "linkage.csv")
    assert (cohort.loc[link["subject_id"], "label"] == 1).all()
    assert 0 < cohort["label"].mean() < 1


def test_split_is_by_case_and_seeded(quick_data):
    train, test = load_site(quick_data / "site-0", CFG, seed=3)
    assert not set(train.cases) & set(test.cases)
    again_train, _ = load_site(quick_data / "site-0", CFG, seed=3)
    assert np.array_equal(train.labels, again_train.labels)
    other, _ = load_site(quick_data / "site-0", CFG, seed=4)
    assert set(other.cases) != set(train.cases) or len(set(train.cases)) == 0


def test_linked_pairing_gives_each_patch_its_patients_record(quick_data):
    site = quick_data / "site-1"
    samples = load_folder(site, CFG)
    cohort = build_cohort(site / "mimic-iv").table.set_index("subject_id")
    link = dict(pd.read_csv(site / "linkage.csv").values)
    i = int(np.flatnonzero(samples.cases == f"subject-{link['Case_2']}")[0])
    expected = cohort.loc[link["Case_2"]].drop("label").to_numpy(np.float32)
    np.testing.assert_array_equal(samples.ehr[i], expected)


def test_two_slides_of_one_patient_never_straddle_the_split(quick_data, tmp_path):
    import shutil

    site = tmp_path / "site"
    shutil.copytree(quick_data / "site-0", site)
    link = pd.read_csv(site / "linkage.csv")
    link.loc[link["case_id"] == "Case_2", "subject_id"] = int(link.loc[link["case_id"] == "Case_1", "subject_id"].iloc[0])
    link.to_csv(site / "linkage.csv", index=False)
    for seed in range(6):
        train, test = load_site(site, CFG, seed=seed)
        assert not set(train.cases) & set(test.cases)
    assert len(set(train.cases) | set(test.cases)) == 5  # 6 cases, 5 patients


def test_linkage_with_a_case_linked_twice_is_refused(quick_data, tmp_path):
    import shutil

    site = tmp_path / "site"
    shutil.copytree(quick_data / "site-0", site)
    link = pd.read_csv(site / "linkage.csv")
    pd.concat([link, pd.DataFrame({"case_id": ["Case_1"], "subject_id": [1]})]).to_csv(site / "linkage.csv",
                                                                                        index=False)
    with pytest.raises(DataFormatError, match=r"case_id 'Case_1' is linked to more than one subject_id"):
        load_folder(site, CFG)


def test_by_label_pairing_follows_the_label_map(quick_data):
    cfg = dataclasses.replace(CFG, pairing="by_label")
    site = quick_data / "site-0"
    samples = load_folder(site, cfg, seed=1)
    cohort = build_cohort(site / "mimic-iv").table
    label_of = {tuple(np.nan_to_num(r)): lab for r, lab in
                zip(cohort.drop(columns=["subject_id", "label"]).to_numpy(np.float32), cohort["label"])}
    for ci, cls in enumerate(cfg.classes):
        rows = samples.ehr[samples.labels == ci][:20]
        assert all(label_of[tuple(np.nan_to_num(r))] == cfg.label_map[cls] for r in rows)


def test_linkage_gap_is_named(quick_data, tmp_path):
    import shutil

    site = tmp_path / "site"
    shutil.copytree(quick_data / "site-0", site)
    link = pd.read_csv(site / "linkage.csv")
    link.iloc[1:].to_csv(site / "linkage.csv", index=False)
    with pytest.raises(DataFormatError, match=r"linkage\.csv: no subject_id for case\(s\) Case_1"):
        load_folder(site, CFG)


def test_pooled_moments_equal_the_moments_of_the_pooled_data():
    rng = np.random.default_rng(0)
    parts = [rng.normal(3, 2, (50, 4)), rng.normal(-1, 1, (80, 4))]
    parts[0][3, 1] = np.nan
    mean, std = pooled_moments([ehr_statistics(p) for p in parts])
    pooled = np.concatenate(parts)
    np.testing.assert_allclose(mean, np.nanmean(pooled, 0), rtol=1e-5)
    np.testing.assert_allclose(std, np.nanstd(pooled, 0), rtol=1e-4)


def test_history_length_before_the_index_does_not_give_the_label_away(quick_data):
    """The generator draws admissions alike for both labels, so the count up to the index must not predict it."""
    from sklearn.metrics import roc_auc_score

    t = pd.concat([build_cohort(quick_data / s / "mimic-iv").table for s in ("site-0", "site-1", "holdout")])
    assert 0.35 < roc_auc_score(t["label"], t["n_admissions"]) < 0.65
