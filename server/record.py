"""What a run leaves behind: ``metrics.json`` (the run's header, then written after every round), one printed line a
round."""

from __future__ import annotations

import math
from datetime import datetime
from pathlib import Path

from shared.cache import write_json
from shared.config import Config, classes_of, task_of
from shared.data import Samples
from shared.metrics import ehr_only_auc, focus_class, weighted_mean
from shared.serde import FLAT_KEYS as SCALARS


def run_name(name: str) -> str:
    """``<name>-<timestamp>``: the default folder name of a run."""
    return f"{name}-{datetime.now():%Y%m%d-%H%M%S}"


def privacy_header(cfg: Config) -> dict | None:
    """What metrics.json says of the run's differential privacy (None without)."""
    p = cfg.privacy
    if p.mode == "local":
        return {
            "mode": p.mode, "unit": p.unit, "delta": p.delta, "target_epsilon": p.epsilon,
            "noise_multiplier": p.noise_multiplier, "max_grad_norm": p.max_grad_norm,
            "note": "epsilon: cumulative in each site's ledger (all runs on that data), for one "
                    f"{p.unit}; epsilon_patient / delta_patient: the guarantee for a whole patient "
                    + ("(the same: a unit is a patient)" if p.unit == "patient" else
                       "(group privacy over the site's most patches of one patient)"),
            "sites": {},
        }
    if p.mode == "central":
        return {
            "mode": p.mode, "unit": "site", "delta": p.delta, "target_epsilon": p.epsilon,
            "clipping": p.clipping, "clip_norm": p.clip_norm,
            "note": "epsilon: for a whole site's contribution to this run (Flower's RDP accountant, FedAvg with "
                    "equal site weights, every site every round, no amplification by sampling)",
            "central": None,
        }
    return None


def run_header(cfg: Config, names: dict[int, str], pretrained: dict | None, holdout: Samples | None,
               eval_path: Path | None, stain_header: dict | None) -> dict:
    """metrics.json's description of the run, before its rounds."""
    classes = classes_of(cfg)
    header = {
        "name": cfg.name, "model": cfg.model.name, "task": task_of(cfg), "pairing": cfg.data.pairing,
        "classes": list(classes),
        "data_root": cfg.data.root, "sites": sorted(names.values()),
        "pretrained": pretrained or "none: weights initialised at random",
        "central_eval": str(eval_path) if holdout is not None else None,
        **({"stain": stain_header} if stain_header else {}),
    }
    if cfg.data.pairing == "by_label" and task_of(cfg) == "patch":
        header["leakage"] = {
            "note": "by_label pairing: EHR rows were chosen by the patch class, so the EHR alone predicts it",
            "ehr_only_macro_auc": ehr_only_auc(holdout, classes) if holdout is not None else None,
        }
    privacy = privacy_header(cfg)
    return {**header, "privacy": privacy} if privacy is not None else header


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
