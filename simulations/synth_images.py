"""Synthetic H&E histopathology tiles with BreCaHAD-style point annotations.

The model behind a tile, top to bottom:

* **Optical density (Beer-Lambert).** A tile is rendered from two stain
  concentration maps, haematoxylin ``H`` (nuclei, blue-purple) and eosin ``E``
  (cytoplasm and stroma, pink), as ``RGB = 255 * exp(-(H * v_H + E * v_E))``.
  ``v_H`` and ``v_E`` are the Ruifrok-Johnston stain vectors, perturbed per
  site: each hospital's stain batch, staining time and scanner give it its own
  hue, intensity, blur and noise (``SiteStyle``).
* **Tissue.** Smooth random fields give stroma and cytoplasm; bright lumens
  (tubules) are cut out as soft ellipses. Tumour cells grow in nests around a
  few centres; lymphocytes and fibroblasts lie in the stroma between them.
* **Nuclei by class** (what a pathologist looks for):
  - ``tumor``: large, pleomorphic (elongated, irregular outline), vesicular
    chromatin with a darker rim and one or two nucleoli. Pleomorphism grows
    with the patient's grade; some tumour nuclei are hyperchromatic and look
    much like mitoses, which keeps the task honestly hard.
  - ``non_tumor``: lymphocytes (small, round, dense and uniform) and
    fibroblasts (thin spindles).
  - ``mitosis``: no nuclear membrane; condensed chromosomes as dense, dark,
    irregular clumps in a metaphase band, an anaphase pair, or a
    prophase-like clumped nucleus, inside a clear halo.
  - ``apoptosis``: a shrunken, very dark round body (pyknosis), sometimes
    fragmented (karyorrhexis), in a bright eosinophilic halo.
* **Annotation noise.** About 3 % of tumour and non-tumour points carry the
  other label, as pathologists disagree on borderline nuclei.
* **Patient latent grade.** Each patient has a grade ``z`` (standard normal,
  site-shifted) that scales the mitotic rate and the pleomorphism; the EHR
  generator uses the same ``z`` for some lab values, so the record carries
  real but partial signal about the patch classes.

Pixel scale is that of BreCaHAD (tumour nuclei about 20-28 px across), so a
64 px patch holds one nucleus and its neighbourhood whatever the tile size.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage, special

# Ruifrok & Johnston (2001) optical density vectors for H and E.
STAIN_H = np.array([0.650, 0.704, 0.286])
STAIN_E = np.array([0.072, 0.990, 0.105])

ANNOTATION_NOISE = 0.03  # share of tumour / non-tumour points labelled as the other class



@dataclass(frozen=True)
class SiteStyle:
    """How one hospital's slides look: stain colour, intensity, scanner blur and noise."""

    stain_h: tuple[float, float, float]
    stain_e: tuple[float, float, float]
    h_scale: float
    e_scale: float
    blur_sigma: float
    noise_std: float

    @classmethod
    def sample(cls, rng: np.random.Generator) -> SiteStyle:
        def perturb(v: np.ndarray, amount: float) -> tuple[float, float, float]:
            w = np.clip(v + rng.normal(0.0, amount, 3), 0.02, None)
            return tuple(float(x) for x in w / np.linalg.norm(w))

        return cls(
            stain_h=perturb(STAIN_H, 0.08),
            stain_e=perturb(STAIN_E, 0.08),
            h_scale=float(rng.uniform(0.8, 1.2)),
            e_scale=float(rng.uniform(0.7, 1.3)),
            blur_sigma=float(rng.uniform(0.3, 1.3)),
            noise_std=float(rng.uniform(1.5, 5.0)),
        )


@dataclass(frozen=True)
class TileSpec:
    """What one tile holds: its size and the expected count of each kind of point."""

    width: int
    height: int
    n_tumor: float
    n_non_tumor: float
    n_mitosis: float
    n_apoptosis: float
    n_lumen: float
    n_non_lumen: float


def _smooth_field(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Zero-mean, unit-std smooth random field (low-pass filtered white noise)."""
    small = (max(4, int(shape[0] / sigma)), max(4, int(shape[1] / sigma)))
    f = rng.normal(size=small)
    f = ndimage.zoom(f, (shape[0] / small[0], shape[1] / small[1]), order=3)[: shape[0], : shape[1]]
    f = ndimage.gaussian_filter(f, 1.0)
    return (f - f.mean()) / (f.std() + 1e-8)


class _Canvas:
    """Stain concentration maps that nuclei are drawn into, each in a small window."""

    def __init__(self, height: int, width: int) -> None:
        self.h = np.zeros((height, width), np.float32)
        self.e = np.zeros((height, width), np.float32)

    def _window(self, cx: float, cy: float, radius: float):
        r = int(np.ceil(radius)) + 2
        x0, x1 = max(0, int(cx) - r), min(self.h.shape[1], int(cx) + r + 1)
        y0, y1 = max(0, int(cy) - r), min(self.h.shape[0], int(cy) + r + 1)
        yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
        return (slice(y0, y1), slice(x0, x1)), xx - cx, yy - cy

    def blob(
        self,
        rng: np.random.Generator,
        cx: float,
        cy: float,
        radius: float,
        density: float,
        *,
        aspect: float = 1.0,
        irregularity: float = 0.0,
        texture: float = 0.0,
        rim: float = 0.0,
        edge: float = 0.8,
    ) -> None:
        """Add one nucleus-like shape of haematoxylin.

        The outline is an ellipse (``aspect`` = major/minor) whose radius is
        modulated by random low harmonics (``irregularity``); the inside gets
        chromatin texture and, for vesicular nuclei, a denser rim.
        """
        extent = radius * max(aspect, 1.0) * (1.0 + 2 * irregularity) + 3
        win, dx, dy = self._window(cx, cy, extent)
        theta = rng.uniform(0, np.pi)
        c, s = np.cos(theta), np.sin(theta)
        u = (dx * c + dy * s) / np.sqrt(aspect)
        v = (-dx * s + dy * c) * np.sqrt(aspect)
        rho = np.hypot(u, v)
        phi = np.arctan2(v, u)
        bound = np.full_like(rho, radius)
        for k in range(2, 6):
            bound += radius * irregularity * rng.normal() / k * np.cos(k * phi + rng.uniform(0, 2 * np.pi))
        inside = special.expit((bound - rho) / edge)
        dens = density * np.ones_like(rho)
        if texture > 0:
            dens *= 1.0 + texture * ndimage.gaussian_filter(rng.normal(size=rho.shape), 1.0).astype(np.float32) * 2.5
        if rim > 0:
            dens *= 1.0 + rim * np.exp(-((rho - bound) ** 2) / 4.0)
        self.h[win] += np.clip(dens, 0, None) * inside

    def halo(self, cx: float, cy: float, radius: float, delta: float) -> None:
        """Change eosin around a point: a clear halo (negative) or an eosinophilic one."""
        win, dx, dy = self._window(cx, cy, radius * 1.5)
        w = np.exp(-(dx**2 + dy**2) / (2 * (radius * 0.8) ** 2))
        self.e[win] += delta * w


def _draw_tumor(cv: _Canvas, rng: np.random.Generator, x: float, y: float, grade: float) -> None:
    pleo = np.clip(0.5 + 0.25 * grade, 0.1, 1.2)
    radius = rng.normal(9.5, 1.5 + pleo)
    radius = float(np.clip(radius, 6, 17))
    hyper = rng.random() < 0.10 + 0.05 * max(grade, 0)
    density = rng.uniform(1.0, 1.4) if hyper else rng.uniform(0.45, 0.85)
    cv.blob(
        rng, x, y, radius, density,
        aspect=1.0 + rng.uniform(0, 0.6) * pleo,
        irregularity=rng.uniform(0.03, 0.12) * pleo,
        texture=0.55 if hyper else 0.25,
        rim=0.0 if hyper else 0.6,
    )
    for _ in range(rng.integers(0 if hyper else 1, 3)):  # nucleoli
        a = rng.uniform(0, 2 * np.pi)
        d = rng.uniform(0, radius * 0.4)
        cv.blob(rng, x + d * np.cos(a), y + d * np.sin(a), rng.uniform(1.2, 2.2), rng.uniform(0.6, 1.0))


def _draw_non_tumor(cv: _Canvas, rng: np.random.Generator, x: float, y: float) -> None:
    kind = rng.random()
    if kind < 0.25:  # plasma cell / activated lymphocyte / endothelium: larger, paler, close to a small tumour nucleus
        cv.blob(rng, x, y, rng.uniform(6.0, 8.5), rng.uniform(0.6, 0.95), aspect=rng.uniform(1.0, 1.6),
                irregularity=0.05, texture=0.25, rim=0.3)
    elif kind < 0.65:  # lymphocyte
        cv.blob(rng, x, y, rng.uniform(4.5, 6.5), rng.uniform(1.0, 1.45), aspect=rng.uniform(1.0, 1.2),
                irregularity=0.03, texture=0.1)
    else:  # fibroblast / endothelial spindle
        cv.blob(rng, x, y, rng.uniform(4.0, 5.5), rng.uniform(0.7, 1.05), aspect=rng.uniform(2.5, 4.5),
                irregularity=0.05, texture=0.15)


def _draw_mitosis(cv: _Canvas, rng: np.random.Generator, x: float, y: float) -> None:
    cv.halo(x, y, 14.0, -0.18)
    phase = rng.choice(["metaphase", "anaphase", "prophase"], p=[0.4, 0.2, 0.4])
    if phase == "prophase":  # still round, but chromatin clumped and dark: the hard case
        cv.blob(rng, x, y, rng.uniform(8, 11), rng.uniform(0.9, 1.3), irregularity=0.12, texture=0.6)
        for _ in range(rng.integers(4, 9)):
            a, d = rng.uniform(0, 2 * np.pi), rng.uniform(0, 7)
            cv.blob(rng, x + d * np.cos(a), y + d * np.sin(a), rng.uniform(1.5, 2.8), rng.uniform(0.6, 1.0))
        return
    angle = rng.uniform(0, np.pi)
    length = rng.uniform(9, 15)
    offsets = [0.0] if phase == "metaphase" else [-rng.uniform(5, 8), rng.uniform(5, 8)]
    for off in offsets:
        for _ in range(rng.integers(5, 11)):
            t = rng.uniform(-length / 2, length / 2)
            jitter = rng.normal(0, 1.5)
            px = x + t * np.cos(angle) + (off + jitter) * -np.sin(angle)
            py = y + t * np.sin(angle) + (off + jitter) * np.cos(angle)
            cv.blob(rng, px, py, rng.uniform(1.8, 3.5), rng.uniform(1.3, 2.0), aspect=rng.uniform(1, 2),
                    irregularity=0.2)


def _draw_apoptosis(cv: _Canvas, rng: np.random.Generator, x: float, y: float) -> None:
    cv.halo(x, y, 9.0, 0.35)
    if rng.random() < 0.6:  # pyknosis
        cv.blob(rng, x, y, rng.uniform(3.5, 5.5), rng.uniform(1.6, 2.2), irregularity=0.03)
    else:  # karyorrhexis
        for _ in range(rng.integers(2, 5)):
            a, d = rng.uniform(0, 2 * np.pi), rng.uniform(1, 5)
            cv.blob(rng, x + d * np.cos(a), y + d * np.sin(a), rng.uniform(1.5, 3.0), rng.uniform(1.5, 2.1))


def _place(rng: np.random.Generator, n: int, centres: np.ndarray, spread: float, w: int, h: int,
           taken: list[np.ndarray], min_dist: float) -> np.ndarray:
    """Up to ``n`` points scattered around ``centres``, at least ``min_dist`` from every point so far."""
    out: list[np.ndarray] = []
    existing = np.concatenate(taken) if taken else np.zeros((0, 2))
    tries = 0
    while len(out) < n and tries < n * 30:
        tries += 1
        c = centres[rng.integers(len(centres))]
        p = c + rng.normal(0, spread, 2)
        if not (0 <= p[0] < w and 0 <= p[1] < h):
            continue
        pool = np.concatenate([existing, np.array(out)]) if out else existing
        if len(pool) and np.min(np.hypot(*(pool - p).T)) < min_dist:
            continue
        out.append(p)
    return np.array(out).reshape(-1, 2)


def render_tile(
    rng: np.random.Generator, spec: TileSpec, style: SiteStyle, grade: float
) -> tuple[np.ndarray, dict[str, list[dict[str, float]]]]:
    """Render one H&E tile and its ground truth.

    Returns
    -------
    image
        ``(height, width, 3)`` uint8 RGB.
    points
        The seven BreCaHAD keys, in order, each a list of ``{"x", "y"}``
        centres normalised to [0, 1]. ``non_mitosis`` is always empty, as in
        the real data set.
    """
    w, h = spec.width, spec.height
    cv = _Canvas(h, w)
    # Tissue: stroma/cytoplasm eosin plus faint background haematoxylin.
    cv.e += (0.32 + 0.12 * _smooth_field(rng, (h, w), 40.0)).astype(np.float32)
    cv.h += (0.06 + 0.02 * _smooth_field(rng, (h, w), 15.0)).astype(np.float32)

    n_nests = max(1, int(rng.poisson(2 + w * h / 400_000)))
    nests = np.column_stack([rng.uniform(0.1, 0.9, n_nests) * w, rng.uniform(0.1, 0.9, n_nests) * h])
    counts = {k: int(rng.poisson(getattr(spec, f"n_{k}"))) for k in ("tumor", "non_tumor", "mitosis", "apoptosis",
                                                                     "lumen", "non_lumen")}
    counts["mitosis"] = int(rng.poisson(spec.n_mitosis * np.exp(0.8 * grade - 0.32)))

    # Lumens first: bright holes inside nests, nuclei are kept out of them.
    lumen_pts = _place(rng, counts["lumen"], nests, 60.0, w, h, [], 60.0)
    yy, xx = np.mgrid[0:h, 0:w]
    hole = np.zeros((h, w), np.float32)
    for lx, ly in lumen_pts:
        a, b = rng.uniform(14, 30), rng.uniform(10, 22)
        hole = np.maximum(hole, special.expit((1.0 - ((xx - lx) / a) ** 2 - ((yy - ly) / b) ** 2) * 6))
    taken = [lumen_pts]
    tumour_like = _place(rng, counts["tumor"] + counts["mitosis"] + counts["apoptosis"], nests, 70.0 + 0.08 * w,
                         w, h, taken, 17.0)
    order = rng.permutation(len(tumour_like))
    n_mit = min(counts["mitosis"], len(order))
    n_apo = min(counts["apoptosis"], len(order) - n_mit)
    mit_pts = tumour_like[order[:n_mit]]
    apo_pts = tumour_like[order[n_mit : n_mit + n_apo]]
    tum_pts = tumour_like[order[n_mit + n_apo :]]
    taken.append(tumour_like)
    stroma = np.column_stack([rng.uniform(0, w, 8), rng.uniform(0, h, 8)])
    non_pts = _place(rng, counts["non_tumor"], stroma, 0.25 * max(w, h), w, h, taken, 13.0)
    taken.append(non_pts)
    non_lumen_pts = _place(rng, counts["non_lumen"], nests, 50.0, w, h, taken, 25.0)

    for x, y in tum_pts:
        _draw_tumor(cv, rng, x, y, grade)
    for x, y in non_pts:
        _draw_non_tumor(cv, rng, x, y)
    for x, y in mit_pts:
        _draw_mitosis(cv, rng, x, y)
    for x, y in apo_pts:
        _draw_apoptosis(cv, rng, x, y)
    # Unannotated out-of-focus nuclei: clutter every patch has in real tissue.
    for _ in range(int(rng.poisson(w * h / 30_000))):
        cv.blob(rng, rng.uniform(0, w), rng.uniform(0, h), rng.uniform(4, 9), rng.uniform(0.2, 0.45), edge=2.0)

    keep = 1.0 - 0.92 * hole
    H = np.clip(cv.h * keep * style.h_scale, 0, 4)
    E = np.clip(cv.e * keep * style.e_scale, 0, 3)
    od = H[..., None] * np.array(style.stain_h, np.float32) + E[..., None] * np.array(style.stain_e, np.float32)
    rgb = 250.0 * np.exp(-od)
    if style.blur_sigma > 0:
        rgb = ndimage.gaussian_filter(rgb, (style.blur_sigma, style.blur_sigma, 0))
    rgb += rng.normal(0, style.noise_std, rgb.shape)
    image = np.clip(rgb, 0, 255).astype(np.uint8)

    # Annotator disagreement: a few tumour / non-tumour calls go the other way, as between real pathologists.
    flip_t = rng.random(len(tum_pts)) < ANNOTATION_NOISE
    flip_n = rng.random(len(non_pts)) < ANNOTATION_NOISE
    tum_pts, non_pts = (np.concatenate([tum_pts[~flip_t], non_pts[flip_n]]),
                        np.concatenate([non_pts[~flip_n], tum_pts[flip_t]]))

    def norm(pts: np.ndarray) -> list[dict[str, float]]:
        return [{"x": round(float(px) / w, 6), "y": round(float(py) / h, 6)} for px, py in pts]

    points = {
        "mitosis": norm(mit_pts),
        "non_mitosis": [],
        "apoptosis": norm(apo_pts),
        "tumor": norm(tum_pts),
        "non_tumor": norm(non_pts),
        "lumen": norm(lumen_pts),
        "non_lumen": norm(non_lumen_pts),
    }
    return image, points
