"""``fedfuse data baseline``: how far colour and darkness alone get on the patch task.

A logistic regression on a handful of per-patch statistics (mean R, G, B,
grey-level spread, share of dark pixels, centre brightness and a few more of
the same kind) is trained on the sites' train splits and scored on the holdout
(or, without one, on the sites' test splits), split by case exactly as the
simulation splits. A model that does not beat it by a clear margin has learned
colour, not morphology; a generator whose patches it solves does not ask for
a model at all (issue 15).

A second row adds one spatial step, the spread and dark share of the central
16 px window (the annotated nucleus itself): if that pair closes most of the
gap to the demo's model, the generator draws every nucleus of a class alike
and the model's margin is a margin over a two-number shortcut.

``python -m simulations.baseline --figure docs/tissue.png DATA_ROOT`` remakes the
README's picture of generated tiles and patches (:func:`tissue_figure`).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shared.config import DataConfig
from shared.data import Samples, concat, load_folder, load_site
from shared.errors import DataFormatError
from shared.metrics import classification_metrics

FEATURES = ("mean_r", "mean_g", "mean_b", "grey_std", "dark_share", "centre_grey", "grey_p10", "grey_p90")
# One spatial step past colour: how uneven and how dark the annotated nucleus' own window is. A generator
# whose classes this pair separates draws every nucleus of a class alike (issue 15).
CENTRE_TEXTURE = ("centre_grey_std", "centre_dark_share")
ROWS = {"colour": FEATURES, "colour + centre texture": FEATURES + CENTRE_TEXTURE}
DARK = 110  # grey level under which a pixel counts as dark (nuclear haematoxylin)
CENTRE = 16  # side of the central window, px: about one tumour nucleus


def patch_features(images: np.ndarray, names: tuple[str, ...] = FEATURES) -> np.ndarray:
    """``(n, P, P, 3)`` uint8 patches -> ``(n, len(names))`` statistics, one column per name in ``names``.

    ``names`` are drawn from :data:`FEATURES` (whole-patch colour and intensity, and the centre's mean
    brightness) and :data:`CENTRE_TEXTURE` (spread and dark share of the central ``CENTRE`` px window).
    """
    x = images.astype(np.float32)
    grey = x.mean(-1)
    n, p = grey.shape[:2]
    lo, hi = (p - CENTRE) // 2, (p + CENTRE) // 2
    centre = grey[:, lo:hi, lo:hi].reshape(n, -1)
    flat = grey.reshape(n, -1)
    columns = {
        "mean_r": lambda: x[..., 0].reshape(n, -1).mean(1), "mean_g": lambda: x[..., 1].reshape(n, -1).mean(1),
        "mean_b": lambda: x[..., 2].reshape(n, -1).mean(1), "grey_std": lambda: flat.std(1),
        "dark_share": lambda: (flat < DARK).mean(1), "centre_grey": lambda: centre.mean(1),
        "grey_p10": lambda: np.percentile(flat, 10, axis=1), "grey_p90": lambda: np.percentile(flat, 90, axis=1),
        "centre_grey_std": lambda: centre.std(1), "centre_dark_share": lambda: (centre < DARK).mean(1),
    }
    unknown = [name for name in names if name not in columns]
    if unknown:
        raise ValueError(f"unknown patch feature(s) {', '.join(unknown)}; known: {', '.join(columns)}")
    return np.column_stack([columns[name]() for name in names])


@dataclass(frozen=True)
class BaselineResult:
    """One fitted baseline's test metrics (``classification_metrics``), its features and where its data came from."""

    metrics: dict
    n_train: int
    test_source: str
    row: str = "colour"
    features: tuple[str, ...] = FEATURES


def site_folders(root: Path) -> list[Path]:
    folders = sorted(Path(root).glob("site-*"), key=lambda p: (len(p.name), p.name))
    if not folders:
        raise DataFormatError(f"{root}: no site-<k> folders; generate some with `fedfuse synth --out {root}`")
    return folders


def baseline_splits(root: Path, cfg: DataConfig, seed: int) -> tuple[Samples, Samples, str]:
    """(train, test, test source) as the simulation splits: site ``k`` with seed ``seed + k``, the holdout whole."""
    splits = [load_site(folder, cfg, seed + k) for k, folder in enumerate(site_folders(root))]
    train = concat([tr.prefixed(f"site-{k}") for k, (tr, _) in enumerate(splits)])
    holdout = Path(root) / "holdout"
    if holdout.is_dir():
        return train, load_folder(holdout, cfg, seed), "holdout"
    return train, concat([te.prefixed(f"site-{k}") for k, (_, te) in enumerate(splits)]), "sites' test splits"


def fit_baseline(train: Samples, seed: int = 0, features: tuple[str, ...] = FEATURES):
    """A standardised, class-balanced logistic regression on :func:`patch_features` (a scikit-learn pipeline)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, class_weight="balanced",
                                                               random_state=seed))
    return model.fit(patch_features(train.images, features), train.labels)


def run_baseline(root: Path, cfg: DataConfig, seed: int = 0, row: str = "colour") -> BaselineResult:
    """The baseline on the feature set ``ROWS[row]``, split by case as the simulation splits."""
    if row not in ROWS:
        raise ValueError(f"unknown baseline row {row!r}; known: {', '.join(map(repr, ROWS))}")
    return run_baselines(root, cfg, seed, rows=(row,))[0]


def run_baselines(root: Path, cfg: DataConfig, seed: int = 0, rows: tuple[str, ...] = tuple(ROWS)
                  ) -> list[BaselineResult]:
    """Every row of :data:`ROWS` (or those named) on one split, loaded once."""
    train, test, source = baseline_splits(root, cfg, seed)
    present = np.unique(train.labels)
    if len(present) < len(cfg.classes):
        missing = [c for i, c in enumerate(cfg.classes) if i not in present]
        raise DataFormatError(f"{root}: no training patches of class(es) {', '.join(missing)}")
    results = []
    for row in rows:
        model = fit_baseline(train, seed, ROWS[row])
        probs = model.predict_proba(patch_features(test.images, ROWS[row]))
        results.append(BaselineResult(classification_metrics(test.labels, probs, cfg.classes), len(train),
                                      source, row, ROWS[row]))
    return results


def format_result(result: BaselineResult) -> str:
    m = result.metrics
    per_class = ", ".join(f"{c} {v:.3f}" for c, v in m["auc"].items())
    return (f"{result.row} baseline ({len(result.features)} features: {', '.join(result.features)})\n"
            f"trained on {result.n_train} patches (sites' train splits), tested on {m['n']} ({result.test_source})\n"
            f"macro AUC {m['macro_auc']:.3f} ({per_class}); accuracy {m['accuracy']:.3f}")


def format_results(results: list[BaselineResult]) -> str:
    """The rows one under the other, then a table of macro and per-class AUC side by side."""
    classes = list(results[0].metrics["auc"])
    width = max(len(r.row) for r in results)
    table = [f"{'':<{width}}  {'macro':>6}  " + "  ".join(f"{c:>10}" for c in classes)]
    table += [f"{r.row:<{width}}  {r.metrics['macro_auc']:>6.3f}  "
              + "  ".join(f"{r.metrics['auc'][c]:>10.3f}" for c in classes) for r in results]
    return "\n\n".join(map(format_result, results)) + "\n\nAUC\n" + "\n".join(table)


def tissue_figure(root: Path, out: Path, cfg: DataConfig | None = None, per_class: int = 8, tiles: int = 3) -> Path:
    """A figure of ``tiles`` whole tiles (downscaled) from different sites, and ``per_class`` patches per class.

    Patches are drawn from points at least half a patch from the tile's edge,
    so none shows reflect padding.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from shared.brecahad import list_tiles, read_image
    from shared.data import folder_patches

    cfg = cfg or DataConfig()
    folders = site_folders(root)
    picks = [list_tiles(folders[k % len(folders)] / "BreCaHAD")[k] for k in range(tiles)]
    patches = folder_patches(folders[0], cfg)
    first = read_image(picks[0].image)
    half = cfg.patch_size / 2
    x, y = patches.points[:, 0] * first.shape[1], patches.points[:, 1] * first.shape[0]
    interior = (x >= half) & (y >= half) & (x <= first.shape[1] - half) & (y <= first.shape[0] - half)
    rng = np.random.default_rng(0)
    rows = len(cfg.classes)
    fig = plt.figure(figsize=(1.6 * per_class, 1.6 * per_class * first.shape[0] / first.shape[1] / tiles * 1.05
                              + 1.7 * rows), dpi=100)
    grid = fig.add_gridspec(2, 1, height_ratios=[per_class * first.shape[0] / first.shape[1] / tiles * 1.05,
                                                 1.05 * rows], hspace=0.08)
    top = grid[0].subgridspec(1, tiles, wspace=0.03)
    for k, tile in enumerate(picks):
        ax = fig.add_subplot(top[k])
        ax.imshow(read_image(tile.image))
        ax.set_title(f"{folders[k % len(folders)].name} / {tile.name}", fontsize=8)
        ax.axis("off")
    bottom = grid[1].subgridspec(rows, per_class, wspace=0.04, hspace=0.08)
    for ci, cls in enumerate(cfg.classes):
        idx = np.flatnonzero((patches.labels == ci) & interior)
        for j, i in enumerate(rng.choice(idx, min(per_class, len(idx)), replace=False)):
            ax = fig.add_subplot(bottom[ci, j])
            ax.imshow(patches.images[i], interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(cls, fontsize=9)
    fig.suptitle("Generated H&E (fedfuse synth): whole tiles, and 64 px patches centred on annotated nuclei",
                 fontsize=10)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, bbox_inches="tight")
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("root", help="folder holding site-<k>/ (and holdout/)")
    p.add_argument("--figure", help="write the tissue figure (PNG) instead of running the baseline")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.figure:
        print(tissue_figure(Path(args.root), Path(args.figure)))
    else:
        print(format_results(run_baselines(Path(args.root), DataConfig(root=args.root), args.seed)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
