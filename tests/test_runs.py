"""Run folders: --force replaces only what fedfuse made, one writer per folder, no process outlives its run."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

import simulations.flower
from server import checkpoint
from simulations.cli import main
from simulations.flower import ScreenLines, run_simulation
from simulations.runs import (
    LOCK,
    OWNER_ENV,
    FolderError,
    check_replaceable,
    child,
    clear,
    hold,
    is_marked,
    mark,
    marker,
    processes,
)
from tests.helpers import processes_mentioning

ROOT = Path(__file__).resolve().parent.parent
CONFIG = str(ROOT / "configs/quickstart.yaml")


def tree(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes: what must survive a refusal unchanged."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def hospital(folder: Path) -> Path:
    """A stand-in for a hospital's data folder (not made by fedfuse)."""
    (folder / "BreCaHAD" / "images").mkdir(parents=True)
    (folder / "BreCaHAD" / "images" / "Case_1-01.tif").write_bytes(b"II*\0 a real slide")
    (folder / "linkage.csv").write_text("case_id,subject_id\nCase_1,7\n")
    return folder


@pytest.mark.parametrize("name", ["", ".", "..", "../x", "a/b", "/etc", "a\\b", "x\0y"])
def test_a_name_that_would_leave_its_folder_is_refused(tmp_path, name):
    with pytest.raises(FolderError, match="expected one plain name"):
        child(tmp_path, name, "name")


def test_a_plain_name_stays_inside(tmp_path):
    assert child(tmp_path, "quickstart-20260101-000000", "name") == tmp_path / "quickstart-20260101-000000"


def test_force_refuses_a_folder_fedfuse_did_not_make_and_deletes_nothing(quick_data, tmp_path, capsys):
    theirs = hospital(tmp_path / "results")
    before = tree(theirs)
    data = ["--set", f"data.root={quick_data}", "--set", "data.sites=2"]
    assert main(["simulate", CONFIG, *data, "--out", str(theirs), "--force"]) == 2
    err = capsys.readouterr().err
    assert "fedfuse did not make it" in err and marker(theirs, "run").name in err
    assert tree(theirs) == before


@pytest.mark.parametrize("where", ["root", "holding the root", "holdout"])
def test_force_never_replaces_the_data(quick_data, tmp_path, capsys, where):
    """Even a data folder with a run's marker planted in it: data.root, a folder above it, the holdout."""
    data = hospital(tmp_path / "hospital" / "data")
    (data / "holdout").mkdir()
    out = {"root": data, "holding the root": data.parent, "holdout": data / "holdout"}[where]
    mark(out, "run")
    before = tree(tmp_path)
    settings = ["--set", f"data.root={data}", "--set", f"server.eval_data={data / 'holdout'}"]
    assert main(["simulate", CONFIG, *settings, "--out", str(out), "--force"]) == 2
    err = capsys.readouterr().err.strip()
    assert "refusing to replace" in err and ("data.root" in err or "server.eval_data" in err)
    assert tree(tmp_path) == before


def test_a_run_folder_is_replaced_whole_but_its_lock_is_kept(tmp_path):
    run = tmp_path / "run"
    (run / "seed-0").mkdir(parents=True)
    (run / "seed-0" / "metrics.json").write_text("{}")
    (run / "link").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "kept").write_text("not the run's")
    mark(run, "run")
    check_replaceable(run, "run", "--out", {"data.root": str(tmp_path / "data")})
    with hold(run):
        clear(run)
        assert [p.name for p in run.iterdir()] == [LOCK]
    assert (tmp_path / "elsewhere" / "kept").is_file()  # a link inside the run is removed, not followed


def test_synth_refuses_a_hospital_folder_even_with_force(tmp_path, capsys):
    theirs = hospital(tmp_path / "hospital")
    before = tree(theirs)
    assert main(["synth", "--out", str(theirs), "--sites", "1"]) == 2
    assert "not empty" in capsys.readouterr().err
    assert main(["synth", "--out", str(theirs), "--sites", "1", "--force"]) == 2
    assert marker(theirs, "data").name in capsys.readouterr().err
    assert tree(theirs) == before


def test_generated_data_is_marked_as_made_by_synth(quick_data):
    assert is_marked(quick_data, "data") and not is_marked(quick_data, "run")


def test_one_writer_per_folder_and_a_dead_owners_lock_is_taken_over(tmp_path):
    run = tmp_path / "run"
    with hold(run):
        with pytest.raises(FolderError, match=rf"pid {os.getpid()}\b.*is writing this folder"):
            with hold(run):
                pass
    owner = subprocess.Popen([sys.executable, "-c", "import sys, time; from simulations.runs import hold\n"
                              "with hold(sys.argv[1]):\n    print('held', flush=True); time.sleep(60)", str(run)],
                             cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert owner.stdout.readline().strip() == "held"
        with pytest.raises(FolderError, match=rf"pid {owner.pid}\b"):
            with hold(run):
                pass
    finally:
        owner.kill()
        owner.wait()
    deadline = time.time() + 10
    while True:  # the watchdog lets go once it has swept
        try:
            with hold(run):
                break
        except FolderError:
            assert time.time() < deadline, "a dead owner's lock was never released"
            time.sleep(0.1)


def fake_run(metrics: dict):
    """A stand-in for the Flower run: writes ``metrics`` as the server would, and nothing else."""
    def run_simulation(run_dir: Path, run_config: dict, *args, **kwargs) -> None:
        (run_dir / "metrics.json").write_text(json.dumps(metrics))
    return run_simulation


def ehr_run(quick_data) -> list[str]:
    """Settings that need no patch extraction before the (faked) Flower run."""
    return ["--set", f"data.root={quick_data}", "--set", "data.sites=2", "--set", "model.name=mlp",
            "--set", "report.shap_rows=0"]


def test_a_run_whose_every_site_declined_exits_non_zero_and_says_why(quick_data, tmp_path, monkeypatch, capsys):
    stopped = "round 1: every site has spent its privacy budget; the run stops with the model of round 0"
    monkeypatch.setattr(simulations.flower, "run_simulation", fake_run({
        "rounds": [{"round": 1, "failed": {"site-0": "budget_exhausted: spent", "site-1": "budget_exhausted: spent"}}],
        "final": {"source": "none"}, "stopped": stopped}))
    assert main(["simulate", CONFIG, *ehr_run(quick_data), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fedfuse: error: the run trained nothing") and stopped in err and "\n" not in err


def test_a_resume_while_another_run_holds_the_folder_is_refused(quick_data, tmp_path, monkeypatch, capsys):
    """And --force on it too; the same resume goes ahead once the holder is done."""
    run = tmp_path / "run"
    monkeypatch.setattr(simulations.flower, "run_simulation", fake_run({"rounds": [], "final": {"source": "none"}}))
    assert main(["simulate", CONFIG, *ehr_run(quick_data), "--out", str(run)]) == 2  # trained nothing, but made
    capsys.readouterr()
    assert is_marked(run, "run") and (run / "config.yaml").is_file()
    with hold(run):
        assert main(["simulate", CONFIG, *ehr_run(quick_data), "--resume", str(run)]) == 2
        assert f"pid {os.getpid()}" in capsys.readouterr().err
        assert main(["simulate", CONFIG, *ehr_run(quick_data), "--out", str(run), "--force"]) == 2
        assert "is writing this folder" in capsys.readouterr().err
    assert (run / "config.yaml").is_file()
    monkeypatch.setattr(simulations.flower, "run_simulation", fake_run({
        "rounds": [{"round": 1, "train_loss": 0.5}], "final": {"source": "none"}}))
    (run / "stale.txt").write_text("from the run before")
    assert main(["simulate", CONFIG, *ehr_run(quick_data), "--out", str(run), "--force"]) == 0
    assert not (run / "stale.txt").exists() and is_marked(run, "run")


def made_run(quick_data, run: Path, monkeypatch, capsys) -> None:
    """A run folder as `fedfuse simulate` leaves it (marker, config.yaml, lock), from a faked Flower run."""
    monkeypatch.setattr(simulations.flower, "run_simulation", fake_run({"rounds": [], "final": {"source": "none"}}))
    assert main(["simulate", CONFIG, *ehr_run(quick_data), "--out", str(run)]) == 2  # trained nothing, but made
    assert "the run trained nothing" in capsys.readouterr().err
    assert is_marked(run, "run") and (run / "config.yaml").is_file() and (run / LOCK).is_file()


def test_resume_refuses_a_folder_that_only_holds_a_matching_config(quick_data, tmp_path, monkeypatch, capsys):
    """No marker is written into it, so a later --force still refuses it; a real run still resumes, unmarked anew."""
    run = tmp_path / "run"
    made_run(quick_data, run, monkeypatch, capsys)
    mine = hospital(tmp_path / "mine")
    (mine / "config.yaml").write_bytes((run / "config.yaml").read_bytes())
    before = tree(mine)
    assert main(["simulate", CONFIG, *ehr_run(quick_data), "--resume", str(mine)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"fedfuse: error: --resume {mine}: not a run fedfuse made (no .fedfuse-run or checkpoint.json "
                   "file); expected a run folder written by `fedfuse simulate`")
    assert tree(mine) == before and not marker(mine, "run").exists() and not (mine / LOCK).exists()
    assert main(["simulate", CONFIG, *ehr_run(quick_data), "--out", str(mine), "--force"]) == 2
    assert "fedfuse did not make it" in capsys.readouterr().err
    assert tree(mine) == before
    made = marker(run, "run").read_bytes()
    monkeypatch.setattr(simulations.flower, "run_simulation", fake_run({
        "rounds": [{"round": 1, "train_loss": 0.5}], "final": {"source": "none"}}))
    assert main(["simulate", CONFIG, *ehr_run(quick_data), "--resume", str(run)]) == 0
    assert marker(run, "run").read_bytes() == made


def test_a_lock_planted_as_a_link_is_refused_and_its_target_unchanged(quick_data, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    made_run(quick_data, run, monkeypatch, capsys)
    precious = tmp_path / "bashrc"
    precious.write_text("export PATH=$HOME/bin:$PATH\n")
    (run / LOCK).unlink()
    (run / LOCK).symlink_to(precious)
    for how in (["--resume", str(run)], ["--out", str(run), "--force"]):
        assert main(["simulate", CONFIG, *ehr_run(quick_data), *how]) == 2
        err = capsys.readouterr().err.strip()
        assert err == (f"fedfuse: error: {run / LOCK}: a symbolic link; expected a regular file fedfuse writes (it "
                       "never writes through a link): remove it and retry")
        assert precious.read_text() == "export PATH=$HOME/bin:$PATH\n" and (run / LOCK).is_symlink()


def test_a_lock_that_is_not_a_regular_file_is_refused(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    os.mkfifo(run / LOCK)
    with pytest.raises(FolderError, match=rf"^{run / LOCK}: not a regular file; expected a regular file"):
        with hold(run):
            pass


def test_a_marker_is_never_written_through_a_link_nor_read_through_one(tmp_path):
    precious = tmp_path / "precious.txt"
    precious.write_text("not fedfuse's\n")
    folder = tmp_path / "run"
    folder.mkdir()
    marker(folder, "run").symlink_to(precious)
    mark(folder, "run")
    assert precious.read_text() == "not fedfuse's\n"
    assert not marker(folder, "run").is_symlink() and is_marked(folder, "run")
    assert [p.name for p in folder.iterdir()] == [marker(folder, "run").name]  # no temporary file left
    theirs = hospital(tmp_path / "theirs")  # a link to a real run's marker does not make a folder a run
    marker(theirs, "run").symlink_to(marker(folder, "run"))
    assert not is_marked(theirs, "run")


def test_flower_log_planted_as_a_link_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    precious = tmp_path / "precious.txt"
    precious.write_text("not fedfuse's\n")
    run = tmp_path / "run"
    run.mkdir()
    (run / "flower.log").symlink_to(precious)

    def superlink(*args, stdout, **kwargs):  # what a started SuperLink does first: write to its log
        stdout.write("INFO : Starting SuperLink\n")
        stdout.flush()
        raise RuntimeError("no SuperLink in this test")

    monkeypatch.setattr(simulations.flower.subprocess, "Popen", superlink)
    with pytest.raises(FolderError, match=rf"^{run / 'flower.log'}: a symbolic link"):
        run_simulation(run, {}, 1, 1.0)
    assert precious.read_text() == "not fedfuse's\n"


def test_force_never_replaces_a_ledger_folder_named_relative_to_the_data(tmp_path, monkeypatch, capsys):
    """A relative privacy.ledger_dir lies inside data.root, wherever the command runs."""
    data = hospital(tmp_path / "hospital")
    ledgers = data / "ledgers"
    mark(ledgers, "run")
    (ledgers / "ledger-site-0.json").write_text('{"history": []}')
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(simulations.flower, "run_simulation", fake_run({"rounds": [], "final": {"source": "none"}}))
    before = tree(tmp_path)
    assert main(["simulate", CONFIG, "--set", f"data.root={data}", "--set", "privacy.ledger_dir=ledgers",
                 "--out", str(ledgers), "--force"]) == 2
    err = capsys.readouterr().err.strip()
    assert f"it is or holds privacy.ledger_dir ({ledgers})" in err
    assert tree(tmp_path) == before


@pytest.mark.slow
def test_synth_force_keeps_the_privacy_ledgers(tmp_path, capsys):
    """The same seed makes the same patients: what they spent stays, at the root and in a site folder alike."""
    out = tmp_path / "data"
    ledgers = {out / ".fedfuse-privacy" / "ledger-site-0.json": '{"site": "site-0"}',
               out / "site-0" / ".fedfuse-privacy" / "ledger-abc.json": '{"site": "hospital-a"}',
               out / "custom" / "ledger-site-1.json": '{"site": "site-1"}'}
    mark(out, "data")
    for path, text in ledgers.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    (out / "site-0" / "old-tile.tif").write_bytes(b"from the run before")
    assert main(["synth", "--out", str(out), "--sites", "1", "--force"]) == 0
    shown = capsys.readouterr().out
    assert all(path.read_text() == text for path, text in ledgers.items())
    for kept in (out / ".fedfuse-privacy", out / "site-0" / ".fedfuse-privacy", out / "custom"):
        assert f"kept {kept}: privacy ledgers" in shown
    assert not (out / "site-0" / "old-tile.tif").exists() and (out / "site-0" / "linkage.csv").is_file()


# What `flwr log --stream` gives for a ClientApp that raised, then a ServerApp that crashed (shortened from a
# real flower.log): each record twice (coloured, then dated), the site's reason a Ray traceback over many lines.
FLOWER_LOG = """\x1b[92mINFO \x1b[0m:      [ROUND 1]
\x1b[91mERROR \x1b[0m:     An exception was raised when processing a message by RayBackend
12/01/2026 18:16:35:ERROR:An exception was raised when processing a message by RayBackend
\x1b[91mERROR \x1b[0m:     \x1b[36mray::ClientAppActor.run()\x1b[39m (pid=22159, ip=192.0.2.2)
  File "/x/client/app.py", line 179, in local_train
    raise RuntimeError(f"injected fault (faults.crash): site {site.name} fails in round {server_round}")
RuntimeError: injected fault (faults.crash): site site-1 fails in round 1

The above exception was the direct cause of the following exception:

\x1b[36mray::ClientAppActor.run()\x1b[39m (pid=22159, ip=192.0.2.2)
flwr.clientapp.client_app.ClientAppException: 
Exception ClientAppException occurred. Message: injected fault (faults.crash): site site-1 fails in round 1
12/01/2026 18:16:35:ERROR:\x1b[36mray::ClientAppActor.run()\x1b[39m (pid=22159, ip=192.0.2.2)
RuntimeError: injected fault (faults.crash): site site-1 fails in round 1
[fedfuse] round 1: site site-1 did not train: RuntimeError: injected fault (faults.crash): site site-1 fails in round 1
\x1b[92mINFO \x1b[0m:      aggregate_train: Received 1 results and 1 failures
\x1b[91mERROR \x1b[0m:     Simulation raised an exception
Traceback (most recent call last):
  File "/x/server/app.py", line 10, in main
    run_rounds(grid)
ValueError: round 2: NaN in the global model
12/01/2026 18:16:40:ERROR:Simulation raised an exception
Traceback (most recent call last):
ValueError: round 2: NaN in the global model
"""


def test_the_screen_shows_a_sites_error_and_the_server_apps_exception_once_each():
    screen = ScreenLines()
    shown = [s for s in map(screen, FLOWER_LOG.splitlines(keepends=True)) if s is not None]
    assert shown == [
        "ERROR: An exception was raised when processing a message by RayBackend",
        "  RuntimeError: injected fault (faults.crash): site site-1 fails in round 1",
        "round 1: site site-1 did not train: RuntimeError: injected fault (faults.crash): site site-1 fails in round 1",
        "ERROR: Simulation raised an exception",
        "  ValueError: round 2: NaN in the global model",
    ]


WATCHED = textwrap.dedent("""
    import subprocess, sys, time
    from simulations.runs import POLL_S, die_with_parent, hold
    with hold(sys.argv[1]):
        child = subprocess.Popen(["sleep", "60"], preexec_fn=die_with_parent(), start_new_session=True)
        # Orphaned when the shell dies, in a session of its own and unmarked: as Ray's agents are.
        shell = subprocess.Popen(["sh", "-c", "sleep 61 & echo $!; sleep 62"], stdout=subprocess.PIPE, text=True,
                                 start_new_session=True)
        orphan = shell.stdout.readline().strip()
        time.sleep(3 * POLL_S)  # the watchdog has seen them all
        print(child.pid, shell.pid, orphan, flush=True)
        time.sleep(60)
""")


def test_a_killed_owners_processes_die_with_it_and_no_one_elses(tmp_path):
    """The parent-death signal for a child; the watchdog for the rest, even where an orphan hides its origin.

    A process marked with the run folder dies too, though the owner never started it; one marked with
    another folder lives on.
    """
    marked = subprocess.Popen(["sleep", "63"], env={OWNER_ENV: str(tmp_path / "run" / "seed-0")})
    stranger = subprocess.Popen(["sleep", "64"], env={OWNER_ENV: str(tmp_path / "other")})
    owner = subprocess.Popen([sys.executable, "-c", WATCHED, str(tmp_path / "run")], cwd=ROOT,
                             stdout=subprocess.PIPE, text=True)
    pids = [int(p) for p in owner.stdout.readline().split()]
    try:
        owner.send_signal(signal.SIGKILL)
        owner.wait()
        deadline = time.time() + 10
        while {*pids, marked.pid} & processes().keys() and time.time() < deadline:
            time.sleep(0.1)
        assert not set(pids) & processes().keys()
        assert marked.wait(timeout=1) == -signal.SIGKILL and stranger.pid in processes()
    finally:
        for pid in [*pids, marked.pid, stranger.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        marked.wait()
        stranger.wait()


@pytest.mark.e2e
def test_a_killed_simulate_leaves_no_process_and_its_folder_is_refused_while_held(quick_data, tmp_path, capsys):
    """`fedfuse simulate` alone is SIGKILLed after round 1 (as the OOM killer does): nothing it started lives on.

    Site 1 crashes in round 1: its ClientApp's error is on the screen, not only in flower.log.
    """
    common = ["--set", f"data.root={quick_data}", "--set", f"server.eval_data={quick_data / 'holdout'}",
              "--set", "data.sites=2", "--set", "train.steps=1", "--set", "federation.rounds=20",
              "--set", "data.patch_size=32", "--set", "report.shap_rows=0", "--set", "model.name=cnn",
              "--set", "faults.crash=[1@1]", "--set", "federation.min_sites=1"]
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "simulations.cli", "simulate", CONFIG, "--out", str(run), *common],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        shown = []
        for line in proc.stdout:
            shown.append(line)
            if line.startswith("round  1/"):
                break
        else:
            pytest.fail(f"the run ended before round 1 (exit {proc.wait()}):\n{''.join(shown)}")
        assert "round 1: site site-1 did not train: RuntimeError: injected fault (faults.crash): site site-1 fails " \
               "in round 1\n" in shown, "".join(shown)
        deadline = time.time() + 60
        while not (run / checkpoint.FILE).is_file():
            assert time.time() < deadline, "no checkpoint after round 1"
            time.sleep(0.1)
        started = processes_mentioning(str(run))
        assert len(started) >= 4  # SuperLink, SuperExec, simulation, Ray, the log stream, the watchdog
        assert main(["simulate", CONFIG, "--resume", str(run), *common]) == 2
        assert f"pid {proc.pid}" in capsys.readouterr().err
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        deadline = time.time() + 30
        while processes_mentioning(str(run)) and time.time() < deadline:
            time.sleep(0.5)
        assert processes_mentioning(str(run)) == []
    finally:
        if proc.poll() is None:
            proc.kill()
    with hold(run):  # free again: the next --resume may take it
        pass


def test_deploy_local_refuses_a_folder_it_did_not_make(tmp_path, capsys):
    """A try replaces the coordinator's certificates and keys: never in a real coordinator's folder."""
    theirs = tmp_path / "coordinator-home"
    (theirs / "coordinator").mkdir(parents=True)
    (theirs / "coordinator" / "ca.key").write_text("the federation's real CA key")
    before = tree(theirs)
    assert main(["deploy", "local", "--out", str(theirs)]) == 2
    assert marker(theirs, "deploy").name in capsys.readouterr().err
    assert tree(theirs) == before


def test_privacy_sweep_refuses_a_folder_that_holds_no_sweep(quick_data, tmp_path, capsys):
    theirs = hospital(tmp_path / "results")
    before = tree(theirs)
    assert main(["privacy-sweep", CONFIG, *ehr_run(quick_data), "--out", str(theirs)]) == 2
    assert "holds no sweep" in capsys.readouterr().err
    assert tree(theirs) == before


def test_a_run_name_never_leaves_runs(quick_data, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["simulate", CONFIG, *ehr_run(quick_data), "--set", "name=../../escaped"]) == 2
    assert "name" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == [] and not (tmp_path.parent / "escaped").exists()


@pytest.mark.parametrize("model", ["mlp", "xgboost"])
def test_the_model_and_config_files_are_never_written_through_a_planted_link(tmp_path, model):
    from shared import learner
    from shared.config import Config, ModelConfig, dump

    cfg = Config(model=ModelConfig(name=model))
    outside = tmp_path / "outside.txt"
    outside.write_text("the user's file")
    run = tmp_path / "run"
    run.mkdir()
    name = "model.json" if model == "xgboost" else "model.pt"
    for planted in ("config.yaml", name):
        (run / planted).symlink_to(outside)
    features = len(learner.FEATURES)
    weights = learner.initial_weights(cfg, np.zeros(features, np.float32), np.ones(features, np.float32))[0]
    dump(cfg, run / "config.yaml")
    learner.save(cfg, weights, run)
    assert outside.read_text() == "the user's file"
    assert not (run / "config.yaml").is_symlink() and not (run / name).is_symlink()
