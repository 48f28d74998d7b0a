"""Synthetic MIMIC-IV ``hosp`` tables for one hospital, in the real layout.

The model behind a record:

* **Who.** Every imaged case is a breast cancer patient; around them each site
  has other breast cancer patients without images and many patients admitted
  for other reasons. Positives are almost all women and a little older.
* **When.** Each subject has one to five admissions over a few (shifted,
  MIMIC-style 21xx) years. For a positive, one admission is the *index*: the
  first whose diagnoses carry a breast cancer code (not always at seq_num 1).
  Later admissions carry personal-history (Z85.3 / V10.3) and ER-status codes
  and post-treatment labs, exactly the data a cohort builder must not use.
* **What is measured.** Labs (real MIMIC itemids) drawn around each admission
  and some outpatient labs without ``hadm_id``; omr rows with blood pressure,
  BMI, weight and height. The patient's latent grade ``z`` (shared with the
  image generator) shifts LDH, alkaline phosphatase, platelets, haemoglobin
  and albumin, so the record says something, not everything, about how
  mitotically active the tumour is.
* **Mess, as in the real tables.** ICD-9 and ICD-10 both occur, codes have no
  dots, some ``valuenum`` are empty with text in ``value``, a few omr blood
  pressures are malformed, some subjects have no admission at all.
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

# itemid -> (label, fluid, category, unit, mean, sd, shift per unit of grade z)
LABS: dict[int, tuple[str, str, str, str, float, float, float]] = {
    50912: ("Creatinine", "Blood", "Chemistry", "mg/dL", 0.9, 0.25, 0.0),
    50931: ("Glucose", "Blood", "Chemistry", "mg/dL", 108.0, 22.0, 0.0),
    50983: ("Sodium", "Blood", "Chemistry", "mEq/L", 139.0, 2.8, 0.0),
    50971: ("Potassium", "Blood", "Chemistry", "mEq/L", 4.1, 0.4, 0.0),
    50861: ("Alanine Aminotransferase (ALT)", "Blood", "Chemistry", "IU/L", 24.0, 10.0, 0.0),
    50878: ("Asparate Aminotransferase (AST)", "Blood", "Chemistry", "IU/L", 26.0, 9.0, 1.5),
    50863: ("Alkaline Phosphatase", "Blood", "Chemistry", "IU/L", 78.0, 20.0, 11.0),
    50862: ("Albumin", "Blood", "Chemistry", "g/dL", 3.9, 0.35, -0.12),
    50954: ("Lactate Dehydrogenase (LD)", "Blood", "Chemistry", "IU/L", 195.0, 35.0, 22.0),
    51222: ("Hemoglobin", "Blood", "Hematology", "g/dL", 12.8, 1.3, -0.35),
    51301: ("White Blood Cells", "Blood", "Hematology", "K/uL", 7.4, 1.9, 0.3),
    51265: ("Platelet Count", "Blood", "Hematology", "K/uL", 250.0, 55.0, 14.0),
}

# (icd_code, icd_version, long_title): every code the generator writes.
ICD_CODES: list[tuple[str, int, str]] = [
    ("C50911", 10, "Malignant neoplasm of unspecified site of right female breast"),
    ("C50912", 10, "Malignant neoplasm of unspecified site of left female breast"),
    ("C50411", 10, "Malignant neoplasm of upper-outer quadrant of right female breast"),
    ("C50812", 10, "Malignant neoplasm of overlapping sites of left female breast"),
    ("C50921", 10, "Malignant neoplasm of unspecified site of right male breast"),
    ("D0511", 10, "Intraductal carcinoma in situ of right breast"),
    ("1749", 9, "Malignant neoplasm of breast (female), unspecified"),
    ("1744", 9, "Malignant neoplasm of upper-outer quadrant of female breast"),
    ("1759", 9, "Malignant neoplasm of other and unspecified sites of male breast"),
    ("2330", 9, "Carcinoma in situ of breast"),
    ("Z853", 10, "Personal history of malignant neoplasm of breast"),
    ("V103", 9, "Personal history of malignant neoplasm of breast"),
    ("Z803", 10, "Family history of malignant neoplasm of breast"),
    ("V163", 9, "Family history of malignant neoplasm of breast"),
    ("Z170", 10, "Estrogen receptor positive status [ER+]"),
    ("Z171", 10, "Estrogen receptor negative status [ER-]"),
    ("V860", 9, "Estrogen receptor positive status [ER+]"),
    ("C519", 10, "Malignant neoplasm of vulva, unspecified"),
    ("C800", 10, "Disseminated malignant neoplasm, unspecified"),
    ("1729", 9, "Melanoma of skin, site unspecified"),
    ("E119", 10, "Type 2 diabetes mellitus without complications"),
    ("25000", 9, "Diabetes mellitus without mention of complication, type II"),
    ("I10", 10, "Essential (primary) hypertension"),
    ("4019", 9, "Unspecified essential hypertension"),
    ("N183", 10, "Chronic kidney disease, stage 3 (moderate)"),
    ("5853", 9, "Chronic kidney disease, Stage III (moderate)"),
    ("E6601", 10, "Morbid (severe) obesity due to excess calories"),
    ("27800", 9, "Obesity, unspecified"),
    ("J449", 10, "Chronic obstructive pulmonary disease, unspecified"),
    ("496", 9, "Chronic airway obstruction, not elsewhere classified"),
    ("F329", 10, "Major depressive disorder, single episode, unspecified"),
    ("311", 9, "Depressive disorder, not elsewhere classified"),
    ("E785", 10, "Hyperlipidemia, unspecified"),
    ("2724", 9, "Other and unspecified hyperlipidemia"),
    ("K219", 10, "Gastro-esophageal reflux disease without esophagitis"),
    ("53081", 9, "Esophageal reflux"),
]
# comorbidity -> (ICD-10 code, ICD-9 code, prevalence)
COMORBIDITIES = {
    "diabetes": ("E119", "25000", 0.18),
    "hypertension": ("I10", "4019", 0.35),
    "ckd": ("N183", "5853", 0.08),
    "obesity": ("E6601", "27800", 0.12),
    "copd": ("J449", "496", 0.08),
    "depression": ("F329", "311", 0.15),
    "hyperlipidemia": ("E785", "2724", 0.25),
}
BREAST = {10: ["C50911", "C50912", "C50411", "C50812", "D0511"], 9: ["1749", "1744", "2330"]}
BREAST_MALE = {10: "C50921", 9: "1759"}
HISTORY = {10: "Z853", 9: "V103"}
FAMILY = {10: "Z803", 9: "V163"}
ER_STATUS = {10: ["Z170", "Z171"], 9: ["V860"]}
DISTRACTORS = [("C519", 10), ("C800", 10), ("1729", 9)]
FILLER = [("K219", 10), ("53081", 9)]

ADMISSION_TYPES = ["EW EMER.", "ELECTIVE", "URGENT", "OBSERVATION ADMIT", "SURGICAL SAME DAY ADMISSION"]
INSURANCE = ["Medicare", "Medicaid", "Private", "Other"]
RACES = ["WHITE", "BLACK/AFRICAN AMERICAN", "HISPANIC/LATINO - PUERTO RICAN", "ASIAN", "OTHER", "UNKNOWN"]


@dataclass(frozen=True)
class Subject:
    """One patient to generate: id, label and latent grade (negatives ignore theirs)."""

    subject_id: int
    positive: bool
    grade: float


def _write_gz_csv(df: pd.DataFrame, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt", newline="") as f:
        df.to_csv(f, index=False)


def _ts(t: pd.Timestamp) -> str:
    return t.strftime("%Y-%m-%d %H:%M:%S")


def _admission_codes(rng: np.random.Generator, s: Subject, female: bool, flags: dict[str, bool], icd9: bool,
                     a: int, index: int) -> list[tuple[str, int]]:
    """The (ICD code, version) list of admission ``a``: comorbidities, filler, the breast cancer code at the
    ``index`` admission, its history after it, family history and distractors, in MIMIC-IV's seq_num order."""
    version = 9 if icd9 else 10
    codes: list[tuple[str, int]] = []
    for name, (c10, c9, _) in COMORBIDITIES.items():
        if flags[name] and rng.random() < 0.8:
            codes.append((c9 if icd9 else c10, version))
    if rng.random() < 0.5:
        codes.append(FILLER[0] if not icd9 else FILLER[1])
    if s.positive and a == index:
        code = BREAST_MALE[version] if not female else str(rng.choice(BREAST[version]))
        codes.insert(int(rng.integers(0, len(codes) + 1)), (code, version))
        if version == 10:
            codes.append((str(rng.choice(ER_STATUS[10])), 10))
    if s.positive and a > index:
        codes.append((HISTORY[version], version))
        codes.append((str(rng.choice(ER_STATUS[version])), version))
    if rng.random() < 0.05:
        codes.append((FAMILY[version], version))
    if rng.random() < 0.04:
        codes.append(DISTRACTORS[int(rng.integers(len(DISTRACTORS)))])
    return codes


def _admission_labs(rng: np.random.Generator, subject_id: int, hadm: int, admit: pd.Timestamp,
                    disch: pd.Timestamp, lab_shift: dict[int, float], post: bool) -> list[dict]:
    """labevents rows (without labevent_id) of one admission: one to three draws, each lab mostly measured;
    ``post``: after the index admission, when treatment lowers them."""
    rows = []
    for _ in range(int(rng.integers(1, 4))):
        t = admit + pd.Timedelta(hours=float(rng.uniform(1, (disch - admit).total_seconds() / 3600)))
        for itemid, (_, _, _, unit, mean, sd, _) in LABS.items():
            if rng.random() < 0.15:
                continue
            val = rng.normal(mean + lab_shift[itemid] - (0.8 * sd if post else 0.0), sd)
            val = max(val, 0.05 * mean)
            text = rng.random() < 0.01
            rows.append({
                "subject_id": subject_id, "hadm_id": hadm,
                "specimen_id": int(rng.integers(1e7, 9e7)), "itemid": itemid,
                "order_provider_id": "", "charttime": _ts(t), "storetime": _ts(t + pd.Timedelta(hours=1)),
                "value": "___" if text else f"{val:.4g}", "valuenum": "" if text else f"{val:.4g}",
                "valueuom": unit, "ref_range_lower": "", "ref_range_upper": "", "flag": "",
                "priority": "ROUTINE", "comments": "",
            })
    return rows


def _vitals(rng: np.random.Generator, subject_id: int, admit: pd.Timestamp, sbp0: float, bmi: float,
            height_in: float) -> list[dict]:
    """omr rows: the outpatient vitals of a visit in the month before an admission."""
    day = (admit - pd.Timedelta(days=int(rng.integers(1, 30)))).strftime("%Y-%m-%d")
    sbp = int(rng.normal(sbp0, 8))
    bp = f"{sbp}/{int(sbp * rng.uniform(0.55, 0.7))}" if rng.random() > 0.02 else "130/"
    weight_lb = bmi * (height_in**2) / 703.0 * rng.normal(1.0, 0.02)
    return [{"subject_id": subject_id, "chartdate": day, "seq_num": seq, "result_name": name, "result_value": value}
            for seq, (name, value) in enumerate([
                ("Blood Pressure", bp),
                ("BMI (kg/m2)", f"{weight_lb * 703.0 / height_in**2:.1f}"),
                ("Weight (Lbs)", f"{weight_lb:.1f}"),
                ("Height (Inches)", f"{height_in:.1f}"),
            ], start=1)]


def _outpatient_labs(rng: np.random.Generator, subject_id: int, start: pd.Timestamp,
                     lab_shift: dict[int, float]) -> list[dict]:
    """labevents rows (without labevent_id) of a blood count drawn outside any admission before the first."""
    t = start - pd.Timedelta(days=int(rng.integers(5, 60)))
    rows = []
    for itemid in (51222, 51301):
        mean, sd = LABS[itemid][4], LABS[itemid][5]
        val = rng.normal(mean + lab_shift[itemid], sd)
        rows.append({
            "subject_id": subject_id, "hadm_id": "",
            "specimen_id": int(rng.integers(1e7, 9e7)), "itemid": itemid, "order_provider_id": "",
            "charttime": _ts(t), "storetime": _ts(t), "value": f"{val:.4g}", "valuenum": f"{val:.4g}",
            "valueuom": LABS[itemid][3], "ref_range_lower": "", "ref_range_upper": "", "flag": "",
            "priority": "ROUTINE", "comments": "",
        })
    return rows


def write_hosp(root: Path, subjects: list[Subject], rng: np.random.Generator, *, id_base: int) -> None:
    """Write ``root/hosp/*.csv.gz`` for ``subjects``.

    ``id_base`` keeps hadm_id and labevent_id unique across the sites of one
    generated federation, as they are unique across the real database.
    """
    patients, admissions, diagnoses, labs, omr = [], [], [], [], []
    hadm = id_base * 10
    labevent = id_base * 1000
    provider = [f"P{rng.integers(10000, 99999)}" for _ in range(20)]

    for s in subjects:
        female = rng.random() < (0.99 if s.positive else 0.55)
        age = int(np.clip(rng.normal(61 if s.positive else 55, 12 if s.positive else 18), 18, 91))
        anchor_year = int(rng.integers(2110, 2185))
        grp = int(rng.choice([2008, 2011, 2014, 2017, 2020]))
        patients.append({
            "subject_id": s.subject_id, "gender": "F" if female else "M", "anchor_age": age,
            "anchor_year": anchor_year, "anchor_year_group": f"{grp} - {grp + 2}", "dod": "",
        })
        bmi = float(np.clip(rng.normal(28.5 if s.positive else 27.0, 5.0), 16, 55))
        height_in = rng.normal(64.0 if female else 69.5, 2.8)
        sbp0 = rng.normal(128 if s.positive else 124, 14)
        flags = {name: rng.random() < p for name, (_, _, p) in COMORBIDITIES.items()}
        # Latent effects: grade for positives, a milder generic shift for everyone.
        z = s.grade if s.positive else 0.0
        lab_shift = {itemid: spec[6] * z + (0.15 * spec[5] if s.positive and itemid == 50863 else 0.0)
                     for itemid, spec in LABS.items()}

        n_adm = 0 if rng.random() < 0.04 and not s.positive else int(rng.integers(1, 6))
        start = pd.Timestamp(f"{anchor_year}-01-01") + pd.Timedelta(days=int(rng.integers(0, 300)))
        times = sorted(start + pd.Timedelta(days=int(d)) for d in rng.integers(0, 4 * 365, n_adm))
        index = int(rng.integers(0, n_adm)) if s.positive else -1
        icd9 = rng.random() < 0.4  # this subject's coding era
        for a, admit in enumerate(times):
            hadm += 1
            admit = admit + pd.Timedelta(hours=int(rng.integers(0, 24)))
            disch = admit + pd.Timedelta(hours=int(rng.integers(20, 24 * 9)))
            atype = str(rng.choice(ADMISSION_TYPES))
            ed = atype.startswith("EW")
            admissions.append({
                "subject_id": s.subject_id, "hadm_id": hadm, "admittime": _ts(admit), "dischtime": _ts(disch),
                "deathtime": "", "admission_type": atype, "admit_provider_id": str(rng.choice(provider)),
                "admission_location": "EMERGENCY ROOM" if ed else "PHYSICIAN REFERRAL",
                "discharge_location": str(rng.choice(["HOME", "HOME HEALTH CARE", "SKILLED NURSING FACILITY"])),
                "insurance": str(rng.choice(INSURANCE)), "language": "ENGLISH",
                "marital_status": str(rng.choice(["MARRIED", "SINGLE", "WIDOWED", "DIVORCED"])),
                "race": str(rng.choice(RACES)),
                "edregtime": _ts(admit - pd.Timedelta(hours=3)) if ed else "",
                "edouttime": _ts(admit) if ed else "", "hospital_expire_flag": 0,
            })
            codes = _admission_codes(rng, s, female, flags, icd9, a, index)
            for seq, (code, ver) in enumerate(codes, start=1):
                diagnoses.append({"subject_id": s.subject_id, "hadm_id": hadm, "seq_num": seq,
                                  "icd_code": code, "icd_version": ver})
            # After the index admission, treatment changes the labs.
            events = _admission_labs(rng, s.subject_id, hadm, admit, disch, lab_shift, s.positive and a > index)
            for event in events:
                labevent += 1
                labs.append({"labevent_id": labevent, **event})
            omr += _vitals(rng, s.subject_id, admit, sbp0, bmi, height_in)
        # Outpatient labs without an admission (empty hadm_id), around the first visit.
        if rng.random() < 0.3:
            for event in _outpatient_labs(rng, s.subject_id, start, lab_shift):
                labevent += 1
                labs.append({"labevent_id": labevent, **event})

    hosp = root / "hosp"
    _write_gz_csv(pd.DataFrame(patients), hosp / "patients.csv.gz")
    _write_gz_csv(pd.DataFrame(admissions), hosp / "admissions.csv.gz")
    _write_gz_csv(pd.DataFrame(diagnoses), hosp / "diagnoses_icd.csv.gz")
    _write_gz_csv(pd.DataFrame(ICD_CODES, columns=["icd_code", "icd_version", "long_title"]),
                  hosp / "d_icd_diagnoses.csv.gz")
    _write_gz_csv(pd.DataFrame(labs), hosp / "labevents.csv.gz")
    _write_gz_csv(pd.DataFrame([(i, v[0], v[1], v[2]) for i, v in LABS.items()],
                               columns=["itemid", "label", "fluid", "category"]), hosp / "d_labitems.csv.gz")
    _write_gz_csv(pd.DataFrame(omr), hosp / "omr.csv.gz")
