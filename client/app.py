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

from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from torch import nn

from shared.config import Config, from_run_config
from shared.data import Samples, ehr_statistics, load_site
from shared.metrics import classification_metrics
from shared.models import build_model
from shared.serde import flatten_metrics
from shared.train import predict, train_epochs
from simulations.partition import load_partition

APP_ROOT = Path(__file__).resolve().parent.parent
app = ClientApp()


def _site(context: Context) -> tuple[Config, int, str, Samples, Samples]:
    """Config, site index, site name and the site's (train, test) split."""
    cfg = from_run_config(dict(context.run_config), APP_ROOT)
    torch.set_num_threads(cfg.train.threads)
    node = context.node_config
    if "data-dir" in node:
        folder = Path(str(node["data-dir"]))
        index = int(node.get("site-index", 0))
        name = str(node.get("site-name", folder.name))
        train, test = load_site(folder, cfg.data, seed=cfg.seed + index)
    elif cfg.data.partition == "natural":
        index = int(node["partition-id"])
        name = f"site-{index}"
        train, test = load_site(Path(cfg.data.root) / name, cfg.data, seed=cfg.seed + index)
    else:
        index = int(node["partition-id"])
        name = f"{cfg.data.partition}-{index}"
        train, test = load_partition(Path(cfg.data.root), cfg.data, index, seed=cfg.seed)
    return cfg, index, name, train, test


def _model(cfg: Config, msg: Message, n_features: int) -> nn.Module:
    model = build_model(cfg.model, n_features, len(cfg.data.classes))
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    return model


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received global model on this site's training split."""
    cfg, index, _, data, _ = _site(context)
    model = _model(cfg, msg, data.ehr.shape[1])
    config = msg.content["config"]
    seed = int(np.random.SeedSequence([cfg.seed, index, int(config["server-round"])]).generate_state(1)[0])
    mu = float(config["proximal-mu"]) if "proximal-mu" in config else 0.0  # sent by FedProx
    loss = train_epochs(model, data, cfg.train, len(cfg.data.classes), seed, proximal_mu=mu)
    metrics = MetricRecord({"train_loss": loss, "num-examples": len(data)})
    return Message(RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": metrics}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the received global model on this site's test split."""
    cfg, index, _, _, data = _site(context)
    model = _model(cfg, msg, data.ehr.shape[1])
    probs, loss = predict(model, data)
    flat = flatten_metrics({**classification_metrics(data.labels, probs, cfg.data.classes), "loss": loss},
                           cfg.data.classes)
    metrics = MetricRecord({**flat, "site-index": index, "num-examples": len(data)})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)


@app.query("ehr_stats")
def ehr_stats(msg: Message, context: Context) -> Message:
    """Per-feature count, sum and sum of squares of the training EHR: summary statistics only."""
    _, index, name, data, _ = _site(context)
    stats = {k: v.tolist() for k, v in ehr_statistics(data.ehr).items()}
    return Message(RecordDict({"stats": MetricRecord({**stats, "site-index": index}),
                               "site": ConfigRecord({"name": name})}),
                   reply_to=msg)
