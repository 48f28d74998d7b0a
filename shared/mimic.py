"""Build a one-row-per-patient cohort from MIMIC-IV's ``hosp`` module.

Label: breast cancer, by ICD code *and* version together (codes are stored
without dots). By default invasive cancer (ICD-9 174.x female, 175.x male;
ICD-10 C50.x) and carcinoma in situ (ICD-9 233.0; ICD-10 D05.x) count as
positive. Personal history (Z85.3 / V10.3), family history (Z80.3 / V16.3)
and ER status (Z17.x / V86.x) do not: they say nothing of current disease.

No leakage from the label into the features:

* each subject has an *index* admission: for a positive the earliest
  admission with a breast cancer code; for everyone else one admission picked
  by a hash of the subject_id (anywhere in the record, as for positives, so
  the length of history before the index does not give the label away).
  Features use only data up to the index admission's discharge time (labs by
  ``charttime``, omr by ``chartdate``, diagnoses of admissions that started no
  later than the index one). A subject with no admission gets no cut-off;
* the only diagnosis features are fixed comorbidity groups, none
  breast-related, so no history, family-history, ER-status or in-situ code can
  ever become a feature.

Messy rows are counted and skipped, never fatal: empty ``valuenum``, itemids
missing from ``d_labitems``, impossible values, malformed blood pressures. A
subject_id listed in ``patients`` with conflicting sex, age or anchor year is
left out (which row is the patient cannot be known), and counted.
Tables are read with only the needed columns; ``labevents`` in chunks.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from shared.cache import cached_arrays, fingerprint
from shared.errors import DataFormatError

# group -> {icd_version: code prefixes}
BREAST_GROUPS: dict[str, dict[int, tuple[str, ...]]] = {
    "invasive": {9: ("174", "175"), 10: ("C50",)},
    "in_situ": {9: ("2330",), 10: ("D05",)},
    "history": {9: ("V103",), 10: ("Z853",)},
    "family_history": {9: ("V163",), 10: ("Z803",)},
    "er_status": {9: ("V860", "V861"), 10: ("Z170", "Z171")},
}
# comorbidity feature -> {icd_version: code prefixes}
COMORBIDITIES: dict[str, dict[int, tuple[str, ...]]] = {
    "diabetes": {9: ("250",), 10: ("E10", "E11", "E13")},
    "hypertension": {9: ("401", "402", "403", "404", "405"), 10: ("I10", "I11", "I12", "I13", "I15")},
    "ckd": {9: ("585",), 10: ("N18",)},
    "obesity": {9: ("2780",), 10: ("E66",)},
    "copd": {9: ("491", "492", "496"), 10: ("J43", "J44")},
    "depression": {9: ("2962", "2963", "311"), 10: ("F32", "F33")},
    "hyperlipidemia": {9: ("272",), 10: ("E78",)},
}
# MIMIC-IV itemid -> (feature name, plausible range): common blood labs.
LAB_PANEL: dict[int, tuple[str, float, float]] = {
    50912: ("creatinine", 0.05, 30.0),
    50931: ("glucose", 10.0, 2000.0),
    50983: ("sodium", 90.0, 200.0),
    50971: ("potassium", 1.0, 12.0),
    50861: ("alt", 0.0, 10000.0),
    50878: ("ast", 0.0, 10000.0),
    50863: ("alk_phos", 0.0, 5000.0),
    50862: ("albumin", 0.5, 7.0),
    50954: ("ldh", 10.0, 20000.0),
    51222: ("hemoglobin", 1.0, 25.0),
    51301: ("wbc", 0.0, 500.0),
    51265: ("platelets", 1.0, 3000.0),
}
# omr result_name prefix -> feature (names vary: "BMI (kg/m2)", "BMI", "Weight (Lbs)", ...)
OMR_NAMES = {"bmi": "bmi", "weight": "weight_lbs", "height": "height_in", "blood pressure": "bp"}

FEATURES: tuple[str, ...] = (
    "age", "gender_male", "bmi", "weight_lbs", "height_in", "sbp", "dbp", "n_admissions",
    *[f"lab_{name}" for name, _, _ in LAB_PANEL.values()],
    *[f"comorb_{name}" for name in COMORBIDITIES],
)

REQUIRED: dict[str, tuple[str, ...]] = {
    "patients": ("subject_id", "gender", "anchor_age", "anchor_year"),
    "admissions": ("subject_id", "hadm_id", "admittime", "dischtime"),
    "diagnoses_icd": ("subject_id", "hadm_id", "icd_code", "icd_version"),
    "d_labitems": ("itemid",),
    "labevents": ("subject_id", "itemid", "charttime", "valuenum"),
    "omr": ("subject_id", "chartdate", "seq_num", "result_name", "result_value"),
}
LAB_CHUNK = 1_000_000
FAR_FUTURE = pd.Timestamp("9999-12-31")  # the cut-off of a subject without admissions: keep everything


@dataclass(frozen=True)
class Cohort:
    """One row per subject_id: ``label`` (1 = breast cancer) and :data:`FEATURES`."""

    table: pd.DataFrame  # columns: subject_id, label, *FEATURES
    skipped: dict[str, int]


def _table(hosp: Path, name: str) -> Path:
    for candidate in (hosp / f"{name}.csv.gz", hosp / f"{name}.csv"):
        if candidate.is_file():
            return candidate
    raise DataFormatError(f"{hosp}: missing table {name}.csv.gz (MIMIC-IV hosp module)")


def _read(hosp: Path, name: str, **kwargs) -> pd.DataFrame:
    path = _table(hosp, name)
    try:
        header = pd.read_csv(path, nrows=0).columns
    except (pd.errors.EmptyDataError, pd.errors.ParserError, OSError, EOFError, UnicodeDecodeError) as err:
        raise DataFormatError(f"{path}: cannot read as CSV: {err}") from None
    missing = [c for c in REQUIRED[name] if c not in header]
    if missing:
        raise DataFormatError(f"{path}: missing column(s) {', '.join(missing)}; expected at least "
                              f"{', '.join(REQUIRED[name])}")
    try:
        return pd.read_csv(path, usecols=list(REQUIRED[name]), **kwargs)
    except (pd.errors.ParserError, OSError, EOFError, UnicodeDecodeError, ValueError) as err:
        raise DataFormatError(f"{path}: cannot read (truncated or malformed?): {err}") from None


def _matches(codes: pd.Series, versions: pd.Series, groups: dict[int, tuple[str, ...]]) -> pd.Series:
    hit = pd.Series(False, index=codes.index)
    for version, prefixes in groups.items():
        hit |= (versions == version) & codes.str.startswith(prefixes)
    return hit


def valid_ids(ids: pd.Series) -> pd.Series:
    """Which parsed ids are whole numbers an int64 holds (not NaN, 1e309, -3 or 2.5)."""
    return ids.notna() & ids.between(0, 2**62) & (ids == np.floor(ids))


def _numeric_ids(df: pd.DataFrame, col: str, skipped: dict[str, int], what: str) -> pd.DataFrame:
    ids = pd.to_numeric(df[col], errors="coerce")
    bad = ~valid_ids(ids)
    if bad.any():
        skipped[what] = skipped.get(what, 0) + int(bad.sum())
    df = df.loc[~bad].copy()
    df[col] = ids[~bad].astype(np.int64)
    return df


def _one_row_per_subject(patients: pd.DataFrame, skipped: dict[str, int]) -> pd.DataFrame:
    """``patients`` with one row per subject_id: a repeated row is dropped, a subject whose rows disagree is left out.

    Rows of one subject_id that give another sex, anchor age or anchor year
    are two people under one id, or a broken merge. Keeping the first (as
    ``drop_duplicates`` would) gives the model an age or sex that may be the
    other person's, and their diagnoses and labs, keyed by the same id, cannot
    be told apart either: the subject is left out, all its rows counted under
    ``patients_conflicting_duplicates``. Identical rows are counted under
    ``patients_repeated_rows`` and kept once.
    """
    facts = pd.DataFrame({"subject_id": patients["subject_id"],
                          "sex": patients["gender"].fillna("").str.strip().str.upper(),
                          "age": pd.to_numeric(patients["anchor_age"], errors="coerce"),
                          "year": pd.to_numeric(patients["anchor_year"], errors="coerce")})
    distinct = facts.drop_duplicates()  # NaN equals NaN here: two rows missing the same fact agree
    conflicting = patients["subject_id"].isin(distinct.loc[distinct["subject_id"].duplicated(), "subject_id"])
    repeated = ~conflicting & patients["subject_id"].duplicated()
    skipped["patients_conflicting_duplicates"] = int(conflicting.sum())
    skipped["patients_repeated_rows"] = int(repeated.sum())
    return patients.loc[~conflicting & ~repeated]


def build_cohort(root: Path, positive: tuple[str, ...] = ("invasive", "in_situ")) -> Cohort:
    """Cohort of the MIMIC-IV root ``root`` (the folder holding ``hosp/``)."""
    hosp = Path(root) / "hosp"
    if not hosp.is_dir():
        raise DataFormatError(f"{root}: expected a MIMIC-IV root with a hosp/ folder")
    for g in positive:
        if g not in BREAST_GROUPS:
            raise ValueError(f"data.positive: unknown group {g!r}; expected some of {', '.join(BREAST_GROUPS)}")
    skipped: dict[str, int] = {}

    patients = _numeric_ids(_read(hosp, "patients", dtype=str), "subject_id", skipped, "patients_bad_id")
    patients = _one_row_per_subject(patients, skipped)
    out = pd.DataFrame({"subject_id": patients["subject_id"].to_numpy()})
    out["gender_male"] = (patients["gender"].str.upper() == "M").astype(float).to_numpy()
    anchor_age = pd.to_numeric(patients["anchor_age"], errors="coerce").to_numpy()
    anchor_year = pd.to_numeric(patients["anchor_year"], errors="coerce").to_numpy()

    adm = _numeric_ids(_read(hosp, "admissions", dtype=str), "hadm_id", skipped, "admissions_bad_id")
    adm = _numeric_ids(adm, "subject_id", skipped, "admissions_bad_id")
    adm["admittime"] = pd.to_datetime(adm["admittime"], errors="coerce")
    adm["dischtime"] = pd.to_datetime(adm["dischtime"], errors="coerce")
    bad_time = adm["admittime"].isna()
    skipped["admissions_bad_time"] = int(bad_time.sum())
    adm = adm.loc[~bad_time]
    adm["dischtime"] = adm["dischtime"].fillna(adm["admittime"])

    dx = _read(hosp, "diagnoses_icd", dtype=str)
    dx = _numeric_ids(dx, "hadm_id", skipped, "diagnoses_bad_id")
    dx = _numeric_ids(dx, "subject_id", skipped, "diagnoses_bad_id")
    dx["icd_code"] = dx["icd_code"].fillna("").str.strip().str.upper().str.replace(".", "", regex=False)
    dx["icd_version"] = pd.to_numeric(dx["icd_version"], errors="coerce")
    bad_version = ~dx["icd_version"].isin([9, 10])
    skipped["diagnoses_bad_version"] = int(bad_version.sum())
    dx = dx.loc[~bad_version]
    groups = {v: tuple(p for g in positive for p in BREAST_GROUPS[g].get(v, ())) for v in (9, 10)}
    dx["breast"] = _matches(dx["icd_code"], dx["icd_version"], groups)
    dx = dx.merge(adm[["hadm_id", "admittime"]], on="hadm_id", how="left")
    no_adm = dx["admittime"].isna()
    skipped["diagnoses_without_admission"] = int(no_adm.sum())

    # Label: any positive code, on any row (the code is the evidence, whether or not its admission is on file).
    positive_ids = set(dx.loc[dx["breast"], "subject_id"])
    out["label"] = out["subject_id"].isin(positive_ids).astype(int)

    # Index admission. A positive's is its first admission with a breast cancer code. Everyone else's (and
    # a positive's whose coded admission is not on file) is one of their admissions picked by a hash of the
    # subject_id: anywhere in the record, as a positive's is. Taking negatives' last admission instead made
    # the amount of history before the index (admission count, age, lab coverage) predict the label.
    first_breast = dx.loc[dx["breast"] & ~no_adm].groupby("hadm_id").size().index
    adm_pos = adm.loc[adm["hadm_id"].isin(first_breast)].sort_values("admittime").groupby("subject_id").head(1)
    others = adm.loc[~adm["subject_id"].isin(adm_pos["subject_id"])].sort_values(["subject_id", "admittime"],
                                                                                 kind="stable")
    count = others.groupby("subject_id")["hadm_id"].transform("size")
    pick = (others["subject_id"] * 2654435761 % 2**32) % count  # Knuth's multiplicative hash
    index = pd.concat([adm_pos, others.loc[others.groupby("subject_id").cumcount() == pick]])
    index = index.set_index("subject_id")
    admit_at = out["subject_id"].map(index["admittime"])
    lost = out["label"].eq(1) & ~out["subject_id"].isin(adm_pos["subject_id"])
    skipped["positives_without_index_admission"] = int(lost.sum())
    cutoff = out["subject_id"].map(index["dischtime"]).fillna(FAR_FUTURE)  # no admission: nothing to cut
    cut = pd.Series(cutoff.to_numpy(), index=out["subject_id"])

    year = admit_at.dt.year.to_numpy(dtype=float)
    out["age"] = np.where(np.isnan(year), anchor_age, anchor_age + (year - anchor_year))
    before = adm.loc[adm["admittime"] <= adm["subject_id"].map(cut)]
    out["n_admissions"] = out["subject_id"].map(before.groupby("subject_id").size()).fillna(0).to_numpy()

    index_admit = pd.Series(admit_at.fillna(FAR_FUTURE).to_numpy(), index=out["subject_id"])
    dx_before = dx.loc[~no_adm & (dx["admittime"] <= dx["subject_id"].map(index_admit))]
    for name, grp in COMORBIDITIES.items():
        ids = set(dx_before.loc[_matches(dx_before["icd_code"], dx_before["icd_version"], grp), "subject_id"])
        out[f"comorb_{name}"] = out["subject_id"].isin(ids).astype(float).to_numpy()

    _add_omr(out, hosp, cut, skipped)
    _add_labs(out, hosp, cut, skipped)
    out = out[["subject_id", "label", *FEATURES]].sort_values("subject_id").reset_index(drop=True)
    return Cohort(out, {k: v for k, v in skipped.items() if v})


def _add_omr(out: pd.DataFrame, hosp: Path, cut: pd.Series, skipped: dict[str, int]) -> None:
    """Latest BMI, weight, height and blood pressure charted on or before the cut-off day."""
    omr = _numeric_ids(_read(hosp, "omr", dtype=str), "subject_id", skipped, "omr_bad_id")
    omr["day"] = pd.to_datetime(omr["chartdate"], errors="coerce")
    name = omr["result_name"].fillna("").str.strip().str.lower()
    omr["feature"] = None
    for prefix, feat in OMR_NAMES.items():
        omr.loc[name.str.startswith(prefix) & omr["feature"].isna(), "feature"] = feat
    omr = omr.loc[omr["feature"].notna() & omr["day"].notna()]
    limit = omr["subject_id"].map(cut).dt.normalize()
    omr["seq"] = pd.to_numeric(omr["seq_num"], errors="coerce")
    omr = omr.loc[omr["day"] <= limit].sort_values(["day", "seq"], kind="stable")  # "latest" is well defined
    value = omr["result_value"].fillna("").str.strip()

    bp = omr["feature"] == "bp"
    parts = value[bp].str.extract(r"^(\d{2,3})\s*/\s*(\d{2,3})$").astype(float)
    ok = parts.notna().all(axis=1) & (parts[0] > parts[1]) & parts[0].between(50, 300) & parts[1].between(20, 200)
    skipped["omr_bad_blood_pressure"] = int((~ok).sum())
    good_bp = omr.loc[bp].loc[ok]
    for col, feat in ((0, "sbp"), (1, "dbp")):
        s = pd.Series(parts.loc[ok, col].to_numpy(), index=good_bp.index)
        out[feat] = out["subject_id"].map(s.groupby(good_bp["subject_id"]).last())

    rest = omr.loc[~bp]
    num = pd.to_numeric(value[~bp], errors="coerce")
    limits = {"bmi": (8, 120), "weight_lbs": (40, 1000), "height_in": (36, 96)}
    for feat, (lo, hi) in limits.items():
        sel = (rest["feature"] == feat)
        good = sel & num.between(lo, hi)
        skipped[f"omr_bad_{feat}"] = int((sel & ~num.between(lo, hi)).sum())
        out[feat] = out["subject_id"].map(num[good].groupby(rest.loc[good, "subject_id"]).last())


def _add_labs(out: pd.DataFrame, hosp: Path, cut: pd.Series, skipped: dict[str, int]) -> None:
    """Mean of each panel lab up to the cut-off, read in chunks (labevents is the big table)."""
    known = _read(hosp, "d_labitems", dtype=str)
    known_ids = set(pd.to_numeric(known["itemid"], errors="coerce").dropna().astype(int))
    panel = {i: v for i, v in LAB_PANEL.items() if i in known_ids}
    parts = []
    path = _table(hosp, "labevents")
    _read(hosp, "labevents", nrows=0)  # checks the columns: a missing one is named with the file
    for k in ("lab_unknown_itemid", "lab_empty_valuenum", "lab_implausible"):
        skipped[k] = 0
    try:
        for chunk in pd.read_csv(path, usecols=list(REQUIRED["labevents"]), dtype=str, chunksize=LAB_CHUNK):
            parts.append(_lab_chunk(chunk, panel, known_ids, cut, skipped))
    except (pd.errors.ParserError, OSError, EOFError, UnicodeDecodeError) as err:
        raise DataFormatError(f"{path}: cannot read (truncated or malformed?): {err}") from None
    totals = pd.concat(parts).groupby(level=[0, 1]).sum() if parts else None
    for itemid, (name, _, _) in LAB_PANEL.items():
        if totals is None or itemid not in totals.index.get_level_values(1):
            out[f"lab_{name}"] = np.nan
            continue
        t = totals.xs(itemid, level=1)
        out[f"lab_{name}"] = out["subject_id"].map(t["sum"] / t["count"])


def _lab_chunk(chunk: pd.DataFrame, panel: dict, known_ids: set, cut: pd.Series, skipped: dict[str, int]):
    """Sum and count of the usable panel values per (subject, itemid) in one chunk of labevents."""
    chunk = _numeric_ids(chunk, "subject_id", skipped, "lab_bad_id")
    itemid = pd.to_numeric(chunk["itemid"], errors="coerce")
    unknown = ~itemid.isin(known_ids)
    skipped["lab_unknown_itemid"] += int(unknown.sum())
    chunk = chunk.loc[~unknown & itemid.isin(panel)].assign(itemid=itemid)
    value = pd.to_numeric(chunk["valuenum"], errors="coerce")
    skipped["lab_empty_valuenum"] += int(value.isna().sum())
    lo = chunk["itemid"].map({i: v[1] for i, v in panel.items()})
    hi = chunk["itemid"].map({i: v[2] for i, v in panel.items()})
    plausible = value.between(lo, hi)
    skipped["lab_implausible"] += int((value.notna() & ~plausible).sum())
    t = pd.to_datetime(chunk["charttime"], errors="coerce")
    keep = plausible & t.notna() & (t <= chunk["subject_id"].map(cut))
    kept = pd.DataFrame({"subject_id": chunk.loc[keep, "subject_id"], "itemid": chunk.loc[keep, "itemid"],
                         "value": value[keep]})
    return kept.groupby(["subject_id", "itemid"])["value"].agg(["sum", "count"])


def table_problems(root: Path) -> list[str]:
    """What is wrong with each table the cohort needs (missing, unreadable header, missing columns); [] if none.

    Reads a few rows of each table, so it lists every broken table at once
    where :func:`build_cohort` stops at the first.
    """
    hosp = Path(root) / "hosp"
    if not hosp.is_dir():
        return [f"{root}: expected a MIMIC-IV root with a hosp/ folder"]
    problems = []
    for name in REQUIRED:
        try:
            _read(hosp, name, dtype=str, nrows=5)
        except DataFormatError as err:
            problems.append(str(err))
    return problems


def load_cohort(root: Path, positive: tuple[str, ...], cache_dir: Path | None) -> Cohort:
    """:func:`build_cohort` through the on-disk cache."""
    hosp = Path(root) / "hosp"
    if not hosp.is_dir():
        raise DataFormatError(f"{root}: expected a MIMIC-IV root with a hosp/ folder")
    key = fingerprint("cohort-v3", str(hosp.resolve()), positive, *sorted(hosp.glob("*.csv*")))

    def build() -> dict[str, np.ndarray]:
        c = build_cohort(root, positive)
        return {
            "subject_id": c.table["subject_id"].to_numpy(),
            "label": c.table["label"].to_numpy(),
            "features": c.table[list(FEATURES)].to_numpy(float),
            "skipped_keys": np.array(list(c.skipped), dtype=str),
            "skipped_values": np.array(list(c.skipped.values()), dtype=np.int64),
        }

    a = cached_arrays(cache_dir, f"cohort-{key}", build)
    table = pd.DataFrame(a["features"], columns=list(FEATURES))
    table.insert(0, "label", a["label"])
    table.insert(0, "subject_id", a["subject_id"])
    return Cohort(table, dict(zip(a["skipped_keys"].tolist(), a["skipped_values"].tolist())))
