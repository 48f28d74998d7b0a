"""``fedfuse loso``: leave one site out, the question a hospital joining later asks.

For each site k, the federation trains without k (``data.leave_out = k``)
and the server scores the final model on all of k's cases (its whole folder
is the central test set), so every number is for a hospital that never took
part in training.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np

from shared.cache import write_json
from shared.config import Config
from simulations.flower import federate


def run_loso(cfg: Config, out: Path, engine: str = "simulation", echo=print) -> dict:
    """One federated run per left-out site; writes ``<out>/loso.json`` and ``loso.md``."""
    out.mkdir(parents=True, exist_ok=True)
    root = Path(cfg.data.root)
    folds = {}
    for k in range(cfg.data.sites):
        fold = dataclasses.replace(
            cfg,
            data=dataclasses.replace(cfg.data, leave_out=k),
            federation=dataclasses.replace(cfg.federation, min_sites=min(cfg.federation.min_sites, cfg.data.sites - 1)),
            server=dataclasses.replace(cfg.server, eval_data=str(root / f"site-{k}")),
        )
        run_dir = out / f"without-site-{k}"
        federate(fold, run_dir, engine)
        final = json.loads((run_dir / "metrics.json").read_text())["final"]
        folds[f"site-{k}"] = final
        echo(f"site-{k} unseen: macro AUC {final['macro_auc']:.3f}, "
             + ", ".join(f"{c} AUC {v:.3f}" for c, v in final["auc"].items()))
    keys = ["accuracy", "macro_auc", *[f"auc.{c}" for c in next(iter(folds.values()))["auc"]]]

    def value(final: dict, key: str) -> float:
        return final["auc"][key[4:]] if key.startswith("auc.") else final[key]

    mean = {k: float(np.nanmean([value(f, k) for f in folds.values()])) for k in keys}
    summary = {"model": cfg.model.name, "strategy": cfg.federation.strategy, "engine": engine, "folds": folds,
               "mean": mean}
    write_json(out / "loso.json", summary)
    lines = ["| unseen site | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for site, final in folds.items():
        lines.append(f"| {site} | " + " | ".join(f"{value(final, k):.3f}" for k in keys) + " |")
    lines.append("| mean | " + " | ".join(f"{mean[k]:.3f}" if not math.isnan(mean[k]) else "n/a" for k in keys) + " |")
    (out / "loso.md").write_text(f"# Leave one site out: {cfg.name}, model {cfg.model.name}\n\n" + "\n".join(lines) + "\n")
    return summary
