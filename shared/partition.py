"""Which data a site holds: ``site_samples`` reads it from the site's node config (a hospital's folder, or a
simulated site), the one place both the ClientApp and SecAgg's client get it; below, the partitions of
simulation: which cases (patients) each simulated hospital holds.

Every scheme assigns whole cases, never single patches, so one patient's
patches are never at two sites. That is also its limit: a partition can only
be as fine as the number of cases. Real BreCaHAD has 17 cases, so at most 8
sites can each keep two cases for a train/test split, and a label skew is as
strong as the patients' own class mixes allow (every case is mostly tumour
nuclei; mitoses concentrate in a few high-grade patients).

* ``natural``: the hospitals as they are (one folder each): nothing to deal, ``site_samples`` reads the folder.
* ``iid``: cases shuffled and dealt so that sites get similar patch counts.
* ``dirichlet``: label skew (Hsu et al. 2019, on cases): each case is typed
  by its most over-represented class; per class, site shares are drawn from
  Dirichlet(alpha) and the class's cases are dealt by those shares. Small
  alpha: strong skew.
* ``quantity``: size skew: site shares of patches drawn from Dirichlet(alpha).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from shared.audit import audited
from shared.config import Config, DataConfig
from shared.data import Samples, load_pooled, load_site, split

SCHEMES = ("iid", "dirichlet", "quantity")  # natural needs no dealing: a site is a folder


def partition_cases(
    cases: np.ndarray, labels: np.ndarray, n_sites: int, scheme: str, alpha: float, seed: int
) -> list[np.ndarray]:
    """Split the unique values of ``cases`` (one entry per patch) into ``n_sites`` groups of case ids."""
    names, inverse = np.unique(cases, return_inverse=True)
    if len(names) < 2 * n_sites:
        raise ValueError(f"data.partition {scheme!r}: {len(names)} cases cannot make {n_sites} sites with at "
                         "least 2 cases each (a train/test split is by case)")
    rng = np.random.default_rng(seed)
    sizes = np.bincount(inverse).astype(float)
    if scheme == "iid":
        shares = np.full(n_sites, 1.0 / n_sites)
        return _deal(rng.permutation(len(names)), sizes, shares, names)
    if scheme == "quantity":
        shares = rng.dirichlet(np.full(n_sites, alpha))
        return _deal(rng.permutation(len(names)), sizes, shares, names)
    if scheme == "dirichlet":
        k = int(labels.max()) + 1
        per_case = np.zeros((len(names), k))
        np.add.at(per_case, (inverse, labels), 1.0)
        overall = per_case.sum(0) / per_case.sum()
        kind = np.argmax(per_case / per_case.sum(1, keepdims=True) / np.maximum(overall, 1e-9), axis=1)
        owner = np.empty(len(names), int)
        for c in range(k):
            members = rng.permutation(np.flatnonzero(kind == c))
            owner[members] = rng.choice(n_sites, size=len(members), p=rng.dirichlet(np.full(n_sites, alpha)))
        return _repair([names[owner == s] for s in range(n_sites)], names, rng)
    raise ValueError(f"data.partition: cases are re-dealt for {', '.join(SCHEMES)}, not {scheme!r}")


def _deal(order: np.ndarray, sizes: np.ndarray, shares: np.ndarray, names: np.ndarray) -> list[np.ndarray]:
    """Two cases per site first, then each case to the site furthest below its share of patches."""
    n_sites = len(shares)
    groups: list[list[int]] = [[] for _ in range(n_sites)]
    filled = np.zeros(n_sites)
    target = shares * sizes.sum()
    for i, case in enumerate(order):
        site = i % n_sites if i < 2 * n_sites else int(np.argmax(target - filled))
        groups[site].append(case)
        filled[site] += sizes[case]
    return [names[np.array(g, int)] for g in groups]


def _repair(groups: list[np.ndarray], names: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
    """Move cases from the largest site to any site with fewer than 2 cases."""
    index = {n: i for i, n in enumerate(names)}
    groups = [list(g) for g in groups]
    while min(len(g) for g in groups) < 2:
        poor = min(range(len(groups)), key=lambda s: len(groups[s]))
        rich = max(range(len(groups)), key=lambda s: len(groups[s]))
        moved = groups[rich].pop(int(rng.integers(len(groups[rich]))))
        groups[poor].append(moved)
    return [np.array(sorted(g, key=lambda n: index[n])) for g in groups]


def load_partition(
    root: Path, cfg: DataConfig, index: int, seed: int, task: str = "patch", stain_reference: list[float] | None = None
) -> tuple[Samples, Samples]:
    """Simulated site ``index`` of ``cfg.partition`` over the pooled cases under ``root``: (train, test)."""
    pooled = load_pooled(root, cfg, seed, task, stain_reference)
    # The partition must be the same at every site: it is seeded by the run's seed alone.
    groups = partition_cases(pooled.cases, pooled.labels, cfg.sites, cfg.partition, cfg.alpha, seed)
    mine = pooled.subset(np.isin(pooled.cases, groups[index]))
    return split(mine, cfg, seed + index)


def natural_index(cfg: Config, partition_id: int) -> int:
    """The site folder (``site-<k>``) simulated SuperNode ``partition_id`` holds: in order, without ``leave_out``."""
    return [k for k in range(cfg.data.sites) if k != cfg.data.leave_out][partition_id]


def site_samples(cfg: Config, node_config: Mapping[str, object], task: str,
                 stain_reference: list[float] | None = None) -> tuple[int, str, Samples, Samples]:
    """The data a site holds, from its node config alone: (index, name, train, test); the one place both the
    ClientApp and SecAgg's client get it. ``stain_reference`` as in ``shared.data.load_site``.

    * deployment: ``data-dir`` is the hospital's folder; ``site-index`` seeds its split, ``site-name`` names it;
    * simulation: ``partition-id`` k holds ``<data.root>/site-<k>`` in order, skipping ``data.leave_out``
      (``natural``), or the k-th group of cases re-dealt from them all.

    With ``privacy.audit_fraction``, the membership audit's non-members are taken out of training here; with
    ``privacy.canaries``, the one-run audit's canaries are planted here (``shared.audit.canaries``).
    """
    if "data-dir" in node_config:
        folder = Path(str(node_config["data-dir"]))
        index = int(node_config.get("site-index", 0))
        name = str(node_config.get("site-name", folder.name))
        train, test = load_site(folder, cfg.data, cfg.seed + index, task, stain_reference)
    elif cfg.data.partition == "natural":
        index = natural_index(cfg, int(node_config["partition-id"]))
        name = f"site-{index}"
        train, test = load_site(Path(cfg.data.root) / name, cfg.data, cfg.seed + index, task, stain_reference)
    else:
        index = int(node_config["partition-id"])
        name = f"{cfg.data.partition}-{index}"
        train, test = load_partition(Path(cfg.data.root), cfg.data, index, cfg.seed, task, stain_reference)
    return index, name, audited(cfg, index, train).train, test


def images_folder(cfg: Config, node_config: Mapping[str, object]) -> Path:
    """A site's BreCaHAD folder, from its node config (as :func:`site_samples` finds its data)."""
    if "data-dir" in node_config:
        return Path(str(node_config["data-dir"])) / "BreCaHAD"
    return Path(cfg.data.root) / f"site-{natural_index(cfg, int(node_config['partition-id']))}" / "BreCaHAD"
