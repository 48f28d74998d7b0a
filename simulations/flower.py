"""Run the fedfuse Flower app in Flower's simulation engine, owning every process it starts.

``flwr run .`` against a local SuperLink leaves that SuperLink (and, after a
failure, Ray agents) running detached, with no pid file. So the simulation
starts its own ``flower-superlink --simulation`` as a child in a new session,
with ``FLWR_HOME`` and ``RAY_TMPDIR`` inside the run folder, submits the app
with ``flwr run``, streams its log, reads the run's status (``flwr run``
exits 0 even when the run failed) and finally kills the SuperLink's process
groups: the SuperLink, the SuperExec, ``flwr-simulation`` and Ray, also on
error or Ctrl-C. If this process is killed outright, the SuperLink and the
log stream die with it (a parent-death signal) and the watchdog of
:func:`simulations.runs.hold` stops the rest: every Flower process carries
``FEDFUSE_RUN=<run folder>`` in its environment.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import deque
from pathlib import Path

import tomli_w

from simulations.runs import OWNER_ENV, die_with_parent, hold, mark, open_log, processes, subfolder, write_safely

PROJECT_ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
RAY_SOCKET_ROOM = 40  # Ray's AF_UNIX socket paths under RAY_TMPDIR must stay under 107 bytes


class SimulationError(RuntimeError):
    """The Flower run did not complete; the message says where its log is."""


def flower_env(home: Path, ray_tmp: Path) -> dict[str, str]:
    """Environment for every Flower process: no runtime installs, no telemetry, state in the run folder."""
    env = os.environ.copy()
    env.update(
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
        FLWR_HOME=str(home),
        RAY_TMPDIR=str(ray_tmp),
        RAY_USAGE_STATS_ENABLED="0",
        RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO="0",
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",  # the SuperLink spawns its helpers by name
    )
    return env


def ray_tmpdir(preferred: Path) -> tuple[Path, bool]:
    """``preferred`` if Ray's socket paths fit under it, else a short private folder (and True: remove it)."""
    if len(str(preferred.resolve())) <= RAY_SOCKET_ROOM:
        return subfolder(preferred).resolve(), False
    return Path(tempfile.mkdtemp(prefix="fedfuse-ray-")), True


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def children(pid: int) -> list[int]:
    """The pids of ``pid``'s live children."""
    return [child for child, (parent, _) in processes().items() if parent == pid]


def stop_tree(pid: int, grace: float = 5.0, known_groups: tuple[int, ...] = ()) -> None:
    """Stop a SuperLink: its process group and its children's groups (SuperExec leads one with Ray in it).

    SIGTERM first; SIGKILL for what is still alive after ``grace`` seconds
    (during a run the SuperLink waits on open log streams and Ray's agents
    ignore SIGTERM).
    """
    groups = {pid} | set(children(pid)) | set(known_groups)  # known: found while the SuperLink was alive
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for g in groups:
            try:
                os.killpg(g, sig)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.time() + grace
        while time.time() < deadline and groups & processes().keys():
            time.sleep(0.2)


def local_superlink_pid(port: int = 39091) -> int | None:
    """The pid of the SuperLink that ``flwr run . local`` started on ``port`` (it writes no pid file)."""
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                argv = (p / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if any(a.endswith(b"flower-superlink") for a in argv[:2]) and b"--port" in argv \
                    and argv[argv.index(b"--port") + 1] == str(port).encode():
                return int(p.name)
    return None


def flwr_cli(args: list[str], env: dict[str, str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "flwr"), *args], env=env, text=True, preexec_fn=die_with_parent(), **kwargs)


def run_simulation(run_dir: Path, run_config: dict, num_sites: int, cpus_per_site: float,
                   echo=print) -> None:
    """Run the app for ``run_config`` with ``num_sites`` simulated SuperNodes; outputs land in ``run_dir``.

    Lines the apps print with the ``[fedfuse]`` prefix, and errors, are passed
    to ``echo``; Flower's full log is kept in ``run_dir/flower.log``. Call it
    inside :func:`simulations.runs.hold` of ``run_dir`` (or a folder above it),
    whose watchdog stops these processes if this one is killed.
    """
    home = subfolder(run_dir / "flwr-home")
    ray_tmp, own_ray_tmp = ray_tmpdir(run_dir / "ray")
    env = {**flower_env(home, ray_tmp), OWNER_ENV: str(run_dir.resolve())}
    port = free_port()
    write_connection(home, f"127.0.0.1:{port}")
    log_path = run_dir / "flower.log"
    with open_log(log_path) as log:
        superlink = subprocess.Popen(
            [str(BIN / "flower-superlink"), "--insecure", "--simulation", "--isolation", "subprocess",
             "--host", "127.0.0.1", "--port", str(port), "--database", ":flwr-in-memory:"],
            cwd=run_dir, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            preexec_fn=die_with_parent())
        helpers: list[int] = []  # the SuperExec leads its own session: remember it while the SuperLink lives
        try:
            wait_ready(superlink, f"http://127.0.0.1:{port}/health", log_path)
            cpus = int(cpus_per_site) if float(cpus_per_site).is_integer() else cpus_per_site
            submit_and_follow(env, run_dir / "run_config.toml", run_config, log, log_path, echo,
                              federation_config=f"num-supernodes={num_sites} client-resources-num-cpus={cpus}",
                              on_submitted=lambda: helpers.extend(children(superlink.pid)))
        finally:
            stop_tree(superlink.pid, grace=2.0, known_groups=tuple(helpers))  # the run is over: no long wait
            superlink.wait()
            if own_ray_tmp:
                shutil.rmtree(ray_tmp, ignore_errors=True)


def write_connection(home: Path, address: str, root_certificates: Path | None = None) -> None:
    """``$FLWR_HOME/config.toml`` with one SuperLink connection, ``fedfuse``, made the default."""
    conn = {"address": address}
    conn.update({"root-certificates": str(root_certificates)} if root_certificates else {"insecure": True})
    text = tomli_w.dumps({"superlink": {"default": "fedfuse", "fedfuse": conn}})
    write_safely(home / "config.toml", lambda path: path.write_text(text))


def submit_and_follow(env: dict[str, str], overrides_path: Path, run_config: dict, log, log_path: Path, echo,
                      federation_config: str | None = None, on_submitted=lambda: None) -> str:
    """Submit the app to the SuperLink of ``env``'s ``fedfuse`` connection, stream its log, check how it ended.

    ``flwr run`` exits 0 even when the run failed, so the run's status is read
    from ``flwr ls`` afterwards; anything but ``finished:completed`` raises.
    Returns the run id.
    """
    write_safely(overrides_path, lambda path: path.write_text(tomli_w.dumps(run_config)))
    args = ["run", str(PROJECT_ROOT), "fedfuse", "--format", "json", "--run-config", str(overrides_path)]
    if federation_config:
        args += ["--federation-config", federation_config]
    sub = flwr_cli(args, env, capture_output=True, timeout=300)
    on_submitted()
    try:
        run_id = json.loads(sub.stdout)["run-id"]
    except (json.JSONDecodeError, KeyError):
        raise SimulationError(f"flwr run refused the app:\n{sub.stdout}{sub.stderr}") from None
    stream = subprocess.Popen([str(BIN / "flwr"), "log", str(run_id), "fedfuse", "--stream"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              preexec_fn=die_with_parent())
    try:
        screen = ScreenLines()
        for line in stream.stdout:
            log.write(line)
            shown = screen(line)
            if shown is not None:
                echo(shown)
        stream.wait()
    finally:
        if stream.poll() is None:
            stream.kill()
    status = _final_status(run_id, env, log_path)
    if status["status"] != "finished:completed":
        raise SimulationError(f"Flower run {run_id} ended {status['status']}: "
                              f"{status.get('status-details', '')} (full log: {log_path})")
    return run_id


ANSI = re.compile(r"\x1b\[[0-9;]*m")
# A log record's first line: Flower's coloured form, then its dated copy of the same record.
RECORD = re.compile(r"^(?:(DEBUG|INFO|WARNING|ERROR|CRITICAL)\s*:\s*|\d\d/\d\d/\d{4} [\d:]+:(DEBUG|INFO|WARNING|ERROR|"
                    r"CRITICAL):)(.*)$")
# A traceback's exception line ("RuntimeError: injected fault ..."); Ray's wrapper only repeats the ClientApp's.
EXCEPTION = re.compile(r"^(?!ray\.)[A-Za-z_][\w.]*(?:\([\w.]*\))?: \S")


class ScreenLines:
    """Which lines of a Flower log go to the screen: the apps' ``[fedfuse]`` lines and what went wrong.

    ``ERROR`` records, and the exception lines of the tracebacks that follow
    them (a ClientApp's error reaches the log as a Ray traceback whose cause is
    a dozen lines down; a ServerApp's crash as its own traceback), so the cause
    is on screen, not only in ``flower.log``. Flower writes each record twice;
    the second copy is skipped.
    """

    def __init__(self) -> None:
        self.detail = False  # inside an error's traceback: show its exception lines
        self.copy = False  # inside the dated copy of a record already seen
        self.seen: deque[str] = deque(maxlen=50)  # recent records' messages
        self.shown: set[str] = set()  # exception lines shown for the error at hand

    def __call__(self, line: str) -> str | None:
        """The text to show for ``line``, or None."""
        text = ANSI.sub("", line).rstrip()
        if "[fedfuse]" in text:  # one line each (the server puts a site's error in one line too)
            self.detail, self.copy, self.shown = False, False, set()
            return text.split("[fedfuse]", 1)[1].strip()
        record = RECORD.match(text)
        if record:
            level, message = record.group(1) or record.group(2), record.group(3).strip()
            self.copy = record.group(2) is not None and message in self.seen
            self.seen.append(message)
            self.detail = level == "ERROR" and not self.copy
            self.shown = self.shown if level == "ERROR" else set()  # one error's records repeat its cause
            quiet = message.startswith(("Traceback", "ray::"))  # a traceback's first line; Ray's actor's name
            return f"ERROR: {message}" if self.detail and not quiet else None
        if "Traceback (most recent call last)" in text:
            self.detail = not self.copy
            return None
        if not self.detail or self.copy or not EXCEPTION.match(text) or text in self.shown:
            return None
        self.shown.add(text)
        return f"  {text}"


def _final_status(run_id: str, env: dict[str, str], log_path: Path, poll_s: float = 0.5) -> dict:
    """The run's status from ``flwr ls``, waiting while it is not finished (a log stream can end early)."""
    while True:
        ls = flwr_cli(["ls", "fedfuse", "--run-id", str(run_id), "--format", "json"], env, capture_output=True,
                   timeout=60)
        try:
            status = json.loads(ls.stdout)["runs"][0]
        except (json.JSONDecodeError, KeyError, IndexError):
            raise SimulationError(f"cannot read the status of Flower run {run_id}: {ls.stdout}{ls.stderr} "
                                  f"(full log: {log_path})") from None
        if str(status.get("status", "")).startswith("finished"):
            return status
        time.sleep(poll_s)


def wait_ready(proc: subprocess.Popen, health_url: str, log_path: Path, timeout: float = 60,
               context=None) -> None:
    """Wait until a SuperLink answers ``health_url`` (``context``: an ``ssl.SSLContext`` for HTTPS)."""
    name = Path(str(proc.args[0])).name
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SimulationError(f"{name} exited with code {proc.returncode}; see {log_path}")
        try:
            with urllib.request.urlopen(health_url, timeout=1, context=context) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise SimulationError(f"{name} did not become ready in {timeout:.0f} s; see {log_path}")


def federate(cfg, run_dir: Path, engine: str = "simulation", echo=lambda line: None) -> None:
    """Run the app for ``cfg`` into ``run_dir``: Flower's simulation engine, or the in-process Grid.

    ``data.leave_out`` takes one site out of the federation (``data.sites - 1``
    SuperNodes). ``run_dir`` is marked as a run and held (one writer)
    meanwhile. Raises :class:`SimulationError` if the run trained nothing.
    """
    from shared.config import run_envelope

    run_dir = Path(run_dir).resolve()  # the apps run in another working directory
    # Experiments compare metrics: the end-of-run explanations (federated SHAP) are for a run's own report.
    run_config = run_envelope(dataclasses.replace(cfg, report=dataclasses.replace(cfg.report, shap_rows=0)), run_dir)
    n_sites = cfg.data.sites - (cfg.data.leave_out is not None)
    with hold(run_dir):
        mark(run_dir, "run")
        if engine == "inprocess":
            from client.app import app as client_app
            from server.app import app as server_app
            from simulations.inprocess import run_server

            run_server(server_app, client_app, run_config, n_sites)
        else:
            run_simulation(run_dir, run_config, n_sites, cfg.simulation.cpus_per_site, echo=echo)
    trained(run_dir)


def trained(run_dir: Path) -> dict:
    """``run_dir``'s metrics.json; a run that trained nothing raises, with the server's reason (every site
    declined for its privacy budget, or none answered)."""
    metrics = json.loads((run_dir / "metrics.json").read_text())
    if not any("train_loss" in r or r.get("central") or r.get("federated") for r in metrics.get("rounds", [])):
        why = metrics.get("stopped") or "no round completed"
        raise SimulationError(f"the run trained nothing: {why} (metrics: {run_dir / 'metrics.json'})")
    return metrics


def flwr_run_local(extra_args: list[str]) -> int:
    """``flwr run . local --stream`` as the README documents, then stop the SuperLink it leaves running.

    One simulated SuperNode per site of ``configs/quickstart.yaml`` unless
    ``--federation-config`` is given. A SuperLink that was already running
    before (someone else's) is left alone.
    """
    if "--federation-config" not in extra_args:
        from shared.config import load

        sites = load(PROJECT_ROOT / "configs" / "quickstart.yaml").data.sites
        extra_args = [*extra_args, "--federation-config", f"num-supernodes={sites} client-resources-num-cpus=1"]
    ray_tmp, own = ray_tmpdir(PROJECT_ROOT / ".flwr" / "ray")
    env = flower_env(PROJECT_ROOT / ".flwr", ray_tmp)
    already = local_superlink_pid()
    try:
        return flwr_cli(["run", ".", "local", "--stream", *extra_args], env, cwd=PROJECT_ROOT).returncode
    finally:
        pid = local_superlink_pid()
        if pid is not None and pid != already:
            stop_tree(pid)
            print(f"stopped the local SuperLink (pid {pid}) and its process groups")
        if own:
            shutil.rmtree(ray_tmp, ignore_errors=True)


if __name__ == "__main__":  # used by `make flwr-run`
    sys.exit(flwr_run_local(sys.argv[1:]))
