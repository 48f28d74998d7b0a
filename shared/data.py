"""Multimodal samples of one hospital folder: patch, the patient's EHR vector, patch class.

A hospital folder (a simulated ``site-<k>/``, the ``holdout/``, or a real
site's data directory) holds ``BreCaHAD/``, ``mimic-iv/`` and ``linkage.csv``.
Every source offers the same views (FLamby's idea): :func:`load_site` gives a
site's train and test splits, split by case (patient), never by patch.

Pairing of patches with EHR rows:

* ``linked``: ``linkage.csv`` (``case_id``, ``subject_id``) joins a case's
  patches to that patient's record, as inside one hospital.
* ``by_label``: BreCaHAD and MIMIC-IV share no patients, so a study on the two
  public sets pairs each patch with a random record whose cohort label matches
  ``label_map[patch class]``. The EHR then carries the label by construction:
  reports name the mode and show the EHR-only AUC as the leakage it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from shared.brecahad import Patches, load_patches
from shared.config import DataConfig
from shared.errors import DataFormatError
from shared.mimic import FEATURES, load_cohort, valid_ids
from shared.stain import normaliser_for


@dataclass(frozen=True)
class Samples:
    """Aligned arrays, one entry per patch (or per subject, for the EHR task)."""

    images: np.ndarray  # (n, P, P, 3) uint8
    ehr: np.ndarray  # (n, F) float32, NaN where the record has no value
    labels: np.ndarray  # (n,) int64
    cases: np.ndarray  # (n,) str: the patient, the unit of every split (linked: "subject-<id>")

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, mask: np.ndarray) -> Samples:
        return Samples(self.images[mask], self.ehr[mask], self.labels[mask], self.cases[mask])

    def prefixed(self, site: str) -> Samples:
        """The same samples with cases named ``<site>/<case>``, distinct when sites are pooled."""
        return Samples(self.images, self.ehr, self.labels, np.char.add(f"{site}/", self.cases.astype(str)))


def concat(parts: list[Samples]) -> Samples:
    """Several sites' samples as one (case names must already be distinct: see :meth:`Samples.prefixed`)."""
    fields = ("images", "ehr", "labels", "cases")
    return Samples(*[np.concatenate([getattr(p, f) for p in parts]) for f in fields])


def linkage_table(folder: Path) -> pd.DataFrame:
    """``linkage.csv`` of a hospital folder, checked: columns ``case_id``, ``subject_id``, ``row`` (1-based line).

    A case may be linked to one subject only; a subject may have several cases.
    """
    path = Path(folder) / "linkage.csv"
    if not path.is_file():
        raise DataFormatError(f"{folder}: no linkage.csv (columns case_id, subject_id) for data.pairing=linked")
    try:
        table = pd.read_csv(path, dtype=str)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise DataFormatError(f"{path}: cannot read as CSV: {err}") from None
    missing = [c for c in ("case_id", "subject_id") if c not in table.columns]
    if missing:
        raise DataFormatError(f"{path}: missing column(s) {', '.join(missing)}; expected case_id, subject_id")
    ids = pd.to_numeric(table["subject_id"], errors="coerce")
    bad = ~valid_ids(ids)
    if bad.any():
        row = int(bad.to_numpy().argmax()) + 2  # 1-based, after the header
        raise DataFormatError(f"{path}: row {row}: subject_id {table['subject_id'].iloc[row - 2]!r} is not an integer")
    table = pd.DataFrame({"case_id": table["case_id"].str.strip(), "subject_id": ids.astype(np.int64),
                          "row": np.arange(len(table)) + 2})
    clash = table.groupby("case_id")["subject_id"].nunique()
    if (clash > 1).any():
        raise DataFormatError(f"{path}: case_id {clash[clash > 1].index[0]!r} is linked to more than one subject_id")
    return table


def read_linkage(folder: Path) -> dict[str, int]:
    """``linkage.csv`` of a hospital folder as case_id -> subject_id."""
    table = linkage_table(folder)
    return dict(zip(table["case_id"], table["subject_id"]))


def cache_dir_for(folder: Path, cfg: DataConfig) -> Path:
    return Path(cfg.cache_dir) if cfg.cache_dir else Path(folder) / ".fedfuse-cache"


def load_cohort_samples(folder: Path, cfg: DataConfig) -> Samples:
    """The EHR task: one sample per subject of the folder's cohort; the label is breast cancer.

    ``images`` is empty (``(n, 0, 0, 3)``) so the same loops serve both tasks.
    """
    folder = Path(folder)
    cohort = load_cohort(folder / "mimic-iv", cfg.positive, cache_dir_for(folder, cfg)).table
    n = len(cohort)
    return Samples(np.zeros((n, 0, 0, 3), np.uint8), cohort[list(FEATURES)].to_numpy(np.float32),
                   cohort["label"].to_numpy(np.int64), cohort["subject_id"].astype(str).to_numpy())


def folder_patches(folder: Path, cfg: DataConfig, stain_reference: list[float] | None = None) -> Patches:
    """A hospital folder's patches as ``cfg`` cuts and normalises them, through its cache (one entry per setting)."""
    return load_patches(Path(folder) / "BreCaHAD", cfg.classes, cfg.patch_size, cfg.border,
                        cache_dir_for(folder, cfg), normaliser_for(cfg, stain_reference))


def load_folder(folder: Path, cfg: DataConfig, seed: int = 0, task: str = "patch",
                stain_reference: list[float] | None = None) -> Samples:
    """Every sample of a hospital folder: patches with their paired EHR vector, or cohort rows (``task="ehr"``).

    ``stain_reference``: the federation's, for ``data.stain_reference: federated`` (shared/stain.py).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataFormatError(f"{folder}: hospital data folder not found")
    if task == "ehr":
        return load_cohort_samples(folder, cfg)
    patches = folder_patches(folder, cfg, stain_reference)
    cohort = load_cohort(folder / "mimic-iv", cfg.positive, cache_dir_for(folder, cfg)).table
    features = cohort[list(FEATURES)].to_numpy(np.float32)
    row_of = pd.Series(np.arange(len(cohort)), index=cohort["subject_id"].to_numpy())
    if cfg.pairing == "linked":
        link = read_linkage(folder)
        missing = sorted(set(patches.cases) - set(link))
        if missing:
            raise DataFormatError(f"{folder / 'linkage.csv'}: no subject_id for case(s) {', '.join(missing)}")
        subjects = np.array([link[c] for c in patches.cases], np.int64)
        unknown = sorted(set(subjects.tolist()) - set(row_of.index))
        if unknown:
            raise DataFormatError(f"{folder / 'linkage.csv'}: subject_id(s) {unknown[:5]} not in "
                                  f"{folder / 'mimic-iv/hosp/patients.csv.gz'}")
        rows = row_of.loc[subjects].to_numpy()
        # The patient is the unit of every split: several cases (slides) of one subject stay together.
        units = np.char.add("subject-", subjects.astype(str))
    else:
        units = patches.cases
        rng = np.random.default_rng(seed)
        labels = cohort["label"].to_numpy()
        rows = np.empty(len(patches.labels), np.int64)
        for ci, cls in enumerate(cfg.classes):
            if cls not in cfg.label_map:
                raise DataFormatError(f"data.label_map: no EHR label for patch class {cls!r}")
            pool = np.flatnonzero(labels == cfg.label_map[cls])
            sel = patches.labels == ci
            if sel.any() and not len(pool):
                raise DataFormatError(f"{folder / 'mimic-iv'}: no cohort rows with label {cfg.label_map[cls]} "
                                      f"to pair with {cls!r} patches (data.pairing=by_label)")
            rows[sel] = rng.choice(pool, int(sel.sum())) if sel.any() else rows[sel]
    return Samples(patches.images, features[rows], patches.labels, units)


def split_by_case(samples: Samples, test_fraction: float, seed: int) -> tuple[Samples, Samples]:
    """Seeded train/test split of whole cases (patients; subjects for the EHR task): none on both sides."""
    cases = np.unique(samples.cases)
    if len(cases) < 2:
        raise DataFormatError(f"only {len(cases)} case(s) here; a train/test split by case needs at least 2")
    rng = np.random.default_rng(seed)
    n_test = min(len(cases) - 1, max(1, round(test_fraction * len(cases))))
    test_cases = rng.permutation(cases)[:n_test]
    is_test = np.isin(samples.cases, test_cases)
    return samples.subset(~is_test), samples.subset(is_test)


def split_by_patch(samples: Samples, test_fraction: float, seed: int) -> tuple[Samples, Samples]:
    """Seeded train/test split of single samples: a case's patches land on both sides (the study's protocol, as
    far as it can be read; ``data.split: patch``). Neighbouring patches of one tile overlap, so the test split
    holds pixels the model trained on: what such a split measures is recall, not generalisation."""
    if len(samples) < 2:
        raise DataFormatError(f"only {len(samples)} sample(s) here; a train/test split needs at least 2")
    rng = np.random.default_rng(seed)
    n_test = min(len(samples) - 1, max(1, round(test_fraction * len(samples))))
    is_test = np.zeros(len(samples), dtype=bool)
    is_test[rng.permutation(len(samples))[:n_test]] = True
    return samples.subset(~is_test), samples.subset(is_test)


def split(samples: Samples, cfg: DataConfig, seed: int) -> tuple[Samples, Samples]:
    """(train, test) by ``cfg.split``: whole cases (the default, and fedfuse's protocol) or single patches."""
    return (split_by_patch if cfg.split == "patch" else split_by_case)(samples, cfg.test_fraction, seed)


def load_site(folder: Path, cfg: DataConfig, seed: int, task: str = "patch",
              stain_reference: list[float] | None = None) -> tuple[Samples, Samples]:
    """A site's (train, test) samples."""
    return split(load_folder(folder, cfg, seed, task, stain_reference), cfg, seed)


def load_sites(cfg: DataConfig, seed: int, task: str = "patch") -> list[tuple[Samples, Samples]]:
    """Every simulated site's (train, test), ``<root>/site-<k>`` for k < ``sites``, each split with seed + k as the
    site itself does (``shared.partition.site_samples``)."""
    return [load_site(Path(cfg.root) / f"site-{k}", cfg, seed + k, task) for k in range(cfg.sites)]


def load_pooled(root: Path, cfg: DataConfig, seed: int, task: str = "patch",
                stain_reference: list[float] | None = None) -> Samples:
    """Every ``site-<k>`` folder under ``root`` in one set; cases named ``site-<k>/Case_<c>`` stay distinct."""
    folders = sorted(Path(root).glob("site-*"), key=lambda p: (len(p.name), p.name))
    if not folders:
        raise DataFormatError(f"{root}: no site-<k> folders to pool")
    return concat([load_folder(folder, cfg, seed + k, task, stain_reference).prefixed(folder.name)
                   for k, folder in enumerate(folders)])


def ehr_statistics(ehr: np.ndarray) -> dict[str, np.ndarray]:
    """Per-feature count, sum and sum of squares of the observed values: what a site may share."""
    observed = ~np.isnan(ehr)
    x = np.where(observed, ehr, 0.0).astype(np.float64)
    return {"count": observed.sum(0).astype(np.float64), "sum": x.sum(0), "sumsq": (x**2).sum(0)}


def pooled_moments(stats: list[dict[str, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation per feature from the sites' :func:`ehr_statistics`."""
    n = sum(s["count"] for s in stats)
    total = sum(s["sum"] for s in stats)
    total_sq = sum(s["sumsq"] for s in stats)
    mean = np.divide(total, n, out=np.zeros_like(total), where=n > 0)
    var = np.divide(total_sq, n, out=np.zeros_like(total), where=n > 0) - mean**2
    std = np.sqrt(np.clip(var, 0, None))
    return mean.astype(np.float32), np.where(std > 1e-6, std, 1.0).astype(np.float32)
