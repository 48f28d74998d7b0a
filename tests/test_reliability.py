"""Reliability: replies checked before aggregation, injected faults, checkpoints and resume."""

import json
import math
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Message, Metadata, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

from server import checkpoint
from server.loop import Declared, check_update, checked
from shared.config import apply_overrides, load
from shared.wire import from_record, to_record
from simulations.cli import main
from tests.helpers import CONFIG, RESCORED_AUC, processes_mentioning, rescored

ROOT = Path(__file__).resolve().parent.parent


def sent(node: int) -> Message:
    md = Metadata(run_id=1, message_id=f"m-{node}", src_node_id=1, dst_node_id=node, reply_to_message_id="",
                  group_id="1", created_at=time.time(), ttl=3600.0, message_type="train")
    return Message(content=RecordDict(), metadata=md)


def reply(to: Message, arrays: dict[str, np.ndarray]) -> Message:
    metrics = {"train_loss": 0.5, "num-examples": 10, "site-index": 0, "epsilon": math.nan,
               "epsilon-patient": math.nan, "delta-patient": math.nan}
    return Message(RecordDict({"arrays": to_record(arrays), "metrics": MetricRecord(metrics)}), reply_to=to)


DECLARED = {node: Declared(examples=10) for node in (1, 2, 3, 11, 12, 13, 14)}  # each site's training examples


def test_nan_and_wrong_shape_updates_are_rejected_and_the_rest_aggregated():
    cfg = load(CONFIG)
    glob = {"w": np.zeros((2, 3), np.float32), "b": np.zeros(3, np.float32)}
    good = {"w": np.full((2, 3), 2.0, np.float32), "b": np.ones(3, np.float32)}
    nan = {"w": np.full((2, 3), np.nan, np.float32), "b": np.ones(3, np.float32)}
    wrong_shape = {"w": np.ones((3, 2), np.float32), "b": np.ones(3, np.float32)}
    out = [sent(n) for n in (11, 12, 13, 14)]
    replies = [reply(out[2], wrong_shape), reply(out[0], good), reply(out[1], nan)]  # 14 never answers
    names = {11: "site-a", 12: "site-b", 13: "site-c", 14: "site-d"}
    result = checked(cfg, out, replies, to_record(glob), names.get, DECLARED)
    assert [names[m.metadata.src_node_id] for m in result] == ["site-a", "site-b", "site-c", "site-d"]
    assert not result[0].has_error()
    assert "NaN" in result[1].error.reason and "'w'" in result[1].error.reason
    assert "shape (3, 2), expected (2, 3)" in result[2].error.reason
    assert result[3].has_error() and "timeout" in result[3].error.reason
    arrays, _ = FedAvg().aggregate_train(1, result)  # Flower's reply filter drops the error replies
    np.testing.assert_array_equal(from_record(arrays)["w"], good["w"])


def test_check_update_names_missing_extra_and_dtype():
    ref = {"w": np.zeros(2, np.float32)}
    assert check_update(ref, {"w": np.zeros(2, np.float32)}) is None
    assert "missing ['w']" in check_update(ref, {"v": np.zeros(2, np.float32)})
    assert "unexpected ['v']" in check_update(ref, {"w": np.zeros(2, np.float32), "v": np.zeros(1)})
    assert "dtype int64" in check_update(ref, {"w": np.zeros(2, np.int64)})
    assert check_update(ref, {"w": np.zeros(2, np.float64)}) is None  # float64 (FedAdam's) against float32: fine
    assert "Inf" in check_update(ref, {"w": np.array([0, np.inf], np.float32)})


def test_an_update_far_larger_than_the_rounds_median_is_rejected():
    cfg = apply_overrides(load(CONFIG), {"federation.max_update_ratio": 5.0})
    glob = {"w": np.zeros(4, np.float32)}
    out = [sent(n) for n in (1, 2, 3)]
    replies = [reply(out[0], {"w": np.full(4, 1.0, np.float32)}), reply(out[1], {"w": np.full(4, 1.2, np.float32)}),
               reply(out[2], {"w": np.full(4, 50.0, np.float32)})]
    result = checked(cfg, out, replies, to_record(glob), str, DECLARED)
    assert [m.has_error() for m in result] == [False, False, True]
    assert "max_update_ratio" in result[2].error.reason


def saved(run_dir: Path) -> dict:
    """The run's checkpoint, read as a resume reads it: checked against the run's own config."""
    return checkpoint.load(run_dir, load(run_dir / "config.yaml"))


def test_a_crash_a_hang_and_nan_weights_are_survived_and_recorded(federation, tmp_path, capsys):
    metrics = federation(tmp_path / "run", {
        "federation.rounds": 3, "federation.min_sites": 1, "federation.round_timeout": 8,
        "faults.crash": ["1@1"], "faults.nan": ["0@2"], "faults.hang": ["1@3"]})
    failed = [r.get("failed", {}) for r in metrics["rounds"]]
    assert list(failed[0]) == ["site-1"] and "injected fault (faults.crash)" in failed[0]["site-1"]
    assert list(failed[1]) == ["site-0"] and "NaN" in failed[1]["site-0"]
    assert list(failed[2]) == ["site-1"] and "timeout" in failed[2]["site-1"]
    assert [r["round"] for r in metrics["rounds"]] == [1, 2, 3] and "stopped" not in metrics
    assert metrics["final"]["round"] == 3 and math.isfinite(metrics["final"]["macro_auc"])
    assert "site site-1 did not train" in capsys.readouterr().out


def test_below_min_sites_the_run_stops_with_a_clear_message(federation, tmp_path, capsys):
    metrics = federation(tmp_path / "run", {"federation.rounds": 3, "federation.min_sites": 2,
                                              "faults.crash": ["1@2"]})
    assert "federation.min_sites is 2" in metrics["stopped"] and "model of round 1" in metrics["stopped"]
    assert [r["round"] for r in metrics["rounds"]] == [1, 2]
    assert "injected fault" in metrics["rounds"][1]["failed"]["site-1"]
    assert metrics["final"]["round"] == 1
    assert "only 1 site(s) sent a usable update" in capsys.readouterr().out


def test_a_stopped_fedadam_run_resumes_from_its_checkpoint_to_the_straight_result(federation, tmp_path):
    adam = {"federation.rounds": 3, "federation.strategy": "fedadam"}
    straight = federation(tmp_path / "a" / "run", adam)
    state = saved(tmp_path / "a" / "run")
    assert state["round"] == 3 and set(state["strategy"]) >= {"m_t", "v_t", "current_arrays"}
    assert state["best_round"] in (1, 2, 3)
    # Both sites fail in round 3, the run stops (min_sites 2) with round 2's checkpoint; the sites recover.
    stopped = federation(tmp_path / "b" / "run", {**adam, "faults.crash": ["0@3", "1@3"]})
    assert "stopped" in stopped and saved(tmp_path / "b" / "run")["round"] == 2
    resumed = federation(tmp_path / "b" / "run", adam, resume=True)
    for m in (straight, resumed):
        m.pop("seconds")
    assert resumed == straight


@pytest.mark.e2e
def test_a_killed_run_resumes_to_the_same_metrics(quick_data, tmp_path, capsys):
    """4 rounds straight == 2 rounds, every process of the run killed, resumed for the rest (real Flower)."""
    common = ["--set", f"data.root={quick_data}", "--set", f"server.eval_data={quick_data / 'holdout'}",
              "--set", "data.sites=2", "--set", "train.steps=2", "--set", "federation.rounds=4",
              "--set", "data.patch_size=32", "--set", "report.shap_rows=0"]
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    assert main(["simulate", CONFIG, "--out", str(straight), *common]) == 0
    printed = capsys.readouterr()  # what `fedfuse simulate` prints and leaves behind
    out = printed.out
    assert "round  4/4" in out and "final (central)" in out
    assert "\r" not in out + printed.err and "round/s" not in printed.err  # not a terminal: a plain log, no bars
    metrics = json.loads((straight / "metrics.json").read_text())
    assert [r["round"] for r in metrics["rounds"]] == [1, 2, 3, 4]
    assert all(set(r["sites"]) == {"site-0", "site-1"} for r in metrics["rounds"])
    final = metrics["final"]
    again = rescored(straight, quick_data / "holdout")  # the saved model scores what the run reported
    assert final["source"] == "central" and final["macro_auc"] == pytest.approx(again["macro_auc"], abs=RESCORED_AUC)
    assert final["accuracy"] == pytest.approx(again["accuracy"])
    assert set(final["auc"]) == {"mitosis", "tumor", "non_tumor"} and "ci95" in final
    assert all((straight / f).is_file() for f in ("model.pt", "config.yaml", checkpoint.FILE, "flower.log"))
    assert processes_mentioning(str(straight)) == []  # SuperLink, SuperExec, Ray: all stopped
    proc = subprocess.Popen([sys.executable, "-m", "simulations.cli", "simulate", CONFIG, "--out", str(broken),
                             *common], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.time() + 180
        while not (broken / checkpoint.FILE).is_file() or saved(broken)["round"] < 2:
            assert proc.poll() is None and time.time() < deadline, "the run ended before its checkpoint of round 2"
            time.sleep(0.1)
        for pid in [proc.pid, *processes_mentioning(str(broken))]:  # the crash: every process of the run, at once
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    done = saved(broken)["round"]
    assert 2 <= done < 4
    assert main(["simulate", CONFIG, "--out", str(broken), *common]) == 2  # never overwritten without --force
    assert "--resume" in capsys.readouterr().err
    assert main(["simulate", CONFIG, "--resume", str(broken), *common]) == 0
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (straight, broken))
    for m in (a, b):
        m.pop("seconds")
    assert a == b
    assert processes_mentioning(str(broken)) == []


def test_central_dp_accountant_survives_a_checkpoint(federation, tmp_path):
    """Flower's accountant holds modules beside its state: the state is saved and restored, the modules kept."""
    from server.record import RunRecord
    from server.strategy import build_strategy

    metrics = federation(tmp_path / "run", {"federation.rounds": 2, "privacy.mode": "central",
                                              "privacy.epsilon": None, "privacy.noise_multiplier": 1.0})
    state = saved(tmp_path / "run")
    assert "fraction_train" in state["strategy"]["strategy"]  # the wrapped FedAvg's own state, as attributes
    assert "record" not in state["strategy"]["strategy"]  # its wiring is rebuilt, not restored
    cfg = apply_overrides(load(CONFIG), {"privacy.mode": "central", "privacy.epsilon": None,
                                         "privacy.noise_multiplier": 1.0, "data.sites": 2})
    fresh = build_strategy(cfg, RunRecord(tmp_path, ("a",), {}), {1: "site-0", 2: "site-1"}, set())
    assert fresh.accountant.get_privacy_spent().num_releases == 0
    checkpoint.restore_strategy(fresh, state["strategy"])
    spent = fresh.accountant.get_privacy_spent()
    assert spent.num_releases == 2 and spent.epsilon == pytest.approx(metrics["privacy"]["central"]["epsilon"])


class Payload:
    """A pickle that creates ``marker`` when loaded (a crafted checkpoint once ran a shell command this way)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


@pytest.mark.parametrize("name", [checkpoint.OLD_FILE, checkpoint.FILE])
def test_resuming_a_planted_pickle_runs_nothing_and_names_the_file(federation, tmp_path, name):
    marker = tmp_path / "ran"
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / name).write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(ValueError, match=str(tmp_path / "run" / name)):
        federation(tmp_path / "run", {"federation.rounds": 2}, resume=True)
    assert not marker.exists()
