"""``fedfuse synth``: generated hospitals in the real BreCaHAD and MIMIC-IV layouts.

Each site folder holds what a real hospital would point fedfuse at::

    site-<k>/BreCaHAD/images/Case_<c>-<nn>.tif     RGB TIFF
    site-<k>/BreCaHAD/groundTruth/Case_<c>-<nn>.json
    site-<k>/mimic-iv/hosp/*.csv.gz
    site-<k>/linkage.csv                            case_id -> subject_id

and ``holdout/`` has the same layout with cases of its own: the server's
central test set. Sites differ in stain, blur and noise (``SiteStyle``) and in
their patients' grade mix; each holdout case takes the style of one of the
sites, so the holdout samples the federation's population, not a new scanner.

Presets:

* ``quick``: small tiles (512x384) and a mitotic rate raised to about 6 % of
  nuclei, so a demo trains in minutes and the holdout has enough mitoses to
  measure their AUC.
* ``brecahad``: the real data set's size across the sites: 17 cases, 162
  tiles of 1360x1024, about 145 points a tile and mitosis about 0.5 % of the
  nuclei. The holdout adds three cases on top.

The images and the EHR are generated from one latent grade per patient (see
``synth_images`` and ``synth_ehr``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from concurrent.futures import Executor, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from tqdm import tqdm

from shared.config import BRECAHAD_KEYS as POINT_KEYS
from simulations.runs import FolderError, check_replaceable, clear, mark
from simulations.synth_ehr import Subject, write_hosp
from simulations.synth_images import STAIN_E, STAIN_H, SiteStyle, TileSpec, render_tile


@dataclass(frozen=True)
class Preset:
    """Size of a generated federation."""

    tile: TileSpec
    total_cases: int | None  # split across the sites; None: cases_per_site each
    cases_per_site: int
    images_per_case: int | tuple[int, ...]
    total_images: int | None
    holdout_cases: int
    extra_subjects: int  # EHR-only subjects per site (other positives and negatives)


PRESETS: dict[str, Preset] = {
    "quick": Preset(
        tile=TileSpec(512, 384, n_tumor=28, n_non_tumor=10, n_mitosis=3.5, n_apoptosis=1.0, n_lumen=1.0,
                      n_non_lumen=1.0),
        total_cases=None, cases_per_site=6, images_per_case=4, total_images=None, holdout_cases=6,
        extra_subjects=60,
    ),
    "brecahad": Preset(
        # 3 % annotation noise moves tumour points to non_tumor: these means give the real totals after it.
        tile=TileSpec(1360, 1024, n_tumor=128, n_non_tumor=8.3, n_mitosis=0.7, n_apoptosis=1.6, n_lumen=3.0,
                      n_non_lumen=3.7),
        total_cases=17, cases_per_site=0, images_per_case=0, total_images=162, holdout_cases=3,
        extra_subjects=200,
    ),
}


def _site_plan(preset: Preset, sites: int, rng: np.random.Generator) -> list[list[int]]:
    """Images per case, for each site."""
    if preset.total_cases is None:
        return [[int(preset.images_per_case)] * preset.cases_per_site for _ in range(sites)]
    if sites > preset.total_cases:
        raise ValueError(f"preset has {preset.total_cases} cases; cannot make {sites} sites with one case each")
    per_site = np.array_split(np.arange(preset.total_cases), sites)
    images = np.full(preset.total_cases, preset.total_images // preset.total_cases)
    images[rng.permutation(preset.total_cases)[: preset.total_images % preset.total_cases]] += 1
    return [[int(images[c]) for c in cases] for cases in per_site]


def _write_tile(seed: int, spec: TileSpec, style: SiteStyle, grade: float, image_path: Path,
                truth_path: Path) -> dict[str, int]:
    """Render one tile from its own seed and write it and its ground truth; returns its point counts."""
    image, points = render_tile(np.random.default_rng(seed), spec, style, grade)
    Image.fromarray(image).save(image_path, format="TIFF")
    truth_path.write_text(json.dumps(points))
    return {k: len(points[k]) for k in POINT_KEYS}


def _write_site(
    folder: Path,
    images_per_case: list[int],
    styles: list[SiteStyle],
    grade_mean: float,
    preset: Preset,
    rng: np.random.Generator,
    id_base: int,
    bar: tqdm,
    pool: Executor,
) -> dict[str, int]:
    """Write one site (or the holdout): tiles, ground truth, EHR, linkage. Returns point counts.

    Each tile gets a seed of its own, drawn here in order, so the output is the
    same however many processes of ``pool`` render the tiles.
    """
    img_dir = folder / "BreCaHAD" / "images"
    gt_dir = folder / "BreCaHAD" / "groundTruth"
    img_dir.mkdir(parents=True, exist_ok=True)
    gt_dir.mkdir(parents=True, exist_ok=True)
    totals = dict.fromkeys(POINT_KEYS, 0)
    subjects, linkage, jobs = [], [], []
    for c, n_images in enumerate(images_per_case, start=1):
        grade = float(rng.normal(grade_mean, 1.0))
        subject_id = id_base + c
        subjects.append(Subject(subject_id, True, grade))
        linkage.append({"case_id": f"Case_{c}", "subject_id": subject_id})
        style = styles[(c - 1) % len(styles)]
        for i in range(1, n_images + 1):
            name = f"Case_{c}-{i:02d}"
            jobs.append(pool.submit(_write_tile, int(rng.integers(2**63)), preset.tile, style, grade,
                                    img_dir / f"{name}.tif", gt_dir / f"{name}.json"))
    n_cases = len(images_per_case)
    for j in range(preset.extra_subjects):
        positive = rng.random() < 0.3
        subjects.append(Subject(id_base + n_cases + 1 + j, positive, float(rng.normal(grade_mean, 1.0))))
    order = rng.permutation(len(subjects))  # real tables are not sorted by label
    write_hosp(folder / "mimic-iv", [subjects[i] for i in order], rng, id_base=id_base)
    pd.DataFrame(linkage).to_csv(folder / "linkage.csv", index=False)
    for job in jobs:
        for k, n in job.result().items():
            totals[k] += n
        bar.update()
    return totals


def is_ledger_folder(folder: Path) -> bool:
    """Whether ``folder`` keeps privacy ledgers: named as a site's ledger folder, or holding a ledger file (a
    ``privacy.ledger_dir`` of another name)."""
    from shared.privacy import LEDGER_FOLDER  # here: the tile workers need no torch

    return folder.name == LEDGER_FOLDER or any(folder.glob("ledger-*.json"))


def synth(out: Path, sites: int, seed: int, preset: str = "quick", replace: bool = False,
          workers: int | None = None, echo: Callable[[str], None] = print) -> dict[str, dict[str, int]]:
    """Generate ``sites`` hospitals and a holdout under ``out``; returns point counts per folder.

    ``out`` must be new or empty, so no hospital's tables or tiles are
    overwritten or mixed with generated ones; ``replace`` empties it first, but
    only if ``synth`` made it (its ``.fedfuse-data`` marker), and keeps its
    privacy ledgers (:func:`is_ledger_folder`, said with ``echo``): the same
    seed makes the same patients, whose spent epsilon must still count. ``workers``
    processes render the tiles (default: the CPUs this process may use, at
    most 4); the output does not depend on it. On a terminal, a
    progress bar counts the tiles (none in a log).
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; expected one of {sorted(PRESETS)}")
    if sites < 1:
        raise ValueError(f"--sites must be at least 1, got {sites}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out}: a file; expected a new or empty folder for the generated hospitals")
    if out.is_dir() and any(out.iterdir()):
        if not replace:
            raise FolderError(f"--out {out}: not empty; generated hospitals go into a new or empty folder, so no "
                              "data is overwritten or mixed (--force replaces a folder `fedfuse synth` made)")
        check_replaceable(out, "data", "--out")
        for kept in clear(out, keep=is_ledger_folder):
            echo(f"kept {kept}: privacy ledgers; regenerated patients are the same patients, so what they have "
                 "spent still counts (`fedfuse privacy reset` starts them over, on purpose)")
    mark(out, "data")  # first: a half-written folder is still one synth may replace
    p = PRESETS[preset]
    rng = np.random.default_rng(seed)
    styles = [SiteStyle.sample(rng) for _ in range(sites)]
    grade_means = rng.normal(0.0, 0.5, sites)
    plans = _site_plan(p, sites, rng)
    holdout_plan = [int(np.mean([n for plan in plans for n in plan]).round())] * p.holdout_cases
    counts = {}
    workers = workers or min(4, len(os.sched_getaffinity(0)))
    with tqdm(total=sum(map(sum, plans)) + sum(holdout_plan), desc="generating tiles", unit="tile",
              disable=None) as bar, ProcessPoolExecutor(workers) as pool:
        for k in range(sites):
            counts[f"site-{k}"] = _write_site(out / f"site-{k}", plans[k], [styles[k]], float(grade_means[k]), p,
                                              np.random.default_rng([seed, k]), 10_000_000 + 100_000 * k, bar, pool)
        counts["holdout"] = _write_site(out / "holdout", holdout_plan, styles, 0.0, p,
                                        np.random.default_rng([seed, 10_000]), 19_000_000, bar, pool)
    return counts


def write_stain_reference(path: Path | None = None) -> Path:
    """Remake ``shared/assets/stain_reference.png`` and, beside it, ``.json``: data.stain_reference ``shipped``.

    A 256 x 256 tile rendered with the textbook Ruifrok-Johnston H and E vectors at unit
    intensity, mild blur and noise, grade 0, seed 0: the appearance stain normalisation maps onto.
    The JSON holds its Reinhard and Macenko statistics, what the sites read.
    """
    from shared.stain import SHIPPED_IMAGE, WIDTH, reference_from_image

    path = Path(path or SHIPPED_IMAGE)
    style = SiteStyle(tuple(STAIN_H / np.linalg.norm(STAIN_H)), tuple(STAIN_E / np.linalg.norm(STAIN_E)),
                      h_scale=1.0, e_scale=1.0, blur_sigma=0.8, noise_std=3.0)
    spec = TileSpec(256, 256, n_tumor=14, n_non_tumor=5, n_mitosis=1, n_apoptosis=0.5, n_lumen=0.5, n_non_lumen=0.5)
    image, _ = render_tile(np.random.default_rng(0), spec, style, 0.0)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path, format="PNG")
    reference_from_image.cache_clear()
    stats = {m: reference_from_image(m, path).tolist() for m in WIDTH}
    path.with_suffix(".json").write_text(json.dumps({"image": path.name, **stats}, indent=1) + "\n")
    return path
