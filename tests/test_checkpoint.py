"""Checkpoints cannot run code, are checked before use, and restore a run exactly (no Flower process)."""

import hashlib
import json
import os
import pickle
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord
from flwr.supercore.privacy_accounting import GaussianPrivacyEvent

from server import checkpoint
from server.record import RunRecord
from server.strategy import STRATEGIES, build_strategy
from shared.config import apply_overrides, dump, load

CONFIG = Path(__file__).resolve().parent.parent / "configs/quickstart.yaml"
SITES = {11: "site-0", 12: "site-1"}
CENTRAL = {"privacy.mode": "central", "privacy.epsilon": None, "privacy.noise_multiplier": 1.0, "data.sites": 2}


class Payload:
    """A pickle that, when loaded, creates ``marker``: what a crafted checkpoint.pkl did with a shell command."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def strategy_for(cfg, run_dir: Path):
    return build_strategy(cfg, RunRecord(run_dir, ("a",), {}), SITES, {"w"})


def run_folder(tmp_path: Path, overrides: dict | None = None) -> tuple[Path, object]:
    run_dir = tmp_path / "run"
    run_dir.mkdir(exist_ok=True)
    cfg = apply_overrides(load(CONFIG), overrides or {})
    dump(cfg, run_dir / "config.yaml")  # what the ServerApp writes before its first round
    return run_dir, cfg


def record(rounds: int) -> dict:
    return {"header": {"name": "t", "sites": ["site-0", "site-1"]}, "final": None, "privacy": {"sites": {}},
            "rounds": [{"round": r, "central": {"macro_auc": [0.5, 0.7, 0.9][r % 3], "auc": {"a": 0.25}},
                        "failed": {"site-1": "timeout"}} for r in range(1, rounds + 1)]}


def save_one(tmp_path: Path, arrays: dict | None = None, overrides: dict | None = None, rounds: int = 2):
    run_dir, cfg = run_folder(tmp_path, overrides)
    weights = arrays if arrays is not None else {"w": np.linspace(-1, 1, 6, dtype=np.float32).reshape(2, 3)}
    for r in range(1, rounds + 1):
        checkpoint.save(run_dir, r, weights, strategy_for(cfg, run_dir), record(r))
    return run_dir, cfg


def data_files(run_dir: Path) -> dict[str, Path]:
    sums = json.loads((run_dir / checkpoint.FILE).read_text())["sha256"]
    return {name.rsplit(".", 1)[1]: run_dir / name for name in sums}


def replace_with_checksum(run_dir: Path, path: Path, data: bytes) -> None:
    """Replace a data file and fix its checksum in the manifest: what a deliberate attacker would do."""
    path.write_bytes(data)
    manifest = json.loads((run_dir / checkpoint.FILE).read_text())
    manifest["sha256"][path.name] = hashlib.sha256(data).hexdigest()
    (run_dir / checkpoint.FILE).write_text(json.dumps(manifest))


def test_the_payload_is_live(tmp_path):
    """The planted file below really runs code when unpickled: the tests that refuse it can fail."""
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(Payload(marker))).close()
    assert marker.exists()


@pytest.mark.parametrize("where", ["old name", "manifest", "json", "safetensors"])
def test_a_planted_pickle_is_never_opened_and_the_error_names_the_file(tmp_path, where):
    marker = tmp_path / "ran"
    payload = pickle.dumps(Payload(marker))
    if where == "old name":
        run_dir, cfg = run_folder(tmp_path)
        target = run_dir / checkpoint.OLD_FILE
        target.write_bytes(payload)
    else:
        run_dir, cfg = save_one(tmp_path)
        target = run_dir / checkpoint.FILE if where == "manifest" else data_files(run_dir)[where]
        if where == "manifest":
            target.write_bytes(payload)
        else:
            replace_with_checksum(run_dir, target, payload)
    with pytest.raises(ValueError) as err:
        checkpoint.load(run_dir, cfg)
    assert not marker.exists()
    assert str(target) in str(err.value)
    assert where != "old name" or "older fedfuse" in str(err.value) and "cannot be resumed safely" in str(err.value)


def test_an_old_pickle_beside_a_new_checkpoint_is_left_alone(tmp_path):
    marker = tmp_path / "ran"
    run_dir, cfg = save_one(tmp_path)
    (run_dir / checkpoint.OLD_FILE).write_bytes(pickle.dumps(Payload(marker)))
    assert checkpoint.load(run_dir, cfg)["round"] == 2
    assert not marker.exists()


def test_a_flipped_byte_in_any_file_is_caught(tmp_path):
    run_dir, cfg = save_one(tmp_path)
    rng = np.random.default_rng(0)
    for path in [run_dir / checkpoint.FILE, *data_files(run_dir).values()]:
        original = path.read_bytes()
        for at in {0, len(original) - 1, *rng.integers(0, len(original), 40).tolist()}:
            flipped = bytearray(original)
            flipped[at] ^= 0x01
            path.write_bytes(bytes(flipped))
            with pytest.raises(ValueError, match=re.escape(str(path))) as err:
                checkpoint.load(run_dir, cfg)
            assert path.name == checkpoint.FILE or "checksum mismatch" in str(err.value), (path, at, err.value)
        path.write_bytes(original)
    assert checkpoint.load(run_dir, cfg)["round"] == 2


@pytest.mark.parametrize("value, shown", [(5.8e36, "5.8e+36"), (np.nan, "NaN"), (-np.inf, "Inf"),
                                          (2e6, "2e+06")])
def test_a_weight_out_of_range_or_not_finite_is_refused(tmp_path, value, shown):
    w = np.zeros((2, 3), np.float32)
    w[1, 2] = value
    run_dir, cfg = save_one(tmp_path, {"b": np.ones(3, np.float32), "w": w})
    with pytest.raises(ValueError, match=re.escape(shown)) as err:
        checkpoint.load(run_dir, cfg)
    assert str(data_files(run_dir)["safetensors"]) in str(err.value) and "'model/w'" in str(err.value)


def test_the_largest_honest_values_pass(tmp_path):
    """EHR scaling buffers hold raw lab means and spreads: up to the top of their plausible range (2e4)."""
    run_dir, cfg = save_one(tmp_path, {"ehr.mean": np.array([2e4, 60.0], np.float32), "n": np.array(10**9)})
    assert checkpoint.load(run_dir, cfg)["arrays"]["ehr.mean"][0] == 2e4


def test_other_settings_are_refused_and_more_rounds_are_not(tmp_path):
    run_dir, cfg = save_one(tmp_path)
    state_file = data_files(run_dir)["json"]
    for change in ({"seed": 7}, {"data.sites": 5}, {"federation.strategy": "fedadam"}):
        with pytest.raises(ValueError, match="only federation.rounds may change") as err:
            checkpoint.load(run_dir, apply_overrides(cfg, change))
        assert str(state_file) in str(err.value) and next(iter(change)) in str(err.value)
    more = apply_overrides(cfg, {"federation.rounds": cfg.federation.rounds + 5, "faults.crash": ["0@3"]})
    assert checkpoint.load(run_dir, more)["round"] == 2


def test_a_round_trip_restores_arrays_record_and_random_states(tmp_path):
    run_dir, cfg = run_folder(tmp_path)
    arrays = {"conv.weight": np.random.default_rng(1).normal(size=(4, 3, 3, 3)).astype(np.float32),
              "bn.num_batches_tracked": np.array(17, np.int64), "ehr.mean": np.arange(5, dtype=np.float64),
              "empty": np.zeros((0, 2), np.float32), "a.last": np.ones(2, np.float16)}
    random.seed(3), np.random.seed(3), torch.manual_seed(3)
    random.gauss(0, 1), np.random.normal()  # states with a cached Gaussian
    checkpoint.save(run_dir, 3, arrays, strategy_for(cfg, run_dir), record(3))
    after_save = (random.random(), random.gauss(0, 1), np.random.normal(size=3), torch.rand(3))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)

    state = checkpoint.load(run_dir, cfg)
    checkpoint.restore_rng(state)
    after_restore = (random.random(), random.gauss(0, 1), np.random.normal(size=3), torch.rand(3))
    assert after_restore[:2] == after_save[:2]
    np.testing.assert_array_equal(after_restore[2], after_save[2])
    assert torch.equal(after_restore[3], after_save[3])
    assert list(state["arrays"]) == list(arrays)  # the order too: messages carry the arrays in it
    for k, a in arrays.items():
        assert state["arrays"][k].dtype == a.dtype and state["arrays"][k].shape == a.shape
        np.testing.assert_array_equal(state["arrays"][k], a)
    assert state["record"] == record(3) and state["round"] == 3 and state["best_round"] == 2


def saved_and_restored(tmp_path: Path, overrides: dict, train) -> tuple:
    """A strategy after ``train`` changed it, and a fresh one of the same config restored from its checkpoint."""
    run_dir, cfg = run_folder(tmp_path, overrides)
    strategy = strategy_for(cfg, run_dir)
    train(strategy)
    checkpoint.save(run_dir, 1, {"w": np.zeros(2, np.float32)}, strategy, record(1))
    fresh = strategy_for(cfg, run_dir)
    checkpoint.restore_strategy(fresh, checkpoint.load(run_dir, cfg)["strategy"])
    return strategy, fresh


def test_fedadams_moments_are_restored_exactly(tmp_path):
    rng = np.random.default_rng(2)

    def train(s):
        s.current_arrays = {"w": rng.normal(size=(3, 2)), "b": rng.normal(size=2).astype(np.float32)}
        s.m_t = {k: rng.normal(size=v.shape) * 1e-3 for k, v in s.current_arrays.items()}
        s.v_t = {k: rng.random(size=v.shape) * 1e-7 for k, v in s.current_arrays.items()}

    saved, fresh = saved_and_restored(tmp_path, {"federation.strategy": "fedadam"}, train)
    assert fresh.m_t is not None and fresh.record is not saved.record  # restored state, rebuilt wiring
    for name in ("current_arrays", "m_t", "v_t"):
        a, b = getattr(saved, name), getattr(fresh, name)
        assert list(a) == list(b)
        for k in a:
            assert a[k].dtype == b[k].dtype
            np.testing.assert_array_equal(a[k], b[k])
    assert (fresh.eta, fresh.beta_2, fresh.tau) == (saved.eta, saved.beta_2, saved.tau)


@pytest.mark.parametrize("clipping", ["server", "client"])
def test_flowers_central_dp_accountant_is_restored_exactly(tmp_path, clipping):
    def train(s):
        s.accountant.compose(GaussianPrivacyEvent(noise_multiplier=1.0, sample_size=2, population_size=2), 3)
        if clipping == "server":
            s.current_arrays = ArrayRecord({"w": Array(np.arange(4, dtype=np.float32))})

    saved, fresh = saved_and_restored(tmp_path, {**CENTRAL, "privacy.clipping": clipping}, train)
    assert fresh.accountant.state_dict() == saved.accountant.state_dict()
    assert fresh.accountant.get_privacy_spent() == saved.accountant.get_privacy_spent()
    assert fresh.accountant.get_privacy_spent().num_releases == 3
    assert fresh.strategy.weighted_by_key == saved.strategy.weighted_by_key
    if clipping == "server":
        np.testing.assert_array_equal(fresh.current_arrays["w"].numpy(), np.arange(4, dtype=np.float32))


@pytest.mark.parametrize("name", [*STRATEGIES, "central"])
def test_every_strategy_is_saved_and_restored(tmp_path, name):
    xgb = name.startswith("xgb")
    overrides = CENTRAL if name == "central" else {"federation.strategy": name, **({"model.name": "xgboost"} if xgb
                                                                                  else {})}

    def train(s):
        if name == "xgb_bagging":
            s.current_bst = b'{"learner": 1}\x00\xff'
        if name == "xgb_cyclic":
            s.registered_nodes = {12: 0, 11: 1}

    saved, fresh = saved_and_restored(tmp_path, overrides, train)
    tree = [checkpoint.encode(s, "strategy", {}) for s in (saved, fresh)]
    assert tree[0] == tree[1]
    if xgb:
        assert vars(fresh).get("current_bst") == vars(saved).get("current_bst")
        assert vars(fresh).get("registered_nodes") == vars(saved).get("registered_nodes")


def test_an_attribute_a_checkpoint_cannot_hold_is_refused_on_save(tmp_path):
    run_dir, cfg = run_folder(tmp_path, {"federation.strategy": "fedadam"})
    strategy = strategy_for(cfg, run_dir)
    strategy.scheduler = lambda r: r  # a new attribute: noticed, never pickled or dropped
    with pytest.raises(TypeError, match="strategy.scheduler is a function"):
        checkpoint.save(run_dir, 1, {"w": np.zeros(2, np.float32)}, strategy, record(1))
    assert not (run_dir / checkpoint.FILE).exists()


def test_a_state_with_other_types_or_attributes_is_refused(tmp_path):
    run_dir, cfg = save_one(tmp_path)
    state_file = data_files(run_dir)["json"]
    original = json.loads(state_file.read_text())
    unknown = {**original, "strategy": {**original["strategy"], "eta": {"pickle": "gASVAA=="}}}
    replace_with_checksum(run_dir, state_file, json.dumps(unknown).encode())
    with pytest.raises(ValueError, match="strategy.eta: expected a JSON scalar"):
        checkpoint.load(run_dir, cfg)
    foreign = {**original, "strategy": {**original["strategy"], "aggregate_train": 1}}
    replace_with_checksum(run_dir, state_file, json.dumps(foreign).encode())
    state = checkpoint.load(run_dir, cfg)
    with pytest.raises(ValueError, match="'aggregate_train' does not fit") as err:
        checkpoint.restore_strategy(strategy_for(cfg, run_dir), state["strategy"])
    assert str(state_file) in str(err.value)


def test_a_crash_before_the_manifest_leaves_the_previous_checkpoint_whole(tmp_path, monkeypatch):
    run_dir, cfg = save_one(tmp_path, rounds=4)
    assert sorted(p.name for p in run_dir.glob("checkpoint-*")) == [
        "checkpoint-3.json", "checkpoint-3.safetensors", "checkpoint-4.json", "checkpoint-4.safetensors"]
    replace = os.replace

    def crash_on_the_manifest(src, dst):
        if Path(dst).name == checkpoint.FILE:
            raise KeyboardInterrupt  # the process dies here
        replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_on_the_manifest)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(run_dir, 5, {"w": np.full((2, 3), 9, np.float32)}, strategy_for(cfg, run_dir), record(5))
    monkeypatch.undo()
    state = checkpoint.load(run_dir, cfg)
    assert state["round"] == 4 and state["arrays"]["w"][0, 0] == -1
    assert not list(run_dir.glob("*.tmp"))


def test_no_checkpoint_is_a_clear_error(tmp_path):
    run_dir, cfg = run_folder(tmp_path)
    with pytest.raises(FileNotFoundError, match="no checkpoint to resume from"):
        checkpoint.load(run_dir, cfg)
