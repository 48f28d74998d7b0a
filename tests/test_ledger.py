"""A site's privacy ledger: the hospital's own (where it lives, what it may hold) and exact across changes of noise."""

import contextlib
import dataclasses
import json
import math
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, Metadata, RecordDict

from client.app import BUDGET_EXHAUSTED, LOCAL_DP_REQUIRED
from client.app import app as client_app
from shared import privacy
from shared.config import PrivacyConfig, apply_overrides, flatten, load
from shared.data import Samples
from shared.mimic import FEATURES
from shared.models import build_model
from simulations.cli import absolute_paths, main
from tests.helpers import opacus_after

ROOT = Path(__file__).resolve().parent.parent
DEADLINE_S = 20.0  # what "refused within seconds" allows on a loaded machine; the accountant takes milliseconds
DELTA = 1e-5


@contextlib.contextmanager
def deadline(seconds: float = DEADLINE_S):
    """Fail the test if its block has not ended after ``seconds``: a hang (Opacus' series summing a NaN forever,
    a pure-Python loop) is interrupted by SIGALRM instead of blocking the test run."""
    def expire(signum, frame):
        pytest.fail(f"still running after {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def samples() -> Samples:
    return Samples(np.zeros((4, 8, 8, 3), np.uint8), np.zeros((4, 2), np.float32), np.zeros(4, np.int64),
                   np.array(["a", "a", "b", "b"]))


@pytest.mark.parametrize(("entry", "why"), [
    ([math.nan, 0.5, 3], "noise multiplier nan"),
    ([1.0, math.nan, 3], "sample rate nan"),
    ([1.0, 0.5, -3], "steps -3"),
    ([1.0, 1.5, 3], "sample rate 1.5"),
    ([1.0, 0.0, 3], "sample rate 0.0"),
    ([-1.0, 0.5, 3], "noise multiplier -1.0"),
    ([math.inf, 0.5, 3], "noise multiplier inf"),
    ([1.0, 0.5, 2.5], "steps 2.5"),
    ([1.0, 0.5], "expected [noise multiplier, sample rate, steps]"),
])
def test_a_ledger_with_a_bad_entry_is_refused_within_seconds_naming_file_and_entry(tmp_path, capsys, entry, why):
    good = privacy.Ledger(tmp_path, samples(), PrivacyConfig(mode="local"), "site-0")
    good.spend((1.0, 0.5, 3), "run-1", 1)
    planted = json.loads(good.path.read_text())
    planted["history"].append(entry)  # json writes NaN as NaN, which it reads back as a float
    good.path.write_text(json.dumps(planted))
    before = good.path.read_bytes()

    with pytest.raises(ValueError, match="history entry 1") as refused, deadline():
        privacy.Ledger(tmp_path, samples(), PrivacyConfig(mode="local"), "site-0").epsilon()
    assert str(good.path) in str(refused.value) and why in str(refused.value)
    assert good.path.read_bytes() == before  # left for its owner to repair or reset
    with pytest.raises(ValueError, match="expected"), deadline():  # the accountant refuses it, whoever calls it
        privacy.epsilon([(1.0, 0.5, 3), entry], DELTA)
    with deadline():
        assert main(["privacy", "show", str(tmp_path)]) == 2  # `privacy show` says what is wrong, and ends
    assert why in capsys.readouterr().err


@pytest.mark.parametrize("changes", [{"delta": math.nan}, {"delta": 1.5}, {"history": "[1, 0.5, 3]"},
                                     {"rounds": [{"round": 1}]}])
def test_a_ledger_whose_delta_or_layout_is_wrong_is_refused(tmp_path, changes):
    good = privacy.Ledger(tmp_path, samples(), PrivacyConfig(mode="local"), "site-0")
    good.spend((1.0, 0.5, 3), "run-1", 1)
    good.path.write_text(json.dumps({**json.loads(good.path.read_text()), **changes}))
    with pytest.raises(ValueError, match=f"{good.path}: not a valid privacy ledger"):
        privacy.Ledger(tmp_path, samples(), PrivacyConfig(mode="local"), "site-0")


def test_a_bad_entry_is_refused_before_it_is_spent(tmp_path):
    ledger = privacy.Ledger(tmp_path, samples(), PrivacyConfig(mode="local"), "site-0")
    ledger.spend((1.0, 0.5, 3), "run-1", 1)
    before = ledger.path.read_bytes()
    for entry in [(1.0, 0.5, -291), (math.nan, 0.5, 3), (1.0, 2.0, 3)]:
        with pytest.raises(ValueError, match="expected"):
            ledger.epsilon(entry)  # the budget check before a round
        with pytest.raises(ValueError, match="expected"):
            ledger.spend(entry, "run-2", 1)
    assert ledger.path.read_bytes() == before and ledger.history == [(1.0, 0.5, 3)]


@pytest.mark.filterwarnings("ignore:Optimal order")  # at 1e6 the best order is the last: harmless
def test_epsilon_is_bounded_in_time_for_extreme_noise():
    with deadline():  # 1e-160: sigma**2 underflows in Opacus' series to a NaN it never stops summing
        assert privacy.epsilon([(1e-160, 0.5, 10)], DELTA) == math.inf
        huge = privacy.epsilon([(1e200, 0.01, 10)], DELTA)  # overflows Opacus' series
    assert privacy.epsilon([(0.0, 0.5, 10)], DELTA) == math.inf  # clipping without noise
    assert huge == privacy.epsilon([(privacy.NOISE_RANGE[1], 0.01, 10)], DELTA)  # accounted at the top
    assert huge == pytest.approx(opacus_after([(1e6, 0.01, 10)]), rel=1e-9)  # where epsilon has stopped moving
    assert privacy.epsilon([(1.0, 0.5, 0)], DELTA) == opacus_after([]) == 0  # no step releases nothing


@pytest.mark.slow
def test_the_ledger_is_opacus_accountant_across_changes_of_noise_and_sample_rate(tmp_path):
    """Rounds at the same noise and rate merge; a change starts a new entry and forgets nothing before it."""
    ledger = privacy.Ledger(tmp_path, samples(), PrivacyConfig(mode="local"), "site-0")
    rounds = [(1.0, 0.25, 2), (1.0, 0.25, 2), (1.5, 0.4, 3), (1.0, 0.25, 2), (0.8, 0.25, 1)]
    for r, entry in enumerate(rounds, start=1):
        assert ledger.spend(entry, "run-1", r) == pytest.approx(opacus_after(rounds[:r]), rel=1e-9)
    reopened = privacy.Ledger(tmp_path, samples(), PrivacyConfig(mode="local"), "site-0")
    assert reopened.epsilon() == pytest.approx(opacus_after(rounds), rel=1e-9)
    assert len(reopened.history) == 4  # the two first rounds merged, nothing else


def test_the_budget_is_the_runs_budget_else_its_epsilon():
    assert privacy.run_budget(PrivacyConfig(epsilon=8.0)) == 8.0
    assert privacy.run_budget(PrivacyConfig(epsilon=8.0, budget=3.0)) == 3.0
    assert privacy.run_budget(PrivacyConfig(epsilon=None, noise_multiplier=1.0)) is None


def test_only_a_simulated_site_reads_the_ledger_folder_from_the_run_config(tmp_path):
    run = PrivacyConfig(mode="local", ledger_dir=str(tmp_path / "elsewhere"))
    hospital = {"data-dir": str(tmp_path / "hospital")}
    assert privacy.ledger_folder(hospital, run, "/data") == tmp_path / "hospital" / ".fedfuse-privacy"
    own = {**hospital, "ledger-dir": str(tmp_path / "vault")}
    assert privacy.ledger_folder(own, run, "/data") == tmp_path / "vault"
    assert privacy.ledger_folder({"partition-id": 0}, run, "/data") == tmp_path / "elsewhere"
    relative = dataclasses.replace(run, ledger_dir="ledgers")
    assert privacy.ledger_folder({"partition-id": 0}, relative, "/data") == Path("/data/ledgers")
    assert privacy.ledger_folder({"partition-id": 0}, PrivacyConfig(), "/data") == Path("/data/.fedfuse-privacy")


def train_message(server_round: int, message_type: str = "train") -> Message:
    md = Metadata(run_id=server_round, message_id=f"m-{server_round}", src_node_id=1, dst_node_id=7,
                  reply_to_message_id="", group_id=str(server_round), created_at=time.time(), ttl=3600.0,
                  message_type=message_type)
    model = build_model(load(ROOT / "configs/quickstart.yaml").model, len(FEATURES), 3)
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()),
                          "config": ConfigRecord({"server-round": server_round})})
    return Message(content=content, metadata=md)


def test_a_coordinator_cannot_move_reset_or_raise_a_hospitals_ledger(quick_data, tmp_path):
    """The run config points the ledger at an empty folder and lifts the budget: the SuperNode keeps its own."""
    hospital = tmp_path / "hospital"
    shutil.copytree(quick_data / "site-0", hospital)
    cfg = apply_overrides(absolute_paths(load(ROOT / "configs/quickstart.yaml")), {
        "data.root": str(quick_data), "train.steps": 2, "privacy.mode": "local", "privacy.epsilon": None,
        "privacy.noise_multiplier": 1.0, "privacy.ledger_dir": str(tmp_path / "empty"), "privacy.budget": 1e9})
    run_config = {"config": str(ROOT / "configs/quickstart.yaml"), **flatten(cfg)}
    node = {"data-dir": str(hospital), "site-name": "oslo"}
    replies = [client_app(train_message(r), Context(run_id=r, node_id=7, node_config=node, state=RecordDict(),
                                                    run_config=run_config)) for r in (1, 2)]
    assert not any(reply.has_error() for reply in replies)
    assert not (tmp_path / "empty").exists()
    [path] = (hospital / ".fedfuse-privacy").glob("ledger-*.json")
    ledger = privacy.read_ledger(path)
    assert [r["run"] for r in ledger["rounds"]] == ["1", "2"]  # the second run went on from the first
    eps = [reply.content["metrics"]["epsilon"] for reply in replies]
    assert eps[0] < eps[1] == pytest.approx(privacy.epsilon(ledger["history"], DELTA), rel=1e-12)
    capped = Context(run_id=3, node_id=7, node_config={**node, "privacy-budget": eps[1]}, state=RecordDict(),
                     run_config=run_config)
    declined = client_app(train_message(3), capped)  # the hospital's budget caps the run's 1e9
    assert declined.has_error() and declined.error.code == BUDGET_EXHAUSTED and str(path) in declined.error.reason
    assert privacy.read_ledger(path)["history"] == ledger["history"]  # nothing spent


@pytest.mark.parametrize(("changes", "asked"), [
    ({"privacy.mode": "none"}, "privacy.mode none"),
    ({"privacy.mode": "central", "privacy.noise_multiplier": 1.0}, "privacy.mode central"),
    ({"privacy.mode": "local", "privacy.noise_multiplier": 0.0}, "privacy.mode local with noise multiplier 0"),
])
def test_a_hospital_with_a_budget_trains_only_under_local_dp_with_noise(quick_data, tmp_path, changes, asked):
    """The hospital's privacy-budget, not the coordinator's privacy.mode, says its data trains under local DP."""
    hospital = tmp_path / "hospital"
    shutil.copytree(quick_data / "site-0", hospital)
    base = apply_overrides(absolute_paths(load(ROOT / "configs/quickstart.yaml")), {
        "data.root": str(quick_data), "train.steps": 2, "privacy.mode": "local", "privacy.epsilon": None,
        "privacy.noise_multiplier": 1.0})
    node = {"data-dir": str(hospital), "site-name": "oslo", "privacy-budget": 50.0}

    def reply(cfg, server_round: int, message_type: str = "train") -> Message:
        run_config = {"config": str(ROOT / "configs/quickstart.yaml"), **flatten(cfg)}
        return client_app(train_message(server_round, message_type),
                          Context(run_id=server_round, node_id=7, node_config=node, state=RecordDict(),
                                  run_config=run_config))

    assert not reply(base, 1).has_error()  # local DP with noise: the site trains and spends
    [path] = (hospital / ".fedfuse-privacy").glob("ledger-*.json")
    before = path.read_bytes()
    lesser = apply_overrides(base, {"privacy.epsilon": None, **changes})
    refused = reply(lesser, 2)
    assert refused.has_error() and refused.error.code == LOCAL_DP_REQUIRED
    reason = refused.error.reason
    assert reason.startswith("local_dp_required: site oslo") and "privacy-budget = 50.0" in reason and asked in reason
    assert path.read_bytes() == before and len(list(path.parent.iterdir())) == 1  # nothing spent, no other ledger
    assert not reply(lesser, 3, "evaluate").has_error()  # evaluation spends no budget: allowed
    assert not reply(base, 4).has_error()
    assert [r["round"] for r in privacy.read_ledger(path)["rounds"]] == [1, 4]
