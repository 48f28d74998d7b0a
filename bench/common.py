"""What the benchmarks share: sizes and options, the machine's description, generated data, peak memory of a
process tree, the timeline of a federated run, and the result file with its targets.

Every benchmark runs as ``python -m bench.<name> [--tiny | --quick | --full] [--out FILE] [--data DIR]`` and
writes one JSON file (default ``bench/results/<name>.json``) with the same top-level keys::

    name, size, machine, settings, figures, targets, seconds

``figures`` holds the measurements, absolute seconds among them (for the record: these machines are shared and
noisy, so nothing asserts them); ``targets`` holds the issue's targets as ``{figure, measured, target, met}``
rows. Ratios are always of measurements taken in the same run.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import logging
import math
import os
import platform
import shutil
import threading
import time
from pathlib import Path

from shared.config import eval_data_path, load, task_of
from shared.data import load_folder
from simulations.synth import synth

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"  # the committed full-size results; other sizes in a folder of their own


def results_dir(size: str) -> Path:
    """Where a size's result files go by default: ``bench/results`` (full) or ``bench/results/<size>``."""
    return RESULTS if size == "full" else RESULTS / size
DATA = ROOT / "data" / "bench"  # generated once, reused by later runs (data/ never travels with the app)
QUICKSTART = ROOT / "configs" / "quickstart.yaml"
SIZES = ("tiny", "quick", "full")
KEYS = ("name", "size", "machine", "settings", "figures", "targets", "seconds")


def parser(name: str, doc: str, data: bool = True) -> argparse.ArgumentParser:
    """The options every benchmark takes (``--data`` where it uses generated data); a script may add its own."""
    ap = argparse.ArgumentParser(prog=f"python -m bench.{name}", description=doc.split("\n\n")[0])
    size = ap.add_mutually_exclusive_group()
    for s, what in (("tiny", "seconds: the smoke test's size"), ("quick", "what `make bench` runs (default)"),
                    ("full", "the size of the committed results")):
        size.add_argument(f"--{s}", dest="size", action="store_const", const=s, help=what)
    ap.set_defaults(size="quick")
    ap.add_argument("--out", type=Path, help="the JSON file to write (default bench/results/[<size>/]<name>.json)")
    if data:
        ap.add_argument("--data", type=Path, default=DATA, help="folder of generated data sets, made when missing")
    return ap


def machine() -> dict:
    """Cores, memory, versions, and the load average (others' work on a shared machine): beside every result."""
    meminfo = Path("/proc/meminfo").read_text().splitlines()
    total_kib = next(int(line.split()[1]) for line in meminfo if line.startswith("MemTotal:"))
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), "unknown")
    versions = {}
    for package in ("torch", "flwr", "ray", "opacus", "xgboost", "numpy"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return {"cpu_count": os.cpu_count(), "cpus_usable": len(os.sched_getaffinity(0)), "cpu_model": model,
            "memory_gib": round(total_kib / 2**20, 1), "load_average": [round(x, 2) for x in os.getloadavg()],
            "python": platform.python_version(), "platform": platform.platform(), **versions}


def dataset(data: Path, preset: str, sites: int) -> Path:
    """``<data>/<preset>-<sites>sites``: ``fedfuse synth``'s sites and holdout (seed 0), generated when missing."""
    root = (Path(data) / f"{preset}-{sites}sites").resolve()
    if not root.is_dir():
        partial = root.with_name(root.name + ".partial")  # an interrupted generation is never taken for data
        shutil.rmtree(partial, ignore_errors=True)
        print(f"generating {sites} site(s) of preset {preset} in {root} (once: later runs reuse it) ...", flush=True)
        started = time.perf_counter()
        synth(partial, sites, 0, preset)
        partial.rename(root)
        print(f"  generated in {time.perf_counter() - started:.0f} s", flush=True)
    return root


def replicated(base: Path, sites: int) -> Path:
    """A data root of ``sites`` sites whose ``site-<k>`` links to ``base``'s site ``k mod n`` (and its holdout).

    For measuring the machinery with many sites without generating each one:
    the copies share their folder's patch cache, as they share its files.
    """
    n = sum(1 for p in base.glob("site-*") if p.is_dir())
    root = base.with_name(f"{base.name}-as-{sites}")
    root.mkdir(exist_ok=True)
    for k in range(sites):
        link = root / f"site-{k}"
        if not link.exists():
            link.symlink_to(base / f"site-{k % n}", target_is_directory=True)
    if not (root / "holdout").exists():
        (root / "holdout").symlink_to(base / "holdout", target_is_directory=True)
    return root


def config(root: Path, overrides: dict):
    """``configs/quickstart.yaml`` on the data set ``root`` (its holdout as the server's test set), with ``overrides``."""
    return load(QUICKSTART, {"data.root": str(root), "server.eval_data": str(root / "holdout"), **overrides})


def warm_caches(cfg) -> None:
    """Decode every folder's patches into its cache once, so no measured run pays for extraction."""
    folders = sorted(Path(cfg.data.root).glob("site-*")) + [eval_data_path(cfg)]
    for folder in {f.resolve() for f in folders}:
        load_folder(folder, cfg.data, cfg.seed, task_of(cfg))


def _tree(root_pid: int) -> list[int]:
    """``root_pid`` and every process below it (Flower's SuperLink, ``flwr-simulation``, Ray's daemons and actors)."""
    children: dict[int, list[int]] = {}
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                ppid = int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(p.name))
    out, todo = [], [root_pid]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += children.get(pid, [])
    return out


def _memory(pid: int) -> tuple[int, int]:
    """(PSS, RSS) of one process in bytes; (0, 0) when it is gone."""
    pss = rss = 0
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                pss = int(line.split()[1]) * 1024
            elif line.startswith("Rss:"):
                rss = int(line.split()[1]) * 1024
    except OSError:
        pass
    return pss, rss


class PeakMemory:
    """Peak memory of this process and every process it starts, sampled every ``interval`` seconds in a thread.

    ``pss`` (proportional set size) counts a page shared by several processes
    (torch's libraries in every Ray worker) once in all; ``rss`` sums each
    process's resident memory and counts it in each. ``pss`` is the machine's
    real use. A process that lives less than ``interval`` may be missed; a
    sample costs about 3 ms of CPU per process, so not much less than a second.
    """

    def __init__(self, interval: float = 1.0) -> None:
        self.interval = interval
        self.pss = self.rss = self.processes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while True:
            pids = _tree(os.getpid())
            sizes = [_memory(pid) for pid in pids]
            self.pss = max(self.pss, sum(s[0] for s in sizes))
            self.rss = max(self.rss, sum(s[1] for s in sizes))
            self.processes = max(self.processes, len(pids))
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


class RoundClock:
    """When each round of a federated run ended, in seconds from ``__enter__``.

    The ServerApp rewrites ``metrics.json`` after every round (atomically), in
    whichever process it runs; a thread watches it and notes when a round
    appears. Rounds first seen on ``__exit__`` (the run ended within one
    poll) end then.
    """

    def __init__(self, metrics: Path, interval: float = 0.05) -> None:
        self.path = Path(metrics)
        self.interval = interval
        self.ends: list[float] = []
        self._seen: int | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _check(self) -> None:
        try:
            stamp = self.path.stat().st_mtime_ns
            if stamp == self._seen:
                return
            rounds = len(json.loads(self.path.read_text())["rounds"])
        except (OSError, ValueError, KeyError):
            return
        self._seen = stamp
        self.ends += [time.perf_counter() - self.started] * (rounds - len(self.ends))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._check()

    def __enter__(self) -> RoundClock:
        self.started = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._check()


def steady_round(ends: list[float], last_differs: bool = False) -> float | None:
    """Seconds a round takes once running: from the first round's end to the last's, over the rounds between.

    ``last_differs``: the last round does extra work (the server's final
    bootstrap intervals), so with three rounds or more it is left out.
    """
    if last_differs and len(ends) >= 3:
        ends = ends[:-1]
    return (ends[-1] - ends[0]) / (len(ends) - 1) if len(ends) >= 2 else None


@contextlib.contextmanager
def quiet(log: Path):
    """The apps' printed lines go to ``log``, and log records below WARNING (Flower's INFO lines) nowhere."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as sink, contextlib.redirect_stdout(sink):
        logging.disable(logging.INFO)  # Flower sets its logger's own level when imported: this holds whatever it set
        try:
            yield
        finally:
            logging.disable(logging.NOTSET)


def target(figure: str, measured: float | None, bound: float | None, unit: str = "", at_most: bool = True,
           note: str = "") -> dict:
    """A row of the summary: a measured value against the issue's bound (``bound`` None: a headline, no target).

    ``met`` is None when there is no bound or nothing was measured.
    """
    met = None if measured is None or bound is None else bool(measured <= bound if at_most else measured >= bound)
    limit = "-" if bound is None else f"{'<=' if at_most else '>='} {bound:g}{unit}"
    return {"figure": figure, "measured": measured, "target": limit, "unit": unit, "met": met, "note": note}


def _finite(value):
    """JSON without NaN or Infinity (not JSON): they become null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def write(args: argparse.Namespace, name: str, started: float, settings: dict, figures: dict,
          targets: list[dict]) -> dict:
    """Write the result file, print the targets' table, and return the result."""
    result = {"name": name, "size": args.size, "machine": machine(), "settings": settings, "figures": figures,
              "targets": targets, "seconds": round(time.perf_counter() - started, 1)}
    result = _finite(result)
    out = args.out or results_dir(args.size) / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=1, allow_nan=False) + "\n")
    tmp.replace(out)
    print_targets(targets)
    print(f"{name} ({args.size}): {result['seconds']:.0f} s in all; wrote {out}")
    return result


def fmt(value, digits: int = 3) -> str:
    """A table cell: ``digits`` significant digits, whole numbers from ``10**digits`` up, "-" for nothing."""
    if value is None:
        return "-"
    if isinstance(value, float):
        if abs(value) >= 10**digits:
            return f"{value:.0f}"
        return "0" if abs(value) < 1e-4 else f"{value:.{digits}g}"
    return str(value)


def table(headers: list[str], rows: list[list]) -> str:
    """Rows as left-aligned text columns."""
    cells = [headers] + [[fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def target_cells(row: dict) -> list[str]:
    """A :func:`target` row as table cells: figure, measured, target, met?"""
    measured = "-" if row["measured"] is None else fmt(row["measured"]) + row["unit"]
    return [row["figure"], measured, row["target"], "-" if row["met"] is None else "yes" if row["met"] else "NO"]


def print_targets(targets: list[dict]) -> None:
    if targets:
        print(table(["target", "measured", "bound", "met?"], [target_cells(t) for t in targets]))
