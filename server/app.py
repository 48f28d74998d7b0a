"""ServerApp: federation-wide statistics, the rounds, central evaluation, checkpoints, the run's outputs.

The round loop is server/loop.py's, which runs Flower's strategy hooks itself
so a run can resume from its checkpoint and every reply is checked (with
``privacy.secure_aggregation``, Flower's legacy SecAgg+ workflow:
server/secagg.py, which neither checkpoints nor resumes). This module adds what
happens around it: one query round for the EHR feature statistics (sites
share sums, never rows), evaluation on the server's own held-out set when it
has one, ``metrics.json`` and a checkpoint after every round, and the final
model.

Every query's replies are checked as training replies are: a site whose
statistics reply is an error, or whose name, split sizes or sums do not hold
up, is left out of the run with one printed line saying why; a site's bad
stain or SHAP reply is left out of that aggregate. The run goes on while
``federation.min_sites`` remain.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.exception import PrivacyBudgetExhausted

from server import checkpoint, secagg
from server.loop import AdmittedGrid, Declared, TooFewSites, as_count, central_evaluation, run_rounds
from server.record import RunRecord, run_header, run_name
from server.strategy import BudgetSpent, build_strategy, site_error
from shared import explain, learner, stain
from shared.config import (
    Config,
    check_plain_name,
    classes_of,
    dump,
    eval_data_path,
    read_envelope,
    task_of,
)
from shared.data import Samples, load_folder, pooled_moments
from shared.metrics import focus_class
from shared.mimic import FEATURES
from shared.wire import STAIN_REFERENCE, from_record, to_record

APP_ROOT = Path(__file__).resolve().parent.parent
# What a site's stain statistics (shared/stain.py) can honestly be, per method: (lowest, highest) of each. Reinhard:
# LAB means within the channels' ranges as torchstain converts (L 0..100, a and b -128..127), standard deviations at
# most half a channel's range. Macenko: stain vectors are unit optical-density directions (each component in
# [-1, 1]); 99th-percentile concentrations are optical densities >= 0 (8-bit RGB reaches ln 256 = 5.5 a channel;
# 100 leaves room for nearly parallel stain vectors).
STAIN_RANGE = {"reinhard": ((0, -128, -128, 0, 0, 0), (100, 127, 127, 50, 127.5, 127.5)),
               "macenko": ((-1,) * 6 + (0, 0), (1,) * 6 + (100, 100))}
MAX_STAIN_IMAGES = 10**6  # tiles a site may say it measured: BreCaHAD holds 162, a hospital's archive far fewer than this
app = ServerApp()


def _run_dir(cfg: Config, given: str) -> Path:
    run_dir = Path(given) if given else Path("runs") / run_name(cfg.name)
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def _site_name(reply: Message, taken: dict[int, str]) -> str:
    """The name a site reports, if a hospital's reports and files can carry it: one a site, nothing a path or a
    terminal would read as more than a name. A name another node took first (in node order) is refused rather than
    renamed: two nodes with one name are the same hospital joined twice (its patients counted, its privacy budget
    spent twice) or one posing as another, and either needs its IT team, not a suffix."""
    site = reply.content.config_records.get("site")
    name = site.get("name") if site is not None else None
    check_plain_name(name, "site name (ConfigRecord 'site', key 'name': it names the hospital in reports and files)")
    owner = next((node for node, taken_name in taken.items() if taken_name == name), None)
    if owner is not None:
        raise ValueError(f"site name {name!r} is node {owner}'s already: each site needs its own site-name")
    return name


def _ehr_sums(reply: Message, examples: int) -> dict[str, np.ndarray]:
    """The site's per-feature count, sum and sum of squares, checked against ``examples`` and each other."""
    record, n = reply.content.metric_records.get("stats"), len(FEATURES)
    sums = {}
    for k in ("count", "sum", "sumsq"):
        value = record.get(k) if record is not None else None
        if not isinstance(value, list) or len(value) != n:
            raise ValueError(f"stats {k!r}: expected a list of {n} numbers, one per EHR feature (MetricRecord 'stats')")
        sums[k] = np.asarray(value, np.float64)
        if not np.isfinite(sums[k]).all():
            raise ValueError(f"stats {k!r} holds NaN or Inf: expected {n} finite numbers")
    count, total, squares = sums["count"], sums["sum"], sums["sumsq"]
    if ((count < 0) | (count > examples) | (count != np.round(count))).any():
        raise ValueError(f"stats 'count': expected whole numbers from 0 to the site's {examples} training examples")
    # An honest site's sums obey Cauchy-Schwarz (sum^2 <= count * sumsq) and no EHR value (shared/mimic.py: age,
    # vitals, lab values, flags) comes near MAX_WEIGHT, the bound of the EHR scaling the server pools from them.
    if ((squares < 0) | (squares > count * learner.MAX_WEIGHT**2) | (total**2 > count * squares * (1 + 1e-9) + 1e-9)).any():
        raise ValueError(f"stats 'sum' and 'sumsq' do not fit 'count': expected sums of values within "
                         f"+-{learner.MAX_WEIGHT:g}, with sum^2 <= count * sumsq")
    return sums


def _declared(reply: Message) -> Declared:
    """The split sizes a site reports with its statistics: the bounds of its later replies' ``num-examples``.

    Nothing bounds them but the site's own sums: a consistent liar (examples 10**12, counts and sums that agree)
    passes every check and dominates the pooled EHR scaling and every example-weighted aggregate (README, Hardening).
    """
    site = reply.content.config_records["site"]
    examples, test = as_count(site.get("examples")), site.get("test-examples")
    if examples is None or examples < 1:
        raise ValueError(f"examples {site.get('examples')!r}: expected a positive integer (the training split's size)")
    tested = as_count(test) if test is not None else None
    if test is not None and (tested is None or tested < 0):
        raise ValueError(f"test-examples {test!r}: expected a whole number (the test split's size)")
    return Declared(examples, tested)


def _ask(grid: Grid, messages: list[Message], timeout: float, what: str, parse: Callable[[Message], Any],
         label: Callable[[int], str]) -> tuple[dict[int, Any], dict[str, str]]:
    """Each site's answer to ``messages``, ``parse``d (node -> answer, in node order), and why the others were
    left out (site -> why, for metrics.json's ``left_out``): one printed line a site, with the site's own error
    where it failed (not only in flower.log)."""
    replies = {m.metadata.src_node_id: m for m in grid.send_and_receive(messages, timeout=timeout)}
    answers, left_out = {}, {}
    for node in sorted(m.metadata.dst_node_id for m in messages):
        reply = replies.get(node)
        if reply is None:
            reason = f"no reply within {timeout:g} s"
        elif reply.has_error():
            reason = site_error(reply.error.reason)
        else:
            try:
                answers[node] = parse(reply)
                continue
            except ValueError as err:
                reason = str(err)
        left_out[label(node)] = reason
        print(f"[fedfuse] site {label(node)} left out of {what}: {reason}", flush=True)
    return answers, left_out


def _site_statistics(grid: Grid, cfg: Config) -> tuple[dict[int, str], list[dict], dict[int, Declared], dict[str, str]]:
    """Ask every site for its EHR sums: node -> site name, the sums, what each site declared, the sites left out.

    A site whose reply is an error or fails a check (its name, its split sizes, the sums' lengths, finiteness and
    consistency) is left out of the run, with its reason printed; the run goes on while
    ``federation.min_sites`` remain.
    """
    deadline = time.time() + cfg.federation.connect_timeout
    nodes = list(grid.get_node_ids())
    while len(nodes) < cfg.federation.min_sites and time.time() < deadline:
        time.sleep(1)
        nodes = list(grid.get_node_ids())
    names: dict[int, str] = {}

    def parse(reply: Message) -> tuple[dict[str, np.ndarray], Declared]:
        name = _site_name(reply, names)
        names[reply.metadata.src_node_id] = name  # from here on, the printed lines name the site
        declared = _declared(reply)
        return _ehr_sums(reply, declared.examples), declared

    messages = [Message(RecordDict(), message_type="query.ehr_stats", dst_node_id=n) for n in nodes]
    answers, left_out = _ask(grid, messages, cfg.federation.setup_timeout, "the run", parse,
                             lambda node: names.get(node, f"node {node}"))
    if len(answers) < cfg.federation.min_sites:
        raise RuntimeError(f"only {len(answers)} site(s) answered with usable statistics; federation.min_sites is "
                           f"{cfg.federation.min_sites}" + "".join(f"; {s}: {why}" for s, why in left_out.items()))
    return ({node: names[node] for node in answers}, [sums for sums, _ in answers.values()],
            {node: declared for node, (_, declared) in answers.items()}, left_out)


def _shap_part(reply: Message, cfg: Config) -> tuple[np.ndarray, int]:
    """A site's mean |SHAP| per EHR feature and its row count, checked."""
    record, n = reply.content.metric_records.get("shap"), len(FEATURES)
    mean_abs, rows = (record.get("mean-abs"), as_count(record.get("rows"))) if record is not None else (None, None)
    if not isinstance(mean_abs, list) or len(mean_abs) != n or not np.all(np.isfinite(mean_abs)) \
            or min(mean_abs) < 0:
        raise ValueError(f"shap 'mean-abs': expected {n} finite numbers >= 0, one per EHR feature")
    if rows is None or not 1 <= rows <= cfg.report.shap_rows:
        raise ValueError(f"shap 'rows' {record.get('rows')!r}: expected a whole number from 1 to "
                         f"{cfg.report.shap_rows} (report.shap_rows)")
    return np.asarray(mean_abs, np.float64), rows


def _federated_importance(grid: Grid, names: dict[int, str], arrays: ArrayRecord, cfg: Config,
                          message_config: dict) -> tuple[dict, dict[str, str]]:
    """Federated SHAP: each site's mean |SHAP| per feature and row count, combined by row count; the sites left out."""
    messages = [Message(RecordDict({"arrays": arrays, "config": ConfigRecord(message_config)}),
                        message_type="query.shap", dst_node_id=n) for n in names]
    answers, left_out = _ask(grid, messages, cfg.federation.round_timeout, "federated SHAP",
                             lambda reply: _shap_part(reply, cfg), names.get)
    order = sorted(answers, key=names.get)
    parts = [answers[node] for node in order]
    if not parts:
        return {}, left_out
    mean_abs = explain.combine(parts)
    ranked = sorted(zip(FEATURES, mean_abs.tolist()), key=lambda fv: -fv[1])
    print("[fedfuse] federated SHAP, mean |SHAP| for " + focus_class(classes_of(cfg)) + ": "
          + ", ".join(f"{f} {v:.3f}" for f, v in ranked[:5]), flush=True)
    return {"method": "TreeExplainer" if cfg.model.name == "xgboost" else "DeepExplainer (mean patient reference)",
            "class": focus_class(classes_of(cfg)), "rows": {names[node]: answers[node][1] for node in order},
            "mean_abs_shap": dict(ranked)}, left_out


def _stain_part(reply: Message, method: str) -> tuple[np.ndarray, int]:
    """A site's mean stain statistics and its image count, checked against what they can be (:data:`STAIN_RANGE`,
    :data:`MAX_STAIN_IMAGES`).

    A consistent liar still passes: statistics anywhere in the colour space with up to MAX_STAIN_IMAGES images
    outweigh every honest site, so it can pull the federation's reference to any stain within those ranges (one no
    site's tissue looks like degrades every site's normalisation), never beyond them; the server cannot count a
    site's tiles.
    """
    record, n = reply.content.metric_records.get("stain"), len(stain.shipped(method))
    mean, images = (record.get("mean"), as_count(record.get("images"))) if record is not None else (None, None)
    low, high = STAIN_RANGE[method]
    values = np.asarray(mean if isinstance(mean, list) else [], np.float64)
    if len(values) != n or not ((values >= low) & (values <= high)).all():  # NaN fails both: refused too
        raise ValueError(f"stain 'mean': expected {n} numbers ({method} statistics), each from {list(low)} to "
                         f"{list(high)} in turn")
    if images is None or not 1 <= images <= MAX_STAIN_IMAGES:
        raise ValueError(f"stain 'images' {record.get('images')!r}: expected a whole number from 1 to "
                         f"{MAX_STAIN_IMAGES}")
    return values, images


def _federated_stain_reference(grid: Grid, names: dict[int, str],
                               cfg: Config) -> tuple[list[float], dict[str, int], dict[str, str]]:
    """The federation's stain reference (each site's mean tile statistics, weighted by its tile count), each
    site's tile count, and the sites left out."""
    messages = [Message(RecordDict(), message_type="query.stain", dst_node_id=n) for n in names]
    answers, left_out = _ask(grid, messages, cfg.federation.round_timeout, "the stain reference",
                             lambda reply: _stain_part(reply, cfg.data.stain_norm), names.get)
    if not answers:
        raise RuntimeError("data.stain_reference: federated, but no site sent usable stain statistics"
                           + "".join(f"; {s}: {why}" for s, why in left_out.items()))
    return (stain.combine(list(answers.values())).tolist(),
            dict(sorted((names[n], k) for n, (_, k) in answers.items())), left_out)


def _stain(grid: Grid, names: dict[int, str], cfg: Config) -> tuple[dict | None, dict, dict[str, str]]:
    """The run header's stain section, the messages' config (the federation's stain reference, if federated) and
    the sites left out of the stain query."""
    if cfg.data.stain_norm == "none":
        return None, {}, {}
    message_config, sources, left_out = {}, {}, {}
    if cfg.data.stain_reference == "federated":
        message_config[STAIN_REFERENCE], sources, left_out = _federated_stain_reference(grid, names, cfg)
    normaliser = stain.normaliser_for(cfg.data, message_config.get(STAIN_REFERENCE))
    return ({"method": cfg.data.stain_norm, "reference_from": cfg.data.stain_reference,
             "reference": normaliser.reference.tolist(), "images_per_site": sources}, message_config, left_out)


def _holdout(cfg: Config, message_config: dict) -> tuple[Samples | None, Path | None]:
    """The server's own test set (``server.eval_data``) and its folder, or None."""
    eval_path = eval_data_path(cfg)
    if eval_path is None:
        return None, None
    if not eval_path.is_dir():
        raise FileNotFoundError(f"server.eval_data: {eval_path} not found; set server.eval_data: null for a "
                                "server without a test set (final metrics are then the sites' mean)")
    return load_folder(eval_path, cfg.data, cfg.seed, task_of(cfg), message_config.get(STAIN_REFERENCE)), eval_path


def _announce(cfg: Config, names: dict[int, str], holdout: Samples | None, pretrained: dict | None,
              resumed: dict | None, run_dir: Path) -> None:
    """The run's first lines on screen: where it resumes or what it starts from, its sites and model."""
    if resumed:
        print(f"[fedfuse] resuming after round {resumed['round']} (checkpoint {run_dir / checkpoint.FILE})", flush=True)
    if pretrained and not resumed:
        made = pretrained["provenance"]
        origin = f"made by {made.get('made_by', '?')}, {made.get('method', '?')}" if made else "no provenance file"
        print(f"[fedfuse] pretrained weights {pretrained['path']} (sha256 {pretrained['sha256'][:16]}..., {origin}): "
              f"{len(pretrained['loaded'])} tensors loaded, {len(pretrained['missing'])} of the model's kept their "
              f"initialisation ({', '.join(pretrained['missing'][:4]) or 'none'})", flush=True)
    print(f"[fedfuse] {len(names)} sites: {', '.join(sorted(names.values()))}; model {cfg.model.name} "
          f"({task_of(cfg)} task), pairing {cfg.data.pairing}; central test set: "
          f"{f'{len(holdout)} samples' if holdout is not None else 'none (final = federated mean)'}", flush=True)


def _stopped(stop: Exception, record: RunRecord, cfg: Config) -> str:
    """Why the run stopped before its last round, printed; the round that stopped it is closed in the record."""
    if isinstance(stop, PrivacyBudgetExhausted):  # central DP: raised before the release that would pass the budget
        print(f"[fedfuse] stopped: central privacy budget: {stop}", flush=True)
        return f"central privacy budget: {stop}"
    print(f"[fedfuse] {stop}", flush=True)
    record.close_round(stop.round, cfg.federation.rounds)  # keeps who failed or declined, and why
    return str(stop)


def _finish(grid: Grid, cfg: Config, names: dict[int, str], record: RunRecord, arrays: ArrayRecord,
            message_config: dict, run_dir: Path, extra: dict, started: float) -> None:
    """After the rounds: federated SHAP, the final model and metrics (``extra`` too), the last lines on screen."""
    # Per-site aggregates are what secure aggregation hides from the server: no federated SHAP with it.
    if cfg.report.shap_rows and explain.has_ehr_input(cfg) and not cfg.privacy.secure_aggregation:
        record.data["importance"], left_out = _federated_importance(grid, names, arrays, cfg, message_config)
        record.left_out({"query.shap": left_out})
    learner.save(cfg, from_record(arrays), run_dir)
    final = record.finish({**extra, "seconds": round(time.time() - started, 1)})
    auc = ", ".join(f"{c} {v:.3f}" for c, v in final.get("auc", {}).items())
    print(f"[fedfuse] final ({final['source']}): macro AUC {final.get('macro_auc', float('nan')):.3f} | "
          f"accuracy {final.get('accuracy', float('nan')):.3f} | AUC {auc}", flush=True)
    print(f"[fedfuse] outputs in {run_dir.resolve()}", flush=True)


def _resumed(cfg: Config, run_dir: Path) -> dict:
    """The checkpoint to continue from (the run config says ``resume``)."""
    if cfg.privacy.secure_aggregation:
        raise ValueError("resume: runs with privacy.secure_aggregation keep no checkpoint (Flower's SecAgg+ workflow "
                         "owns its rounds)")
    return checkpoint.load(run_dir, cfg)


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg, given_dir, resume = read_envelope(dict(context.run_config), APP_ROOT)
    run_dir = _run_dir(cfg, given_dir)
    resumed = _resumed(cfg, run_dir) if resume else None
    dump(cfg, run_dir / "config.yaml")
    started = time.time()
    names, sums, declared, left_stats = _site_statistics(grid, cfg)
    grid = AdmittedGrid(grid, names)  # a site left out is never sampled
    weights, pretrained = learner.initial_weights(cfg, *pooled_moments(sums))
    stain_header, message_config, left_stain = _stain(grid, names, cfg)
    holdout, eval_path = _holdout(cfg, message_config)
    record = RunRecord(run_dir, classes_of(cfg), run_header(cfg, names, pretrained, holdout, eval_path, stain_header),
                       cfg.logging.tensorboard)
    if resumed:
        record.data, weights = resumed["record"], resumed["arrays"]
    record.left_out({"query.ehr_stats": left_stats, "query.stain": left_stain})
    _announce(cfg, names, holdout, pretrained, resumed, run_dir)
    latest = {"arrays": to_record(weights)}  # the model to keep if the run stops early
    evaluate = central_evaluation(cfg, record, holdout, latest)
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
            secagg.start(grid, context, cfg, strategy, weights, trained, declared, evaluate)
        else:
            run_rounds(grid, strategy, latest["arrays"], cfg, resumed["round"] + 1 if resumed else 1,
                       lambda node: names.get(node, str(node)), declared, evaluate, end_of_round, message_config)
    except (BudgetSpent, TooFewSites, PrivacyBudgetExhausted) as stop:
        extra["stopped"] = _stopped(stop, record, cfg)
    _finish(grid, cfg, names, record, latest["arrays"], message_config, run_dir, extra, started)
