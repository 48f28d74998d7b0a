"""ClientApp: a hospital site. Thin handlers: unpack the message, call ``shared/``, pack the reply.

Where the site's data is comes from ``node_config`` and nothing else, so the
same code runs in simulation and at a hospital:

* deployment: ``data-dir`` is the hospital's folder (BreCaHAD/, mimic-iv/,
  linkage.csv); ``site-name`` optionally names it in the server's reports;
* simulation: ``partition-id`` k selects ``<data.root>/site-<k>``, or, with
  ``data.partition`` other than ``natural``, the k-th group of cases re-dealt
  from all the site folders under ``data.root``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import fixedclipping_mod
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from client.secagg import legacy_app
from shared import explain, learner, privacy, stain
from shared.brecahad import list_tiles, read_image
from shared.config import Config, classes_of, from_run_config, task_of
from shared.data import Samples, ehr_statistics
from shared.metrics import classification_metrics
from shared.partition import images_folder, site_samples
from shared.serde import flatten_metrics
from shared.wire import STAIN_REFERENCE, UNIFORM, compact, from_record, to_record

APP_ROOT = Path(__file__).resolve().parent.parent
BUDGET_EXHAUSTED = 100  # Error code of a site that declines to train: its privacy budget would be exceeded
LOCAL_DP_REQUIRED = 103  # Error code of a site that refuses to train: its hospital allows only local DP, the run asks less
FEDBN_STATE = "fedbn-local-batch-norm"  # context.state: this site's BatchNorm layers under FedBN
HANG_MARGIN_S = 2.0  # faults.hang: how long past federation.round_timeout the site takes


@dataclass(frozen=True)
class Site:
    cfg: Config
    index: int
    name: str
    train: Samples
    test: Samples


def _site(context: Context, msg: Message | None = None, raw_stain: bool = False) -> Site:
    """This site's config, index, name and (train, test) split, for the configured model's task.

    ``msg``: the server's message, whose config carries the federation's stain reference (if any);
    ``raw_stain``: patches as scanned (the EHR statistics, asked before any reference exists, need no pixels).
    A process serving the same site again (a simulation's worker, round after round) reuses what it loaded.
    """
    config = msg.content.config_records.get("config") if msg is not None else None
    stain_reference = tuple(config[STAIN_REFERENCE]) if config is not None and STAIN_REFERENCE in config else None
    site = _load_site(_items(context.run_config), tuple(sorted(context.node_config.items())), stain_reference,
                      raw_stain)
    torch.set_num_threads(site.cfg.train.threads)
    return site


def _items(run_config) -> tuple:
    return tuple(sorted(run_config.items()))


def _config(context: Context) -> Config:
    """The run's config: every message of a run carries the same run config, so it is parsed once a run."""
    return _parsed(_items(context.run_config))


@functools.lru_cache(maxsize=8)
def _parsed(run_config: tuple) -> Config:
    return from_run_config(dict(run_config), APP_ROOT)


@functools.lru_cache(maxsize=4)
def _load_site(run_config: tuple, node_config: tuple, stain_reference: tuple | None, raw_stain: bool) -> Site:
    cfg = _parsed(run_config)
    if raw_stain and cfg.data.stain_norm == "none":  # the same data: one copy
        return _load_site(run_config, node_config, stain_reference, False)
    if raw_stain:
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, stain_norm="none"))
    reference = list(stain_reference) if stain_reference is not None else None
    index, name, train, test = site_samples(cfg, dict(node_config), task_of(cfg), reference)
    return Site(cfg, index, name, train, test)


def _ledger(site: Site, context: Context) -> tuple[privacy.Ledger, float]:
    """This site's privacy ledger and epsilon budget, both the hospital's own.

    Where the ledger lives: ``shared.privacy.ledger_folder`` (a SuperNode's own node config, never the run's).
    The budget: ``shared.privacy.site_budget`` (the run's, capped by the hospital's ``privacy-budget``).
    """
    p = site.cfg.privacy
    folder = privacy.ledger_folder(context.node_config, p, site.cfg.data.root)
    return privacy.Ledger(folder, site.train, p, site.name), privacy.site_budget(context.node_config, p)


def _with_local_bn(site: Site, context: Context, weights: dict, adapt_on: Samples | None = None) -> dict:
    """FedBN: the global ``weights`` with this site's own BatchNorm layers if it has trained; a site that has not
    (given ``adapt_on``, the patches it scores) re-estimates them there first, as an unseen hospital does."""
    if not site.cfg.federation.fedbn:
        return weights
    if FEDBN_STATE in context.state.array_records:
        return {**weights, **from_record(context.state[FEDBN_STATE])}
    return learner.adapt_bn(site.cfg, weights, adapt_on) if adapt_on is not None else weights


def fault_at(cfg: Config, site: int, server_round: int) -> str | None:
    """The failure ``faults`` injects at this site in this round: crash, hang, nan, or None."""
    return next((k for k in ("crash", "hang", "nan") if f"{site}@{server_round}" in getattr(cfg.faults, k)), None)


def _uniform(site: Site) -> dict[str, float]:
    """Central DP aggregates with equal site weights (what its accountant assumes): the weight it reads."""
    return {UNIFORM: 1.0} if site.cfg.privacy.mode == "central" else {}


def _central_clipping(msg: Message, context: Context, call_next) -> Message:
    """Flower's ``fixedclipping_mod`` on training messages that carry a clipping norm (central DP, client side)."""
    if msg.metadata.message_type == MessageType.TRAIN and KEY_CLIPPING_NORM in msg.content["config"]:
        return fixedclipping_mod(msg, context, call_next)
    return call_next(msg, context)


def _secure_aggregation(msg: Message, context: Context, call_next) -> Message:
    """With ``privacy.secure_aggregation``, training speaks Flower's legacy SecAgg+ protocol (client/secagg.py)."""
    if msg.metadata.message_type == MessageType.TRAIN and \
            _config(context).privacy.secure_aggregation:
        return SECAGG_APP(msg, context)
    return call_next(msg, context)


app = ClientApp(mods=[_secure_aggregation, _central_clipping])


def _privacy_metrics(site: Site, eps: float, dp: privacy.Plan | None) -> dict[str, float]:
    """The same keys in every reply (Flower aggregates only replies that agree): NaN without DP."""
    if dp is None:
        return {"epsilon": math.nan, "epsilon-patient": math.nan, "delta-patient": math.nan}
    if site.cfg.privacy.unit == "patient":
        eps_patient, delta_patient = eps, site.cfg.privacy.delta
    else:
        eps_patient, delta_patient = privacy.patient_bound(eps, site.cfg.privacy.delta, dp.max_patches)
    return {"epsilon": eps, "epsilon-patient": eps_patient, "delta-patient": delta_patient}


class Declined(RuntimeError):
    """The site declines to train this round; ``code``: its error reply's code, the message its reason."""

    code: int


class BudgetExhausted(Declined):
    """The site declines to train: this round would take its privacy ledger past its budget."""

    code = BUDGET_EXHAUSTED


class LocalDPRequired(Declined):
    """The site refuses to train: its hospital set ``privacy-budget``, and the run does not train under local DP."""

    code = LOCAL_DP_REQUIRED


def _private_plan(site: Site, context: Context, server_round: int) -> tuple[privacy.Plan | None, privacy.Ledger | None]:
    """This round's DP-SGD plan and the site's ledger (both None without local DP), or :class:`Declined`.

    Checked before the data is touched, so a refused or declined round spends nothing. Only training comes
    here: evaluation and the statistics queries, which spend no budget, stay allowed at every site.
    """
    dp = privacy.plan(site.cfg, site.train) if site.cfg.privacy.mode == "local" else None
    refused = privacy.local_dp_refusal(context.node_config, site.cfg.privacy, dp)
    if refused:
        raise LocalDPRequired(f"local_dp_required: site {site.name}: {refused}")
    if dp is None:
        return None, None
    ledger, budget = _ledger(site, context)
    after = ledger.epsilon(dp.entry)
    if after > budget:
        raise BudgetExhausted(f"budget_exhausted: site {site.name} has spent epsilon {ledger.epsilon():.4g} of its "
                              f"budget {budget:.4g}; round {server_round} would bring it to {after:.4g} "
                              f"({ledger.path})")
    return dp, ledger


def local_training(site: Site, context: Context, weights: learner.Weights, server_round: int,
                   mu: float = 0.0) -> tuple[learner.Weights, dict[str, float]]:
    """This site's update of ``weights`` and its reply metrics; both apps' train handlers call it.

    The site first checks what its hospital allows and its ledger (:func:`_private_plan`), declining before
    it touches the data.
    Randomness derives from (seed, site, round) alone, so a resumed run trains as a straight one
    (local DP's noise excepted: shared/privacy.py draws it from the OS; FedBN's local statistics are lost).
    """
    fault = fault_at(site.cfg, site.index, server_round)
    if fault == "crash":
        raise RuntimeError(f"injected fault (faults.crash): site {site.name} fails in round {server_round}")
    if fault == "hang":  # answers, but after the server stopped waiting
        time.sleep(site.cfg.federation.round_timeout + HANG_MARGIN_S)
    seed = int(np.random.SeedSequence([site.cfg.seed, site.index, server_round]).generate_state(1)[0])
    dp, ledger = _private_plan(site, context, server_round)
    eps = math.nan
    weights = _with_local_bn(site, context, weights)
    weights, loss = learner.local_update(site.cfg, weights, site.train, seed, mu, dp,
                                         (server_round - 1, max(server_round, site.cfg.federation.rounds)))
    if site.cfg.federation.fedbn:  # kept for this site's next round and evaluations; never sent (shared/wire.py)
        context.state[FEDBN_STATE] = to_record({k: weights[k] for k in learner.bn_names(site.cfg)})
    if ledger is not None:
        eps = ledger.spend(dp.entry, str(context.run_id), server_round)
    if fault == "nan":
        weights = {k: np.full_like(v, np.nan) if np.issubdtype(v.dtype, np.floating) else v for k, v in weights.items()}
    return weights, {"train_loss": loss, "num-examples": len(site.train), "site-index": site.index,
                     **_privacy_metrics(site, eps, dp), **_uniform(site)}


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received global model on this site's training split."""
    site = _site(context, msg)
    config = msg.content["config"]
    mu = float(config["proximal-mu"]) if "proximal-mu" in config else 0.0  # sent by FedProx
    try:
        weights, metrics = local_training(site, context, from_record(msg.content["arrays"]),
                                          int(config["server-round"]), mu)
    except Declined as declined:
        return Message(Error(code=declined.code, reason=str(declined)), reply_to=msg)
    return Message(RecordDict({"arrays": to_record(compact(site.cfg, weights)), "metrics": MetricRecord(metrics)}),
                   reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the received global model on this site's test split."""
    site = _site(context, msg)
    classes = classes_of(site.cfg)
    weights = _with_local_bn(site, context, from_record(msg.content["arrays"]), adapt_on=site.test)
    probs, loss = learner.predict(site.cfg, weights, site.test, adapt=False)
    flat = flatten_metrics({**classification_metrics(site.test.labels, probs, classes), "loss": loss}, classes)
    metrics = MetricRecord({**flat, "site-index": site.index, "num-examples": len(site.test), **_uniform(site)})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)


@app.query("ehr_stats")
def ehr_stats(msg: Message, context: Context) -> Message:
    """Per-feature count, sum and sum of squares of the training EHR, and its size: summary statistics only."""
    site = _site(context, raw_stain=True)
    stats = {k: v.tolist() for k, v in ehr_statistics(site.train.ehr).items()}
    return Message(RecordDict({"stats": MetricRecord(stats),
                               "site": ConfigRecord({"name": site.name, "examples": len(site.train),
                                                     "test-examples": len(site.test)})}), reply_to=msg)


@app.query("shap")
def shap_importance(msg: Message, context: Context) -> Message:
    """Mean |SHAP| per EHR feature over this site's explained test rows, and their count: aggregates only."""
    site = _site(context, msg)
    rows = explain.explained_rows(site.test, site.cfg.report.shap_rows, site.cfg.seed + site.index)
    weights = _with_local_bn(site, context, from_record(msg.content["arrays"]), adapt_on=site.test)
    mean_abs, n = explain.importance(site.cfg, weights, rows)
    return Message(RecordDict({"shap": MetricRecord({"mean-abs": mean_abs.tolist(), "rows": n})}), reply_to=msg)


@app.query("stain")
def stain_statistics(msg: Message, context: Context) -> Message:
    """The mean stain statistics of this site's tiles and how many: the federated reference's inputs, nothing else."""
    cfg = _config(context)
    folder = images_folder(cfg, context.node_config)
    images = (read_image(tile.image) for tile in list_tiles(folder))
    mean, n = stain.site_statistics(cfg.data.stain_norm, images, str(folder))
    return Message(RecordDict({"stain": MetricRecord({"mean": mean.tolist(), "images": n})}), reply_to=msg)


SECAGG_APP = legacy_app(_site, local_training)  # SecAgg+'s legacy ClientApp, loading and training as this one
