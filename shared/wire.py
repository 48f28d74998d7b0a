"""Where fedfuse's plain payloads become Flower records, and back: the one place, for both apps.

Weights are ``{name: numpy array}`` (``shared.learner``); metrics are flat
scalars (``shared.serde``). The ServerApp imports these too, so the two sides
cannot disagree on the wire format.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord

from shared.config import Config
from shared.learner import bn_names, trained_names

UNIFORM = "uniform-weight"  # central DP: the reply weight, 1 for every site, as Flower's accountant requires
STAIN_REFERENCE = "stain-reference"  # in every message's config: the federation's stain statistics (shared/stain.py)


def to_record(weights: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in weights.items()})


def from_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in record.items()}


def compact(cfg: Config, weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """What a site uploads: every array, or only the trained ones (``federation.upload``), never its BatchNorm
    layers under FedBN, floats as ``federation.upload_dtype``."""
    if cfg.federation.upload == "trainable":
        keep = trained_names(cfg)
        weights = {k: v for k, v in weights.items() if k in keep}
    if cfg.federation.fedbn:
        local = bn_names(cfg)
        weights = {k: v for k, v in weights.items() if k not in local}
    if cfg.federation.upload_dtype == "float16":
        weights = {k: v.astype(np.float16) if v.dtype == np.float32 else v for k, v in weights.items()}
    return weights


def expand(cfg: Config, reference: dict[str, np.ndarray], update: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The server's side of :func:`compact`: untrained arrays (and, under FedBN, BatchNorm layers) a site left out
    are the global model's it was sent, float16 arrays go back to the global model's dtype. Anything else stays
    for the update check to judge."""
    update = dict(update)
    kept_by_server = set()
    if cfg.federation.upload == "trainable":
        kept_by_server |= set(reference) - trained_names(cfg)
    if cfg.federation.fedbn:
        kept_by_server |= bn_names(cfg)
    update.update({k: v for k, v in reference.items() if k not in update and k in kept_by_server})
    return {k: v.astype(reference[k].dtype) if v.dtype == np.float16 and k in reference else v
            for k, v in update.items()}
