"""Where fedfuse's plain payloads become Flower records, and back: the one place, for both apps.

Weights are ``{name: numpy array}`` (``shared.learner``); metrics are flat
scalars (``shared.serde``). The ServerApp imports these too, so the two sides
cannot disagree on the wire format.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord

UNIFORM = "uniform-weight"  # central DP: the reply weight, 1 for every site, as Flower's accountant requires


def to_record(weights: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in weights.items()})


def from_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in record.items()}
