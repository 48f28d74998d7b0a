"""A hospital's data folder, checked before it joins a federation: every problem at once, and the counts.

The loaders stop at the first bad file, which is right for training; a site
preparing to join wants the whole list. :func:`check_site` reads each part
of the folder on its own (every TIFF decoded, every ground-truth file parsed,
every MIMIC-IV table's header, the cohort built, the linkage matched both
ways) and collects what is wrong, each problem naming its file, row or key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from shared.brecahad import BRECAHAD_TILE, NAME, read_image, read_points
from shared.config import DataConfig
from shared.data import linkage_table
from shared.errors import DataFormatError
from shared.mimic import build_cohort, table_problems

SHOWN = 5  # rows named in one problem; the rest are counted


@dataclass
class SiteReport:
    folder: Path
    problems: list[str] = field(default_factory=list)
    counts: dict[str, object] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems


def _rows(table, what: str) -> str:
    shown = ", ".join(f"row {r} ({c})" for r, c in zip(table["row"][:SHOWN], table[what][:SHOWN]))
    return shown + (f" and {len(table) - SHOWN} more" if len(table) > SHOWN else "")


def _check_images(folder: Path, classes: tuple[str, ...], patch_size: int, report: SiteReport) -> set[str]:
    """BreCaHAD/: every image decodes, holds a whole patch and has a valid ground truth; returns the cases seen."""
    images, truth = folder / "images", folder / "groundTruth"
    missing = [d for d in (images, truth) if not d.is_dir()]
    for d in missing:
        report.problems.append(f"{d}: missing (a BreCaHAD folder holds images/ and groundTruth/)")
    if missing:
        return set()
    cases, tiles, points = set(), 0, dict.fromkeys(classes, 0)
    for img in sorted(p for p in images.iterdir() if p.suffix.lower() in (".tif", ".tiff")):
        m = NAME.match(img.stem)
        if not m:
            report.problems.append(f"{img}: file name should be Case_<case>-<nn>.tif")
            continue
        gt = truth / f"{img.stem}.json"
        try:
            height, width = read_image(img).shape[:2]
        except DataFormatError as err:
            report.problems.append(str(err))
            continue
        if min(width, height) < patch_size:  # its patches would be mostly reflected padding, or all dropped
            report.problems.append(f"{img}: {width}x{height} pixels, smaller than one {patch_size}x{patch_size} "
                                   "patch (data.patch_size); expected a tile of a slide, such as BreCaHAD's "
                                   f"{BRECAHAD_TILE[0]}x{BRECAHAD_TILE[1]}")
            continue
        if not gt.is_file():
            report.problems.append(f"{img}: no ground truth; expected {gt}")
            continue
        try:
            pts = read_points(gt)
        except DataFormatError as err:
            report.problems.append(str(err))
            continue
        tiles += 1
        cases.add(f"Case_{int(m.group(1))}")
        for cls in classes:  # the config allows BreCaHAD keys only
            points[cls] += len(pts[cls])
    stems = {p.stem for p in images.iterdir()}
    for gt in sorted(truth.glob("*.json")):
        if gt.stem not in stems:
            report.problems.append(f"{gt}: ground truth without an image (expected {images / (gt.stem + '.tif')})")
    if not tiles:
        report.problems.append(f"{images}: no readable Case_<case>-<nn>.tif image with its ground truth")
    report.counts.update(images=tiles, cases=len(cases), points=points)
    return cases


def check_site(folder: Path, cfg: DataConfig) -> SiteReport:
    """Everything wrong with a hospital folder (``BreCaHAD/``, ``mimic-iv/``, ``linkage.csv``), and its counts."""
    folder = Path(folder)
    report = SiteReport(folder)
    if not folder.is_dir():
        report.problems.append(f"{folder}: not a folder")
        return report
    cases = _check_images(folder / "BreCaHAD", cfg.classes, cfg.patch_size, report)

    mimic = folder / "mimic-iv"
    subjects = None
    tables = table_problems(mimic)
    report.problems += tables
    if not tables:
        try:
            cohort = build_cohort(mimic, cfg.positive)
        except DataFormatError as err:
            report.problems.append(str(err))
        else:
            subjects = set(cohort.table["subject_id"].tolist())
            report.counts.update(subjects=len(subjects), positives=int(cohort.table["label"].sum()),
                                 skipped_rows=cohort.skipped)

    if cfg.pairing == "linked":
        try:
            link = linkage_table(folder)
        except DataFormatError as err:
            report.problems.append(str(err))
        else:
            path = folder / "linkage.csv"
            if cases:
                stray = link[~link["case_id"].isin(cases)]
                if len(stray):
                    report.problems.append(f"{path}: {len(stray)} row(s) name a case with no image in "
                                           f"{folder / 'BreCaHAD/images'}: {_rows(stray, 'case_id')}")
                unlinked = sorted(cases - set(link["case_id"]))
                if unlinked:
                    report.problems.append(f"{path}: no row for case(s) {', '.join(unlinked)}; their patches "
                                           "cannot be paired with an EHR record")
            if subjects is not None:
                unknown = link[~link["subject_id"].isin(subjects)]
                if len(unknown):
                    report.problems.append(f"{path}: {len(unknown)} row(s) name a subject_id that is not in "
                                           f"{mimic / 'hosp/patients'}: {_rows(unknown, 'subject_id')}")
            report.counts["linked_cases"] = int(link["case_id"].isin(cases).sum())
    if cases and len(cases) < 2:
        report.problems.append(f"{folder}: only {len(cases)} case; a train/test split by patient needs at least 2")
    return report
