"""Communication: bytes a site sends and receives each round, per model, and what float16 or the trainable part would.

    .venv/bin/python -m bench.communication [--tiny | --quick | --full] [--out FILE] [--data DIR]

For each model of the study (cnn, resnet18, mlp, xgboost, fusion, late_fusion;
the quickstart's model settings otherwise), the messages of one round are built
as the apps build them (``shared.wire.to_record``, Flower's records) and
measured in Flower's protobuf form, what crosses the wire:

* up, per site and round: the training reply (the site's weights and its
  metrics) and the evaluation reply (metrics);
* down, per site and round: the training and the evaluation instruction (the
  global weights each time, and a config).

Beside what is sent now (every array, float32): the same with float32 arrays
sent as float16, with only the trainable part (``learner.trained_names``: no
buffers, no frozen layers), with both, and for ResNet-18 with
``model.freeze`` on. XGBoost sends trees, not arrays: under bagging a site
sends only its new tree and receives the whole ensemble, which grows by one tree
per site a round, so it is followed over the rounds on generated data (3 sites,
Flower's ``aggregate_bagging`` as FedXgbBagging uses it), with the UBJSON size
of the same model beside the JSON that is sent.

What float16 costs in accuracy is measured by training: the same seeded
federation (in-process Grid, the quickstart's settings) with
``federation.upload_dtype`` float32 and float16 (and float16 with
``federation.upload: trainable``), the final central macro AUC of each.

Sizes: XGBoost's rounds tiny 2, quick 6 (the quickstart's), full 20 (the
paper's budget of 60 trees over 3 sites); the float16 runs: tiny fusion 1 round
of 2 steps, quick fusion 3 rounds of 20 steps, full fusion and cnn at the
quickstart's 6 rounds of 2 epochs.
"""

from __future__ import annotations

import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from flwr.app import ConfigRecord, MetricRecord, RecordDict
from flwr.common.serde import recorddict_to_proto
from flwr.serverapp.strategy.strategy_utils import aggregate_bagging

from bench import common
from shared import learner, xgb
from shared.config import apply_overrides, classes_of
from shared.data import load_site
from shared.mimic import FEATURES
from shared.serde import booster_to_array, flatten_metrics
from shared.wire import compact, to_record

NAME = "communication"
MODELS = ("cnn", "resnet18", "mlp", "xgboost", "fusion", "late_fusion")
SIZES = {"tiny": {"xgb_rounds": 2, "sites": 2, "auc_models": ("fusion",),
                  "auc_set": {"federation.rounds": 1, "train.steps": 2, "data.patch_size": 32}},
         "quick": {"xgb_rounds": 6, "sites": 3, "auc_models": ("fusion",),
                   "auc_set": {"federation.rounds": 3, "train.steps": 20}},
         "full": {"xgb_rounds": 20, "sites": 3, "auc_models": ("fusion", "cnn"), "auc_set": {}}}
UPLOADS = {"float32": {}, "float16": {"federation.upload_dtype": "float16"},
           "trainable": {"federation.upload": "trainable"},
           "trainable_float16": {"federation.upload_dtype": "float16", "federation.upload": "trainable"}}
TRAINED_UPLOADS = ("float32", "float16", "trainable_float16")  # the macro AUC runs


def _bytes(content: RecordDict) -> int:
    """Size of a message's content in Flower's protobuf form."""
    return recorddict_to_proto(content).ByteSize()


def _train_reply(weights: dict) -> RecordDict:
    metrics = {"train_loss": 0.0, "num-examples": 1, "site-index": 0, "epsilon": math.nan,
               "epsilon-patient": math.nan, "delta-patient": math.nan}  # the keys client/app.py sends
    return RecordDict({"arrays": to_record(weights), "metrics": MetricRecord(metrics)})


def _instruction(weights: dict) -> RecordDict:
    return RecordDict({"arrays": to_record(weights), "config": ConfigRecord({"server-round": 1})})


def _evaluate_reply(cfg) -> RecordDict:
    flat = flatten_metrics({}, classes_of(cfg))  # the fixed key set every site's evaluation reply has
    return RecordDict({"metrics": MetricRecord({**flat, "site-index": 0, "num-examples": 1})})


def neural(cfg) -> dict:
    """Bytes per site and round for a torch model: as sent now, float16, trainable part, both."""
    weights, _ = learner.initial_weights(cfg, np.zeros(len(FEATURES), np.float32), np.ones(len(FEATURES), np.float32))
    trained = learner.trained_names(cfg)
    evaluate_up = _bytes(_evaluate_reply(cfg))
    # Down is the whole float32 model whatever comes back (a site must hold all of it).
    down = 2 * _bytes(_instruction(weights))
    out = {"arrays": len(weights), "parameters": int(sum(v.size for v in weights.values())),
           "trainable_parameters": int(sum(weights[k].size for k in trained)),
           "array_bytes": int(sum(v.nbytes for v in weights.values()))}
    for name, upload in UPLOADS.items():
        sent = compact(apply_overrides(cfg, upload), weights)
        out[name] = {"up": _bytes(_train_reply(sent)) + evaluate_up, "down": down}
    return out


def trees(cfg, root, rounds: int, sites: int) -> dict:
    """XGBoost under bagging, round by round on generated data: bytes up and down per site, JSON and UBJSON."""
    splits = [load_site(root / f"site-{k}", cfg.data, cfg.seed + k, "ehr")[0] for k in range(sites)]
    evaluate_up = _bytes(_evaluate_reply(cfg))
    model, per_round = b"", []
    for r in range(1, rounds + 1):
        down = 2 * _bytes(_instruction({"0": booster_to_array(model)}))
        replies = [xgb.boost(model, s.ehr, s.labels, cfg.model, cfg.seed + k + 1000 * r, bagging=True)[0]
                   for k, s in enumerate(splits)]
        up = [_bytes(_train_reply({"0": booster_to_array(raw)})) + evaluate_up for raw in replies]
        for raw in replies:
            model = aggregate_bagging(model, raw)
        ubj = len(xgb.load_booster(model).save_raw("ubj"))
        per_round.append({"round": r, "up": float(np.mean(up)), "down": down, "model_json": len(model),
                          "model_ubj": ubj})
    return {"sites": sites, "rounds": per_round, "up_per_tree": per_round[-1]["up"],
            "down_last_round": per_round[-1]["down"], "down_growth_per_round": (
                (per_round[-1]["down"] - per_round[0]["down"]) / (rounds - 1) if rounds > 1 else None),
            "ubj_over_json": per_round[-1]["model_ubj"] / per_round[-1]["model_json"]}


def upload_accuracy(root, size: dict, work) -> dict:
    """Final central macro AUC of the same seeded federation for each upload format, per model."""
    from simulations.flower import federate

    out = {}
    for model in size["auc_models"]:
        out[model] = {}
        for name in TRAINED_UPLOADS:
            cfg = common.config(root, {"model.name": model, "data.sites": size["sites"], **size["auc_set"], **UPLOADS[name]})
            run_dir = work / f"{model}-{name}"
            with common.quiet(work / "apps.log"):
                federate(cfg, run_dir, "inprocess")
            out[model][name] = json.loads((run_dir / "metrics.json").read_text())["final"]["macro_auc"]
    return out


def main(argv: list[str] | None = None) -> int:
    args = common.parser(NAME, __doc__).parse_args(argv)
    started = time.perf_counter()
    size = SIZES[args.size]
    root = common.dataset(args.data, "quick", size["sites"])
    models = {}
    for name in MODELS:
        strategy = "xgb_bagging" if name == "xgboost" else "fedavg"
        cfg = common.config(root, {"model.name": name, "federation.strategy": strategy, "data.sites": size["sites"]})
        models[name] = trees(cfg, root, size["xgb_rounds"], size["sites"]) if name == "xgboost" else neural(cfg)
    frozen = common.config(root, {"model.name": "resnet18", "model.freeze": True})
    models["resnet18 (freeze)"] = neural(frozen)

    kib = 1024
    rows = []
    for name, m in models.items():
        if name == "xgboost":
            rows.append([f"xgboost ({size['xgb_rounds']} rounds)", "1 tree", m["up_per_tree"] / kib, "-", "-", "-",
                         m["down_last_round"] / kib])
            continue
        rows.append([name, m["parameters"], m["float32"]["up"] / kib, m["float16"]["up"] / kib,
                     m["trainable"]["up"] / kib, m["trainable_float16"]["up"] / kib, m["float32"]["down"] / kib])
    print("bytes per site per round, in KiB, as Flower's protobuf carries them (up: site -> server; down: server -> "
          "site):")
    print(common.table(["model", "parameters", "up now", "up float16", "up trainable", "up trainable f16", "down now"],
                       rows))
    x = models["xgboost"]
    print(f"xgboost: a site sends its new tree ({x['up_per_tree'] / kib:.1f} KiB) and receives the whole ensemble, "
          f"{common.fmt(x['down_growth_per_round'] and x['down_growth_per_round'] / kib)} KiB more each round; "
          f"UBJSON would be {x['ubj_over_json']:.2f}x the JSON")
    with tempfile.TemporaryDirectory(prefix="fedfuse-bench-upload-") as work:
        accuracy = upload_accuracy(root, size, Path(work))
    for model, aucs in accuracy.items():
        print(f"{model}: final macro AUC, the same seeded run, by upload format: "
              + ", ".join(f"{k} {v:.3f}" for k, v in aucs.items()))

    figures = {"models": models, "macro_auc_by_upload": accuracy}
    settings = {"models": list(MODELS), "xgb_rounds": size["xgb_rounds"], "sites": size["sites"],
                "upload_runs": {"models": list(size["auc_models"]), "set": size["auc_set"]},
                "units": "bytes of the messages' contents in Flower's protobuf form, per site and round"}
    headlines = [common.target(f"{m}: up per site per round, {kind}", models[m][kind]["up"] / kib, None, " KiB")
                 for m in ("fusion", "resnet18") for kind in ("float32", "float16")]
    headlines += [common.target(f"{m}: macro AUC with float16 uploads minus float32", a["float16"] - a["float32"], None)
                  for m, a in accuracy.items()]
    common.write(args, NAME, started, settings, figures, headlines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
