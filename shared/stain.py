"""Stain normalisation, a site-local preprocessing step (torchstain's Reinhard and Macenko).

Hospitals differ above all in stain and scanner. ``data.stain_norm`` maps every
tile, before its patches are cut, onto one *reference* appearance:

* ``reinhard`` (Reinhard et al. 2001): each LAB channel of a tile is
  standardised and given the reference's mean and standard deviation. Its
  statistics: LAB means (3) and standard deviations (3).
* ``macenko`` (Macenko et al. 2009): a tile's own haematoxylin and eosin
  optical-density vectors are estimated and its stain concentrations are
  re-rendered with the reference's vectors and 99th-percentile concentrations.
  Its statistics: the stain matrix (3 x 2, columns H and E) and those two
  percentiles.

The reference never needs pooled images (``data.stain_reference``):

* ``shipped``: the statistics in ``shared/assets/stain_reference.json``, those
  of ``stain_reference.png`` beside it, a 256 x 256 tile the project generated
  with the textbook Ruifrok-Johnston H&E vectors
  (``simulations.synth.write_stain_reference`` remakes both). Numbers, not the
  image, because Flower's app bundle carries no images to the SuperNodes;
* ``federated``: each site computes the mean statistics of its own tiles and
  sends only those and its tile count; the server's tile-weighted mean
  (:func:`combine`) is sent back with every message;
* a path: the statistics of the user's own reference image.

A tile with too little tissue for Macenko's estimate is kept as it is; extraction says how many, per folder.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import numpy as np

from shared.config import DataConfig
from shared.errors import DataFormatError

SHIPPED = Path(__file__).resolve().parent / "assets" / "stain_reference.json"
SHIPPED_IMAGE = SHIPPED.with_suffix(".png")
WIDTH = {"reinhard": 6, "macenko": 8}  # length of a statistics vector


def _normalizer(method: str):
    import torchstain

    return torchstain.normalizers.ReinhardNormalizer(backend="numpy") if method == "reinhard" else \
        torchstain.normalizers.MacenkoNormalizer(backend="numpy")


def statistics(method: str, image: np.ndarray) -> np.ndarray:
    """The stain statistics of one RGB uint8 image (see the module's docstring); raises if it has no tissue."""
    n = _normalizer(method)
    n.fit(image)
    if method == "reinhard":
        return np.concatenate([n.target_means, n.target_stds]).astype(np.float64)
    return np.concatenate([np.asarray(n.HERef).ravel(), n.maxCRef]).astype(np.float64)


def site_statistics(method: str, images, where: str = "the site's tiles") -> tuple[np.ndarray, int]:
    """A site's share of a federated reference: the mean statistics over its images, and how many it used.
    ``where``: the images' folder, for the error when none has tissue."""
    rows = []
    for image in images:
        try:
            rows.append(statistics(method, image))
        except (np.linalg.LinAlgError, ValueError, IndexError):  # no tissue to estimate stains from
            continue
    if not rows:
        raise ValueError(f"stain statistics ({method}): no image in {where} has enough tissue to estimate its "
                         "stains; expected H&E tiles (data.stain_reference: shipped needs none from this site)")
    return np.mean(rows, axis=0), len(rows)


def combine(parts: list[tuple[np.ndarray, int]]) -> np.ndarray:
    """The federation's reference: the sites' mean statistics weighted by their image counts."""
    return np.average(np.stack([np.asarray(m, np.float64) for m, _ in parts]), axis=0,
                      weights=[n for _, n in parts])


def shipped(method: str) -> np.ndarray:
    """The shipped reference's statistics for ``method``."""
    return np.asarray(json.loads(SHIPPED.read_text())[method], np.float64)


@lru_cache(maxsize=8)
def reference_from_image(method: str, path: Path) -> np.ndarray:
    from PIL import Image

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data.stain_reference: reference image {path} not found")
    try:
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB"))
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise DataFormatError(f"data.stain_reference: cannot read the reference image {path}: {err}") from None
    return statistics(method, pixels)


class Normaliser:
    """Maps tiles onto the reference statistics ``reference`` of ``method``."""

    def __init__(self, method: str, reference: np.ndarray) -> None:
        reference = np.asarray(reference, np.float64)
        if method not in WIDTH:
            raise ValueError(f"stain normalisation: unknown method {method!r}; expected one of {', '.join(WIDTH)}")
        if reference.shape != (WIDTH[method],):
            raise ValueError(f"stain reference for {method!r}: expected {WIDTH[method]} numbers, "
                             f"got shape {reference.shape}")
        self.method, self.reference = method, reference
        self._n = _normalizer(method)
        if method == "reinhard":
            self._n.target_means, self._n.target_stds = reference[:3], reference[3:]
        else:
            he = reference[:6].reshape(3, 2)
            self._n.HERef = he / np.linalg.norm(he, axis=0)  # an average of unit vectors, made unit again
            self._n.maxCRef = reference[6:]

    def __call__(self, image: np.ndarray) -> np.ndarray | None:
        """The normalised tile, or None when it has too little tissue to estimate its stains."""
        try:
            if self.method == "reinhard":
                return self._n.normalize(image)
            return self._n.normalize(image, stains=False)[0]
        except (np.linalg.LinAlgError, ValueError, IndexError):
            return None


def normaliser_for(cfg: DataConfig, federated: list[float] | np.ndarray | None = None) -> Normaliser | None:
    """The normaliser ``data.stain_norm`` asks for (None: none). ``federated``: the federation's reference,
    which a site receives with every message from the server and a finished run keeps in metrics.json."""
    if cfg.stain_norm == "none":
        return None
    if cfg.stain_reference == "federated":
        if federated is None:
            raise ValueError("data.stain_reference: federated: the reference is the federation's average, computed "
                             "at the start of a run; here there is none (a finished run keeps it in metrics.json)")
        return Normaliser(cfg.stain_norm, np.asarray(federated, np.float64))
    if cfg.stain_reference == "shipped":
        return Normaliser(cfg.stain_norm, shipped(cfg.stain_norm))
    path = Path(cfg.stain_reference)
    path = path if path.is_absolute() else Path(cfg.root) / path
    return Normaliser(cfg.stain_norm, reference_from_image(cfg.stain_norm, path))
