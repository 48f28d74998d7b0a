"""``make bench``: every benchmark at one size, one after another, then one table of each figure against its target.

    .venv/bin/python -m bench.run [--tiny | --quick | --full] [--only NAME,...] [--results DIR] [--data DIR]

Each benchmark runs in its own process (``python -m bench.<name> --<size>
--out <results>/<name>.json``) with its output shown as it comes; then the
summary: every target and headline figure of every result file, measured
against its bound. A missed target is reported, not a failure (these machines
are shared and noisy); the exit status is 1 only when a benchmark failed, and
the failures are named last.

At ``--quick`` (the default) the whole run takes a few minutes on 2 cores, plus
about 2 minutes the first time to generate the data sets under ``--data``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from bench import common

SCRIPTS = ("federation_overhead", "data_pipeline", "dp_cost", "scale", "communication", "compute")
USES_DATA = ("federation_overhead", "data_pipeline", "scale", "communication")


def run(name: str, size: str, results: Path, data: Path) -> tuple[int, float]:
    """One benchmark in its own process: its exit status and seconds."""
    cmd = [sys.executable, "-m", f"bench.{name}", f"--{size}", "--out", str(results / f"{name}.json")]
    if name in USES_DATA:
        cmd += ["--data", str(data)]
    print(f"\n=== {name} ({size}) ===", flush=True)
    started = time.perf_counter()
    rc = subprocess.run(cmd, cwd=common.ROOT).returncode
    return rc, time.perf_counter() - started


def summary(names: list[str], results: Path) -> str:
    """Every result file's targets as one table."""
    rows = []
    for name in names:
        result = json.loads((results / f"{name}.json").read_text())
        rows += [[name, *common.target_cells(t)] for t in result["targets"]]
    return common.table(["benchmark", "figure", "measured", "target", "met?"], rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    size = ap.add_mutually_exclusive_group()
    for s in common.SIZES:
        size.add_argument(f"--{s}", dest="size", action="store_const", const=s)
    ap.set_defaults(size="quick")
    ap.add_argument("--only", help=f"comma-separated benchmarks, of {', '.join(SCRIPTS)}")
    ap.add_argument("--results", type=Path, help="where the result files go (default bench/results for --full, "
                    "bench/results/<size> otherwise: make bench leaves the committed results alone)")
    ap.add_argument("--data", type=Path, default=common.DATA, help="folder of generated data sets")
    args = ap.parse_args(argv)
    args.results = args.results or common.results_dir(args.size)
    names = args.only.split(",") if args.only else list(SCRIPTS)
    unknown = sorted(set(names) - set(SCRIPTS))
    if unknown:
        ap.error(f"--only: unknown benchmark(s) {', '.join(unknown)}; expected some of {', '.join(SCRIPTS)}")
    started = time.perf_counter()
    seconds, status = {}, {}
    for name in names:
        status[name], seconds[name] = run(name, args.size, args.results, args.data)
    done = [n for n in names if status[n] == 0]
    box = common.machine()
    print(f"\n=== summary: {args.size} size, {time.perf_counter() - started:.0f} s in all; {box['cpu_count']} cores, "
          f"{box['memory_gib']} GiB, load average {box['load_average'][0]} ===")
    if done:
        print(summary(done, args.results))
    print("seconds: " + ", ".join(f"{n} {seconds[n]:.0f}" for n in names))
    failed = [f"{n} (exit status {status[n]})" for n in names if status[n] != 0]
    if failed:
        print(f"FAILED: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
