"""Strategies from Flower's Message API, with the hooks fedfuse needs to see each site.

Every strategy is Flower's own class; :class:`Recording` is mixed in front of
it to record each site's evaluation and the round's training loss, so adding
a strategy is one entry in :data:`STRATEGIES`.
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import Message
from flwr.serverapp.strategy import FedAdam, FedAvg, FedMedian, FedProx, FedTrimmedAvg, FedYogi, Krum

from server.record import RunRecord
from shared.config import Config
from shared.serde import unflatten_metrics

STRATEGIES: dict[str, type[FedAvg]] = {
    "fedavg": FedAvg,
    "fedprox": FedProx,  # the proximal term itself is in the client's loss (shared/train.py)
    "fedadam": FedAdam,
    "fedyogi": FedYogi,
    "fedmedian": FedMedian,
    "fedtrimmedavg": FedTrimmedAvg,
    "krum": Krum,
}


class Recording:
    """Mixin: record each site's evaluation and the round's training loss in the run's record."""

    def __init__(self, record: RunRecord, site_names: dict[int, str], classes: tuple[str, ...], **kwargs) -> None:
        super().__init__(**kwargs)
        self.record = record
        self.site_names = site_names
        self.classes = classes

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        arrays, metrics = super().aggregate_train(server_round, replies)
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


def build_strategy(cfg: Config, record: RunRecord, site_names: dict[int, str]) -> FedAvg:
    """The configured strategy (``federation.strategy``), recording into ``record``."""
    base = STRATEGIES[cfg.federation.strategy]
    cls = type(f"Recording{base.__name__}", (Recording, base), {})
    n = cfg.federation.min_sites
    return cls(
        record, site_names, cfg.data.classes,
        fraction_train=cfg.federation.fraction_train, fraction_evaluate=cfg.federation.fraction_evaluate,
        min_train_nodes=n, min_evaluate_nodes=n, min_available_nodes=n,
        **_options(cfg),
    )
