"""Federation overhead: a federated run against a plain loop doing the same work, and where the difference goes.

    .venv/bin/python -m bench.federation_overhead [--tiny | --quick | --full] [--out FILE] [--data DIR]

Three ways to do one piece of work, timed one after the other in this run:

* ``plain``: a loop in this process, one site after another on
  ``train.threads`` threads: every site's local update from the global model
  (the sites' optimiser steps, seeds and data), FedAvg weighted by examples,
  each site's evaluation on its test split and the server's on the holdout
  (with the final round's bootstrap intervals);
* ``inprocess``: the real ServerApp and ClientApp through the in-process Grid
  (simulations/inprocess.py): no Ray, no SuperLink, but every message is
  serialised and every handler runs as in Flower, one site after another;
* ``simulation``: ``fedfuse simulate``'s path, Flower's simulation engine
  (SuperLink, ``flwr run``, Ray actors: ``cpus / simulation.cpus_per_site``
  sites train at once). The ``--tiny`` smoke size skips it.

For each: wall time over plain's (the target: at most 1.3 at the quickstart
size, ``--full``) and its timeline, read from the files the run writes: start
(until the ServerApp writes ``config.yaml``), first round (with the sites'
statistics query), a steady round (``metrics.json`` gains a round; the last
round, which adds the final bootstrap intervals, left out from 3 rounds on), end
(after the last round). The fixed cost per round is a steady round minus plain's.
Where it goes: in the in-process run, timers wrap the ClientApp's config
parsing (``from_run_config``), the rest of its per-message site setup
(``_site``: the site's data, loaded from the cache the first time and kept),
the messages' serialisation and the server's checkpoints; a fresh Ray start is
timed on its own.

Sizes (configs/quickstart.yaml on generated ``quick``-preset data): tiny: 2
sites, 2 rounds of 1 step; quick: 3 sites, 3 rounds of 1 epoch; full: the
quickstart itself, 3 sites, 6 rounds of 2 epochs.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench import common
from client import app as client_app
from server import checkpoint
from shared import learner
from shared.config import classes_of, eval_data_path, task_of
from shared.data import ehr_statistics, load_folder, load_sites, pooled_moments
from shared.evaluation import bootstrap_ci
from shared.metrics import classification_metrics
from simulations import inprocess
from simulations.flower import federate, flower_env, ray_tmpdir

NAME = "federation_overhead"
SIZES = {
    "tiny": {"sites": 2, "engines": ("plain", "inprocess"), "set": {"federation.rounds": 2, "train.steps": 1}},
    "quick": {"sites": 3, "engines": ("plain", "inprocess", "simulation"),
              "set": {"federation.rounds": 3, "train.local_epochs": 1}},
    "full": {"sites": 3, "engines": ("plain", "inprocess", "simulation"), "set": {}},
}
TARGET_RATIO = 1.3
SPOTS = {  # what the in-process run times inside the apps: name -> (module, function)
    "config_parsing": (client_app, "from_run_config"),  # the ClientApp rebuilds the config every message
    "site_reloading": (client_app, "_site"),  # ... and gets its site's data (from the cache once, then kept)
    "serialisation": (inprocess, "_transmitted"),  # each message to protobuf and back, as through a SuperLink
    "checkpoints": (checkpoint, "save"),  # the server's checkpoint after every round
}
RAY_PROBE = """
import time
t0 = time.perf_counter()
import ray
t1 = time.perf_counter()
ray.init(include_dashboard=False, logging_level="WARNING")  # as Flower's RayBackend starts it
t2 = time.perf_counter()
ray.shutdown()
print(t1 - t0, t2 - t1, time.perf_counter() - t2)
"""


def plain(cfg) -> dict:
    """The federation's work without the federation: same sites, steps, seeds, aggregation and evaluation."""
    started = time.perf_counter()
    torch.set_num_threads(cfg.train.threads)  # as each site sets it
    task, classes, rounds = task_of(cfg), classes_of(cfg), cfg.federation.rounds
    sites = load_sites(cfg.data, cfg.seed, task)
    holdout = load_folder(eval_data_path(cfg), cfg.data, cfg.seed, task)
    weights, _ = learner.initial_weights(cfg, *pooled_moments([ehr_statistics(train.ehr) for train, _ in sites]))
    ends, central = [], {}
    for r in range(1, rounds + 1):
        updates = []
        for k, (train, _) in enumerate(sites):
            seed = int(np.random.SeedSequence([cfg.seed, k, r]).generate_state(1)[0])  # client/app.py's
            updates.append((learner.local_update(cfg, weights, train, seed)[0], len(train)))
        total = sum(n for _, n in updates)
        weights = {key: sum(w[key] * (n / total) for w, n in updates).astype(value.dtype)
                   for key, value in updates[0][0].items()}
        for _, test in sites:
            classification_metrics(test.labels, learner.predict(cfg, weights, test)[0], classes)
        probs, _ = learner.predict(cfg, weights, holdout)
        central = classification_metrics(holdout.labels, probs, classes)
        if r == rounds:  # the server's final-round intervals
            bootstrap_ci(holdout, probs, classes, n=200, seed=cfg.seed)
        ends.append(time.perf_counter() - started)
    wall = time.perf_counter() - started
    return {"wall_s": wall, "round_ends_s": ends, **timeline(0.0, ends, wall), "macro_auc": central["macro_auc"]}


def timeline(server_started: float, ends: list[float], wall: float) -> dict:
    """A run's phases in seconds: start (before the ServerApp), first round, a steady round, end (after the last).

    A round first seen after the run returned ends at the wall time (``end_s`` 0).
    """
    return {"start_s": server_started, "first_round_s": ends[0] - server_started,
            "round_s": common.steady_round(ends, last_differs=True), "end_s": max(0.0, wall - ends[-1])}


class Timers:
    """Seconds and calls spent in module-level functions while a run lasts (wrapped, restored afterwards).

    Times are exclusive: a timed function called inside another counts for
    itself only, so the spots never add up to more than the run.
    """

    def __init__(self, spots: dict[str, tuple[object, str]]) -> None:
        for name, (module, attr) in spots.items():
            if not callable(getattr(module, attr, None)):
                raise AttributeError(f"{NAME}: spot {name!r} times {module.__name__}.{attr}, which is gone; "
                                     "update SPOTS in bench/federation_overhead.py")
        self.spots = spots
        self.seconds = dict.fromkeys(spots, 0.0)
        self.calls = dict.fromkeys(spots, 0)
        self._inner: list[float] = []  # per open call: time spent in timed calls inside it

    def _wrap(self, name: str, fn):
        def timed(*args, **kwargs):
            started = time.perf_counter()
            self._inner.append(0.0)
            try:
                return fn(*args, **kwargs)
            finally:
                spent = time.perf_counter() - started
                self.seconds[name] += spent - self._inner.pop()
                self.calls[name] += 1
                if self._inner:
                    self._inner[-1] += spent
        return timed

    @contextlib.contextmanager
    def active(self):
        saved = {name: getattr(module, attr) for name, (module, attr) in self.spots.items()}
        for name, (module, attr) in self.spots.items():
            setattr(module, attr, self._wrap(name, saved[name]))
        try:
            yield self
        finally:
            for name, (module, attr) in self.spots.items():
                setattr(module, attr, saved[name])


def federated(cfg, engine: str, run_dir: Path) -> dict:
    """One federated run of ``cfg`` in ``engine``: wall time, timeline, final macro AUC (and timers in process)."""
    timers = Timers(SPOTS)
    with contextlib.ExitStack() as stack:
        if engine == "inprocess":
            stack.enter_context(timers.active())
            stack.enter_context(common.quiet(run_dir / "apps.log"))
        clock = stack.enter_context(common.RoundClock(run_dir / "metrics.json"))
        epoch = time.time() - (time.perf_counter() - clock.started)  # the clock's zero as a file time
        federate(cfg, run_dir, engine)
        wall = time.perf_counter() - clock.started
    server_started = (run_dir / "config.yaml").stat().st_mtime - epoch  # the ServerApp's first write
    final = json.loads((run_dir / "metrics.json").read_text())["final"]
    out = {"wall_s": wall, "round_ends_s": clock.ends, **timeline(server_started, clock.ends, wall),
           "macro_auc": final.get("macro_auc")}
    if engine == "inprocess":
        out["inside"] = {name: {"seconds": timers.seconds[name], "calls": timers.calls[name]} for name in SPOTS}
    return out


def ray_start(work: Path) -> dict:
    """A fresh ``import ray``, ``ray.init`` and ``ray.shutdown``, timed in a new process with Flower's environment."""
    ray_tmp, own = ray_tmpdir(work / "ray")
    try:
        done = subprocess.run([sys.executable, "-c", RAY_PROBE], env=flower_env(work / "flwr-home", ray_tmp),
                              capture_output=True, text=True, timeout=300)
    finally:
        if own:
            shutil.rmtree(ray_tmp, ignore_errors=True)
    if done.returncode != 0:
        raise RuntimeError(f"timing Ray's start failed:\n{done.stderr[-2000:]}")
    imported, init, shutdown = (float(x) for x in done.stdout.split()[-3:])
    return {"import_s": imported, "init_s": init, "shutdown_s": shutdown}


def versus_plain(runs: dict) -> dict:
    """Each engine against plain: wall ratio, extra seconds, fixed cost per round."""
    base = runs["plain"]
    out = {}
    for engine, run in runs.items():
        if engine != "plain":
            fixed = run["round_s"] - base["round_s"] if run["round_s"] is not None else None
            out[engine] = {"ratio": run["wall_s"] / base["wall_s"], "extra_s": run["wall_s"] - base["wall_s"],
                           "fixed_per_round_s": fixed}
    return out


def main(argv: list[str] | None = None) -> int:
    args = common.parser(NAME, __doc__).parse_args(argv)
    started = time.perf_counter()
    size = SIZES[args.size]
    root = common.dataset(args.data, "quick", size["sites"])
    cfg = common.config(root, {"data.sites": size["sites"], **size["set"]})
    common.warm_caches(cfg)
    budget = f"{cfg.train.steps} steps" if cfg.train.steps else f"{cfg.train.local_epochs} epochs"
    print(f"federation overhead: {cfg.data.sites} sites, {cfg.federation.rounds} rounds of {budget}, model "
          f"{cfg.model.name}, train.threads {cfg.train.threads}; {', '.join(size['engines'])}", flush=True)
    runs = {}
    with tempfile.TemporaryDirectory(prefix="fedfuse-bench-") as work:
        work = Path(work)
        for engine in size["engines"]:
            runs[engine] = plain(cfg) if engine == "plain" else federated(cfg, engine, work / engine)
            print(f"  {engine:<10} {runs[engine]['wall_s']:6.1f} s", flush=True)
        ray = ray_start(work) if "simulation" in runs else None
    versus = versus_plain(runs)

    print(common.table(
        ["engine", "wall s", "x plain", "start s", "1st round s", "round s", "end s", "fixed s/round", "macro AUC"],
        [[engine, run["wall_s"], versus.get(engine, {}).get("ratio"), run["start_s"], run["first_round_s"],
          run["round_s"], run["end_s"], versus.get(engine, {}).get("fixed_per_round_s"), run["macro_auc"]]
         for engine, run in runs.items()]))
    inside, wall = runs["inprocess"]["inside"], runs["inprocess"]["wall_s"]
    print(f"inside the in-process run ({wall:.1f} s, {versus['inprocess']['extra_s']:+.1f} s over plain):")
    print(common.table(["where", "seconds", "calls", "s per call", "share of the run"],
                       [[name, t["seconds"], t["calls"], t["seconds"] / max(t["calls"], 1),
                         f"{100 * t['seconds'] / wall:.1f} %"] for name, t in inside.items()]))
    if ray:
        print(f"Ray alone: import {ray['import_s']:.1f} s, init {ray['init_s']:.1f} s, shutdown "
              f"{ray['shutdown_s']:.1f} s (of the simulation's start {runs['simulation']['start_s']:.1f} s and end "
              f"{runs['simulation']['end_s']:.1f} s)")

    sim = versus.get("simulation")
    parsing = inside["config_parsing"]
    targets = [
        # The target is for the quickstart size (--full): smaller runs are mostly Ray's start and stop.
        common.target(f"federation overhead, simulation / plain ({args.size}"
                      f"{'' if args.size == 'full' else '; target at --full'})", sim["ratio"] if sim else None,
                      TARGET_RATIO if args.size == "full" else None, "x"),
        common.target("fixed cost per round, simulation", sim["fixed_per_round_s"] if sim else None, None, " s"),
        common.target("simulation start + end, once per run", runs["simulation"]["start_s"] +
                      runs["simulation"]["end_s"] if sim else None, None, " s"),
        common.target("config parsing per ClientApp message", parsing["seconds"] / max(parsing["calls"], 1), None,
                      " s"),
    ]
    settings = {"sites": cfg.data.sites, "rounds": cfg.federation.rounds, "local_epochs": cfg.train.local_epochs,
                "steps": cfg.train.steps, "model": cfg.model.name, "threads": cfg.train.threads,
                "batch_size": cfg.train.batch_size, "cpus_per_site": cfg.simulation.cpus_per_site,
                "engines": list(size["engines"]), "data": str(root)}
    common.write(args, NAME, started, settings, {"runs": runs, "versus_plain": versus, "ray_start": ray}, targets)
    return 0


if __name__ == "__main__":
    sys.exit(main())
