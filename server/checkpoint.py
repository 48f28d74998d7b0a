"""Checkpoints: what the server needs to continue a run after its last complete round, in files that cannot run code.

After every round three files are written to the run folder:

* ``checkpoint-<round>.safetensors``: every array (the global model, the
  strategy's arrays such as FedAdam's moments, the RNG states' arrays);
  safetensors is a JSON header and raw bytes, nothing in it is executed;
* ``checkpoint-<round>.json``: everything else as plain JSON: the round, the
  run's record so far (every round's metrics, the best round, the sites' last
  reported epsilons; the ledgers themselves stay at the sites), the run's
  settings, the RNG states' scalars and the strategy's state as a typed tree
  (:func:`encode`);
* ``checkpoint.json`` (:data:`FILE`), written last: the two files' names and
  sha256. Reading starts there, and a file whose bytes do not hash to its entry
  is refused before anything parses it.

Each file goes to a temporary name, is fsynced and renamed; the manifest is
renamed last, so a crash at any point leaves it naming the previous round's
files, whole. The files of the round before the latest are kept as well (a
reader that read the manifest just before it moved still finds them); older
ones are deleted.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from flwr.serverapp.strategy import Strategy
from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant
from safetensors import SafetensorError
from safetensors.numpy import load as load_tensors
from safetensors.numpy import save as save_tensors

from shared.cache import write_atomic
from shared.config import Config, fixed_settings, settings_changed
from shared.config import load as load_config
from shared.learner import MAX_WEIGHT

FILE = "checkpoint.json"
OLD_FILE = "checkpoint.pkl"  # fedfuse's pickled checkpoints: never opened
FORMAT = "fedfuse-checkpoint"
VERSION = 2
DATA = re.compile(r"checkpoint-(\d+)\.(safetensors|json)")
# Settings a resume may change: more rounds; injected faults (faults.*) are how a test stops a run, not what it trains.
# Attributes of fedfuse's strategy classes that are wiring, rebuilt from the config on resume, not state; Flower's
# metric aggregation functions are the constructor's defaults (code, not state).
WIRING = {"record", "site_names", "classes", "trained", "train_metrics_aggr_fn", "evaluate_metrics_aggr_fn"}
SCALARS = (bool, int, float, str, type(None))
TAGS = ("tuple", "dict", "array", "bytes", "arrayrecord", "object", "accountant")


class StrategyState(dict):
    """A strategy's saved attributes (a nested one: a DP wrapper's inner strategy), and the file they came from."""

    def __init__(self, attributes: dict[str, Any], file: Path) -> None:
        super().__init__(attributes)
        self.file = file


class AccountantState(dict):
    """Flower's RDP accountant as its own ``state_dict()``: its modules and backend are rebuilt, not saved."""


def encode(value: Any, path: str, tensors: dict[str, np.ndarray]) -> Any:
    """``value`` as a JSON tree; its arrays go into ``tensors`` under ``path``, the tree names them.

    JSON scalars and lists are themselves; anything else is one tagged object
    (:data:`TAGS`): a tuple, a dict (``[key, value]`` pairs, so int keys stay
    ints), an array or bytes (a tensor's name), Flower's ``ArrayRecord``, a
    nested strategy (its attributes) or Flower's accountant (its
    ``state_dict()``). Other types are refused, so a new attribute is noticed
    rather than silently dropped or pickled.
    """
    if type(value) in SCALARS:
        return value
    if type(value) in (list, tuple):
        items = [encode(v, f"{path}[{i}]", tensors) for i, v in enumerate(value)]
        return items if type(value) is list else {"tuple": items}
    if type(value) is dict and all(type(k) in SCALARS for k in value):
        return {"dict": [[k, encode(v, f"{path}[{k!r}]", tensors)] for k, v in value.items()]}
    if isinstance(value, np.ndarray) and value.dtype.kind in "biuf":
        tensors[path] = np.require(value, requirements="C")  # np.ascontiguousarray would make a 0-d array 1-d
        return {"array": path}
    if type(value) is bytes:  # an xgboost strategy's booster
        tensors[path] = np.frombuffer(value, np.uint8)
        return {"bytes": path}
    if isinstance(value, ArrayRecord):
        return {"arrayrecord": encode({k: a.numpy() for k, a in value.items()}, path, tensors)}
    if isinstance(value, RdpAccountant):
        return {"accountant": value.state_dict()}
    if isinstance(value, Strategy):
        return {"object": {k: encode(v, f"{path}.{k}", tensors) for k, v in vars(value).items() if k not in WIRING}}
    raise TypeError(f"checkpoint: {path} is a {type(value).__qualname__}, which a checkpoint does not hold; add it to "
                    "WIRING in server/checkpoint.py if the config rebuilds it, or give its type an encoding there")


def decode(node: Any, path: str, file: Path, tensors: dict[str, np.ndarray]) -> Any:
    """The inverse of :func:`encode`, for the tags it writes only; anything else is refused, naming ``file``."""
    if not isinstance(node, dict) or len(node) == 1:  # a tagged object has exactly one key
        match node:
            case None | bool() | int() | float() | str():
                return node
            case list():
                return [decode(v, f"{path}[{i}]", file, tensors) for i, v in enumerate(node)]
            case {"tuple": list(items)}:
                return tuple(decode(v, f"{path}[{i}]", file, tensors) for i, v in enumerate(items))
            case {"dict": list(pairs)} if all(isinstance(p, list) and len(p) == 2 and type(p[0]) in SCALARS
                                              for p in pairs):
                return {k: decode(v, f"{path}[{k!r}]", file, tensors) for k, v in pairs}
            case {"array": str(name)} if name in tensors:
                return tensors[name]
            case {"bytes": str(name)} if name in tensors and tensors[name].dtype == np.uint8:
                return tensors[name].tobytes()
            case {"arrayrecord": dict(body)}:
                arrays = decode(body, path, file, tensors)
                if isinstance(arrays, dict) and all(isinstance(a, np.ndarray) for a in arrays.values()):
                    return ArrayRecord({k: Array(a) for k, a in arrays.items()})
            case {"object": dict(attributes)}:
                return StrategyState({k: decode(v, f"{path}.{k}", file, tensors) for k, v in attributes.items()},
                                     file)
            case {"accountant": dict(state)}:
                return AccountantState(state)
    raise ValueError(f"{file}: {path}: expected a JSON scalar, a list or one of {', '.join(TAGS)} (with the tensor it "
                     f"names), got {json.dumps(node)[:80]}")


def restore_strategy(strategy, state: StrategyState) -> None:
    """Set the saved attributes on ``strategy``, built afresh from the run's config.

    Only instance attributes are set (some, like an xgboost strategy's
    booster, appear in the first round), never the wiring nor anything that
    would shadow the class's methods; a nested strategy is restored in place,
    and Flower's accountant through its own ``load_state_dict`` (which checks
    the state against its privacy settings).
    """
    owned, cls = vars(strategy), type(strategy)
    for k, v in state.items():
        expected = {StrategyState: Strategy, AccountantState: RdpAccountant}.get(type(v), object)
        shadows = k.startswith("__") or callable(getattr(cls, k, None)) or isinstance(getattr(cls, k, None), property)
        if k in WIRING or shadows or not isinstance(owned.get(k), expected):
            raise ValueError(f"{state.file}: strategy attribute '{k}' does not fit {type(strategy).__name__}; expected "
                             "one of its own attributes (a checkpoint of another strategy?)")
        if isinstance(v, StrategyState):
            restore_strategy(owned[k], v)
        elif isinstance(v, AccountantState):
            try:
                owned[k].load_state_dict(dict(v))
            except ValueError as err:
                raise ValueError(f"{state.file}: strategy attribute '{k}' (the privacy accountant): {err}") from None
        else:
            setattr(strategy, k, v)


def save(run_dir: Path, server_round: int, arrays: dict[str, np.ndarray], strategy, record: dict) -> None:
    """Checkpoint the run after ``server_round``, bound to the settings in ``<run_dir>/config.yaml``."""
    run_dir = Path(run_dir)
    tensors = {f"model/{k}": np.require(v, requirements="C") for k, v in arrays.items()}
    tree = encode(strategy, "strategy", tensors)["object"]
    python, numpy, torch_state = random.getstate(), np.random.get_state(), torch.get_rng_state()
    tensors |= {"rng/numpy": numpy[1], "rng/torch": torch_state.numpy()}
    state = {
        "version": VERSION, "round": server_round, "arrays": list(arrays), "strategy": tree, "record": record,
        "best_round": _best_round(record), "settings": fixed_settings(load_config(run_dir / "config.yaml")),
        "rng": {"python": [python[0], list(python[1]), python[2]], "numpy": [numpy[0], *numpy[2:]]},
    }
    files = {f"checkpoint-{server_round}.safetensors": save_tensors(tensors),
             f"checkpoint-{server_round}.json": json.dumps(state, allow_nan=True).encode()}
    for name, data in files.items():
        write_atomic(run_dir / name, "wb", lambda f, data=data: f.write(data), durable=True)
    manifest = {"format": FORMAT, "version": VERSION,
                "sha256": {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}}
    write_atomic(run_dir / FILE, "wb", lambda f: f.write(json.dumps(manifest, indent=1).encode()), durable=True)
    for path in run_dir.iterdir():  # the round before stays for a reader that read the previous manifest
        found = DATA.fullmatch(path.name)
        if found and int(found[1]) < server_round - 1:
            path.unlink(missing_ok=True)


def load(run_dir: Path, cfg: Config) -> dict:
    """The checkpoint of ``run_dir``, checked: its checksums first, then that it fits ``cfg`` and holds sane weights.

    Raises
    ------
    FileNotFoundError
        No checkpoint in ``run_dir``.
    ValueError
        A checksum, the settings, a weight or the structure does not fit; the
        message names the file. An old pickled checkpoint is refused unopened.
    """
    run_dir = Path(run_dir)
    if not (run_dir / FILE).is_file():
        if (run_dir / OLD_FILE).exists():
            raise ValueError(f"{run_dir / OLD_FILE}: a checkpoint of an older fedfuse (a pickle, which can run code "
                             "when read): it is not opened and cannot be resumed safely; start the run again")
        raise FileNotFoundError(f"{run_dir / FILE}: no checkpoint to resume from (runs write one after every round; "
                                "secure aggregation runs do not)")
    (tensor_file, tensor_bytes), (state_file, state_bytes) = _verified(run_dir / FILE)
    try:
        tensors = load_tensors(tensor_bytes)
    except SafetensorError as err:
        raise ValueError(f"{tensor_file}: not a safetensors file ({err})") from None
    _check_weights(tensor_file, tensors)
    state = _state(state_file, state_bytes)
    changed = settings_changed(state["settings"], fixed_settings(cfg))
    if changed:
        raise ValueError(f"{state_file}: written by a run with other settings ({', '.join(changed[:8])} differ); "
                         "expected the run's own config and --set options (only federation.rounds may change)")
    names = state["arrays"]
    if not all(isinstance(k, str) for k in names) or {f"model/{k}" for k in names} != {
            k for k in tensors if k.startswith("model/")}:
        raise ValueError(f"{state_file}: its model's array names do not match the tensors of {tensor_file}")
    return {
        "version": VERSION, "round": state["round"], "record": state["record"], "best_round": state["best_round"],
        "arrays": {k: tensors[f"model/{k}"] for k in names},
        "strategy": _strategy(state_file, state["strategy"], tensors),
        "rng": _rng(state_file, state["rng"], tensors),
    }


def restore_rng(state: dict) -> None:
    """Set Python's, numpy's and torch's global random states to a loaded checkpoint's (checked by :func:`load`)."""
    random.setstate(state["rng"]["python"])
    np.random.set_state(state["rng"]["numpy"])
    torch.set_rng_state(state["rng"]["torch"])


def _best_round(record: dict) -> int | None:
    scored = [r for r in record["rounds"] if r.get("central") or r.get("federated")]
    best = max(scored, key=lambda r: (r.get("central") or r["federated"])["macro_auc"], default=None)
    return best["round"] if best else None


def _verified(manifest: Path) -> tuple[tuple[Path, bytes], tuple[Path, bytes]]:
    """The tensor and state files the manifest names, each read once and checked against its sha256."""
    try:
        entry = json.loads(manifest.read_bytes())
    except (ValueError, RecursionError) as err:
        raise ValueError(f"{manifest}: not a fedfuse checkpoint manifest ({err})") from None
    if not isinstance(entry, dict) or entry.get("format") != FORMAT or entry.get("version") != VERSION:
        raise ValueError(f"{manifest}: not a checkpoint of this fedfuse (expected format '{FORMAT}', version {VERSION})")
    sums = entry.get("sha256")
    kinds = {DATA.fullmatch(n)[2]: n for n in sums if DATA.fullmatch(n)} if isinstance(sums, dict) else {}
    if len(kinds) != 2 or len(sums) != 2:
        raise ValueError(f"{manifest}: expected the sha256 of one checkpoint-<round>.safetensors and one "
                         "checkpoint-<round>.json")
    out = []
    for name in (kinds["safetensors"], kinds["json"]):
        path = manifest.parent / name
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise ValueError(f"{path}: missing (named by {manifest})") from None
        digest = hashlib.sha256(data).hexdigest()
        if digest != sums[name]:
            raise ValueError(f"{path}: checksum mismatch (sha256 {digest[:16]}..., expected {str(sums[name])[:16]}... "
                             f"from {manifest}): the file is corrupted or was changed")
        out.append((path, data))
    return out[0], out[1]


def _strategy(path: Path, tree: dict, tensors: dict[str, np.ndarray]) -> StrategyState:
    try:
        return decode({"object": tree}, "strategy", path, tensors)
    except RecursionError:  # JSON that the parser accepted but nested deeper than decoding can follow
        raise ValueError(f"{path}: the strategy's state is nested too deeply for a fedfuse checkpoint") from None


def _check_weights(path: Path, tensors: dict[str, np.ndarray]) -> None:
    for name, a in tensors.items():
        if a.dtype.kind != "f" or a.size == 0:
            continue
        if not np.isfinite(a).all():
            raise ValueError(f"{path}: tensor '{name}' holds NaN or Inf; expected finite weights")
        peak = float(np.abs(a).max())
        if peak > MAX_WEIGHT:  # the bound the server holds every update to (server/loop.py)
            raise ValueError(f"{path}: tensor '{name}' holds {peak:.3g}; expected weights within "
                             f"±{MAX_WEIGHT:g} (shared.learner.MAX_WEIGHT; a corrupted or tampered checkpoint)")


def _state(path: Path, data: bytes) -> dict:
    """The state file's JSON, with each top-level entry of the expected type."""
    try:
        state = json.loads(data)
    except (ValueError, RecursionError) as err:
        raise ValueError(f"{path}: not a fedfuse checkpoint state ({err})") from None
    types = {"round": int, "arrays": list, "strategy": dict, "record": dict, "best_round": (int, type(None)),
             "settings": dict, "rng": dict}
    wrong = [k for k, t in types.items() if not isinstance(state, dict) or k not in state or
             not isinstance(state[k], t)]
    if wrong:
        raise ValueError(f"{path}: not a fedfuse checkpoint state (expected {', '.join(wrong)} of the right type)")
    return state


def _rng(path: Path, rng: dict, tensors: dict[str, np.ndarray]) -> dict:
    """The saved random states, each checked on a throwaway generator of its kind before it can reach the global one."""
    try:
        version, internal, gauss = rng["python"]
        python = (version, tuple(internal), gauss)
        random.Random().setstate(python)
        kind, position, has_gauss, cached = rng["numpy"]
        numpy = (kind, tensors["rng/numpy"], position, has_gauss, cached)
        np.random.RandomState().set_state(numpy)
        torch_state = torch.from_numpy(tensors["rng/torch"].copy())
        torch.Generator().set_state(torch_state)
    except (KeyError, TypeError, ValueError, OverflowError, RuntimeError) as err:
        raise ValueError(f"{path}: unusable random states ({err!r}); expected Python's, numpy's and torch's as "
                         "fedfuse saves them") from None
    return {"python": python, "numpy": numpy, "torch": torch_state}
