"""``fedfuse``: generate data, inspect real or generated data, build cohorts, run simulations."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import re
import signal
import sys
import time
from functools import partial
from pathlib import Path

from tqdm import tqdm

from shared.config import (
    IMAGE_CLASSES,
    Config,
    ConfigError,
    dump,
    eval_data_path,
    fixed_settings,
    load,
    parse_assignments,
    run_envelope,
    settings_changed,
    task_of,
)
from shared.errors import DataFormatError
from simulations.deploy import DeployError
from simulations.flower import SimulationError
from simulations.runs import FolderError, check_replaceable, child, clear, hold, is_marked, mark, marker, write_safely


def _synth(args: argparse.Namespace) -> int:
    from simulations.synth import synth

    started = time.time()
    counts = synth(Path(args.out), args.sites, args.seed, args.preset, replace=args.force)
    for name, c in counts.items():
        print(f"{name}: " + ", ".join(f"{k} {v}" for k, v in c.items() if k != "non_mitosis"))
    print(f"wrote {len(counts)} folders under {args.out} in {time.time() - started:.1f} s")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    path = Path(args.path)
    if (path / "hosp").is_dir():
        from shared.mimic import build_cohort

        cohort = build_cohort(path)
        out = {"subjects": len(cohort.table), "positives": int(cohort.table["label"].sum()),
               "skipped_rows": cohort.skipped}
    elif (path / "images").is_dir() or (path / "groundTruth").is_dir():
        from shared.brecahad import inspect

        out = inspect(path, IMAGE_CLASSES, args.patch_size, args.border)
    else:
        raise DataFormatError(f"{path}: neither a BreCaHAD folder (images/, groundTruth/) "
                              "nor a MIMIC-IV root (hosp/)")
    if args.json:
        print(json.dumps(out))
    else:
        for key, value in out.items():
            if isinstance(value, dict):
                print(f"{key}:")
                for k, v in value.items():
                    print(f"  {k:<28} {v}")
            else:
                print(f"{key:<30} {value}")
    return 0


def _baseline(args: argparse.Namespace) -> int:
    from shared.config import DataConfig
    from simulations.baseline import format_results, run_baselines

    print(format_results(run_baselines(Path(args.root), DataConfig(root=args.root), args.seed)))
    return 0


def _cohort(args: argparse.Namespace) -> int:
    from shared.mimic import build_cohort

    out = csv_path(Path(args.out), "--out")
    cohort = build_cohort(Path(args.mimic))
    out.parent.mkdir(parents=True, exist_ok=True)
    cohort.table.to_csv(args.out, index=False)
    print(f"wrote {len(cohort.table)} subjects ({int(cohort.table['label'].sum())} positive) to {args.out}")
    if cohort.skipped:
        print("skipped rows: " + ", ".join(f"{k} {v}" for k, v in cohort.skipped.items()))
    return 0


def csv_path(path: Path, flag: str) -> Path:
    """``path`` if a CSV can be written there: not a folder, and its parent not a file."""
    if path.is_dir():
        raise FileExistsError(f"{flag} {path}: a folder; expected the path of a CSV file to write, e.g. "
                              f"{path / 'out.csv'}")
    if any(p.exists() and not p.is_dir() for p in path.parents):
        raise FileExistsError(f"{flag} {path}: {next(p for p in path.parents if p.exists() and not p.is_dir())} "
                              "is a file, not a folder; expected the path of a CSV file to write")
    return path


def absolute_paths(cfg: Config) -> Config:
    """Paths as absolute: the Flower processes run in the run folder, not here."""
    def fix(p: str | None) -> str | None:
        return str(Path(p).resolve()) if p else p

    data = dataclasses.replace(cfg.data, root=fix(cfg.data.root), cache_dir=fix(cfg.data.cache_dir))
    model = dataclasses.replace(cfg.model, pretrained=fix(cfg.model.pretrained))
    cfg = dataclasses.replace(cfg, data=data, model=model)
    evaluation = eval_data_path(cfg)
    return dataclasses.replace(cfg, server=dataclasses.replace(cfg.server, eval_data=str(evaluation) if evaluation
                                                               else None))


def _ensure_data(cfg: Config) -> None:
    """Generate ``data.root`` with ``data.preset`` if it is absent; check it has the sites the config needs."""
    from shared.data import folder_patches
    from simulations.synth import synth

    root = Path(cfg.data.root)
    if not root.exists():
        print(f"no data at {root}: generating {cfg.data.sites} sites (preset {cfg.data.preset}, seed {cfg.seed})",
              flush=True)
        synth(root, cfg.data.sites, cfg.seed, cfg.data.preset)
    missing = [f"site-{k}" for k in range(cfg.data.sites) if not (root / f"site-{k}").is_dir()]
    if missing and cfg.data.partition == "natural":
        raise DataFormatError(f"{root}: data.sites is {cfg.data.sites} but {', '.join(missing)} is missing")
    # Extract (and cache) every folder's patches here, where a terminal shows the progress, rather than
    # inside the first round, where it would count against federation.round_timeout.
    holdout = eval_data_path(cfg)
    folders = sorted(root.glob("site-*")) + ([holdout] if holdout and holdout.is_dir() else [])
    federated_stain = cfg.data.stain_norm != "none" and cfg.data.stain_reference == "federated"  # known at run time
    for folder in folders if task_of(cfg) == "patch" and not federated_stain else []:
        folder_patches(folder, cfg.data)


def _paper(args: argparse.Namespace) -> int:
    from simulations.paper import load_paper, run_paper

    def listed(flag: str, kind=str) -> tuple | None:
        text = getattr(args, flag)
        try:
            return tuple(kind(x.strip()) for x in text.split(",") if x.strip()) if text else None
        except ValueError:
            raise ValueError(f"--{flag} {text!r}: expected a comma-separated list of {kind.__name__}") from None

    base, paper = load_paper(Path(args.config), args.quick, listed("models"), protocol=args.protocol,
                             modes=listed("modes"), seeds=listed("seeds", int), out=args.out)
    base = absolute_paths(base)
    _ensure_data(base)
    started = time.time()
    if args.protocol:
        from simulations.protocol import run_protocol

        table = run_protocol(base, paper, echo=lambda line: print(line, flush=True))
    else:
        table = run_paper(base, paper, echo=lambda line: print(line, flush=True))
    print(table.read_text())
    print(f"done in {time.time() - started:.0f} s: {table} and {table.with_suffix('.csv')}")
    return 0


def _pretrain(args: argparse.Namespace) -> int:
    from simulations.paper import load_experiment
    from simulations.pretrain import PretrainConfig, run_pretrain

    base, settings = load_experiment(Path(args.config), args.quick, "pretrain", PretrainConfig)
    if args.model:
        base = dataclasses.replace(base, model=dataclasses.replace(base.model, name=args.model))
    changes = {k: v for k, v in (("method", args.method), ("steps", args.steps), ("out", args.out)) if v}
    settings = dataclasses.replace(settings, **changes)
    base = absolute_paths(base)
    _ensure_data(base)
    path, provenance = run_pretrain(base, settings, echo=lambda line: print(line, flush=True))
    print(f"done in {provenance['seconds']:.0f} s: {path} (sha256 {provenance['sha256'][:16]}...) and its "
          f"provenance {path.with_suffix('.json')}; use it with --set model.pretrained={path}")
    return 0


def _shift_study(args: argparse.Namespace) -> int:
    from simulations.paper import load_experiment
    from simulations.shift_study import ShiftStudyConfig, run_shift_study

    base, study = load_experiment(Path(args.config), args.quick, "study", ShiftStudyConfig)
    base = absolute_paths(base)
    _ensure_data(base)
    started = time.time()
    table = run_shift_study(base, study, echo=lambda line: print(line, flush=True))
    print(table.read_text())
    print(f"done in {time.time() - started:.0f} s: {table}, {table.with_suffix('.csv')} and "
          f"{table.with_name('shift_study_patches.png')}")
    return 0


def _loso(args: argparse.Namespace) -> int:
    from server.record import run_name
    from simulations.loso import run_loso

    cfg = absolute_paths(load(args.config, parse_assignments(args.set)))
    _ensure_data(cfg)
    out = Path(args.out) if args.out else child(Path("results"), f"loso-{run_name(cfg.name)}", "name")
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty; choose another --out")
    run_loso(cfg, out.resolve(), echo=lambda line: print(line, flush=True))
    print((out / "loso.md").read_text())
    return 0


def _privacy_sweep(args: argparse.Namespace) -> int:
    from simulations.privacy_sweep import run_sweep

    settings = parse_assignments(args.set)
    if args.quick:  # a small version: two short rounds in process
        settings = {"federation.rounds": 2, "train.steps": 4, **settings}
    cfg = absolute_paths(load(args.config, settings))
    _ensure_data(cfg)
    epsilons = [float(e) for e in args.epsilons.split(",")]
    if any(e <= 0 for e in epsilons):
        raise ValueError(f"--epsilons: expected positive numbers or inf, got {args.epsilons}")
    out = Path(args.out) if args.out else child(Path("results"), f"privacy-sweep-{cfg.name}"
                                                          f"{'-quick' if args.quick else ''}", "name")
    stamp = out / "config.yaml"  # a rerun continues the same sweep, never a different one
    if out.is_dir() and any(out.iterdir()) and not stamp.is_file():
        raise FileExistsError(f"--out {out} exists, is not empty and holds no sweep (no config.yaml); choose another "
                              "--out")
    out.mkdir(parents=True, exist_ok=True)
    write_safely(out / "config.new.yaml", partial(dump, cfg))
    if stamp.is_file() and stamp.read_text() != (out / "config.new.yaml").read_text():
        (out / "config.new.yaml").unlink()
        raise FileExistsError(f"{out} holds a sweep of another config ({stamp}); choose another --out")
    (out / "config.new.yaml").replace(stamp)
    seeds = [int(x) for x in args.seeds.split(",")]
    table = run_sweep(cfg, epsilons, seeds, out.resolve(), "inprocess" if args.quick else "simulation",
                      echo=lambda line: print(line, flush=True))
    print(table.read_text())
    print(f"plot: {(out / 'privacy_sweep.png').resolve()}")
    return 0


def _predict(args: argparse.Namespace) -> int:
    from simulations.predict import predict_folder

    out, summary = predict_folder(Path(args.model), Path(args.data_dir), csv_path(Path(args.out), "--out"))
    print(f"wrote {out}" + (f" and the per-tile mitotic counts {summary}" if summary else ""))
    return 0


def _same_run(cfg: Config, run_dir: Path) -> None:
    """A resumed run must have the config it started with (more rounds may be asked for)."""
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        raise FileNotFoundError(f"{saved}: not a run folder written by `fedfuse simulate` (no config.yaml)")
    changed = settings_changed(fixed_settings(load(saved)), fixed_settings(cfg))
    if changed:
        raise ConfigError(f"--resume {run_dir}: the config differs from the run's in {', '.join(changed[:8])}; "
                          "resume with the same config and --set options (only federation.rounds may grow, "
                          "and faults.* may change)")


def _made_run(run_dir: Path) -> None:
    """Refuse to resume a folder that is not a run: it must hold the run's marker or its checkpoint.

    Checked before the lock is taken, and a resume never writes a marker: a
    folder that merely holds a matching config.yaml must not become one that
    ``--force`` may later replace.
    """
    from server.checkpoint import FILE

    if not run_dir.is_dir():
        raise FileNotFoundError(f"--resume {run_dir}: no such folder; expected a run folder written by "
                                "`fedfuse simulate`")
    if not (is_marked(run_dir, "run") or (run_dir / FILE).is_file()):
        raise FolderError(f"--resume {run_dir}: not a run fedfuse made (no {marker(run_dir, 'run').name} or {FILE} "
                          "file); expected a run folder written by `fedfuse simulate`")


def _kept(cfg: Config, config_file: str) -> dict[str, str | Path | None]:
    """What ``--force`` must never delete: the data, the holdout, caches, ledgers, weights, the config itself."""
    from shared.privacy import ledger_folder

    return {"data.root": cfg.data.root, "server.eval_data": cfg.server.eval_data, "data.cache_dir": cfg.data.cache_dir,
            "privacy.ledger_dir": ledger_folder({}, cfg.privacy, cfg.data.root),  # as a simulated site finds it
            "model.pretrained": cfg.model.pretrained, "the config file": config_file}


def _run_folder(args: argparse.Namespace, cfg: Config) -> tuple[Path, bool]:
    """The run folder and whether to empty it first (``--force``); checks only, writes nothing."""
    from server.record import run_name

    if args.resume:
        if args.out or args.seeds or args.force:
            raise ValueError("--resume RUN_DIR continues that run: it takes no --out, --seeds or --force")
        run_dir = Path(args.resume).resolve()
        _made_run(run_dir)
        _same_run(cfg, run_dir)
        return run_dir, False
    run_dir = (Path(args.out) if args.out else child(Path("runs"), run_name(cfg.name), "name")).resolve()
    if run_dir.exists() and not run_dir.is_dir():
        raise FileExistsError(f"--out {run_dir}: a file; expected a folder for the run")
    if not (run_dir.is_dir() and any(run_dir.iterdir())):
        return run_dir, False
    if not args.force:
        raise FileExistsError(f"{run_dir} exists and is not empty; choose another --out, continue it with "
                              "--resume, or replace it with --force")
    check_replaceable(run_dir, "run", "--out", _kept(cfg, args.config))
    return run_dir, True


def _simulate(args: argparse.Namespace) -> int:
    from simulations.flower import run_simulation

    cfg = absolute_paths(load(args.config, parse_assignments(args.set)))
    run_dir, replace = _run_folder(args, cfg)
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else [cfg.seed]
    _ensure_data(cfg)
    started = time.time()
    finals = {}
    with hold(run_dir):
        if replace:
            clear(run_dir)
        if not args.resume:  # a resumed folder was checked to be a run (_made_run): a resume marks nothing
            mark(run_dir, "run")
        for seed in seeds:
            run = dataclasses.replace(cfg, seed=seed)
            folder = run_dir / f"seed-{seed}" if args.seeds else run_dir
            with hold(folder) if args.seeds else contextlib.nullcontext():
                if args.seeds:
                    mark(folder, "run")
                write_safely(folder / "config.yaml", partial(dump, run))
                run_config = run_envelope(run, folder, Path(args.config).resolve(), args.resume)
                print(f"federated run '{cfg.name}' (seed {seed}): {cfg.data.sites} sites, model {cfg.model.name}, "
                      f"{cfg.federation.rounds} rounds -> {folder}" + (" (resumed)" if args.resume else ""),
                      flush=True)
                with tqdm(total=cfg.federation.rounds, desc="rounds", unit="round", disable=None) as bar:
                    run_simulation(folder, run_config, cfg.data.sites - (cfg.data.leave_out is not None),
                                   cfg.simulation.cpus_per_site, echo=partial(_echo_round, bar))
            finals[seed] = _trained(folder)["final"]
        if args.seeds:
            summary = seed_summary(finals)
            write_safely(run_dir / "summary.json", lambda path: path.write_text(json.dumps(summary, indent=1)))
            print("over seeds " + ", ".join(map(str, seeds)) + ": "
                  + ", ".join(f"{k} {v['mean']:.3f} ± {v['std']:.3f}" for k, v in summary.items()))
        return _summarise(folder, finals[seeds[-1]], started)  # the report too is written under the lock


def _trained(folder: Path) -> dict:
    """The run's metrics.json, saying why it stopped early; refuses a run that trained nothing."""
    from simulations.flower import trained

    metrics = trained(folder)
    if metrics.get("stopped"):
        print(f"stopped early: {metrics['stopped']}", flush=True)
    return metrics


def _summarise(folder: Path, final: dict, started: float) -> int:
    """Print the last run's final metrics, its privacy spending and its report."""
    from shared.metrics import focus_class

    if final["source"] == "none":
        print(f"done in {time.time() - started:.0f} s. No final metrics: no server test set and no site evaluated "
              f"(federation.fraction_evaluate 0?); metrics: {folder / 'metrics.json'}")
        return 0
    spent = json.loads((folder / "metrics.json").read_text()).get("privacy")
    if spent:
        for site, e in sorted(spent["sites"].items()):
            print(f"privacy: {site} epsilon {e['epsilon']:.3g} per {spent['unit']} (delta {spent['delta']:g}); "
                  f"per patient {e['epsilon_patient']:.3g} (delta {e['delta_patient']:.3g}), cumulative in its ledger")
    focus = focus_class(list(final["auc"]))
    print(f"done in {time.time() - started:.0f} s. final ({final['source']}) macro AUC {final['macro_auc']:.3f}, "
          f"{focus} AUC {final['auc'][focus]:.3f}; metrics: {folder / 'metrics.json'}")
    print(f"report: {_report(folder)}")
    return 0


def _echo_round(bar: tqdm, line: str) -> None:
    """Print an app's line above the rounds bar (a terminal only; in a log, just the line); advance it."""
    bar.write(line)
    done = re.match(r"round\s+(\d+)/", line)
    if done:
        bar.update(int(done.group(1)) - bar.n)


def _report(run_dir: Path) -> Path:
    from simulations.report import build, read_metrics

    cfg = load(run_dir / "config.yaml")
    explained = read_metrics(run_dir).get("importance")
    if explained and cfg.report.pooled_reference and not (run_dir / "pooled_reference.json").is_file():
        print("building the report; for its SHAP comparison, training the same model on the pooled data "
              "(report.pooled_reference) ...", flush=True)
    return build(run_dir)


def _report_command(args: argparse.Namespace) -> int:
    print(f"report: {_report(Path(args.run_dir))}")
    return 0


def _privacy_ledgers(args: argparse.Namespace) -> list[Path]:
    folder = Path(args.dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such ledger folder (a SuperNode's: its ledger-dir, default "
                                "<data-dir>/.fedfuse-privacy; a simulation's: privacy.ledger_dir, default "
                                "<data.root>/.fedfuse-privacy)")
    return sorted(folder.glob("ledger-*.json"))


def _privacy_show(args: argparse.Namespace) -> int:
    from shared.privacy import epsilon, read_ledger

    ledgers = _privacy_ledgers(args)
    for path in ledgers:
        d = read_ledger(path)
        runs = len({r["run"] for r in d["rounds"]})
        eps = epsilon(d["history"], d["delta"])
        print(f"{path.name}: site {d['site']}, epsilon {eps:.4g} per {d['unit']} at delta {d['delta']:g}, "
              f"{len(d['rounds'])} rounds in {runs} run(s)")
    if not ledgers:
        print(f"{args.dir}: no ledgers")
    return 0


def _privacy_reset(args: argparse.Namespace) -> int:
    ledgers = _privacy_ledgers(args)
    if not args.yes:
        raise ValueError(f"resetting {len(ledgers)} ledger(s) in {args.dir} lets their data be trained on again as "
                         "if never used; pass --yes to do it on purpose")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for path in ledgers:  # kept under another name, for the audit trail; new runs start from zero
        path.rename(path.with_name(f"reset-{stamp}-{path.name}"))
        print(f"reset {path.name} (kept as reset-{stamp}-{path.name})")
    return 0


def _site_check(args: argparse.Namespace) -> int:
    from shared.site_check import check_site

    cfg = load(args.config) if args.config else Config()
    report = check_site(Path(args.data_dir), cfg.data)
    if args.json:
        print(json.dumps({"folder": str(report.folder), "ok": report.ok, "problems": report.problems,
                          "counts": report.counts}))
    else:
        for key, value in report.counts.items():
            print(f"{key:<14} {value}")
        for problem in report.problems:
            print(f"problem: {problem}")
        print(f"{report.folder}: " + ("ready to join" if report.ok else f"{len(report.problems)} problem(s)"))
    return 0 if report.ok else 1


def _deploy_certs(args: argparse.Namespace) -> int:
    from simulations.deploy import make_certs

    paths = make_certs(Path(args.out), args.host, args.days, args.force)
    print(f"CA: {paths['ca']} (give it to every hospital); {paths['ca_key']} stays here, private")
    print(f"SuperLink: {paths['cert']} and {paths['key']}, valid for {', '.join(args.host)} for {args.days} days")
    return 0


def _deploy_keys(args: argparse.Namespace) -> int:
    from simulations.deploy import make_keys

    names = args.names.split(",") if args.names else [f"site-{k}" for k in range(args.sites)]
    for pub in make_keys(Path(args.out), names, args.force):
        print(f"{pub.with_suffix('')} (private: stays at the hospital) and {pub} (send to the coordinator)")
    return 0


def _deploy_admit(args: argparse.Namespace) -> int:
    from simulations.deploy import Admissions

    admissions = Admissions(Path(args.dir), args.superlink, args.ca)
    if args.name and len(args.public_key) > 1:
        raise ValueError("--name names one hospital; admit several keys without it (named by their files)")
    for key in args.public_key:
        node_id = admissions.admit(Path(key), args.name)
        print(f"admitted {args.name or Path(key).name.removesuffix('.pub')} as node {node_id}")
    return 0


def _deploy_revoke(args: argparse.Namespace) -> int:
    from simulations.deploy import Admissions

    admissions = Admissions(Path(args.dir), args.superlink, args.ca)
    for who in args.who:
        print(f"revoked node {admissions.revoke(who)} ({who}); it is disconnected and cannot rejoin")
    return 0


def _deploy_local(args: argparse.Namespace) -> int:
    from simulations.deploy import deploy_local

    overrides = parse_assignments(args.set)
    load(Path(__file__).resolve().parent.parent / "configs" / "quickstart.yaml", overrides)  # refuse bad keys now
    started = time.time()
    run_dir = deploy_local(Path(args.out), args.sites, overrides, echo=lambda line: print(line, flush=True))
    final = json.loads((run_dir / "metrics.json").read_text())["final"]
    print(f"done in {time.time() - started:.0f} s. final ({final['source']}) macro AUC {final['macro_auc']:.3f}; "
          f"metrics: {run_dir / 'metrics.json'}; process logs: {Path(args.out).resolve() / 'processes'}")
    return 0


def seed_summary(finals: dict[int, dict]) -> dict[str, dict[str, float]]:
    """Mean and standard deviation over seeds of the final accuracy, macro AUC and per-class AUC."""
    import numpy as np

    rows = [f for f in finals.values() if f["source"] != "none"]
    if not rows:
        return {}
    keys = {"accuracy": lambda f: f["accuracy"], "macro_auc": lambda f: f["macro_auc"],
            **{f"auc.{c}": (lambda f, c=c: f["auc"][c]) for c in rows[0]["auc"]}}
    out = {}
    for key, get in keys.items():
        values = np.array([get(f) for f in rows], float)
        out[key] = {"mean": float(np.nanmean(values)), "std": float(np.nanstd(values)), "n": len(values)}
    return out


def _data_commands(sub) -> None:
    """The subcommands synth, data inspect / cohort / baseline."""
    s = sub.add_parser("synth", help="generate hospitals in the BreCaHAD and MIMIC-IV layouts")
    s.add_argument("--out", required=True, help="folder to write site-<k>/ and holdout/ into")
    s.add_argument("--sites", type=int, default=3)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--preset", choices=["quick", "brecahad"], default="quick",
                   help="quick: small, for demos and tests; brecahad: the real data set's size")
    s.add_argument("--force", action="store_true", help="replace an --out folder that `fedfuse synth` made "
                   "(any other non-empty folder is refused)")
    s.set_defaults(func=_synth)

    d = sub.add_parser("data", help="inspect data or build a cohort")
    dsub = d.add_subparsers(dest="data_command", required=True)
    i = dsub.add_parser("inspect", help="counts of a BreCaHAD folder or a MIMIC-IV root")
    i.add_argument("path", help="BreCaHAD folder (holding images/ and groundTruth/) or MIMIC-IV root (holding hosp/)")
    i.add_argument("--json", action="store_true", help="print one JSON object")
    i.add_argument("--border", choices=["reflect", "drop"], default="reflect",
                   help="patches at tile edges: reflect-pad (default) or drop and count")
    i.add_argument("--patch-size", type=int, default=64)
    i.set_defaults(func=_inspect)
    c = dsub.add_parser("cohort", help="write the one-row-per-subject cohort of a MIMIC-IV root")
    c.add_argument("--mimic", required=True, help="MIMIC-IV root (holding hosp/)")
    c.add_argument("--out", required=True, help="CSV to write")
    c.set_defaults(func=_cohort)
    b = dsub.add_parser("baseline", help="colour statistics (and the same plus the centre's "
                        "texture) + logistic regression on a generated federation's patches: the AUC a model must "
                        "clearly beat")
    b.add_argument("root", help="folder holding site-<k>/ (and holdout/), e.g. data/quickstart")
    b.add_argument("--seed", type=int, default=0, help="the run's seed: site k splits with seed + k (default 0)")
    b.set_defaults(func=_baseline)


def _run_commands(sub) -> None:
    """The subcommands simulate, loso, report, predict."""
    r = sub.add_parser("simulate", help="run a federated simulation (Flower's simulation engine)")
    r.add_argument("config", help="YAML experiment file, e.g. configs/quickstart.yaml")
    r.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a setting (repeatable), e.g. --set federation.rounds=3")
    r.add_argument("--out", help="run folder (default runs/<name>-<timestamp>); must not exist, unless --force")
    r.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its last complete round (its "
                   "checkpoint.json), with the same config and --set options")
    r.add_argument("--force", action="store_true", help="replace an existing --out folder that fedfuse simulate made "
                   "(its .fedfuse-run marker); never data.root, the holdout or a folder holding them")
    r.add_argument("--seeds", help="repeat the run for each seed, e.g. 0,1,2 (into seed-<s>/), and report "
                   "mean and std in summary.json")
    r.set_defaults(func=_simulate)

    lo = sub.add_parser("loso", help="leave one site out: train federated without it, test on it")
    lo.add_argument("config", help="YAML experiment file")
    lo.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a setting")
    lo.add_argument("--out", help="results folder (default results/loso-<name>-<timestamp>)")
    lo.set_defaults(func=_loso)

    rp = sub.add_parser("report", help="rebuild a run's report.html (plots, Grad-CAM, SHAP, privacy ledger)")
    rp.add_argument("run_dir", help="a run folder written by `fedfuse simulate`")
    rp.set_defaults(func=_report_command)

    pr = sub.add_parser("predict", help="apply a trained model to a hospital folder")
    pr.add_argument("model", help="a run folder written by `fedfuse simulate` (config.yaml + model.pt / model.json)")
    pr.add_argument("data_dir", help="hospital folder: BreCaHAD/, mimic-iv/, linkage.csv")
    pr.add_argument("--out", required=True, help="CSV to write (patch task: also <name>-tiles.csv)")
    pr.set_defaults(func=_predict)


def _experiment_commands(sub) -> None:
    """The subcommands shift-study, pretrain, paper, privacy-sweep."""
    ss = sub.add_parser("shift-study", help="stain normalisation, stain augmentation and FedBN, each scored on "
                                             "hospitals left out of training: a table and a picture")
    ss.add_argument("--config", default="configs/shift_study.yaml",
                    help="study config (default configs/shift_study.yaml)")
    ss.add_argument("--quick", action="store_true", help="a small version: quick data, one seed, one held-out site")
    ss.set_defaults(func=_shift_study)
    pt = sub.add_parser("pretrain", help="image-encoder weights (and their provenance) from a public data set that "
                        "is not the federation's: supervised or SimCLR")
    pt.add_argument("--config", default="configs/pretrain.yaml", help="pretrain config (default configs/pretrain.yaml)")
    pt.add_argument("--model", choices=("cnn", "resnet18"), help="the encoder (default: the config's base.model.name)")
    pt.add_argument("--method", choices=("supervised", "simclr"), help="default: the config's pretrain.method")
    pt.add_argument("--steps", type=int, help="optimiser steps (default: the config's pretrain.steps)")
    pt.add_argument("--out", help="weights file; {model} and {method} are filled in (default: the config's)")
    pt.add_argument("--quick", action="store_true", help="a small version (the config's quick section)")
    pt.set_defaults(func=_pretrain)

    pp = sub.add_parser("paper", help="the study's six models, trained pooled, federated and local: a table")
    pp.add_argument("--config", default="configs/paper.yaml", help="paper config (default configs/paper.yaml)")
    pp.add_argument("--models", help="only these rows, e.g. cnn,resnet18 (default: the config's paper.models; with "
                    "--protocol: paper.protocol.models)")
    pp.add_argument("--modes", help="only these columns, e.g. pooled (default: the config's paper.modes)")
    pp.add_argument("--seeds", help="these seeds, e.g. 0,1 (default: the config's paper.seeds; with --protocol: "
                    "paper.protocol.seeds)")
    pp.add_argument("--out", help="results folder (default: the config's paper.out); cells are cached in <out>/cells")
    pp.add_argument("--protocol", action="store_true", help="instead of the table: the study's protocol (patch split, "
                    "pairing by label) beside ours, pooled, for paper.protocol.models: protocol.md")
    pp.add_argument("--quick", action="store_true", help="a small version (the config's quick section)")
    pp.set_defaults(func=_paper)

    sw = sub.add_parser("privacy-sweep", help="local DP at several epsilons: AUC, membership-attack AUC and the "
                        "canary audit's epsilon lower bound (privacy.canaries a site, 100 if unset), a table and a plot")
    sw.add_argument("config", help="YAML experiment file, e.g. configs/quickstart.yaml")
    sw.add_argument("--epsilons", default="1,3,8,inf", help="target epsilons per site; inf: no DP (default 1,3,8,inf)")
    sw.add_argument("--seeds", default="0", help="seeds, e.g. 0,1,2 (default 0)")
    sw.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a setting")
    sw.add_argument("--out", help="results folder (default results/privacy-sweep-<name>); a rerun continues it")
    sw.add_argument("--quick", action="store_true", help="a small version: 2 rounds of 4 steps, in process")
    sw.set_defaults(func=_privacy_sweep)


def _site_commands(sub) -> None:
    """The subcommands privacy show / reset, site check, deploy."""
    pv = sub.add_parser("privacy", help="the sites' privacy ledgers: what each data set has spent")
    pvsub = pv.add_subparsers(dest="privacy_command", required=True)
    show = pvsub.add_parser("show", help="the cumulative epsilon of every ledger in a folder")
    show.add_argument("dir", help="ledger folder (a SuperNode's ledger-dir, default <data-dir>/.fedfuse-privacy; "
                      "a simulation's privacy.ledger_dir, default <data.root>/.fedfuse-privacy)")
    show.set_defaults(func=_privacy_show)
    reset = pvsub.add_parser("reset", help="start every ledger in a folder from zero (the old ones are kept, renamed)")
    reset.add_argument("dir", help="ledger folder")
    reset.add_argument("--yes", action="store_true", help="confirm: the data may then be trained on again")
    reset.set_defaults(func=_privacy_reset)

    st = sub.add_parser("site", help="a hospital's side of a deployment")
    stsub = st.add_subparsers(dest="site_command", required=True)
    chk = stsub.add_parser("check", help="validate a hospital's data folder before it joins: every problem, and counts")
    chk.add_argument("data_dir", help="hospital folder: BreCaHAD/, mimic-iv/, linkage.csv")
    chk.add_argument("--config", help="YAML experiment file whose data section applies (default: the built-in one)")
    chk.add_argument("--json", action="store_true", help="print one JSON object")
    chk.set_defaults(func=_site_check)

    dp = sub.add_parser("deploy", help="a real federation: certificates, keys, admissions (docs/DEPLOY.md)")
    dpsub = dp.add_subparsers(dest="deploy_command", required=True)
    ce = dpsub.add_parser("certs", help="a CA and the SuperLink's TLS certificate")
    ce.add_argument("--out", required=True, help="the coordinator's folder (ca.crt, ca.key, superlink.crt/.key)")
    ce.add_argument("--host", required=True, nargs="+", metavar="NAME_OR_IP",
                    help="every DNS name or IP address the hospitals use to reach the SuperLink")
    ce.add_argument("--days", type=int, default=825, help="validity (default 825)")
    ce.add_argument("--force", action="store_true", help="replace existing files (hospitals need the new ca.crt)")
    ce.set_defaults(func=_deploy_certs)
    ke = dpsub.add_parser("keys", help="SuperNode key pairs for node authentication")
    ke.add_argument("--out", required=True, help="folder for <name> (private) and <name>.pub")
    ke.add_argument("--sites", type=int, default=1, help="how many, named site-0, site-1, ... (default 1)")
    ke.add_argument("--names", help="comma-separated names instead, e.g. hospital-a,hospital-b")
    ke.add_argument("--force", action="store_true", help="replace existing keys (their admissions stop working)")
    ke.set_defaults(func=_deploy_keys)
    for verb, func, helptext in (("admit", _deploy_admit, "register hospitals' public keys with the SuperLink"),
                                 ("revoke", _deploy_revoke, "unregister hospitals: they are cut off at once")):
        a = dpsub.add_parser(verb, help=helptext)
        if verb == "admit":
            a.add_argument("public_key", nargs="+", help="<name>.pub file(s) from `fedfuse deploy keys`")
            a.add_argument("--name", help="the hospital's name (default: the key file's name)")
        else:
            a.add_argument("who", nargs="+", help="an admitted name, a node id, or a public key file")
        a.add_argument("--superlink", required=True, metavar="HOST:PORT", help="the SuperLink's address")
        a.add_argument("--dir", default=".", help="the coordinator's folder: ca.crt, admissions.json (default .)")
        a.add_argument("--ca", help="CA certificate (default DIR/ca.crt)")
        a.set_defaults(func=func)
    lc = dpsub.add_parser("local", help="try the whole deployment on this machine: SuperLink, one SuperNode per "
                          "site, TLS and node authentication, one run")
    lc.add_argument("--out", default="deploy-try", help="folder for data, certificates, keys, logs, runs "
                    "(default deploy-try)")
    lc.add_argument("--sites", type=int, default=3)
    lc.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="override a setting of configs/quickstart.yaml, e.g. --set federation.rounds=2")
    lc.set_defaults(func=_deploy_local)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedfuse", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    _data_commands(sub)
    _run_commands(sub)
    _experiment_commands(sub)
    _site_commands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwinds, so Flower processes are stopped
    try:
        return args.func(args)
    except (ConfigError, DataFormatError, DeployError, FileExistsError, FileNotFoundError, FolderError,
            SimulationError, ValueError) as err:
        print(f"fedfuse: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
