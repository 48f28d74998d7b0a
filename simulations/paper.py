"""``fedfuse paper``: the study's comparison, trained pooled, local and federated, at equal compute.

For every model (cnn, resnet18, mlp, xgboost, fusion, late_fusion), seed and
mode, a *cell* trains the model and scores it on every site's test split and
on the pooled test split (``shared.evaluation``):

* ``pooled``: all sites' training data in one place (the study's setting);
* ``local``: each site alone; the table reports the mean over sites of each
  local model's score on the pooled test split;
* ``federated``: Flower (the base config's strategy; bagging for XGBoost), through the
  simulation engine (``engine: simulation``) or, for tests, the same
  ServerApp and ClientApp with an in-process Grid (``engine: inprocess``).

The budget is fixed per model in optimiser steps (trees for XGBoost), summed
over sites, and equal across the modes up to rounding: pooled trains ``B``
steps, each local site ``B / K``, and federated ``R`` rounds of ``B / (R K)``
steps at each of the ``K`` sites. Each finished cell is saved as JSON under
``results/cells/``, keyed by its settings, so an interrupted run continues.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from shared import learner
from shared.cache import fingerprint, write_json
from shared.config import (
    Config,
    ConfigError,
    apply_overrides,
    build_section,
    classes_of,
    focus_class,
    from_dict,
    task_of,
    to_dict,
    uses_resnet,
)
from shared.data import concat, load_site
from shared.evaluation import matrix_row
from simulations.flower import federate
from simulations.pooled import train_alone, with_steps

MODES = ("pooled", "federated", "local")
MODALITY = {"cnn": "image", "resnet18": "image", "mlp": "EHR", "xgboost": "EHR", "fusion": "image + EHR",
            "late_fusion": "image + EHR"}


@dataclass(frozen=True)
class PaperConfig:
    """The comparison's own settings; ``base`` (in the YAML) is an ordinary fedfuse config."""

    models: tuple[str, ...] = ("cnn", "resnet18", "mlp", "xgboost", "fusion", "late_fusion")
    seeds: tuple[int, ...] = (0, 1, 2)
    rounds: int = 5  # federated rounds for the neural models (XGBoost: one tree per site a round)
    budgets: dict[str, int] = field(default_factory=lambda: {
        "cnn": 1200, "resnet18": 300, "mlp": 300, "xgboost": 60, "fusion": 1200, "late_fusion": 1200})
    engine: str = "simulation"  # simulation (Flower's engine) | inprocess (same apps, in-process Grid; tests)
    bootstrap: int = 200  # resamples of patients for the 95 % intervals on the pooled test split
    out: str = "results"


def load_experiment(path: Path, quick: bool, section: str, cls: type) -> tuple[Config, object]:
    """An experiment's YAML: ``base`` (a fedfuse config), ``<section>`` (``cls``'s settings) and ``quick``, whose
    ``<section>`` and ``set`` entries apply with ``quick``."""
    raw = yaml.safe_load(Path(path).read_text()) or {}
    unknown = set(raw) - {"base", section, "quick"}
    if unknown:
        raise ConfigError(f"{path}: unknown top-level key(s) {', '.join(sorted(unknown))}; expected base, {section}, "
                          "quick")
    small = raw.get("quick", {}) if quick else {}
    try:
        settings = build_section(cls, {**raw.get(section, {}), **small.get(section, {})}, section)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
    base = apply_overrides(from_dict(raw.get("base", {}), f"{path} (base)"), small.get("set", {}))
    if base.data.partition != "natural" or base.data.leave_out is not None:
        raise ConfigError(f"{path}: base.data.partition must be natural and base.data.leave_out null: every cell "
                          "is scored on the natural sites, which other partitions would deal out again")
    return base, settings


def load_paper(path: Path, quick: bool) -> tuple[Config, PaperConfig]:
    """``base`` (a fedfuse config) and ``paper``; with ``quick``, ``quick.paper`` and ``quick.set`` applied."""
    base, paper = load_experiment(path, quick, "paper", PaperConfig)
    unknown = [m for m in paper.models if m not in MODALITY]  # also what would name a file outside results/cells
    if unknown:
        raise ConfigError(f"{path}: paper.models: unknown model(s) {', '.join(map(repr, unknown))}; expected "
                          f"some of {', '.join(MODALITY)}")
    missing = [m for m in paper.models if m not in paper.budgets]
    if missing:
        raise ConfigError(f"{path}: paper.budgets has no entry for {', '.join(missing)}")
    return base, paper


def _model_config(base: Config, model: str, seed: int) -> Config:
    """``base`` for one model: xgboost federates by bagging; pretrained weights only reach ResNet encoders."""
    strategy = "xgb_bagging" if model == "xgboost" else base.federation.strategy
    if model != "xgboost" and strategy.startswith("xgb_"):
        strategy = "fedavg"
    m = dataclasses.replace(base.model, name=model)
    resnet = uses_resnet(m)
    m = dataclasses.replace(m, pretrained=m.pretrained if resnet else None, freeze=m.freeze and resnet)
    return dataclasses.replace(base, seed=seed, model=m,
                               federation=dataclasses.replace(base.federation, strategy=strategy))


def run_cell(cfg: Config, paper: PaperConfig, mode: str, work: Path) -> dict:
    """Train one (model, seed, mode) and return its evaluation-matrix rows."""
    task, classes = task_of(cfg), classes_of(cfg)
    root = Path(cfg.data.root)
    sites = [f"site-{k}" for k in range(cfg.data.sites)]
    splits = {s: load_site(root / s, cfg.data, cfg.seed + k, task) for k, s in enumerate(sites)}
    tests = {s: test for s, (_, test) in splits.items()}
    budget = paper.budgets[cfg.model.name]
    k = len(sites)

    def row(weights):
        return matrix_row(lambda samples: learner.predict(cfg, weights, samples)[0], tests, classes,
                          bootstrap=paper.bootstrap, seed=cfg.seed)

    if mode == "pooled":
        train = concat([tr for tr, _ in splits.values()])
        return {"pooled": row(train_alone(cfg, train, budget, cfg.seed))}
    if mode == "local":
        return {s: row(train_alone(cfg, tr, budget / k, cfg.seed + i)) for i, (s, (tr, _)) in enumerate(splits.items())}
    if cfg.model.name == "xgboost":  # bagging: each round adds one tree per site
        rounds, per_round = max(1, round(budget / k)), 1
    else:
        rounds, per_round = paper.rounds, budget / (paper.rounds * k)
    fed = with_steps(dataclasses.replace(cfg, federation=dataclasses.replace(cfg.federation, rounds=rounds)),
                      per_round)
    run_dir = work / "run"
    federate(fed, run_dir, paper.engine)
    return {"federated": row(learner.load(fed, run_dir))}


def _key(cfg: Config, paper: PaperConfig, mode: str, data: str) -> str:
    blob = json.dumps({"cfg": to_dict(cfg), "data": data, "mode": mode, "budget": paper.budgets[cfg.model.name],
                       "rounds": paper.rounds, "engine": paper.engine, "bootstrap": paper.bootstrap},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def run_paper(base: Config, paper: PaperConfig, echo=print) -> Path:
    """Every cell (cached), then the table; returns the table's path."""
    out = Path(paper.out)
    cells_dir = out / "cells"
    cells_dir.mkdir(parents=True, exist_ok=True)
    results: dict[tuple[str, str], list[dict]] = {}
    # Regenerated or edited data must not reuse cells: the key includes every input file's fingerprint.
    data = fingerprint(*sorted(p for p in Path(base.data.root).rglob("*") if p.is_file()
                               and not any(part.startswith(".fedfuse-") for part in p.parts)))
    for model in paper.models:
        for seed in paper.seeds:
            cfg = _model_config(base, model, seed)
            for mode in MODES:
                path = cells_dir / f"{model}-{mode}-seed{seed}-{_key(cfg, paper, mode, data)}.json"
                if not path.is_file():
                    started = time.time()
                    rows = run_cell(cfg, paper, mode, cells_dir / f"work-{path.stem}")
                    write_json(path, {"model": model, "mode": mode, "seed": seed, "rows": rows,
                                      "seconds": round(time.time() - started, 1)})  # atomic: no half cells
                    echo(f"{model:<12} {mode:<10} seed {seed}: {time.time() - started:.0f} s")
                results.setdefault((model, mode), []).append(json.loads(path.read_text()))
    return write_table(base, paper, results, out)


def _summary(cells: list[dict], key: str) -> tuple[float, float, float, float]:
    """Over seeds: mean, std, and the mean 95 % bootstrap bounds of a metric on the pooled test split.

    ``local`` cells hold one model per site: their values are first averaged over sites.
    """
    per_seed, lows, highs = [], [], []
    for cell in cells:
        rows = [r["pooled"] for r in cell["rows"].values()]
        per_seed.append(_nanmean([_metric(r, key) for r in rows]))
        bounds = [r["ci95"][key] for r in rows if "ci95" in r]
        lows.append(_nanmean([b[0] for b in bounds]))
        highs.append(_nanmean([b[1] for b in bounds]))
    std = float(np.nanstd(per_seed)) if len(per_seed) > 1 else 0.0
    return _nanmean(per_seed), std, _nanmean(lows), _nanmean(highs)


def _nanmean(values: list[float]) -> float:
    v = [x for x in values if not math.isnan(x)]
    return float(np.mean(v)) if v else math.nan


def _metric(m: dict, key: str) -> float:  # key: "accuracy", "macro_auc" or "auc.<class>"
    return float(m["auc"][key.split(".", 1)[1]]) if key.startswith("auc.") else float(m[key])


def write_table(base: Config, paper: PaperConfig, results: dict, out: Path) -> Path:
    lines, csv = [], ["model,modality,task,mode,metric,mean,std,ci95_low,ci95_high"]
    header = "| model | modality | task | " + " | ".join(
        f"{mode} acc | {mode} macro AUC | {mode} mitosis / EHR AUC" for mode in MODES) + " |"
    lines += [header, "|" + "---|" * (3 + 3 * len(MODES))]
    for model in paper.models:
        cfg = _model_config(base, model, 0)
        task = task_of(cfg)
        focus = f"auc.{focus_class(classes_of(cfg))}"
        cells = [f"{model}", MODALITY[model], "patch (3 classes)" if task == "patch" else "EHR (breast cancer)"]
        for mode in MODES:
            for key in ("accuracy", "macro_auc", focus):
                mean, std, low, high = _summary(results[(model, mode)], key)
                cells.append(f"{mean:.3f} ± {std:.3f}")
                csv.append(f"{model},{MODALITY[model]},{task},{mode},{key},{mean:.4f},{std:.4f},{low:.4f},{high:.4f}")
        lines.append("| " + " | ".join(cells) + " |")
    note = (f"\nScores on the pooled test split (every site's held-out cases), mean ± std over seeds "
            f"{', '.join(map(str, paper.seeds))}; local: the mean over sites of each site's own model. "
            f"95 % intervals from a bootstrap over patients ({paper.bootstrap} resamples) are in the CSV. "
            f"Data: {base.data.root} ({base.data.sites} sites, partition {base.data.partition}); pairing "
            f"{base.data.pairing}; pretrained weights: {base.model.pretrained or 'none (random initialisation)'}. "
            f"Budget, in optimiser steps summed over sites (trees for XGBoost), equal across modes: "
            + ", ".join(f"{m} {paper.budgets[m]}" for m in paper.models)
            + f"; federated: {paper.rounds} rounds (XGBoost: budget / sites rounds of one tree per site), "
            f"engine {paper.engine}.\n")
    table = out / "paper_table.md"
    table.write_text("# fedfuse: the study's models, pooled / federated / local\n\n" + "\n".join(lines) + "\n" + note)
    (out / "paper_table.csv").write_text("\n".join(csv) + "\n")
    return table
