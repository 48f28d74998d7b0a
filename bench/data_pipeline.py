"""Data pipeline: patch extraction and its cache on ``brecahad``-preset data, then the loader's share of training.

    .venv/bin/python -m bench.data_pipeline [--tiny | --quick | --full] [--out FILE] [--data DIR]

1. Extraction: each site folder's patches decoded from its TIFFs and cut
   around the points of the kept classes (``shared.brecahad.load_patches``)
   into an empty cache: seconds for all the sites (target: under 60 s for the
   whole preset, 162 images and about 23,000 patches, on 2 cores) and patches
   per second; then the same read back from the cache; the cohort (EHR) built
   and read back likewise.
2. The loader's share of a training step (target: under 10 %): the
   quickstart's model and train settings on one site's training split, read
   from the cache; each step's batch assembly (``shared.train.make_batch``, the
   training loop's own: indexing, uint8 to float, the configured
   augmentations) and its forward, backward and optimiser step timed apart;
   the same with a light HED stain jitter (``train.hed_jitter`` 0.05) on.
3. A site's load from the cache: what a ClientApp process pays when it first
   serves a site (client/app.py keeps the site for later messages; a
   deployment starts a fresh process each round), against one local update at
   the quickstart's settings (``train.local_epochs`` passes over the split).

Sizes: tiny: the ``quick`` preset's 2 sites, 3 timed steps; quick: the
``brecahad`` preset (3 sites, 162 images; generated once, about 100 s on 2
cores), 10 timed steps; full: the same, extraction 3 times (the median), 50
timed steps.
"""

from __future__ import annotations

import dataclasses
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from bench import common
from shared.brecahad import list_tiles, load_patches
from shared.config import classes_of, task_of
from shared.data import load_site
from shared.mimic import FEATURES, load_cohort
from shared.models import build_model
from shared.train import class_weights, make_batch

NAME = "data_pipeline"
SIZES = {
    "tiny": {"preset": "quick", "sites": 2, "repeats": 1, "steps": 3},
    "quick": {"preset": "brecahad", "sites": 3, "repeats": 1, "steps": 10},
    "full": {"preset": "brecahad", "sites": 3, "repeats": 3, "steps": 50},
}
TARGET_EXTRACTION_S = 60.0
TARGET_LOADER_SHARE = 10.0  # percent of a training step
HED_JITTER = 0.05  # a light stain jitter: the loader's costliest option, measured beside the defaults
WARMUP = 2


def _timed(fn, *args):
    """``fn(*args)`` and the seconds it took."""
    started = time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - started


def extraction(cfg, folders: list[Path]) -> dict:
    """Every folder's patches and cohort into an empty cache, then read back from it: seconds and counts."""
    d = cfg.data
    out = {"tiles": 0, "patches": 0, "patches_s": 0.0, "patches_cached_s": 0.0, "cohort_s": 0.0,
           "cohort_cached_s": 0.0, "cache_mb": 0.0}
    with tempfile.TemporaryDirectory(prefix="fedfuse-bench-cache-") as tmp:
        for k, folder in enumerate(folders):
            cache = Path(tmp) / f"site-{k}"
            images = folder / "BreCaHAD"
            patches, seconds = _timed(load_patches, images, d.classes, d.patch_size, d.border, cache)
            _, cached = _timed(load_patches, images, d.classes, d.patch_size, d.border, cache)
            _, cohort = _timed(load_cohort, folder / "mimic-iv", d.positive, cache)
            _, cohort_cached = _timed(load_cohort, folder / "mimic-iv", d.positive, cache)
            out["tiles"] += len(list_tiles(images))
            out["patches"] += len(patches.labels)
            out["patches_s"] += seconds
            out["patches_cached_s"] += cached
            out["cohort_s"] += cohort
            out["cohort_cached_s"] += cohort_cached
            out["cache_mb"] += sum(p.stat().st_size for p in cache.iterdir()) / 2**20
    return out


def step_times(cfg, train, samples, steps: int) -> dict:
    """Seconds per training step spent assembling the batch and computing it (after ``WARMUP`` steps).

    ``train``: the train settings (batch size, augmentations) of ``cfg``'s or another's.
    """
    torch.set_num_threads(train.threads)
    torch.manual_seed(cfg.seed)
    n_classes = len(classes_of(cfg))
    model = build_model(cfg.model, len(FEATURES), n_classes).train()
    opt = torch.optim.Adam(model.parameters(), lr=train.lr, weight_decay=train.weight_decay)
    loss_fn = nn.CrossEntropyLoss(weight=class_weights(samples.labels, n_classes, train.class_weights))
    gen = torch.Generator().manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    batch = train.batch_size
    loader = compute = 0.0
    for step in range(WARMUP + steps):
        idx = rng.choice(len(samples), size=min(batch, len(samples)), replace=False)
        t0 = time.perf_counter()
        images, ehr, labels = make_batch(samples, idx, train, gen)
        t1 = time.perf_counter()
        loss = model.loss(images, ehr, labels, loss_fn)
        opt.zero_grad()
        loss.backward()
        opt.step()
        t2 = time.perf_counter()
        if step >= WARMUP:
            loader += t1 - t0
            compute += t2 - t1
    return {"loader_s": loader / steps, "compute_s": compute / steps}


def main(argv: list[str] | None = None) -> int:
    args = common.parser(NAME, __doc__).parse_args(argv)
    started = time.perf_counter()
    size = SIZES[args.size]
    root = common.dataset(args.data, size["preset"], size["sites"])
    cfg = common.config(root, {"data.sites": size["sites"]})
    folders = [root / f"site-{k}" for k in range(size["sites"])]
    print(f"data pipeline: preset {size['preset']}, {size['sites']} sites, patch {cfg.data.patch_size} px, classes "
          f"{', '.join(cfg.data.classes)}; model {cfg.model.name}, batch {cfg.train.batch_size}, "
          f"train.threads {cfg.train.threads}", flush=True)

    runs = [extraction(cfg, folders) for _ in range(size["repeats"])]
    ex = sorted(runs, key=lambda r: r["patches_s"])[len(runs) // 2]  # the median run
    ex["repeats_patches_s"] = [r["patches_s"] for r in runs]
    ex["patches_per_s"] = ex["patches"] / ex["patches_s"]
    ex["cached_per_s"] = ex["patches"] / ex["patches_cached_s"]
    print(common.table(["step", "seconds", "per second"], [
        [f"extract {ex['patches']} patches from {ex['tiles']} images", ex["patches_s"],
         f"{ex['patches_per_s']:.0f} patches"],
        ["read them back from the cache", ex["patches_cached_s"], f"{ex['cached_per_s']:.0f} patches"],
        ["build the cohorts (EHR)", ex["cohort_s"], ""],
        ["read the cohorts back", ex["cohort_cached_s"], ""],
    ]))

    task = task_of(cfg)
    load_site(folders[0], cfg.data, cfg.seed, task)  # fills the site's own cache
    reloads = [_timed(load_site, folders[0], cfg.data, cfg.seed, task) for _ in range(3)]
    train = reloads[0][0][0]
    reload_s = statistics.median(seconds for _, seconds in reloads)
    step = step_times(cfg, cfg.train, train, size["steps"])
    jitter = step_times(cfg, dataclasses.replace(cfg.train, hed_jitter=HED_JITTER), train, size["steps"])
    jitter_share = 100 * jitter["loader_s"] / (jitter["loader_s"] + jitter["compute_s"])
    per_step = step["loader_s"] + step["compute_s"]
    loader_share = 100 * step["loader_s"] / per_step
    update_steps = cfg.train.local_epochs * -(-len(train) // cfg.train.batch_size)
    update_s = update_steps * per_step
    reload_share = 100 * reload_s / (reload_s + update_s)
    print(common.table(["training on site-0's split", "seconds", "share"], [
        [f"batch assembly (loader), per step of {cfg.train.batch_size}", step["loader_s"], f"{loader_share:.1f} %"],
        ["forward, backward, optimiser step", step["compute_s"], f"{100 - loader_share:.1f} %"],
        [f"loader with stain jitter (train.hed_jitter {HED_JITTER})", jitter["loader_s"], f"{jitter_share:.1f} %"],
        [f"reload of the site from the cache ({len(train)} training samples)", reload_s, f"{reload_share:.1f} %"],
        [f"one local update ({cfg.train.local_epochs} epochs, {update_steps} steps)", update_s, ""],
    ]))

    loader = {**step, "loader_share_pct": loader_share, "hed_jitter": HED_JITTER,
              "hed_jitter_loader_s": jitter["loader_s"], "hed_jitter_loader_share_pct": jitter_share,
              "samples": len(train), "reload_s": reload_s,
              "local_update_s": update_s, "local_update_steps": update_steps, "reload_share_pct": reload_share}
    note = "" if size["preset"] == "brecahad" else f"{size['preset']} preset here, not brecahad"
    targets = [
        common.target(f"extraction of the {size['preset']} preset ({ex['tiles']} images)", ex["patches_s"],
                      TARGET_EXTRACTION_S, " s", note=note),
        common.target("loader share of a training step", loader_share, TARGET_LOADER_SHARE, " %"),
        common.target("patches extracted per second", ex["patches_per_s"], None),
        common.target(f"loader share with train.hed_jitter {HED_JITTER}", jitter_share, None, " %"),
    ]
    settings = {**size, "patch_size": cfg.data.patch_size, "classes": list(cfg.data.classes), "model": cfg.model.name,
                "batch_size": cfg.train.batch_size, "threads": cfg.train.threads, "data": str(root)}
    common.write(args, NAME, started, settings, {"extraction": ex, "loader": loader}, targets)
    return 0


if __name__ == "__main__":
    sys.exit(main())
