"""What a run leaves behind: ``metrics.json`` written after every round, one printed line a round."""

from __future__ import annotations

import math
from datetime import datetime
from pathlib import Path

from shared.cache import write_json
from shared.metrics import focus_class, weighted_mean
from shared.serde import FLAT_KEYS as SCALARS


def run_name(name: str) -> str:
    """``<name>-<timestamp>``: the default folder name of a run."""
    return f"{name}-{datetime.now():%Y%m%d-%H%M%S}"


def federated_mean(sites: dict[str, dict], classes: tuple[str, ...]) -> dict:
    """Example-weighted mean of the sites' metrics; confusion matrices are summed."""
    rows = list(sites.values())
    weights = [r["n"] for r in rows]
    out = {k: weighted_mean([r[k] for r in rows], weights) for k in SCALARS}
    out["auc"] = {c: weighted_mean([r["auc"][c] for r in rows], weights) for c in classes}
    k = len(classes)
    out["confusion"] = [[sum(r["confusion"][i][j] for r in rows if "confusion" in r) for j in range(k)]
                        for i in range(k)]
    out["n"] = sum(weights)
    return out


def scalars(entry: dict, classes: tuple[str, ...]) -> dict[str, float]:
    """A round's numbers as TensorBoard tags: ``central/macro_auc``, ``site-0/auc_mitosis``, ``privacy/epsilon``..."""
    out = {"train/loss": entry["train_loss"]} if "train_loss" in entry else {}
    scored = {"central": entry.get("central"), "federated": entry.get("federated"), **entry.get("sites", {})}
    for source, m in scored.items():
        if m:
            out.update({f"{source}/{k}": m[k] for k in ("macro_auc", "accuracy", "loss")})
            out.update({f"{source}/auc_{c}": m["auc"][c] for c in classes})
    spent = entry.get("privacy") or {}
    if "epsilon" in spent:  # central DP: one epsilon for the run
        out["privacy/epsilon"] = spent["epsilon"]
    out.update({f"privacy/epsilon_{site}": e["epsilon"] for site, e in spent.items() if isinstance(e, dict)})
    return out


def _tensorboard(run_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise RuntimeError("logging.tensorboard: true needs the tensorboard package: "
                           "pip install -e '.[tensorboard]' (or set logging.tensorboard: false)") from None
    return SummaryWriter(log_dir=str(run_dir / "tensorboard"))


class RunRecord:
    """Collects per-round metrics and writes ``metrics.json`` (and, optionally, TensorBoard scalars) each round."""

    def __init__(self, run_dir: Path, classes: tuple[str, ...], header: dict, tensorboard: bool = False) -> None:
        self.path = run_dir / "metrics.json"
        self.classes = classes
        self.data: dict = {**header, "rounds": [], "final": None}
        self._pending: dict[int, dict] = {}
        self._writer = _tensorboard(run_dir) if tensorboard else None

    def left_out(self, queries: dict[str, dict[str, str]]) -> None:
        """Record the sites left out of each query (a message type, e.g. ``query.stain`` -> {site: why}) under the
        run's ``left_out``; a run that left no site out has no ``left_out``."""
        for query, reasons in queries.items():
            if reasons:
                self.data.setdefault("left_out", {}).setdefault(query, {}).update(reasons)

    def round(self, r: int) -> dict:
        return self._pending.setdefault(r, {"round": r})

    def close_round(self, r: int, total: int) -> None:
        """The round is complete: derive the federated mean, print its line, save."""
        entry = self._pending.pop(r)
        if entry.get("sites"):
            entry["federated"] = federated_mean(entry["sites"], self.classes)
        self.data["rounds"].append(entry)
        if self._writer is not None:
            for tag, value in scalars(entry, self.classes).items():
                self._writer.add_scalar(tag, value, r)
            self._writer.flush()
        shown = entry.get("central") or entry.get("federated")
        source = "central" if entry.get("central") else "federated"
        if shown:
            # The class users watch: mitosis on the patch task, breast cancer on the EHR task.
            key = focus_class(self.classes)
            print(f"[fedfuse] round {r:>2}/{total} | train loss {entry.get('train_loss', math.nan):.3f} | "
                  f"loss {shown['loss']:.3f} | acc {shown['accuracy']:.3f} | macro AUC {shown['macro_auc']:.3f} | "
                  f"{key} AUC {shown['auc'][key]:.3f} ({source})", flush=True)
        self.save()

    def finish(self, extra: dict) -> dict:
        """Set ``final`` from the last round: central when the server has a test set, else federated."""
        scored = [r for r in self.data["rounds"] if r.get("central") or r.get("federated")]
        last = scored[-1] if scored else {}
        if last.get("central"):
            final = {**last["central"], "source": "central"}
        elif last.get("federated"):
            final = {**last["federated"], "source": "federated"}
        else:
            final = {"source": "none"}
        if last:
            final["round"] = last["round"]
        self.data["final"] = final
        self.data.update(extra)
        self.save()
        if self._writer is not None:
            self._writer.close()
        return final

    def save(self) -> None:
        write_json(self.path, self.data)
