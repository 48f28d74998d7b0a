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

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.wire import from_record, to_record
from shared import learner
from shared.config import Config, classes_of, from_run_config, task_of
from shared.data import Samples, ehr_statistics, load_site
from shared.metrics import classification_metrics
from shared.serde import flatten_metrics
from simulations.partition import load_partition

APP_ROOT = Path(__file__).resolve().parent.parent
app = ClientApp()


@dataclass(frozen=True)
class Site:
    cfg: Config
    index: int
    name: str
    train: Samples
    test: Samples


def _site(context: Context) -> Site:
    """This site's config, index, name and (train, test) split, for the configured model's task."""
    cfg = from_run_config(dict(context.run_config), APP_ROOT)
    torch.set_num_threads(cfg.train.threads)
    node, task = context.node_config, task_of(cfg)
    if "data-dir" in node:
        folder = Path(str(node["data-dir"]))
        index = int(node.get("site-index", 0))
        name = str(node.get("site-name", folder.name))
        train, test = load_site(folder, cfg.data, cfg.seed + index, task)
    elif cfg.data.partition == "natural":
        # With a site left out, the SuperNodes map onto the remaining sites in order.
        index = [k for k in range(cfg.data.sites) if k != cfg.data.leave_out][int(node["partition-id"])]
        name = f"site-{index}"
        train, test = load_site(Path(cfg.data.root) / name, cfg.data, cfg.seed + index, task)
    else:
        index = int(node["partition-id"])
        name = f"{cfg.data.partition}-{index}"
        train, test = load_partition(Path(cfg.data.root), cfg.data, index, cfg.seed, task)
    return Site(cfg, index, name, train, test)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received global model on this site's training split."""
    site = _site(context)
    config = msg.content["config"]
    seed = int(np.random.SeedSequence([site.cfg.seed, site.index, int(config["server-round"])]).generate_state(1)[0])
    mu = float(config["proximal-mu"]) if "proximal-mu" in config else 0.0  # sent by FedProx
    weights, loss = learner.local_update(site.cfg, from_record(msg.content["arrays"]), site.train, seed, mu)
    metrics = MetricRecord({"train_loss": loss, "num-examples": len(site.train)})
    return Message(RecordDict({"arrays": to_record(weights), "metrics": metrics}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the received global model on this site's test split."""
    site = _site(context)
    classes = classes_of(site.cfg)
    probs, loss = learner.predict(site.cfg, from_record(msg.content["arrays"]), site.test)
    flat = flatten_metrics({**classification_metrics(site.test.labels, probs, classes), "loss": loss}, classes)
    metrics = MetricRecord({**flat, "site-index": site.index, "num-examples": len(site.test)})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)


@app.query("ehr_stats")
def ehr_stats(msg: Message, context: Context) -> Message:
    """Per-feature count, sum and sum of squares of the training EHR: summary statistics only."""
    site = _site(context)
    stats = {k: v.tolist() for k, v in ehr_statistics(site.train.ehr).items()}
    return Message(RecordDict({"stats": MetricRecord(stats),
                               "site": ConfigRecord({"name": site.name})}), reply_to=msg)
