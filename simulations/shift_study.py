"""``fedfuse shift-study``: stain normalisation, stain augmentation and FedBN, scored on unseen hospitals.

Leave one site out (as ``fedfuse loso``): for each hospital k the federation
trains without k, and the final model is scored on every patch of k, a
hospital whose stain, blur and noise it never saw (the ``brecahad`` preset's
sites differ in all three by construction). Per model (``cnn`` and
``fusion``) and seed, under each *condition*:

* ``none``: no remedy (the usual flips and rotations only);
* ``reinhard``, ``macenko``: stain normalisation onto the shipped reference
  (``data.stain_norm``; the held-out hospital normalises its own tiles too);
* ``augmentation``: HED stain jitter (``train.hed_jitter``) on top of the flips;
* ``fedbn``: a BatchNorm CNN whose statistics stay at each site; the unseen
  hospital estimates its own from its unlabeled patches;
* ``combined``: the better normalisation of the two (by mean macro AUC over
  both models), augmentation and FedBN together.

Cells (model, condition, held-out site, seed) run two at a time, each in its
own process with the same ServerApp and ClientApp as a deployment through the
in-process Grid (``simulations/inprocess.py``), and are cached under
``<out>/cells/`` so an interrupted study continues. Outputs: ``shift_study.md``
and ``.csv`` (macro AUC and mitosis AUC on the held-out hospital: the mean
over held-out sites, then mean and spread over seeds) and
``shift_study_patches.png`` (patches of each site before and after each
normalisation).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shared.cache import fingerprint, write_json
from shared.config import Config, apply_overrides, to_dict

METRICS = ("macro_auc", "auc.mitosis")


@dataclass(frozen=True)
class ShiftStudyConfig:
    """The study's own settings; ``base`` (in the YAML) is an ordinary fedfuse config."""

    models: tuple[str, ...] = ("cnn", "fusion")
    seeds: tuple[int, ...] = (0, 1)
    held_out: tuple[int, ...] = (0, 1, 2)  # the sites left out, one at a time
    hed_jitter: float = 0.1  # augmentation's strength (between Tellez et al.'s light 0.05 and strong 0.2)
    workers: int = 2  # cells run in parallel, a process each (one torch thread each)
    out: str = "results"


def conditions(study: ShiftStudyConfig) -> dict[str, dict]:
    """Each single remedy as config changes ("combined" is chosen from their results)."""
    return {
        "none": {},
        "reinhard": {"data.stain_norm": "reinhard"},
        "macenko": {"data.stain_norm": "macenko"},
        "augmentation": {"train.hed_jitter": study.hed_jitter},
        "fedbn": {"model.cnn_norm": "batch", "federation.fedbn": True},
    }


def _cells(base: Config, study: ShiftStudyConfig, named: dict[str, dict], cells_dir: Path, data: str):
    """(model, condition, held-out site, seed, its config, its cached result's path) for every cell."""
    root = Path(base.data.root)
    for model in study.models:
        for name, changes in named.items():
            for k in study.held_out:
                for seed in study.seeds:
                    cfg = apply_overrides(base, {
                        **changes, "model.name": model, "seed": seed, "data.leave_out": k,
                        "federation.min_sites": min(base.federation.min_sites, base.data.sites - 1),
                        "server.eval_data": str(root / f"site-{k}")})
                    yield model, name, k, seed, cfg, cells_dir / f"{model}-{name}-site{k}-seed{seed}-{_key(cfg, data)}.json"


def _run_cell(cfg: Config, work: Path) -> dict:
    """One federation without the held-out site; its final scores on that site (the server's test set).

    The apps' own lines go to ``work/log.txt``: the study prints one line a cell.
    """
    from simulations.flower import federate

    started = time.time()
    work.mkdir(parents=True, exist_ok=True)
    logging.disable(logging.WARNING)  # Flower's lines (e.g. "fraction_evaluate is 0"); it resets its level on import
    try:
        with open(work / "log.txt", "w") as log, contextlib.redirect_stdout(log):
            federate(cfg, work, "inprocess")
    finally:
        logging.disable(logging.NOTSET)
    final = json.loads((work / "metrics.json").read_text())["final"]
    return {"macro_auc": final["macro_auc"], "auc": final["auc"], "accuracy": final["accuracy"],
            "seconds": round(time.time() - started, 1)}


def _warm(folder: Path, cfg: Config) -> None:
    """Extract (and cache) a folder's patches under one normalisation, before cells share them (in a worker:
    nothing comes back)."""
    from shared.data import folder_patches

    folder_patches(folder, cfg.data)


def _key(cfg: Config, data: str) -> str:
    return hashlib.sha256(json.dumps({"cfg": to_dict(cfg), "data": data}, sort_keys=True).encode()).hexdigest()[:12]


def _value(cell: dict, metric: str) -> float:
    return float(cell["auc"][metric[4:]] if metric.startswith("auc.") else cell[metric])


def _run_conditions(base, study, named: dict[str, dict], cells_dir: Path, data: str, pool, echo) -> dict:
    """Every cell of the ``named`` conditions, run where not cached: ``{(model, condition): [cells]}``."""
    cells = list(_cells(base, study, named, cells_dir, data))
    jobs = [(pool.submit(_run_cell, cfg, cells_dir / f"work-{path.stem}"), model, name, k, seed, path)
            for model, name, k, seed, cfg, path in cells if not path.is_file()]
    for future, model, name, k, seed, path in jobs:
        cell = future.result()
        write_json(path, {"model": model, "condition": name, "held_out": k, "seed": seed, **cell})
        echo(f"{model:<7} {name:<13} site-{k} unseen, seed {seed}: macro AUC {cell['macro_auc']:.3f}, "
             f"mitosis AUC {cell['auc']['mitosis']:.3f} ({cell['seconds']:.0f} s)")
    results: dict[tuple[str, str], list[dict]] = {}
    for model, name, _, _, _, path in cells:
        results.setdefault((model, name), []).append(json.loads(path.read_text()))
    return results


def summary(cells: list[dict], metric: str) -> tuple[float, float]:
    """Mean over held-out sites within each seed, then the mean and standard deviation over seeds."""
    seeds = sorted({c["seed"] for c in cells})
    per_seed = [np.mean([_value(c, metric) for c in cells if c["seed"] == s]) for s in seeds]
    return float(np.mean(per_seed)), float(np.std(per_seed))


def run_shift_study(base: Config, study: ShiftStudyConfig, echo=print) -> Path:
    """Every cell (cached), the table and the picture; returns the table's path."""
    out = Path(study.out)
    cells_dir = out / "cells"
    cells_dir.mkdir(parents=True, exist_ok=True)
    root = Path(base.data.root)
    data = fingerprint(*sorted(p for p in root.rglob("*") if p.is_file()
                               and not any(part.startswith(".fedfuse-") for part in p.parts)))
    folders = [root / f"site-{k}" for k in range(base.data.sites)]
    single = conditions(study)
    with ProcessPoolExecutor(max_workers=study.workers) as pool:
        warm = [pool.submit(_warm, f, apply_overrides(base, single[name])) for f in folders
                for name in ("none", "reinhard", "macenko")]
        for w in warm:
            w.result()
        results = _run_conditions(base, study, single, cells_dir, data, pool, echo)
        best = max(("reinhard", "macenko"), key=lambda n: np.mean([summary(results[(m, n)], "macro_auc")[0]
                                                                   for m in study.models]))
        combined = {**single[best], **single["augmentation"], **single["fedbn"]}
        results.update({(m, "combined"): cells for (m, _), cells in
                        _run_conditions(base, study, {"combined": combined}, cells_dir, data, pool, echo).items()})
    picture = patches_figure(base, out / "shift_study_patches.png")
    return write_table(base, study, results, best, out, picture)


def write_table(base: Config, study: ShiftStudyConfig, results: dict, best: str, out: Path, picture: Path) -> Path:
    names = [*conditions(study), "combined"]
    lines = ["| model | condition | macro AUC (unseen site) | mitosis AUC (unseen site) | vs none (macro AUC) |",
             "|---|---|---|---|---|"]
    csv = ["model,condition,metric,mean,std,seeds,held_out_sites"]
    for model in study.models:
        reference = summary(results[(model, "none")], "macro_auc")[0]
        for name in names:
            cells = results[(model, name)]
            shown = name if name != "combined" else f"combined ({best} + augmentation + fedbn)"
            (m, s), (mm, ms) = summary(cells, "macro_auc"), summary(cells, "auc.mitosis")
            lines.append(f"| {model} | {shown} | {m:.3f} ± {s:.3f} | {mm:.3f} ± {ms:.3f} | {m - reference:+.3f} |")
            for metric in METRICS:
                mean, std = summary(cells, metric)
                csv.append(f"{model},{name},{metric},{mean:.4f},{std:.4f},{len(study.seeds)},{len(study.held_out)}")
    seconds = sum(c["seconds"] for cells in results.values() for c in cells)
    root = Path(base.data.root).resolve()
    shown = root.relative_to(Path.cwd()) if root.is_relative_to(Path.cwd()) else root
    reference = ("the shipped reference (shared/assets/stain_reference.png's statistics)"
                 if base.data.stain_reference == "shipped" else f"data.stain_reference {base.data.stain_reference}")
    note = (f"\nEach cell: a federation of the other sites ({base.federation.rounds} rounds of "
            f"{base.train.steps} steps a site, batch {base.train.batch_size}), scored on every patch of the "
            f"held-out hospital. Mean over held-out sites {', '.join(map(str, study.held_out))}, then mean ± std "
            f"over seeds {', '.join(map(str, study.seeds))}. Data: {shown} ({base.data.sites} sites, preset "
            f"{base.data.preset}). Normalisation onto {reference}; augmentation: HED jitter {study.hed_jitter} plus "
            f"flips; fedbn: the CNN with BatchNorm (no affine), its statistics kept at each site in training; the "
            f"unseen site, which has none of its own, re-estimates them on its unlabeled patches before it is "
            f"scored. Training time summed over cells: {seconds / 60:.0f} min. Patches before and after "
            f"normalisation: {picture.name}.\n")
    table = out / "shift_study.md"
    table.write_text("# fedfuse: site shift, scored on unseen hospitals\n\n" + "\n".join(lines) + "\n" + note)
    (out / "shift_study.csv").write_text("\n".join(csv) + "\n")
    return table


def patches_figure(base: Config, path: Path, per_site: int = 4) -> Path:
    """Patches from each site: as scanned, then Reinhard- and Macenko-normalised (the shipped reference)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from shared.data import load_folder

    root = Path(base.data.root)
    methods = ("none", "reinhard", "macenko")
    sites = [f"site-{k}" for k in range(base.data.sites)]
    fig, axes = plt.subplots(len(sites), len(methods) * per_site,
                             figsize=(1.1 * len(methods) * per_site, 1.25 * len(sites)), squeeze=False)
    for i, site in enumerate(sites):
        pick = None
        for j, method in enumerate(methods):
            samples = load_folder(root / site, dataclasses.replace(base.data, stain_norm=method))
            if pick is None:
                pick = np.random.default_rng(i).choice(len(samples), per_site, replace=False)
            for c, idx in enumerate(pick):
                ax = axes[i, j * per_site + c]
                ax.imshow(samples.images[idx])
                ax.set_xticks([])
                ax.set_yticks([])
                if i == 0 and c == 0:
                    ax.set_title("as scanned" if method == "none" else method, fontsize=9, loc="left")
            axes[i, 0].set_ylabel(site, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
