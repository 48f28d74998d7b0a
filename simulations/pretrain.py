"""``fedfuse pretrain``: image-encoder weights made on data that is not the federation's.

Transfer learning as the study does it needs weights from elsewhere, and
nothing here can download ImageNet's. So a "public" data set stands in for
one: hospitals generated with another seed (so other patients, grades,
stains, blur and scanners) than the federation's, the way BreCaHAD itself is
public to a hospital network. Two ways to train on it:

* ``supervised``: the encoder with a patch-class head, on the public data's
  labels (its case-split test score goes into the provenance);
* ``simclr``: contrastive learning on the patches without their labels
  (``shared.contrastive``), what a federation could also run on its own sites.

The encoder's state dict (torchvision's key names for ResNet-18) goes to
``pretrain.out`` as safetensors, with its provenance beside it
(``shared.pretrain``): data, seed, steps, the run's settings and the file's
sha256. ``model.pretrained: <out>`` loads it into a run's encoder.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from shared import learner
from shared.config import Config, ConfigError, classes_of, task_of, to_dict
from shared.contrastive import simclr
from shared.data import concat, load_sites
from shared.metrics import classification_metrics
from shared.models import image_encoder, image_encoders
from shared.pretrain import provenance_path, write_weights
from simulations.pooled import train_alone

METHODS = ("supervised", "simclr")


@dataclass(frozen=True)
class PretrainConfig:
    """How the weights are made; ``base`` (in the YAML) says on what data and for which encoder."""

    method: str = "supervised"  # supervised (the public data's labels) | simclr (its patches alone)
    steps: int = 2000
    batch_size: int = 64  # simclr: patches a step, two views each
    lr: float = 0.001
    temperature: float = 0.2  # simclr: NT-Xent's temperature
    out: str = "weights/{model}-{method}.safetensors"


def check(base: Config, settings: PretrainConfig) -> None:
    """Refuse settings that cannot make weights, naming the key; and an output that is not fedfuse's to replace."""
    if settings.method not in METHODS:
        raise ConfigError(f"pretrain.method: expected one of {', '.join(METHODS)}, got {settings.method!r}")
    if base.model.name not in ("cnn", "resnet18"):
        raise ConfigError(f"base.model.name: pretrain makes image-encoder weights; expected cnn or resnet18, got "
                          f"{base.model.name!r}")
    for key in ("steps", "batch_size"):
        if not 1 <= getattr(settings, key) <= 1_000_000:
            raise ConfigError(f"pretrain.{key}: expected 1 to 1,000,000, got {getattr(settings, key)}")
    if not 0 < settings.lr <= 10 or not 0 < settings.temperature <= 10:
        raise ConfigError("pretrain.lr and pretrain.temperature: expected positive, at most 10")


def output_path(base: Config, settings: PretrainConfig) -> Path:
    """``pretrain.out`` with ``{model}`` and ``{method}`` filled in; a file there is replaced only if
    ``fedfuse pretrain`` wrote it (its provenance says so): never a user's own weights."""
    path = Path(settings.out.format(model=base.model.name, method=settings.method))
    if path.exists():
        made = provenance_path(path)
        if path.is_dir() or not made.is_file() or '"made_by": "fedfuse pretrain"' not in made.read_text():
            raise FileExistsError(f"pretrain.out {path}: exists and was not written by fedfuse pretrain; choose "
                                  "another --out (your own weights are never overwritten)")
    return path


def run_pretrain(base: Config, settings: PretrainConfig, echo=print) -> tuple[Path, dict]:
    """Train the encoder, write its weights and provenance; returns the path and the provenance."""
    check(base, settings)
    path = output_path(base, settings)
    started = time.time()
    task, classes = task_of(base), classes_of(base)
    root = Path(base.data.root)
    splits = load_sites(base.data, base.seed, task)
    train, test = concat([tr for tr, _ in splits]), concat([te for _, te in splits])
    echo(f"pretrain {base.model.name} ({settings.method}) on {root}: {len(train)} training patches, "
         f"{len(test)} test patches, {settings.steps} steps")
    result: dict = {}
    cfg = dataclasses.replace(base, train=dataclasses.replace(base.train, batch_size=settings.batch_size,
                                                              lr=settings.lr))
    if settings.method == "supervised":
        weights = train_alone(cfg, train, settings.steps, base.seed)
        scores = classification_metrics(test.labels, learner.predict(cfg, weights, test)[0], classes)
        result["public_test"] = {"accuracy": round(scores["accuracy"], 4), "macro_auc": round(scores["macro_auc"], 4),
                                 "auc": {k: round(v, 4) for k, v in scores["auc"].items()}}
        echo(f"public test split: macro AUC {scores['macro_auc']:.3f}, accuracy {scores['accuracy']:.3f}")
        encoder = image_encoders(learner.network(cfg, weights))[0]
    else:
        torch.manual_seed(base.seed)
        encoder = image_encoder(base.model, base.model.name)
        images = concat([train, test]).images  # labels are never read
        losses = simclr(encoder, base.model.image_latent, images, cfg.train, settings.steps, base.seed,
                        settings.temperature, echo=echo)
        result["final_loss"] = round(float(np.mean(losses[-max(1, settings.steps // 10):])), 4)
    provenance = {
        "made_by": "fedfuse pretrain", "method": settings.method, "encoder": base.model.name,
        "data": {"root": str(root), "preset": base.data.preset, "sites": base.data.sites, "seed": base.seed,
                 "patches": len(train) + len(test), "labels_used": settings.method == "supervised"},
        "seed": base.seed, "steps": settings.steps, "settings": dataclasses.asdict(settings),
        "model": to_dict(base)["model"], "train": to_dict(cfg)["train"], **result,
        "seconds": round(time.time() - started, 1),
    }
    return path, write_weights(encoder.weights_module(), path, provenance)
