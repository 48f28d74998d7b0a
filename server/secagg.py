"""Secure aggregation (SecAgg+): the server learns the sites' weighted mean, never one site's model.

Flower 1.42 has SecAgg+ only on its legacy API (``flwr.server``), so with
``privacy.secure_aggregation`` the training half of each round runs there:
``SecAggPlusWorkflow`` around the legacy ``FedAvg``. Everything else is the
run server/app.py prepares for every strategy: the sites' statistics, the
first model, site evaluation through the Message API, the central evaluation
that closes each round, the final model.

What crosses the legacy wire, in one order decided here: the sites receive
every array of the global model (names in the fit config) and return only the
trained ones, masked. The rest (the EHR scaling, frozen layers) are the
server's own and never change in training; kept out of the sum, they need no
room in the clipping range (the EHR means reach hundreds).

SecAgg+ sums integers. A site scales its arrays by ``n / max_weight`` (``n``
its training examples), clips them to ``[-c, c]`` and rounds each value
stochastically to one of ``Q`` levels (``c``, ``Q``: ``privacy.secagg_clipping_range``
and ``secagg_quantization_range``). With ``max_weight`` the largest site's
count no weight exceeds 1 and nothing in range is clipped; each element of the
mean is then off by less than ``k * 2c / Q / W`` for ``k`` sites of total
weight ``W`` (``W >= 1`` when the largest site takes part).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.common import FitRes, Parameters, Scalar, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server import Grid, LegacyContext, ServerConfig
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import FedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, Key
from flwr.serverapp.strategy import Strategy

from server.loop import Declared, check_train_metrics, checked_evaluation
from server.record import RunRecord
from server.strategy import BudgetSpent, note_spend
from shared.config import Config, ConfigError
from shared.learner import Weights
from shared.metrics import weighted_mean
from shared.wire import to_record

NUM_SHARES = 1.0  # every sampled site holds a share of every other's secrets: hospital federations are small
THRESHOLD = 2 / 3  # of the shares rebuild a secret (at least 2): a third of the sites may drop out, fewer collude in vain
TIMEOUT = 3600  # seconds a protocol stage waits for replies (the Message API strategies' default); later: dropped


class SecAggPlus(SecAggPlusWorkflow):
    """Flower's SecAgg+ workflow, keeping each round's protocol state: which sites dropped out, and why."""

    state = None

    def setup_stage(self, grid, context, state) -> bool:
        self.state = state
        return super().setup_stage(grid, context, state)


class SecureFedAvg(FedAvg):
    """Legacy FedAvg on what SecAgg+ releases, put back into the model; records the round's training.

    SecAgg+ hands every reply the same unmasked weighted mean of the trained
    arrays, so FedAvg's own mean of them is that mean again. A reply whose
    metrics ``judge`` refuses (node, metrics -> why, or None) is left out of
    the loss and the privacy record, and recorded under ``failed``: its masked
    update is in the sum already, bounded by SecAgg+'s clipping range.
    """

    def __init__(self, weights: Weights, secure: list[str], record: RunRecord, site_names: dict[int, str],
                 judge: Callable[[int, dict], str | None], **kwargs) -> None:
        super().__init__(initial_parameters=ndarrays_to_parameters(list(weights.values())), **kwargs)
        self.weights = weights  # the global model, updated by each round's aggregate
        self.secure = secure
        self.record = record
        self.site_names = site_names
        self.judge = judge
        self.aggregated = 0  # the last round whose aggregate arrived

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]],
                      failures: list) -> tuple[Parameters | None, dict[str, Scalar]]:
        results = [(proxy, res) for proxy, res in results if not self._refused(server_round, proxy.node_id, res)]
        parameters, metrics = super().aggregate_fit(server_round, results, failures)
        if parameters is None:
            return None, metrics
        mean = dict(zip(self.secure, parameters_to_ndarrays(parameters), strict=True))
        self.weights = {k: mean[k].astype(v.dtype) if k in mean else v for k, v in self.weights.items()}
        self.aggregated = server_round
        entry = self.record.round(server_round)
        entry["train_loss"] = float(metrics["train_loss"])
        if failures:  # sites that dropped out; SecAgg+ recovered the others' sum without them
            entry["dropped"] = _reasons(failures)
        for proxy, res in results:
            note_spend(self.record, self.site_names.get(proxy.node_id, f"node {proxy.node_id}"), server_round,
                       res.metrics)
        return ndarrays_to_parameters(list(self.weights.values())), metrics

    def _refused(self, server_round: int, node: int, res: FitRes) -> bool:
        reason = self.judge(node, res.metrics)
        if reason is not None:
            name = self.site_names.get(node, f"node {node}")
            self.record.round(server_round).setdefault("failed", {})[name] = f"rejected metrics: {reason}"
            print(f"[fedfuse] round {server_round}: site {name} sent unusable metrics: {reason}", flush=True)
        return reason is not None


def _train_loss(replies: list[tuple[int, dict[str, Scalar]]]) -> dict[str, Scalar]:
    """The sites' example-weighted training loss (sent in the clear, as in every run)."""
    return {"train_loss": weighted_mean([float(m["train_loss"]) for _, m in replies], [n for n, _ in replies])}


def _settings(cfg: Config, weights: Weights, secure: list[str], site_examples: list[int]) -> dict:
    """SecAgg+'s numbers for this run, checked against the first model; what the run record keeps."""
    p = cfg.privacy
    reach = max(float(np.abs(weights[k]).max(initial=0.0)) for k in secure)
    if reach > p.secagg_clipping_range:
        raise ConfigError(f"privacy.secagg_clipping_range: the first model's trained weights reach {reach:.4g}, "
                          f"past the clipping range {p.secagg_clipping_range}; raise it")
    k, c, q = len(site_examples), p.secagg_clipping_range, p.secagg_quantization_range
    return {
        "max_weight": max(site_examples),  # the largest site's training examples: every weight n / max_weight <= 1
        "clipping_range": c, "quantization_range": q, "initial_reach": reach,
        "num_shares": NUM_SHARES, "reconstruction_threshold": THRESHOLD,
        "error_bound": k * 2 * c / q,  # per element of the mean, with every site taking part (total weight >= 1)
        "note": "the server sees only the sum of the sites' masked, quantised trained weights; the EHR scaling "
                "and frozen layers stay the server's own",
    }


def _reasons(failures: list) -> list[str]:
    """The error replies' reasons, once each (the workflow keeps them without their node, some twice)."""
    return list(dict.fromkeys(getattr(f.args[0], "reason", str(f)) if isinstance(f, Exception) and f.args else repr(f)
                              for f in failures))


def _halted(server_round: int, workflow: SecAggPlus, record: RunRecord) -> Exception:
    """Why a round has no aggregate: every sampled site declined (budget) or too few finished the protocol."""
    state = workflow.state
    reasons = _reasons(state.failures)
    record.round(server_round)["dropped"] = reasons
    if reasons and not state.active_node_ids and all("budget_exhausted:" in r for r in reasons):
        return BudgetSpent(server_round)
    return RuntimeError(f"round {server_round}: secure aggregation halted: {len(state.active_node_ids)} of "
                        f"{len(state.sampled_node_ids)} sites finished, fewer than its threshold "
                        f"{state.threshold}: {'; '.join(reasons) or 'no replies'}")


def _announce(settings: dict, secured: int, total: int) -> None:
    print(f"[fedfuse] secure aggregation (SecAgg+): max_weight {settings['max_weight']} (largest site's training "
          f"examples), clipping range +-{settings['clipping_range']:g} (first model's trained weights reach "
          f"{settings['initial_reach']:.3g}), {settings['quantization_range']} quantisation levels: each element "
          f"of the mean within {settings['error_bound']:.2g}; {secured} of {total} arrays summed", flush=True)


def start(grid: Grid, context: Context, cfg: Config, evaluation: Strategy, weights: Weights, trained: set[str],
          declared: Mapping[int, Declared], evaluate_fn: Callable[[int, ArrayRecord], object]) -> None:
    """Run ``federation.rounds`` SecAgg+ rounds from ``weights``.

    ``evaluation``: the run's recording Message-API strategy (its site evaluation, record and site names);
    ``declared``: what each site reported before training (``max_weight``, the bounds of its replies);
    ``evaluate_fn``: the app's central evaluation, which closes each round in the record.
    """
    record, secure = evaluation.record, [k for k in weights if k in trained]
    record.data["secure_aggregation"] = settings = _settings(cfg, weights, secure, [d.examples for d in declared.values()])
    _announce(settings, len(secure), len(weights))

    def fit_config(server_round: int) -> dict[str, Scalar]:
        return {"server-round": server_round, "arrays": " ".join(weights), "secure": " ".join(secure),
                "clipping-range": float(settings["clipping_range"]), "max-weight": float(settings["max_weight"])}

    f = cfg.federation
    strategy = SecureFedAvg(weights, secure, record, evaluation.site_names,
                            lambda node, metrics: check_train_metrics(cfg, metrics, declared.get(node)),
                            fraction_fit=f.fraction_train, fraction_evaluate=0.0, min_fit_clients=f.min_sites,
                            min_available_clients=f.min_sites, on_fit_config_fn=fit_config,
                            fit_metrics_aggregation_fn=_train_loss)
    secagg = SecAggPlus(NUM_SHARES, THRESHOLD, max_weight=float(settings["max_weight"]),
                        clipping_range=float(settings["clipping_range"]),
                        quantization_range=settings["quantization_range"], timeout=TIMEOUT)

    def evaluate_round(grid: Grid, context: LegacyContext) -> None:
        """After SecAgg+'s round: the sites' and the server's evaluation, as :meth:`Strategy.start` does them."""
        server_round = int(context.state.config_records[MAIN_CONFIGS_RECORD][Key.CURRENT_ROUND])
        if strategy.aggregated != server_round:
            raise _halted(server_round, secagg, record)
        arrays = to_record(strategy.weights)
        sent = list(evaluation.configure_evaluate(server_round, arrays, ConfigRecord({}), grid))
        replies = checked_evaluation(cfg, sent, list(grid.send_and_receive(sent, timeout=TIMEOUT)), declared)
        evaluation.aggregate_evaluate(server_round, replies)
        evaluate_fn(server_round, arrays)

    legacy = LegacyContext(context, config=ServerConfig(num_rounds=f.rounds), strategy=strategy)
    DefaultWorkflow(fit_workflow=secagg, evaluate_workflow=evaluate_round)(grid, legacy)

