"""Checkpoints: what the server needs to continue a run after its last complete round.

Written after every round to ``<run dir>/checkpoint.pkl``, atomically (a
temporary file, then a rename), so a crash leaves the previous round's
checkpoint whole. It holds the global model, the strategy's own state (e.g.
FedAdam's moments, the central-DP accountant), the round, the server's random
states, the run's record so far (every round's metrics, the best round, the
sites' last reported epsilons; the ledgers themselves stay at the sites).
"""

from __future__ import annotations

import pickle
import random
import types
from pathlib import Path

import numpy as np
import torch

from shared.cache import write_pickle

FILE = "checkpoint.pkl"
VERSION = 1
# Attributes of fedfuse's strategy classes that are wiring, rebuilt from the config on resume, not state.
WIRING = {"record", "site_names", "classes", "trained"}


class _Nested(dict):
    """The state of an attribute kept as its own attributes (an inner strategy, Flower's accountant)."""


def strategy_state(strategy) -> dict:
    """The strategy's attributes, recursively (a DP wrapper's inner strategy, its accountant), less the wiring.

    Arrays and plain containers are kept as they are; an object is kept whole if it pickles, else as its own
    attributes (Flower's accountant holds modules beside its state). A DP wrapper's inner strategy is always
    kept as its attributes, so its wiring is rebuilt rather than restored.
    """
    out = {}
    for k, v in vars(strategy).items():
        if k in WIRING or isinstance(v, types.ModuleType):
            continue
        nested = k == "strategy" or (hasattr(v, "__dict__") and not _pickles(v))
        out[k] = _Nested(strategy_state(v)) if nested else v
    return out


def _pickles(obj) -> bool:
    try:
        pickle.dumps(obj)
    except (TypeError, pickle.PicklingError, AttributeError):
        return False
    return True


def restore_strategy(strategy, state: dict) -> None:
    for k, v in state.items():
        if isinstance(v, _Nested):
            restore_strategy(getattr(strategy, k), v)
        else:
            setattr(strategy, k, v)


def save(run_dir: Path, server_round: int, arrays: dict[str, np.ndarray], strategy, record: dict) -> None:
    scored = [r for r in record["rounds"] if r.get("central") or r.get("federated")]
    best = max(scored, key=lambda r: (r.get("central") or r["federated"])["macro_auc"], default=None)
    state = {
        "version": VERSION, "round": server_round, "arrays": arrays, "strategy": strategy_state(strategy),
        "record": record, "best_round": best["round"] if best else None,
        "rng": {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()},
    }
    write_pickle(Path(run_dir) / FILE, state)


def load(run_dir: Path) -> dict:
    """The checkpoint of ``run_dir`` (a run folder this user wrote: pickle trusts its source)."""
    path = Path(run_dir) / FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no checkpoint to resume from (runs write one after every round; "
                                "secure aggregation runs do not)")
    try:
        with open(path, "rb") as f:
            state = pickle.load(f)
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError) as err:
        raise ValueError(f"{path}: unreadable checkpoint: {err}") from None
    if not isinstance(state, dict) or state.get("version") != VERSION:
        raise ValueError(f"{path}: a checkpoint of another fedfuse version (expected version {VERSION})")
    return state


def restore_rng(state: dict) -> None:
    random.setstate(state["rng"]["python"])
    np.random.set_state(state["rng"]["numpy"])
    torch.set_rng_state(state["rng"]["torch"])
