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
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
    from_dict,
    image_encoder_of,
    task_of,
    to_dict,
)
from shared.data import concat, load_sites
from shared.evaluation import matrix_row
from shared.metrics import focus_class
from shared.pretrain import sha256_of
from simulations.flower import federate
from simulations.pooled import train_alone, with_steps

MODES = ("pooled", "federated", "local")
MODALITY = {"cnn": "image", "resnet18": "image", "mlp": "EHR", "xgboost": "EHR", "fusion": "image + EHR",
            "late_fusion": "image + EHR"}


@dataclass(frozen=True)
class ProtocolConfig:
    """``fedfuse paper --protocol`` (simulations/protocol.py): which rows and seeds, pooled only."""

    models: tuple[str, ...] = ("cnn", "fusion")
    seeds: tuple[int, ...] = (0, 1, 2)


@dataclass(frozen=True)
class PaperConfig:
    """The comparison's own settings; ``base`` (in the YAML) is an ordinary fedfuse config.

    A row of the table is one of the six models, or a *variant*: a name with settings applied to ``base``
    (``model.name`` among them), e.g. ResNet-18 with pretrained weights. A row's budget is ``budgets[row]``,
    else its model's.
    """

    models: tuple[str, ...] = ("cnn", "resnet18", "mlp", "xgboost", "fusion", "late_fusion")  # the rows
    modes: tuple[str, ...] = MODES  # the columns: some of pooled, federated, local
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)
    protocol: ProtocolConfig = field(default_factory=ProtocolConfig)
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


def load_paper(path: Path, quick: bool, models: tuple[str, ...] | None = None, protocol: bool = False,
               **changes: Any) -> tuple[Config, PaperConfig]:
    """``base`` (a fedfuse config) and ``paper``; with ``quick``, ``quick.paper`` and ``quick.set`` applied.

    ``models``: only these rows; ``changes``: other ``paper`` settings, None for the config's (``fedfuse paper
    --models / --modes / --seeds / --out``). With ``protocol``, ``models`` and ``changes["seeds"]`` are the
    protocol's (``paper.protocol``).
    """
    base, paper = load_experiment(path, quick, "paper", PaperConfig)
    changes = {k: v for k, v in {**changes, "models": models}.items() if v is not None}
    if protocol:
        mine = {k: changes.pop(k) for k in ("models", "seeds") if k in changes}
        changes["protocol"] = dataclasses.replace(paper.protocol, **mine)
    paper = dataclasses.replace(paper, **changes)
    bad = [m for m in paper.modes if m not in MODES]
    if bad or not paper.modes or not paper.seeds:
        raise ConfigError(f"{path}: paper.modes {list(paper.modes)} / paper.seeds {list(paper.seeds)}: expected one "
                          f"or more of {', '.join(MODES)}, and one or more seeds")
    rows = [*MODALITY, *paper.variants]
    wanted = sorted({*paper.models, *paper.protocol.models})
    unknown = [m for m in wanted if m not in rows or not NAME.fullmatch(m)]  # names become cell files
    if unknown:
        raise ConfigError(f"{path}: paper.models / paper.protocol.models: unknown row(s) "
                          f"{', '.join(map(repr, unknown))}; expected some of "
                          f"{', '.join(rows)} (a variant's name: letters, digits, _ and -)")
    for row in wanted:  # a variant's settings are checked here, before any cell trains
        try:
            row_config(base, paper, row, 0)
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from None
    missing = [m for m in wanted if _budget(paper, m) is None]
    if missing:
        raise ConfigError(f"{path}: paper.budgets has no entry for {', '.join(missing)} (nor for its model)")
    return base, paper


NAME = re.compile(r"[A-Za-z0-9_-]{1,60}")


def _budget(paper: PaperConfig, row: str) -> int | None:
    """A row's optimiser steps: its own budget, else its model's (a variant's ``model.name``, else the row)."""
    return paper.budgets.get(row, paper.budgets.get(paper.variants.get(row, {}).get("model.name", row)))


def row_config(base: Config, paper: PaperConfig, row: str, seed: int) -> Config:
    """``base`` for one row and seed: a variant's settings applied; xgboost federates by bagging; pretrained
    weights and freezing only where there is an image encoder."""
    if row in paper.variants:
        try:
            base = apply_overrides(base, paper.variants[row])
        except ConfigError as err:
            raise ConfigError(f"paper.variants.{row}: {err}") from None
    else:
        base = dataclasses.replace(base, model=dataclasses.replace(base.model, name=row))
    model = base.model.name
    strategy = "xgb_bagging" if model == "xgboost" else base.federation.strategy
    if model != "xgboost" and strategy.startswith("xgb_"):
        strategy = "fedavg"
    m = base.model
    image = image_encoder_of(m) is not None
    weights = str(Path(m.pretrained).resolve()) if m.pretrained and image else None  # the apps run elsewhere
    m = dataclasses.replace(m, pretrained=weights, freeze=m.freeze and image)
    return dataclasses.replace(base, seed=seed, model=m,
                               federation=dataclasses.replace(base.federation, strategy=strategy))


def run_cell(cfg: Config, paper: PaperConfig, row: str, mode: str, work: Path) -> dict:
    """Train one (row, seed, mode) and return its evaluation-matrix rows."""
    task, classes = task_of(cfg), classes_of(cfg)
    splits = {f"site-{k}": parts for k, parts in enumerate(load_sites(cfg.data, cfg.seed, task))}
    tests = {s: test for s, (_, test) in splits.items()}
    budget = _budget(paper, row)
    k = len(splits)

    def scored(weights):
        return matrix_row(lambda samples: learner.predict(cfg, weights, samples)[0], tests, classes,
                          bootstrap=paper.bootstrap, seed=cfg.seed)

    if mode == "pooled":
        train = concat([tr for tr, _ in splits.values()])
        return {"pooled": scored(train_alone(cfg, train, budget, cfg.seed))}
    if mode == "local":
        return {s: scored(train_alone(cfg, tr, budget / k, cfg.seed + i))
                for i, (s, (tr, _)) in enumerate(splits.items())}
    if cfg.model.name == "xgboost":  # bagging: each round adds one tree per site
        rounds, per_round = max(1, round(budget / k)), 1
    else:
        rounds, per_round = paper.rounds, budget / (paper.rounds * k)
    fed = with_steps(dataclasses.replace(cfg, federation=dataclasses.replace(cfg.federation, rounds=rounds)),
                      per_round)
    run_dir = work / "run"
    federate(fed, run_dir, paper.engine)
    return {"federated": scored(learner.load(fed, run_dir))}


def _key(cfg: Config, paper: PaperConfig, row: str, mode: str, data: str) -> str:
    weights = sha256_of(Path(cfg.model.pretrained)) if cfg.model.pretrained else None
    blob = json.dumps({"cfg": to_dict(cfg), "data": data, "mode": mode, "budget": _budget(paper, row),
                       "weights": weights,
                       "rounds": paper.rounds, "engine": paper.engine, "bootstrap": paper.bootstrap},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def data_fingerprint(base: Config) -> str:
    """Every input file's fingerprint: regenerated or edited data must not reuse cells."""
    return fingerprint(*sorted(p for p in Path(base.data.root).rglob("*") if p.is_file()
                               and not any(part.startswith(".fedfuse-") for part in p.parts)))


def cached_cell(cfg: Config, paper: PaperConfig, row: str, mode: str, data: str, echo=print) -> dict:
    """One (row, seed, mode) cell: read from ``<out>/cells/`` when a cell of the same settings is there, else
    trained and written there (atomically: no half cells)."""
    cells_dir = Path(paper.out) / "cells"
    cells_dir.mkdir(parents=True, exist_ok=True)
    path = cells_dir / f"{row}-{mode}-seed{cfg.seed}-{_key(cfg, paper, row, mode, data)}.json"
    if not path.is_file():
        started = time.time()
        rows = run_cell(cfg, paper, row, mode, cells_dir / f"work-{path.stem}")
        write_json(path, {"model": row, "mode": mode, "seed": cfg.seed, "rows": rows,
                          "seconds": round(time.time() - started, 1)})
        echo(f"{row:<12} {mode:<10} seed {cfg.seed}: {time.time() - started:.0f} s")
    return json.loads(path.read_text())


def check_weights(base: Config, paper: PaperConfig, rows) -> None:
    """Every pretrained weights file the rows need is there, before hours of cells start."""
    for row in rows:
        weights = row_config(base, paper, row, 0).model.pretrained
        if weights and not Path(weights).is_file():
            raise FileNotFoundError(f"paper row {row}: model.pretrained {weights} not found; make it first with "
                                    "`fedfuse pretrain` (configs/pretrain.yaml; --method simclr for SimCLR weights)")


def run_paper(base: Config, paper: PaperConfig, echo=print) -> Path:
    """Every cell (cached), then the table; returns the table's path."""
    check_weights(base, paper, paper.models)
    data = data_fingerprint(base)
    results = {(row, mode): [cached_cell(row_config(base, paper, row, seed), paper, row, mode, data, echo)
                             for seed in paper.seeds]
               for row in paper.models for mode in paper.modes}
    return write_table(base, paper, results, Path(paper.out))


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


def _majority_share(cells: list[dict]) -> float:
    """Over seeds, the share of the pooled test split's largest class: the accuracy of always answering it."""
    shares = []
    for cell in cells:
        confusion = np.asarray(next(iter(cell["rows"].values()))["pooled"]["confusion"])
        shares.append(confusion.sum(1).max() / max(confusion.sum(), 1))
    return float(np.mean(shares))


def write_table(base: Config, paper: PaperConfig, results: dict, out: Path) -> Path:
    """``paper_table.md`` and ``.csv``; each task's majority-class row first, the bar every model must clear."""
    lines, csv = [], ["model,modality,task,mode,metric,mean,std,ci95_low,ci95_high"]
    header = "| model | modality | task | " + " | ".join(
        f"{mode} acc | {mode} macro AUC | {mode} mitosis / EHR AUC" for mode in paper.modes) + " |"
    lines += [header, "|" + "---|" * (3 + 3 * len(paper.modes))]
    described, majority_done = [], set()
    for row in paper.models:
        cfg = row_config(base, paper, row, 0)
        task, modality = task_of(cfg), MODALITY[cfg.model.name]
        task_name = "patch (3 classes)" if task == "patch" else "EHR (breast cancer)"
        if task not in majority_done:  # the trivial baseline: always the largest class; every AUC 0.5
            majority_done.add(task)
            share = _majority_share(results[(row, "pooled")])
            lines.append(f"| majority class | none | {task_name} | "
                         + " | ".join(f"{share:.3f} | 0.500 | 0.500" for _ in paper.modes) + " |")
        focus = f"auc.{focus_class(classes_of(cfg))}"
        cells = [row, modality, task_name]
        for mode in paper.modes:
            for key in ("accuracy", "macro_auc", focus):
                mean, std, low, high = _summary(results[(row, mode)], key)
                cells.append(f"{mean:.3f} ± {std:.3f}")
                csv.append(f"{row},{modality},{task},{mode},{key},{mean:.4f},{std:.4f},{low:.4f},{high:.4f}")
        lines.append("| " + " | ".join(cells) + " |")
        if row in paper.variants:
            described.append(f"{row}: " + ", ".join(f"{k} {v}" for k, v in paper.variants[row].items()))
    note = (f"\nScores on the pooled test split (every site's held-out cases), mean ± std over seeds "
            f"{', '.join(map(str, paper.seeds))}; local: the mean over sites of each site's own model. "
            f"95 % intervals from a bootstrap over patients ({paper.bootstrap} resamples) are in the CSV. "
            f"Data: {base.data.root} ({base.data.sites} sites, partition {base.data.partition}, split "
            f"{base.data.split}); pairing {base.data.pairing}; pretrained weights: "
            f"{base.model.pretrained or 'none (random initialisation)'}"
            + "".join(f"; {d}" for d in described)
            + ". Budget, in optimiser steps summed over sites (trees for XGBoost), equal across modes: "
            + ", ".join(f"{m} {_budget(paper, m)}" for m in paper.models)
            + f"; federated: {paper.rounds} rounds (XGBoost: budget / sites rounds of one tree per site), "
            f"engine {paper.engine}.\n")
    table = out / "paper_table.md"
    table.write_text("# fedfuse: the study's models, pooled / federated / local\n\n" + "\n".join(lines) + "\n" + note)
    (out / "paper_table.csv").write_text("\n".join(csv) + "\n")
    return table
