"""Strategies from Flower's Message API, with the hooks fedfuse needs to see each site.

Every strategy is Flower's own class; :class:`Recording` is mixed in front of
it to record each site's evaluation and the round's training loss, so adding
a strategy is one entry in :data:`STRATEGIES`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from flwr.app import Message
from flwr.serverapp.strategy import (
    FedAdam,
    FedAvg,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedXgbBagging,
    FedXgbCyclic,
    FedYogi,
    Krum,
)

from server.record import RunRecord
from shared.config import Config, classes_of
from shared.serde import unflatten_metrics

STRATEGIES: dict[str, type[FedAvg]] = {
    "fedavg": FedAvg,
    "fedprox": FedProx,  # the proximal term itself is in the client's loss (shared/train.py)
    "fedadam": FedAdam,
    "fedyogi": FedYogi,
    "fedmedian": FedMedian,
    "fedtrimmedavg": FedTrimmedAvg,
    "krum": Krum,
    "xgb_bagging": FedXgbBagging,  # xgboost: each site's new trees appended to the global model
    "xgb_cyclic": FedXgbCyclic,  # xgboost: one site a round continues the whole model
}


class BudgetSpent(RuntimeError):
    """No site may train any more without exceeding its privacy budget: the run ends, cleanly."""

    def __init__(self, server_round: int) -> None:
        super().__init__(f"round {server_round}: every site has spent its privacy budget; the run stops with the "
                         f"model of round {server_round - 1}")
        self.round = server_round


class Recording:
    """Mixin: record each site's evaluation and the round's training loss in the run's record."""

    def __init__(self, record: RunRecord, site_names: dict[int, str], classes: tuple[str, ...], **kwargs) -> None:
        super().__init__(**kwargs)
        self.record = record
        self.site_names = site_names
        self.classes = classes

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        replies = list(replies)
        entry = self.record.round(server_round)
        for m in replies:
            name = self.site_names.get(m.metadata.src_node_id, f"node {m.metadata.src_node_id}")
            if m.has_error():  # dropped by Flower's reply filter; recorded and printed here
                entry.setdefault("failed", {})[name] = m.error.reason
                print(f"[fedfuse] round {server_round}: site {name} did not train: {m.error.reason}", flush=True)
            elif not math.isnan(float(m.content["metrics"]["epsilon"])):  # NaN: the run has no DP
                spent = {k.replace("-", "_"): float(m.content["metrics"][k])
                         for k in ("epsilon", "epsilon-patient", "delta-patient")}
                entry.setdefault("privacy", {})[name] = spent
                self.record.data["privacy"]["sites"][name] = {**spent, "round": server_round}
        if replies and all(m.has_error() and m.error.reason.startswith("budget_exhausted") for m in replies):
            raise BudgetSpent(server_round)
        arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is None:  # Flower would go on with the old model and report it as trained
            reasons = "; ".join(m.error.reason for m in replies if m.has_error())[:2000]
            raise RuntimeError(f"round {server_round}: no site returned a usable update ({reasons or 'no replies'})")
        if metrics is not None:
            self.record.round(server_round)["train_loss"] = float(metrics["train_loss"])
        return arrays, metrics

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]):
        replies = list(replies)
        sites = self.record.round(server_round).setdefault("sites", {})
        for m in replies:
            if m.has_error():
                continue
            flat = dict(m.content["metrics"])
            name = self.site_names.get(m.metadata.src_node_id, f"site-{int(flat['site-index'])}")
            metrics = unflatten_metrics(flat, self.classes)
            metrics["n"] = int(metrics.pop("num-examples"))
            metrics.pop("site-index", None)
            sites[name] = metrics
        return super().aggregate_evaluate(server_round, replies)


def _options(cfg: Config) -> dict:
    """The chosen strategy's own settings, from ``federation.*``."""
    f = cfg.federation
    return {
        "fedprox": {"proximal_mu": f.proximal_mu},
        "fedadam": {"eta": f.server_lr, "eta_l": cfg.train.lr, "beta_1": f.beta_1, "beta_2": f.beta_2, "tau": f.tau},
        "fedyogi": {"eta": f.server_lr, "eta_l": cfg.train.lr, "beta_1": f.beta_1, "beta_2": f.beta_2, "tau": f.tau},
        "fedtrimmedavg": {"beta": f.trim_beta},
        "krum": {"num_malicious_nodes": f.krum_malicious},
    }.get(f.strategy, {})


def _sampling(cfg: Config) -> dict:
    n = cfg.federation.min_sites
    if cfg.federation.strategy == "xgb_cyclic":  # one site a round; Flower fixes its own minimums
        return {"min_available_nodes": n}
    return {"min_train_nodes": n, "min_evaluate_nodes": n, "min_available_nodes": n}


def build_strategy(cfg: Config, record: RunRecord, site_names: dict[int, str]) -> FedAvg:
    """The configured strategy (``federation.strategy``), recording into ``record``."""
    base = STRATEGIES[cfg.federation.strategy]
    cls = type(f"Recording{base.__name__}", (Recording, base), {})
    return cls(
        record, site_names, classes_of(cfg),
        fraction_train=cfg.federation.fraction_train, fraction_evaluate=cfg.federation.fraction_evaluate,
        **_sampling(cfg), **_options(cfg),
    )
