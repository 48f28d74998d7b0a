"""ServerApp: federation-wide statistics, the rounds, central evaluation, checkpoints, the run's outputs.

The round loop is server/loop.py's, which runs Flower's strategy hooks itself
so a run can resume from its checkpoint and every reply is checked (with
``privacy.secure_aggregation``, Flower's legacy SecAgg+ workflow:
server/secagg.py, which neither checkpoints nor resumes). This module adds what
happens around it: one query round for the EHR feature statistics (sites
share sums, never rows), evaluation on the server's own held-out set when it
has one, ``metrics.json`` and ``checkpoint.pkl`` after every round, and the
final model.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.exception import PrivacyBudgetExhausted

from client.wire import STAIN_REFERENCE, from_record, to_record
from server import checkpoint, secagg
from server.loop import TooFewSites, run_rounds
from server.record import RunRecord
from server.strategy import BudgetSpent, build_strategy
from shared import explain, learner, stain
from shared.config import Config, classes_of, dump, eval_data_path, focus_class, from_run_config, run_name, task_of
from shared.data import load_folder, pooled_moments
from shared.evaluation import bootstrap_ci
from shared.metrics import classification_metrics, ehr_only_auc
from shared.mimic import FEATURES

APP_ROOT = Path(__file__).resolve().parent.parent
app = ServerApp()


def _run_dir(cfg: Config, given: str) -> Path:
    run_dir = Path(given) if given else Path("runs") / run_name(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def _site_statistics(grid: Grid, cfg: Config) -> tuple[dict[int, str], list[dict]]:
    """Ask every site for its EHR sums; returns node -> site name and the statistics.

    Each site's statistics include ``examples``, the size of its training
    split: what SecAgg+'s ``max_weight`` must cover.
    """
    deadline = time.time() + 120
    nodes = list(grid.get_node_ids())
    while len(nodes) < cfg.federation.min_sites and time.time() < deadline:
        time.sleep(1)
        nodes = list(grid.get_node_ids())
    messages = [Message(RecordDict(), message_type="query.ehr_stats", dst_node_id=n) for n in nodes]
    names, stats = {}, []
    for reply in grid.send_and_receive(messages, timeout=600):
        if reply.has_error():
            print(f"[fedfuse] site {reply.metadata.src_node_id} failed to report statistics: {reply.error.reason}",
                  flush=True)
            continue
        names[reply.metadata.src_node_id] = str(reply.content["site"]["name"])
        s = reply.content["stats"]
        stats.append({**{k: np.asarray(s[k], np.float64) for k in ("count", "sum", "sumsq")},
                      "examples": int(reply.content["site"]["examples"])})
    if len(stats) < cfg.federation.min_sites:
        raise RuntimeError(f"only {len(stats)} site(s) answered; federation.min_sites is {cfg.federation.min_sites}")
    return names, stats


def _federated_importance(grid: Grid, names: dict[int, str], arrays: ArrayRecord, cfg: Config,
                          message_config: dict) -> dict:
    """Federated SHAP: each site's mean |SHAP| per feature and row count, combined by row count."""
    messages = [Message(RecordDict({"arrays": arrays, "config": ConfigRecord(message_config)}),
                        message_type="query.shap", dst_node_id=n) for n in names]
    parts, rows = [], {}
    for reply in sorted(grid.send_and_receive(messages, timeout=cfg.federation.round_timeout),
                        key=lambda m: names.get(m.metadata.src_node_id, "")):
        name = names.get(reply.metadata.src_node_id, str(reply.metadata.src_node_id))
        if reply.has_error():
            print(f"[fedfuse] site {name} could not explain the model: {reply.error.reason}", flush=True)
            continue
        shap_record = reply.content["shap"]
        parts.append((np.asarray(shap_record["mean-abs"]), int(shap_record["rows"])))
        rows[name] = int(shap_record["rows"])
    if not parts:
        return {}
    mean_abs = explain.combine(parts)
    ranked = sorted(zip(FEATURES, mean_abs.tolist()), key=lambda fv: -fv[1])
    print("[fedfuse] federated SHAP, mean |SHAP| for " + focus_class(classes_of(cfg)) + ": "
          + ", ".join(f"{f} {v:.3f}" for f, v in ranked[:5]), flush=True)
    return {"method": "TreeExplainer" if cfg.model.name == "xgboost" else "DeepExplainer (mean patient reference)",
            "class": focus_class(classes_of(cfg)), "rows": rows, "mean_abs_shap": dict(ranked)}


def _federated_stain_reference(grid: Grid, names: dict[int, str], cfg: Config) -> tuple[list[float], dict[str, int]]:
    """The federation's stain reference: each site's mean tile statistics, weighted by its tile count."""
    messages = [Message(RecordDict(), message_type="query.stain", dst_node_id=n) for n in names]
    parts, images = [], {}
    for reply in grid.send_and_receive(messages, timeout=cfg.federation.round_timeout):
        name = names.get(reply.metadata.src_node_id, str(reply.metadata.src_node_id))
        if reply.has_error():
            print(f"[fedfuse] site {name} sent no stain statistics: {reply.error.reason}", flush=True)
            continue
        parts.append((np.asarray(reply.content["stain"]["mean"]), int(reply.content["stain"]["images"])))
        images[name] = int(reply.content["stain"]["images"])
    if not parts:
        raise RuntimeError("data.stain_reference: federated, but no site sent stain statistics")
    return stain.combine(parts).tolist(), dict(sorted(images.items()))


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = from_run_config(dict(context.run_config), APP_ROOT)
    run_dir = _run_dir(cfg, str(context.run_config.get("run-dir", "")))
    resumed = checkpoint.load(run_dir) if str(context.run_config.get("resume", "")).lower() == "true" else None
    if resumed and cfg.privacy.secure_aggregation:
        raise ValueError("resume: runs with privacy.secure_aggregation keep no checkpoint (Flower's SecAgg+ workflow "
                         "owns its rounds)")
    dump(cfg, run_dir / "config.yaml")
    classes = classes_of(cfg)
    started = time.time()

    names, stats = _site_statistics(grid, cfg)
    weights, pretrained = learner.initial_weights(cfg, *pooled_moments(stats))
    stain_header, message_config = None, {}
    if cfg.data.stain_norm != "none":
        sources = {}
        if cfg.data.stain_reference == "federated":
            message_config[STAIN_REFERENCE], sources = _federated_stain_reference(grid, names, cfg)
        normaliser = stain.normaliser_for(cfg.data, message_config.get(STAIN_REFERENCE))
        stain_header = {"method": cfg.data.stain_norm, "reference_from": cfg.data.stain_reference,
                        "reference": normaliser.reference.tolist(), "images_per_site": sources}

    holdout, eval_path = None, eval_data_path(cfg)
    if eval_path is not None:
        if not eval_path.is_dir():
            raise FileNotFoundError(f"server.eval_data: {eval_path} not found; set server.eval_data: null for a "
                                    "server without a test set (final metrics are then the sites' mean)")
        holdout = load_folder(eval_path, cfg.data, cfg.seed, task_of(cfg), message_config.get(STAIN_REFERENCE))
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
    if cfg.privacy.mode == "local":
        p = cfg.privacy
        header["privacy"] = {
            "mode": p.mode, "unit": p.unit, "delta": p.delta, "target_epsilon": p.epsilon,
            "noise_multiplier": p.noise_multiplier, "max_grad_norm": p.max_grad_norm,
            "note": "epsilon: cumulative in each site's ledger (all runs on that data), for one "
                    f"{p.unit}; epsilon_patient / delta_patient: the guarantee for a whole patient "
                    + ("(the same: a unit is a patient)" if p.unit == "patient" else
                       "(group privacy over the site's most patches of one patient)"),
            "sites": {},
        }
    elif cfg.privacy.mode == "central":
        p = cfg.privacy
        header["privacy"] = {
            "mode": p.mode, "unit": "site", "delta": p.delta, "target_epsilon": p.epsilon,
            "clipping": p.clipping, "clip_norm": p.clip_norm,
            "note": "epsilon: for a whole site's contribution to this run (Flower's RDP accountant, FedAvg with "
                    "equal site weights, every site every round, no amplification by sampling)",
            "central": None,
        }
    record = RunRecord(run_dir, classes, header, cfg.logging.tensorboard)
    if resumed:
        record.data = resumed["record"]
        weights = resumed["arrays"]
        print(f"[fedfuse] resuming after round {resumed['round']} (checkpoint {run_dir / checkpoint.FILE})", flush=True)
    if pretrained and not resumed:
        print(f"[fedfuse] pretrained weights {pretrained['path']}: {len(pretrained['loaded'])} tensors loaded, "
              f"{len(pretrained['not_loaded'])} not ({', '.join(list(pretrained['not_loaded'])[:4])}, ...)",
              flush=True)
    print(f"[fedfuse] {len(names)} sites: {', '.join(sorted(names.values()))}; model {cfg.model.name} "
          f"({task_of(cfg)} task), pairing {cfg.data.pairing}; central test set: "
          f"{f'{len(holdout)} samples' if holdout is not None else 'none (final = federated mean)'}", flush=True)

    latest = {"arrays": to_record(weights)}  # the model to keep if the run stops early

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        latest["arrays"] = arrays
        if server_round == 0:
            return None
        if holdout is not None:
            probs, loss = learner.predict(cfg, from_record(arrays), holdout)
            central = {**classification_metrics(holdout.labels, probs, classes), "loss": loss}
            if server_round == cfg.federation.rounds:  # the final model: 95 % intervals over patients
                central["ci95"] = bootstrap_ci(holdout, probs, classes, n=200, seed=cfg.seed)
            record.round(server_round)["central"] = central
        record.close_round(server_round, cfg.federation.rounds)
        return None

    trained = learner.trained_names(cfg)
    strategy = build_strategy(cfg, record, names, trained)
    if resumed:
        checkpoint.restore_strategy(strategy, resumed["strategy"])
        checkpoint.restore_rng(resumed)

    def end_of_round(server_round: int, arrays: ArrayRecord) -> None:
        checkpoint.save(run_dir, server_round, from_record(arrays), strategy, record.data)

    extra = {}
    try:
        if cfg.privacy.secure_aggregation:  # the strategy serves for the sites' evaluation only
            secagg.start(grid, context, cfg, strategy, weights, trained, [s["examples"] for s in stats], evaluate)
        else:
            run_rounds(grid, strategy, latest["arrays"], cfg, resumed["round"] + 1 if resumed else 1,
                       lambda node: names.get(node, str(node)), evaluate, end_of_round, message_config)
    except (BudgetSpent, TooFewSites) as stop:
        print(f"[fedfuse] {stop}", flush=True)
        extra["stopped"] = str(stop)
        record.close_round(stop.round, cfg.federation.rounds)  # keeps who failed or declined, and why
    except PrivacyBudgetExhausted as stop:  # central DP: raised before the release that would pass the budget
        extra["stopped"] = f"central privacy budget: {stop}"
        print(f"[fedfuse] stopped: {extra['stopped']}", flush=True)
    # Per-site aggregates are what secure aggregation hides from the server: no federated SHAP with it.
    if cfg.report.shap_rows and explain.has_ehr_input(cfg) and not cfg.privacy.secure_aggregation:
        record.data["importance"] = _federated_importance(grid, names, latest["arrays"], cfg, message_config)
    learner.save(cfg, from_record(latest["arrays"]), run_dir)
    final = record.finish({**extra, "seconds": round(time.time() - started, 1)})
    auc = ", ".join(f"{c} {v:.3f}" for c, v in final.get("auc", {}).items())
    print(f"[fedfuse] final ({final['source']}): macro AUC {final.get('macro_auc', float('nan')):.3f} | "
          f"accuracy {final.get('accuracy', float('nan')):.3f} | AUC {auc}", flush=True)
    print(f"[fedfuse] outputs in {run_dir.resolve()}", flush=True)
