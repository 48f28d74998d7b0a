"""Scale: many simulated sites on one machine: peak memory and time per round, and how both grow with the sites.

    .venv/bin/python -m bench.scale [--tiny | --quick | --full] [--sites 10,30,100] [--out FILE] [--data DIR]

For each number of sites, one federated run of the quickstart's model in
Flower's simulation engine (``fedfuse simulate``'s path) while a thread samples
the memory of the whole process tree: this process, the SuperLink,
``flwr-simulation``, Ray's daemons and actors (``common.PeakMemory``: the peak
of the summed PSS, shared pages counted once, and of the summed RSS). A round
ends when ``metrics.json`` gains it; the time per round is a steady round
(the last round's end minus the first's, over the rounds between).

The sites are generated ``quick``-preset sites repeated (``site-<k>`` links to
generated site ``k mod 3``): what is measured is the machinery's cost with
many sites, not learning. Every site trains ``train.steps`` steps a round and,
but at the quick size, evaluates on its test split; the server has no test set
of its own (its evaluation does not grow with the sites). Ray runs
``cpus / simulation.cpus_per_site`` sites at once. Growth is a least-squares line through the points: seconds per
round and MiB of peak memory per added site. Target: 100 sites in under 24 GiB.

Sizes: tiny: 2 and 4 sites in the in-process engine (no Ray: the smoke test),
2 rounds of 1 step; quick: 10, 30 and 100 sites, 2 rounds of 1 step and no
evaluation (``federation.fraction_evaluate`` 0: it would double the time);
full: 10, 30 and 100 sites, 3 rounds of 10 steps with every site evaluating.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench import common
from simulations.flower import federate

NAME = "scale"
SIZES = {
    "tiny": {"sites": (2, 4), "generated": 2, "engine": "inprocess", "rounds": 2, "steps": 1, "evaluate": 1.0},
    "quick": {"sites": (10, 30, 100), "generated": 3, "engine": "simulation", "rounds": 2, "steps": 1,
              "evaluate": 0.0},
    "full": {"sites": (10, 30, 100), "generated": 3, "engine": "simulation", "rounds": 3, "steps": 10,
             "evaluate": 1.0},
}
TARGET_SITES = 100
TARGET_GIB = 24.0


def run(cfg, engine: str, run_dir: Path) -> dict:
    """One federated run: wall time, round ends, peak memory of the process tree."""
    with common.PeakMemory() as memory, common.quiet(run_dir / "apps.log"), \
            common.RoundClock(run_dir / "metrics.json") as clock:
        federate(cfg, run_dir, engine)
        wall = time.perf_counter() - clock.started
    return {"wall_s": wall, "round_ends_s": clock.ends, "round_s": common.steady_round(clock.ends),
            "peak_pss_gib": memory.pss / 2**30, "peak_rss_gib": memory.rss / 2**30,
            "processes": memory.processes}


def growth(xs: list[int], ys: list[float | None]) -> dict | None:
    """Least-squares line ``y = intercept + per_site * sites``; None with fewer than two points."""
    points = [(x, y) for x, y in zip(xs, ys) if y is not None]
    if len(points) < 2:
        return None
    slope, intercept = np.polyfit([p[0] for p in points], [p[1] for p in points], 1)
    return {"per_site": float(slope), "intercept": float(intercept),
            "ratio_last_first": points[-1][1] / points[0][1], "sites_last_first": points[-1][0] / points[0][0]}


def main(argv: list[str] | None = None) -> int:
    ap = common.parser(NAME, __doc__)
    ap.add_argument("--sites", help="comma-separated numbers of sites instead of the size's")
    args = ap.parse_args(argv)
    started = time.perf_counter()
    size = SIZES[args.size]
    counts = tuple(int(n) for n in args.sites.split(",")) if args.sites else size["sites"]
    base = common.dataset(args.data, "quick", size["generated"])  # the distinct sites behind the links
    common.warm_caches(common.config(base, {"data.sites": size["generated"]}))
    print(f"scale: {', '.join(map(str, counts))} sites in the {size['engine']} engine, {size['rounds']} rounds of "
          f"{size['steps']} steps a site, {size['evaluate']:.0%} of the sites evaluating", flush=True)
    runs = {}
    with tempfile.TemporaryDirectory(prefix="fedfuse-bench-") as work:
        for n in counts:
            cfg = common.config(common.replicated(base, n), {
                "data.sites": n, "federation.rounds": size["rounds"], "train.steps": size["steps"],
                "federation.fraction_evaluate": size["evaluate"], "server.eval_data": None})
            runs[n] = run(cfg, size["engine"], Path(work) / f"sites-{n}")
            r = runs[n]
            print(f"  {n:>4} sites: {r['wall_s']:6.1f} s, round {common.fmt(r['round_s'])} s, peak "
                  f"{r['peak_pss_gib']:.2f} GiB PSS ({r['peak_rss_gib']:.2f} GiB RSS, {r['processes']} processes)",
                  flush=True)
    ns = list(runs)
    grows = {"round_s": growth(ns, [runs[n]["round_s"] for n in ns]),
             "peak_pss_gib": growth(ns, [runs[n]["peak_pss_gib"] for n in ns])}
    print(common.table(["sites", "wall s", "round s", "s per site-round", "peak PSS GiB", "peak RSS GiB", "processes"],
                       [[n, r["wall_s"], r["round_s"], r["round_s"] / n if r["round_s"] else None,
                         r["peak_pss_gib"], r["peak_rss_gib"], r["processes"]] for n, r in runs.items()]))
    if grows["round_s"] and grows["peak_pss_gib"]:
        t, m = grows["round_s"], grows["peak_pss_gib"]
        print(f"growth: {t['per_site']:.3f} s a round and {1024 * m['per_site']:.1f} MiB of peak memory per added "
              f"site; {t['sites_last_first']:.0f}x the sites took {t['ratio_last_first']:.1f}x the time per round "
              f"and {m['ratio_last_first']:.2f}x the memory")

    at_target = runs.get(TARGET_SITES)
    targets = [common.target(f"peak memory (PSS) with {TARGET_SITES} simulated sites",
                             at_target["peak_pss_gib"] if at_target else None, TARGET_GIB, " GiB",
                             note="" if at_target else f"not run: {TARGET_SITES} sites are not in this size")]
    targets += [common.target(f"time per round, {n} sites", r["round_s"], None, " s") for n, r in runs.items()]
    if grows["round_s"]:
        targets.append(common.target("time per round per added site", grows["round_s"]["per_site"], None, " s"))
        targets.append(common.target("peak memory per added site", 1024 * grows["peak_pss_gib"]["per_site"], None,
                                     " MiB"))
    settings = {**size, "sites": list(counts), "model": cfg.model.name, "data": str(base)}
    common.write(args, NAME, started, settings, {"runs": {str(n): r for n, r in runs.items()}, "growth": grows},
                 targets)
    return 0


if __name__ == "__main__":
    sys.exit(main())
