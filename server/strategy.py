"""Strategies from Flower's Message API, with the hooks fedfuse needs to see each site.

Every strategy is Flower's own class; :class:`Recording` is mixed in front of
it to record each site's evaluation and the round's training loss, so adding
a strategy is one entry in :data:`STRATEGIES`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable

from flwr.app import ArrayRecord, Message
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideFixedClipping,
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
from flwr.supercore.privacy_accounting import GaussianPrivacyEvent, NeighboringRelation, SamplingMethod
from flwr.supercore.privacy_accounting import PrivacyConfig as AccountingConfig
from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

from server.record import RunRecord
from shared.config import Config, classes_of
from shared.privacy import run_budget
from shared.serde import unflatten_metrics
from shared.wire import UNIFORM

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


PRIVACY_KEYS = ("epsilon", "epsilon-patient", "delta-patient")  # a training reply's local-DP metrics (NaN: none)
_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # Ray colours its tracebacks
_FLOWER_REASON = re.compile(r"<class '(?:[\w.]*\.)?([^'.]+)'>:<'(.*)'>", re.S)  # Flower's str(type(err)):<'str(err)'>
_RAY_MESSAGE = "occurred. Message: "  # Flower's Ray actor re-raises a ClientApp's error as ClientAppException(str(err))


def site_error(reason: str) -> str:
    """A site's error reply as one line: the ClientApp's own error and message, not Flower's wrapping.

    Flower 1.42 puts ``str(type(err)) + ":<'" + str(err) + "'>"`` into the reply; in a simulation ``err`` is
    Ray's error around Flower's ``ClientAppException``, whose text is the whole remote traceback. The site's
    error is its last meaningful line, named by the type of the ClientApp's own exception where the traceback
    shows it. Reasons fedfuse writes itself (timeouts, rejections, a declined budget) are kept as they are.
    """
    text = _ANSI.sub("", reason)
    wrapped = _FLOWER_REASON.fullmatch(text.strip())
    if wrapped is None:
        return " ".join(text.split())
    kind, text = wrapped.groups()
    if _RAY_MESSAGE in text:
        message = text.rsplit(_RAY_MESSAGE, 1)[1].strip()
        first = message.splitlines()[0] if message else ""
        own = re.search(r"^(?:[\w.]*\.)?(\w+): " + re.escape(first), text, re.M)
        kind = own.group(1) if own and own.group(1) != "ClientAppException" else "error"
    else:
        message = next((line for line in reversed(text.splitlines()) if line.strip()), "")
    return f"{kind}: {' '.join(message.split())}"


def note_failures(record: RunRecord, site_names: dict[int, str], server_round: int, replies: list[Message],
                  key: str = "failed", what: str = "did not train") -> None:
    """Print and record each error reply under the round's ``key`` (Flower's reply filter drops them)."""
    for m in replies:
        if m.has_error():
            name = site_names.get(m.metadata.src_node_id, f"node {m.metadata.src_node_id}")
            reason = site_error(m.error.reason)
            record.round(server_round).setdefault(key, {})[name] = reason
            print(f"[fedfuse] round {server_round}: site {name} {what}: {reason}", flush=True)


def note_spend(record: RunRecord, name: str, server_round: int, metrics) -> None:
    """Record a site's cumulative local-DP epsilon from its training reply's metrics (NaN: no local DP)."""
    if math.isnan(float(metrics["epsilon"])):
        return
    spent = {k.replace("-", "_"): float(metrics[k]) for k in PRIVACY_KEYS}
    record.round(server_round).setdefault("privacy", {})[name] = spent
    record.data["privacy"]["sites"][name] = {**spent, "round": server_round}


class BudgetSpent(RuntimeError):
    """No site may train any more without exceeding its privacy budget: the run ends, cleanly."""

    def __init__(self, server_round: int) -> None:
        super().__init__(f"round {server_round}: every site has spent its privacy budget; the run stops with the "
                         f"model of round {server_round - 1}")
        self.round = server_round


class RecordingEvaluation:
    """Mixin: record each site's evaluation in the run's record."""

    def __init__(self, record: RunRecord, site_names: dict[int, str], classes: tuple[str, ...], **kwargs) -> None:
        super().__init__(**kwargs)
        self.record = record
        self.site_names = site_names
        self.classes = classes

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]):
        """Record each site's evaluation; an error reply (a failed or rejected evaluation) under ``evaluate_failed``."""
        replies = list(replies)
        note_failures(self.record, self.site_names, server_round, replies, "evaluate_failed", "did not evaluate")
        sites = self.record.round(server_round).setdefault("sites", {})
        for m in replies:
            if m.has_error():
                continue
            flat = dict(m.content["metrics"])
            name = self.site_names.get(m.metadata.src_node_id, f"site-{int(flat['site-index'])}")
            metrics = unflatten_metrics(flat, self.classes)
            metrics["n"] = int(metrics.pop("num-examples"))
            metrics.pop("site-index", None)
            metrics.pop(UNIFORM, None)
            sites[name] = metrics
        return super().aggregate_evaluate(server_round, replies)


class Recording(RecordingEvaluation):
    """Mixin: also the round's failed replies, the sites' local-DP epsilons and the training loss."""

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        replies = list(replies)
        note_failures(self.record, self.site_names, server_round, replies)
        for m in replies:
            if not m.has_error():
                name = self.site_names.get(m.metadata.src_node_id, f"node {m.metadata.src_node_id}")
                note_spend(self.record, name, server_round, m.content["metrics"])
        if replies and all(m.has_error() and m.error.reason.startswith("budget_exhausted") for m in replies):
            raise BudgetSpent(server_round)
        arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is None:  # Flower would go on with the old model and report it as trained
            reasons = "; ".join(m.error.reason for m in replies if m.has_error())[:2000]
            raise RuntimeError(f"round {server_round}: no site returned a usable update ({reasons or 'no replies'})")
        if metrics is not None:
            self.record.round(server_round)["train_loss"] = float(metrics["train_loss"])
        return arrays, metrics


class CentralRecording:
    """Mixin in front of Flower's central-DP wrapper: record each release's epsilon and each voided round.

    The wrapper skips aggregation when any reply is an error (its accountant
    assumes every site in every round); the round then releases nothing and the
    global model stays as it was.
    """

    def __init__(self, record: RunRecord, site_names: dict[int, str], trained: set[str], *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.record = record
        self.site_names = site_names
        self.trained = trained

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        replies = list(replies)
        arrays, metrics = super().aggregate_train(server_round, replies)
        entry = self.record.round(server_round)
        if arrays is None:
            note_failures(self.record, self.site_names, server_round, replies)
            entry["voided"] = "no release: Flower's DP wrapper aggregates only when every sampled site replies"
            print(f"[fedfuse] round {server_round}: {entry['voided']}; the global model stays as it was", flush=True)
        else:
            spent = self.accountant.get_privacy_spent()
            entry["privacy"] = {"epsilon": spent.epsilon, "releases": spent.num_releases}
            if metrics is not None:
                entry["train_loss"] = float(metrics["train_loss"])
            self.record.data["privacy"]["central"] = {"epsilon": spent.epsilon, "delta": spent.delta,
                                                      "releases": spent.num_releases, "round": server_round}
        return arrays, metrics

    def _add_noise_to_aggregated_arrays(self, aggregated_arrays: ArrayRecord) -> ArrayRecord:
        # Buffers (the EHR scaling) and frozen layers never change in training: no update to protect, no noise.
        noisy = super()._add_noise_to_aggregated_arrays(
            ArrayRecord({k: aggregated_arrays[k] for k in aggregated_arrays.keys() if k in self.trained}))
        return ArrayRecord({k: noisy[k] if k in self.trained else aggregated_arrays[k] for k in aggregated_arrays.keys()})


def central_noise(epsilon: float, delta: float, releases: int) -> float:
    """The smallest noise multiplier whose ``releases`` Gaussian releases stay within ``epsilon`` (Flower's RDP)."""
    def spent(sigma: float) -> float:
        accountant = central_accountant(delta, 1, None)
        accountant.compose(GaussianPrivacyEvent(noise_multiplier=sigma, sample_size=1, population_size=1), releases)
        return accountant.get_epsilon(delta)

    low, high = 1e-2, 1e3
    for _ in range(60):  # bisection; ``high`` always meets the target
        mid = (low * high) ** 0.5
        low, high = (low, mid) if spent(mid) <= epsilon else (mid, high)
    return high


def central_accountant(delta: float, sites: int, budget: float | None) -> RdpAccountant:
    """Flower's RDP accountant for central DP: one release a round over ``sites`` equally weighted sites."""
    return RdpAccountant(AccountingConfig(target_delta=delta, population_size=sites, max_epsilon=budget,
                                          neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
                                          sampling_method=SamplingMethod.NO_AMPLIFICATION))


def _central_dp(cfg: Config, inner: FedAvg, record: RunRecord, site_names: dict[int, str], trained: set[str]):
    """FedAvg inside Flower's fixed-clipping DP wrapper, with Flower's RDP accountant (the ``dp`` extra)."""
    p, sites = cfg.privacy, len(site_names)
    sigma = p.noise_multiplier if p.noise_multiplier is not None else central_noise(p.epsilon, p.delta,
                                                                                    cfg.federation.rounds)
    budget = run_budget(p)
    base = DifferentialPrivacyServerSideFixedClipping if p.clipping == "server" else \
        DifferentialPrivacyClientSideFixedClipping
    cls = type(f"Recording{base.__name__}", (CentralRecording, base), {})
    return cls(record, site_names, trained, inner, sigma, p.clip_norm, sites,
               accountant=central_accountant(p.delta, sites, budget))


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


def build_strategy(cfg: Config, record: RunRecord, site_names: dict[int, str], trained: set[str]):
    """The configured strategy (``federation.strategy``), recording into ``record``.

    With ``privacy.mode: central`` it is wrapped in Flower's DP wrapper;
    ``trained`` names the weights training changes (the ones that get noise).
    """
    base = STRATEGIES[cfg.federation.strategy]
    central = cfg.privacy.mode == "central"
    # Flower's accountant takes only FedAvg's own aggregate_train: the DP wrapper's mixin records training instead.
    cls = type(f"Recording{base.__name__}", (RecordingEvaluation if central else Recording, base), {})
    weighting = {"weighted_by_key": UNIFORM} if central else {}
    strategy = cls(
        record, site_names, classes_of(cfg),
        fraction_train=cfg.federation.fraction_train, fraction_evaluate=cfg.federation.fraction_evaluate,
        **_sampling(cfg), **_options(cfg), **weighting,
    )
    return _central_dp(cfg, strategy, record, site_names, trained) if central else strategy
