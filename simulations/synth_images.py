"""Synthetic H&E tiles of invasive breast carcinoma with BreCaHAD-style point annotations.

The model behind a tile, top to bottom:

* **Optical density (Beer-Lambert).** A tile is rendered from two stain
  concentration maps, haematoxylin ``H`` (nuclei, blue-purple) and eosin ``E``
  (cytoplasm and stroma, pink), as ``RGB = 250 * exp(-(H * v_H + E * v_E))``.
  ``v_H`` and ``v_E`` are the Ruifrok-Johnston stain vectors, perturbed per
  site: each hospital's stain batch, staining time and scanner give it its own
  hue, intensity, blur, noise and JPEG quality (``SiteStyle``).
* **Architecture.** Tumour grows in nests (high ground of a smooth random
  field) and cords (its level lines) inside collagenous stroma, whose wavy
  fibre texture follows a smooth orientation field. Tumour cells sit on a
  jittered grid, packed so their nuclei touch and sometimes overlap; their
  cytoplasm borders are the edges of the cells' Voronoi tessellation. Nests
  hold gland lumens and are parted from the stroma by retraction clefts.
  Fibroblasts lie along the fibres; lymphocytes gather in clusters at the
  tumour's edge, scatter through the stroma and infiltrate nests. Some tiles
  reach the tissue's edge: fat or bare glass beyond a smooth boundary.
* **Nuclei by class**, all drawn by one vectorised renderer (``_stamp``: an
  ellipse with a harmonic outline, chromatin texture, rim and nucleoli),
  told apart by morphology more than by darkness:
  - ``tumor``: large (20-28 px across at grade 0, larger and more variable
    with grade), vesicular chromatin with a membrane rim and nucleoli. A
    share that grows with grade is hyperchromatic (as dark as a mitosis, but
    smooth and membrane-bound), and some are cut tangentially (small, dark,
    featureless).
  - ``non_tumor``: lymphocytes (small, round, dense; some activated, larger
    and paler), fibroblasts (thin spindles along the fibres), plasma cells,
    histiocytes (pale, oval or kidney-shaped, the size of a small tumour
    nucleus), endothelial nuclei round capillaries with red cells, and flat
    myoepithelial nuclei on the rim of nests still in situ. Annotators mark
    those in the tumour's field more often than those deep in stroma.
  - ``mitosis``: no membrane; condensed chromosomes with hairy, irregular
    outlines as a metaphase band, an anaphase pair, or clumped prophase or
    prometaphase chromatin, in a rounded, clearer cell.
  - ``apoptosis``: a shrunken, very dark, smooth round body (pyknosis) or its
    fragments (karyorrhexis) in eosinophilic cytoplasm with a retraction halo.
    Unannotated apoptotic bodies, perinuclear halos round ordinary tumour
    cells and lymphocytes in nests keep every cue of the mitoses shared with
    a look-alike of the same darkness and size.
* **Annotation.** Annotated points are a subset of the nuclei drawn (a patch
  round one holds several others, annotated or not). About 3 % of tumour and
  non-tumour points carry the other label, as pathologists disagree on
  borderline nuclei.
* **Patient latent grade.** Each patient has a grade ``z`` (standard normal,
  site-shifted) that scales the mitotic rate, nuclear size, pleomorphism,
  nucleoli and hyperchromasia; the EHR generator uses the same ``z`` for some
  lab values, so the record carries real but partial signal about the patches.

Pixel scale is that of BreCaHAD (0.25 um/px; tumour nuclei about 20-28 px
across), so a 64 px patch holds a nucleus and its neighbours whatever the
tile size.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import ndimage, special

# Ruifrok & Johnston (2001) optical density vectors for H and E.
STAIN_H = np.array([0.650, 0.704, 0.286])
STAIN_E = np.array([0.072, 0.990, 0.105])

ANNOTATION_NOISE = 0.03  # share of tumour / non-tumour points labelled as the other class
CELL_SPACING = 30.0  # px between tumour cell centres at grade 0 (nuclei 20-28 px: they touch)


@dataclass(frozen=True)
class SiteStyle:
    """How one hospital's slides look: stain colour and intensity, scanner blur, noise and compression."""

    stain_h: tuple[float, float, float]
    stain_e: tuple[float, float, float]
    h_scale: float
    e_scale: float
    blur_sigma: float
    noise_std: float
    jpeg_quality: int = 95  # the scanner's compression, applied once to the whole tile

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
            blur_sigma=float(rng.uniform(0.3, 1.1)),
            noise_std=float(rng.uniform(1.5, 5.0)),
            jpeg_quality=int(rng.integers(70, 96)),
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
    """Zero-mean, unit-std smooth random field (low-pass filtered white noise).

    Cubic interpolation of a coarse noise grid to a quarter of ``shape``, then
    linear doubling: the field is smooth at ``sigma`` and costs little at any size.
    """
    quarter = ((shape[0] + 3) // 4, (shape[1] + 3) // 4)
    small = (max(4, int(shape[0] / sigma)), max(4, int(shape[1] / sigma)))
    f = ndimage.zoom(rng.normal(size=small), (quarter[0] / small[0], quarter[1] / small[1]), order=3)
    f = _up(_up(f[: quarter[0], : quarter[1]].astype(np.float32), ((shape[0] + 1) // 2, (shape[1] + 1) // 2)), shape)
    return (f - f.mean()) / (f.std() + 1e-8)


def _up(a: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A map at half resolution doubled to ``shape``: linear for fields, nearest for masks."""
    if a.dtype == bool:
        return np.repeat(np.repeat(a, 2, 0), 2, 1)[: shape[0], : shape[1]]
    p = np.pad(a, ((0, 1), (0, 1)), mode="edge")
    out = np.empty((2 * a.shape[0], 2 * a.shape[1]), a.dtype)
    out[0::2, 0::2] = a
    out[0::2, 1::2] = (p[:-1, :-1] + p[:-1, 1:]) / 2
    out[1::2, 0::2] = (p[:-1, :-1] + p[1:, :-1]) / 2
    out[1::2, 1::2] = (p[:-1, :-1] + p[1:, :-1] + p[:-1, 1:] + p[1:, 1:]) / 4
    return out[: shape[0], : shape[1]]


# --------------------------------------------------------------------------------------------------
# Nuclei: one parameter table, one vectorised renderer.

_FIELDS = ("x", "y", "r", "aspect", "theta", "low", "hair", "density", "rim", "texture", "clump", "edge",
           "nucleoli", "nucleolus_r", "nucleolus_d")


def _nuclei(n: int, **columns) -> dict[str, np.ndarray]:
    """A table of ``n`` nuclei; a scalar column is broadcast, an unnamed one takes its neutral value."""
    neutral = {"aspect": 1.0, "theta": 0.0, "low": 0.0, "hair": 0.0, "rim": 0.0, "texture": 0.0, "clump": 0.0,
               "edge": 0.8, "nucleoli": 0, "nucleolus_r": 2.0, "nucleolus_d": 0.0}
    out = {}
    for f in _FIELDS:
        v = columns.pop(f, neutral.get(f))
        if v is None:
            raise ValueError(f"nucleus column {f!r} has no value")
        out[f] = np.broadcast_to(np.asarray(v, np.float32), (n,)).copy()
    if columns:
        raise ValueError(f"unknown nucleus column(s) {sorted(columns)}")
    return out


def _join(tables: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {f: np.concatenate([t[f] for t in tables]) for f in _FIELDS}


def _stamp(rng: np.random.Generator, t: dict[str, np.ndarray], size: int) -> np.ndarray:
    """``(n, size, size)`` haematoxylin of the nuclei in ``t``, each centred (sub-pixel) in its own window.

    The outline is an ellipse (``aspect`` = major/minor, area kept) whose radius
    is modulated by low harmonics (``low``: pleomorphism) and high ones
    (``hair``: the ragged edge of condensed chromosomes). Inside, chromatin
    texture is multiplicative noise (``texture``: fine granules; ``clump``:
    log-normal clumps), ``rim`` thickens the nuclear membrane and up to two
    nucleoli sit off centre.
    """
    n = len(t["x"])
    off = np.arange(size, dtype=np.float32) - size // 2
    fx = (t["x"] - np.floor(t["x"]))[:, None, None]
    fy = (t["y"] - np.floor(t["y"]))[:, None, None]
    dx = off[None, None, :] - fx
    dy = off[None, :, None] - fy
    c, s = np.cos(t["theta"])[:, None, None], np.sin(t["theta"])[:, None, None]
    sa = np.sqrt(t["aspect"])[:, None, None]
    u = (dx * c + dy * s) / sa
    v = (-dx * s + dy * c) * sa
    rho = np.hypot(u, v)
    phi = np.arctan2(v, u)
    r = t["r"][:, None, None]
    shape = np.ones_like(rho)
    for k, scale in ((2, 1.0), (3, 0.6), (4, 0.4), (5, 0.3)):
        amp = (t["low"] * scale * rng.normal(size=n).astype(np.float32))[:, None, None]
        shape += amp * np.cos(k * phi + rng.uniform(0, 2 * np.pi, (n, 1, 1)).astype(np.float32))
    for k in (7, 9, 11, 14):
        amp = (t["hair"] * rng.uniform(0.3, 1.0, n).astype(np.float32))[:, None, None]
        shape += amp * np.cos(k * phi + rng.uniform(0, 2 * np.pi, (n, 1, 1)).astype(np.float32))
    bound = r * shape
    inside = special.expit((bound - rho) / t["edge"][:, None, None])
    dens = np.broadcast_to(t["density"][:, None, None], rho.shape).copy()
    if (t["texture"] > 0).any() or (t["clump"] > 0).any():
        grain, clumps = _texture(rng, n, size)
        dens *= np.clip(1.0 + t["texture"][:, None, None] * grain, 0.1, None)
        ck = t["clump"][:, None, None]
        dens *= np.exp(ck * clumps - ck**2 / 2)
    dens *= 1.0 + t["rim"][:, None, None] * np.exp(-((rho - bound) ** 2) / 3.0)
    h = dens * inside
    for j in range(2):
        present = (t["nucleoli"] > j) & (t["nucleolus_d"] > 0)
        if not present.any():
            continue
        a = rng.uniform(0, 2 * np.pi, n).astype(np.float32)
        d = (rng.uniform(0.0, 0.45, n) * t["r"]).astype(np.float32)
        nx = (np.cos(a) * d)[:, None, None]
        ny = (np.sin(a) * d)[:, None, None]
        dist = np.hypot(dx - nx, dy - ny)
        h += (present * t["nucleolus_d"])[:, None, None] * special.expit((t["nucleolus_r"][:, None, None] - dist) / 0.6)
    return h


def _texture(rng: np.random.Generator, n: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Fine grain and coarse clumps (unit std) for ``n`` windows, cut at random from one small noise bank."""
    bank = rng.standard_normal((2, 8, 96, 96), dtype=np.float32)
    bank[0] = ndimage.gaussian_filter(bank[0], (0, 0.9, 0.9), mode="wrap")
    bank[1] = ndimage.gaussian_filter(bank[1], (0, 1.6, 1.6), mode="wrap")
    bank /= bank.std(axis=(1, 2, 3), keepdims=True) + 1e-6
    k = rng.integers(0, 8, n)[:, None, None]
    oy = rng.integers(0, 96, n)[:, None, None]
    ox = rng.integers(0, 96, n)[:, None, None]
    iy, ix = np.mgrid[0:size, 0:size]
    flat = k * 96 * 96 + ((oy + iy[None]) % 96) * 96 + (ox + ix[None]) % 96
    return bank[0].ravel()[flat], bank[1].ravel()[flat]


def _accumulate(canvas: np.ndarray, x: np.ndarray, y: np.ndarray, stamps: np.ndarray) -> None:
    """Add ``stamps`` (``(n, S, S)``) into ``canvas`` centred at ``(x, y)``, clipped at its edges (in place)."""
    if not len(stamps):
        return
    hgt, wid = canvas.shape
    size = stamps.shape[1]
    half = size // 2
    pad = np.zeros((hgt + 2 * size, wid + 2 * size), np.float64)
    x0 = np.floor(x).astype(np.int64) - half + size
    y0 = np.floor(y).astype(np.int64) - half + size
    inside = (x0 >= 0) & (y0 >= 0) & (x0 + size <= pad.shape[1]) & (y0 + size <= pad.shape[0])
    x0, y0, stamps = x0[inside], y0[inside], stamps[inside]  # a window wholly off the tile adds nothing
    iy, ix = np.mgrid[0:size, 0:size]
    idx = (y0[:, None, None] + iy[None]) * pad.shape[1] + (x0[:, None, None] + ix[None])
    pad.ravel()[:] = np.bincount(idx.ravel(), weights=stamps.ravel().astype(np.float64), minlength=pad.size)
    canvas += pad[size : size + hgt, size : size + wid].astype(np.float32)


def _draw(rng: np.random.Generator, canvas: np.ndarray, table: dict[str, np.ndarray]) -> None:
    """Render a nucleus table into ``canvas``: grouped by window size, so small nuclei get small windows."""
    extent = table["r"] * np.sqrt(np.maximum(table["aspect"], 1.0)) * (1.0 + 2.2 * table["low"] + 1.6 * table["hair"])
    sizes = 2 * np.ceil(extent + 3 * table["edge"] + 2).astype(int) + 1
    lower = 0
    for size in (17, 25, 33, 45, 61, 81):
        pick = np.flatnonzero((sizes > lower) & ((sizes <= size) | (size == 81)))  # the largest are clipped
        lower = size
        for chunk in np.array_split(pick, max(1, int(np.ceil(len(pick) * size * size / 2e6)))):
            if len(chunk):
                sub = {f: v[chunk] for f, v in table.items()}
                _accumulate(canvas, sub["x"], sub["y"], _stamp(rng, sub, size))


def _halo(canvas: np.ndarray, x: np.ndarray, y: np.ndarray, radius: np.ndarray, delta: np.ndarray) -> None:
    """Add a Gaussian of peak ``delta`` and width ``radius`` at each point (eosin: halos and clearing)."""
    if not len(x):
        return
    size = 2 * int(np.ceil(2.5 * radius.max())) + 1
    off = np.arange(size, dtype=np.float32) - size // 2
    dx = off[None, None, :] - (x - np.floor(x))[:, None, None]
    dy = off[None, :, None] - (y - np.floor(y))[:, None, None]
    g = np.exp(-(dx**2 + dy**2) / (2 * radius[:, None, None] ** 2)) * delta[:, None, None]
    _accumulate(canvas, x, y, g.astype(np.float32))


# --------------------------------------------------------------------------------------------------
# Nuclei of each kind, as parameter tables.


def _tumour_nuclei(rng: np.random.Generator, x: np.ndarray, y: np.ndarray, grade: float) -> dict[str, np.ndarray]:
    """Carcinoma nuclei, and among them the look-alikes of a mitosis. Grade shifts them all.

    Most are vesicular with a membrane rim and nucleoli. The rest are what a
    pathologist must tell from a mitotic figure: hyperchromatic nuclei (as
    dark, but smooth and membrane-bound), crushed or folded hyperchromatic
    nuclei (dark, elongated, a ragged edge, but homogeneous and membrane-bound),
    nuclei with coarse clumped chromatin (like prophase, but with nucleoli and
    a rim) and tangential cuts (small, dark, featureless).
    """
    n = len(x)
    pleo = float(np.clip(0.55 + 0.25 * grade, 0.15, 1.2))
    r = np.clip(rng.normal(11.5 + 0.9 * grade, 1.0 + 1.0 * pleo, n), 7.5, 17.0)
    kind = np.searchsorted(np.cumsum([np.clip(0.14 + 0.06 * grade, 0.05, 0.3),  # hyperchromatic
                                      np.clip(0.04 + 0.02 * grade, 0.01, 0.1),  # crushed / folded
                                      np.clip(0.08 + 0.04 * grade, 0.02, 0.2),  # coarse chromatin
                                      0.08]),  # tangential
                           rng.random(n))
    hyper, crushed, coarse, tangential = (kind == k for k in range(4))
    dark = hyper | crushed | tangential
    density = np.select([hyper, crushed, coarse, tangential],
                        [rng.uniform(1.0, 1.6, n), rng.uniform(1.1, 1.6, n), rng.uniform(0.7, 1.1, n),
                         rng.uniform(0.8, 1.3, n)], rng.uniform(0.35, 0.7, n))
    r = np.select([tangential, crushed], [r * rng.uniform(0.5, 0.75, n), r * rng.uniform(0.6, 0.8, n)], r)
    aspect = np.where(crushed, rng.uniform(2.0, 3.5, n), 1.0 + rng.gamma(2.0, 0.06 + 0.1 * pleo, n))
    nucleoli = np.where(dark, 0, rng.integers(1, 3, n) * (rng.random(n) < 0.55 + 0.2 * pleo))
    return _nuclei(
        n, x=x, y=y, r=r, aspect=aspect, theta=rng.uniform(0, np.pi, n),
        low=np.where(crushed, rng.uniform(0.08, 0.15, n), rng.uniform(0.02, 0.05 + 0.08 * pleo, n)),
        hair=np.where(crushed, rng.uniform(0.04, 0.09, n), np.where(coarse, rng.uniform(0.0, 0.05, n), 0.0)),
        density=density,
        rim=np.select([hyper | crushed, tangential], [0.3, 0.0], rng.uniform(0.6, 1.1, n)),
        texture=np.where(dark, 0.25, 0.45), clump=np.select([dark, coarse], [0.2, 0.8], 0.3 + 0.15 * pleo),
        edge=np.where(tangential, 1.6, 0.7), nucleoli=nucleoli,
        nucleolus_r=rng.uniform(1.6, 2.4 + 1.2 * pleo, n), nucleolus_d=rng.uniform(0.5, 0.9, n),
    )


def _lymphocytes(rng: np.random.Generator, x: np.ndarray, y: np.ndarray) -> dict[str, np.ndarray]:
    """Small, round, dense lymphocytes; some activated (larger, paler, a nucleolus), as a small tumour nucleus."""
    n = len(x)
    active = rng.random(n) < 0.15
    return _nuclei(n, x=x, y=y, r=np.where(active, rng.uniform(7.0, 8.5, n), rng.uniform(5.0, 7.0, n)),
                   aspect=rng.uniform(1.0, 1.25, n), theta=rng.uniform(0, np.pi, n), low=rng.uniform(0.01, 0.05, n),
                   density=np.where(active, rng.uniform(0.6, 0.95, n), rng.uniform(1.1, 1.7, n)), texture=0.2,
                   clump=0.25, rim=np.where(active, 0.5, 0.2), edge=0.6, nucleoli=active.astype(int),
                   nucleolus_r=1.8, nucleolus_d=0.5)


def _histiocytes(rng: np.random.Generator, x: np.ndarray, y: np.ndarray) -> dict[str, np.ndarray]:
    """Macrophages: oval or kidney-shaped, pale, finely granular nuclei, about a small tumour nucleus in size."""
    n = len(x)
    return _nuclei(n, x=x, y=y, r=rng.uniform(7.5, 10.0, n), aspect=rng.uniform(1.3, 1.9, n),
                   theta=rng.uniform(0, np.pi, n), low=rng.uniform(0.1, 0.18, n), density=rng.uniform(0.35, 0.6, n),
                   texture=0.35, clump=0.2, rim=0.5, edge=0.7, nucleoli=(rng.random(n) < 0.3).astype(int),
                   nucleolus_r=1.5, nucleolus_d=0.4)


def _plasma_cells(rng: np.random.Generator, x: np.ndarray, y: np.ndarray) -> dict[str, np.ndarray]:
    n = len(x)
    return _nuclei(n, x=x, y=y, r=rng.uniform(6.0, 8.0, n), aspect=rng.uniform(1.0, 1.3, n),
                   theta=rng.uniform(0, np.pi, n), low=0.03, density=rng.uniform(0.7, 1.1, n),
                   texture=0.2, clump=0.6, rim=0.9, edge=0.6)


def _spindles(rng: np.random.Generator, x: np.ndarray, y: np.ndarray, theta: np.ndarray,
              plump: bool = False) -> dict[str, np.ndarray]:
    """Fibroblasts (thin, along the fibres) or endothelial nuclei (``plump``)."""
    n = len(x)
    aspect = rng.uniform(2.5, 4.0, n) if plump else rng.uniform(5.0, 9.0, n)
    return _nuclei(n, x=x, y=y, r=rng.uniform(6.0, 8.0, n) if plump else rng.uniform(5.5, 7.0, n), aspect=aspect,
                   theta=theta + rng.normal(0, 0.15, n), low=rng.uniform(0.02, 0.06, n),
                   density=rng.uniform(0.55, 1.0, n), texture=0.2, clump=0.2, edge=0.6)


def _mitoses(rng: np.random.Generator, x: np.ndarray, y: np.ndarray) -> dict[str, np.ndarray]:
    """Mitotic figures: no membrane, no nucleoli, hairy outlines, several phases; returns every part drawn."""
    parts = []
    phase = rng.choice(4, len(x), p=[0.35, 0.15, 0.3, 0.2])  # metaphase, anaphase, prophase, prometaphase
    for px, py, ph in zip(x, y, phase):
        theta = rng.uniform(0, np.pi)
        dens = rng.uniform(0.95, 1.6)
        if ph < 2:  # condensed chromosomes are the densest chromatin on the slide
            dens *= 1.15
        if ph == 0:  # metaphase: a dense band seen side on, chromosome arms sticking out
            parts.append(_nuclei(1, x=px, y=py, r=rng.uniform(5.5, 7.0), aspect=rng.uniform(3.0, 5.0), theta=theta,
                                 low=0.06, hair=rng.uniform(0.12, 0.2), density=dens, clump=0.5, texture=0.3))
        elif ph == 1:  # anaphase: two bands pulled apart
            gap = rng.uniform(5.0, 9.0)
            for sign in (-1, 1):
                parts.append(_nuclei(1, x=px - sign * gap * np.sin(theta), y=py + sign * gap * np.cos(theta),
                                     r=rng.uniform(4.5, 6.0), aspect=rng.uniform(2.5, 4.0), theta=theta, low=0.08,
                                     hair=rng.uniform(0.12, 0.2), density=dens, clump=0.5, texture=0.3))
        elif ph == 2:  # prophase: still round, chromatin condensed into coarse threads and clumps
            parts.append(_nuclei(1, x=px, y=py, r=rng.uniform(9.0, 12.0), aspect=rng.uniform(1.0, 1.3), theta=theta,
                                 low=0.06, hair=rng.uniform(0.06, 0.1), density=dens * 0.85, clump=1.0,
                                 texture=0.5))
        else:  # prometaphase: an irregular mass of chromosomes, ragged all round
            parts.append(_nuclei(1, x=px, y=py, r=rng.uniform(7.0, 9.5), aspect=rng.uniform(1.2, 2.0), theta=theta,
                                 low=0.15, hair=rng.uniform(0.15, 0.25), density=dens, clump=0.7, texture=0.3))
    if not parts:
        return _nuclei(0, x=0, y=0, r=1, density=0)
    out = _join(parts)
    out["edge"] = rng.uniform(0.5, 1.3, len(out["x"])).astype(np.float32)  # a figure in or a little out of focus
    return out


def _apoptotic_bodies(rng: np.random.Generator, x: np.ndarray, y: np.ndarray) -> dict[str, np.ndarray]:
    """Pyknotic nuclei (one dense, smooth, round body) or karyorrhectic fragments."""
    parts = []
    for px, py in zip(x, y):
        if rng.random() < 0.6:
            parts.append(_nuclei(1, x=px, y=py, r=rng.uniform(4.5, 7.5), aspect=rng.uniform(1.0, 1.2),
                                 theta=rng.uniform(0, np.pi), low=0.02, density=rng.uniform(1.5, 2.1), edge=0.5))
        else:
            k = int(rng.integers(2, 6))
            a, d = rng.uniform(0, 2 * np.pi, k), rng.uniform(2.0, 7.0, k)
            parts.append(_nuclei(k, x=px + d * np.cos(a), y=py + d * np.sin(a), r=rng.uniform(2.0, 3.8, k),
                                 low=0.03, density=rng.uniform(1.5, 2.1, k), edge=0.5))
    return _join(parts) if parts else _nuclei(0, x=0, y=0, r=1, density=0)


# --------------------------------------------------------------------------------------------------
# Architecture.


def _jittered_grid(rng: np.random.Generator, w: int, h: int, spacing: float, jitter: float) -> np.ndarray:
    gx, gy = np.meshgrid(np.arange(spacing / 2, w, spacing), np.arange(spacing / 2, h, spacing * 0.866))
    gx = gx + (np.arange(gx.shape[0])[:, None] % 2) * spacing / 2  # hexagonal rows
    pts = np.column_stack([gx.ravel(), gy.ravel()]) + rng.uniform(-jitter, jitter, (gx.size, 2)) * spacing
    return pts[(pts[:, 0] >= 0) & (pts[:, 0] < w) & (pts[:, 1] >= 0) & (pts[:, 1] < h)]


def _at(mask: np.ndarray, pts: np.ndarray, scale: int = 1) -> np.ndarray:
    """Values of a (possibly half-resolution) map at pixel points."""
    iy = np.clip((pts[:, 1] / scale).astype(int), 0, mask.shape[0] - 1)
    ix = np.clip((pts[:, 0] / scale).astype(int), 0, mask.shape[1] - 1)
    return mask[iy, ix]


def _on_tissue(pts: np.ndarray, w: int, h: int, tissue: np.ndarray, hole: np.ndarray) -> np.ndarray:
    """Which points lie on the ``w`` x ``h`` tile, on tissue and outside lumens (maps at half resolution)."""
    on = (pts[:, 0] >= 0) & (pts[:, 0] < w) & (pts[:, 1] >= 0) & (pts[:, 1] < h)
    return on & _at(tissue, pts, 2) & (_at(hole, pts, 2) < 0.2)


def _fibres(rng: np.random.Generator, shape: tuple[int, int], theta: np.ndarray) -> np.ndarray:
    """Wavy collagen bundles at ``shape`` (half resolution), in [-1, 1]: noise smeared along ``theta``.

    Noise is smeared along four directions and
    the four results blended by how close each is to the local orientation, so
    bundles bend with ``theta``.
    """
    small = shape
    noise = ndimage.gaussian_filter(rng.standard_normal(small, dtype=np.float32), 0.8)
    th = theta
    steps = np.arange(-8, 9)
    out = np.zeros(small, np.float32)
    total = np.zeros(small, np.float32)
    for ang in np.arange(4) * np.pi / 4:
        if ang in (0.0, np.pi / 2):
            line = ndimage.uniform_filter1d(noise, len(steps), axis=1 if ang == 0.0 else 0, mode="wrap")
        else:
            dx, dy = np.round(np.cos(ang) * steps).astype(int), np.round(np.sin(ang) * steps).astype(int)
            line = sum(np.roll(noise, (int(b), int(a)), axis=(0, 1)) for a, b in zip(dx, dy)) / len(steps)
        weight = np.cos(th - ang) ** 6
        out += weight * line
        total += weight
    out /= total + 1e-6
    return np.tanh(1.5 * out / (out.std() + 1e-6))


def _voronoi(seeds: np.ndarray, shape: tuple[int, int], scale: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Index of the nearest seed for every pixel of a ``scale``-reduced grid (-1 without seeds), and its distance (px)."""
    small = (int(np.ceil(shape[0] / scale)), int(np.ceil(shape[1] / scale)))
    if not len(seeds):
        return np.full(small, -1), np.full(small, np.inf)
    marks = np.full(small, -1, np.int64)
    iy = np.clip((seeds[:, 1] / scale).astype(int), 0, small[0] - 1)
    ix = np.clip((seeds[:, 0] / scale).astype(int), 0, small[1] - 1)
    marks[iy, ix] = np.arange(len(seeds))
    dist, (ny, nx) = ndimage.distance_transform_edt(marks < 0, return_indices=True)
    return marks[ny, nx], dist * scale


def _choose(rng: np.random.Generator, n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``k`` of ``n`` indices at random (fewer if there are fewer), and the rest."""
    order = rng.permutation(n)
    k = min(k, n)
    return order[:k], order[k:]


def _regions(rng: np.random.Generator, w: int, h: int, half: tuple[int, int], n_lumens: int):
    """The tile's regions at half resolution: tissue (or glass and fat beyond its edge), tumour nests and cords,
    lumens (centre, axes, angle) and their opening, and the stroma's fibre direction."""
    tissue = np.ones(half, bool)
    fat = rng.random() < 0.5
    if rng.random() < 0.3:  # the tissue's edge crosses this tile
        ang = rng.uniform(0, 2 * np.pi)
        yy, xx = np.mgrid[0 : half[0], 0 : half[1]].astype(np.float32)
        ramp = (xx - half[1] / 2) * np.cos(ang) + (yy - half[0] / 2) * np.sin(ang)
        ramp = ramp / (0.5 * max(half)) + 0.15 * _smooth_field(rng, half, 25.0)
        tissue = ramp < rng.uniform(0.45, 0.8)
    want = rng.uniform(0.4, 0.6)
    f_nest = _smooth_field(rng, half, 45.0)
    f_cord = _smooth_field(rng, half, 40.0)
    nest_level = np.quantile(f_nest[tissue], 1 - want) if tissue.any() else np.inf
    tumour = ((f_nest > nest_level) | ((np.abs(f_cord) < 0.22) & (f_nest > nest_level - 1.0))) & tissue
    depth = ndimage.distance_transform_edt(tumour) * 2  # px from the nest's edge, full-resolution units
    lumens = []
    candidates = np.argwhere(depth > 45)
    for _ in range(n_lumens * 3):
        if len(lumens) >= n_lumens or not len(candidates):
            break
        cy, cx = (candidates[rng.integers(len(candidates))] * 2).astype(float) + 1
        if all(np.hypot(cx - lx, cy - ly) > 90 for lx, ly, *_ in lumens):
            lumens.append((cx, cy, rng.uniform(12, 30), rng.uniform(9, 20), rng.uniform(0, np.pi)))
    hole = np.zeros(half, np.float32)
    if lumens:
        yy, xx = np.mgrid[0 : half[0], 0 : half[1]].astype(np.float32) * 2
        for lx, ly, a, b, t in lumens:
            u = ((xx - lx) * np.cos(t) + (yy - ly) * np.sin(t)) / a
            v = (-(xx - lx) * np.sin(t) + (yy - ly) * np.cos(t)) / b
            hole = np.maximum(hole, special.expit((1.0 - u**2 - v**2) * 6))
    theta_field = np.pi * _smooth_field(rng, half, 60.0)

    return tissue, fat, tumour, lumens, hole, theta_field


def _tumour_cells(rng: np.random.Generator, w: int, h: int, grade: float, tissue: np.ndarray, tumour: np.ndarray,
                  hole: np.ndarray):
    """Tumour cells packed in the nests, and invading ones out in the stroma: cell centres, nucleus centres,
    each half-resolution pixel's cell (a Voronoi map), and the nest map trimmed to where cells are."""
    spacing = CELL_SPACING * float(np.clip(1.0 + 0.05 * grade, 0.9, 1.15))
    grid = _jittered_grid(rng, w, h, spacing, 0.28)
    cell_pts = grid[_at(tumour, grid, 2) & (_at(hole, grid, 2) < 0.2)]
    # Invasion: single tumour cells and small groups out in the stroma near the nests.
    near = ndimage.distance_transform_edt(~tumour) * 2
    loose = _jittered_grid(rng, w, h, 1.8 * spacing, 0.4)
    loose = loose[_at(tissue & ~tumour & (near < 150), loose, 2) & (rng.random(len(loose)) < 0.4)]
    cell_pts = np.concatenate([cell_pts, loose])
    # The nucleus sits a little off its cell's centre; cells at the lumen face keep clear of it.
    nuc_pts = cell_pts + rng.normal(0, 0.08 * spacing, cell_pts.shape)
    labels, reach = _voronoi(cell_pts, (h, w))
    # A nest is where its cells are: strips of the nest map too thin to hold a cell go back to stroma.
    tumour = (tumour & (reach < 0.7 * spacing)) | (reach < 0.45 * spacing)
    return cell_pts, nuc_pts, labels, tumour


def _stromal_cells(rng: np.random.Generator, w: int, h: int, half: tuple[int, int], tissue: np.ndarray,
                   tumour: np.ndarray, stroma: np.ndarray, depth: np.ndarray, hole: np.ndarray) -> dict:
    """The stroma's cells: fibroblasts, lymphocytes (clusters at the nests' edge, some in the nests), plasma
    cells, histiocytes, myoepithelial cells on in-situ rims, capillaries (endothelium, red cells, lumen); and
    each pixel's distance from the nests (``near``)."""
    stroma_area = stroma.sum() * 4
    fib = _jittered_grid(rng, w, h, 70.0, 0.45)
    fib = fib[_at(stroma, fib, 2) & (rng.random(len(fib)) < 0.6)]
    near = ndimage.distance_transform_edt(~tumour) * 2
    edge_band = stroma & (near < 90)
    band_pts = np.argwhere(edge_band)[:, ::-1] * 2.0
    n_clusters = int(rng.poisson(1.0 + stroma_area / 250_000)) if len(band_pts) else 0
    lymph = [np.zeros((0, 2))]
    for _ in range(n_clusters):
        centre = band_pts[rng.integers(len(band_pts))]
        m = int(rng.integers(15, 70))
        spread = rng.uniform(18, 40)
        lymph.append(centre + rng.normal(0, spread, (m, 2)))
    scattered = int(rng.poisson(stroma_area / 12_000))
    lymph.append(np.column_stack([rng.uniform(0, w, scattered * 2), rng.uniform(0, h, scattered * 2)]))
    lymph_pts = np.concatenate(lymph)
    lymph_pts = lymph_pts[_on_tissue(lymph_pts, w, h, tissue, hole)]
    # Lymphocytes do not pile on each other: thin them to a minimum spacing on a fine grid.
    keys = (lymph_pts // 9).astype(int)
    _, first = np.unique(keys[:, 0] * 100_000 + keys[:, 1], return_index=True)
    lymph_pts = lymph_pts[np.sort(first)]
    in_nest = _at(tumour, lymph_pts, 2)
    # In a nest a lymphocyte squeezes between tumour cells (kept: few) rather than replacing them.
    lymph_pts = lymph_pts[~in_nest | (rng.random(len(lymph_pts)) < 0.35)]
    n_plasma = int(rng.poisson(stroma_area / 80_000))
    plasma_pts = band_pts[rng.integers(len(band_pts), size=n_plasma)] + rng.normal(0, 10, (n_plasma, 2)) \
        if len(band_pts) and n_plasma else np.zeros((0, 2))
    n_hist = int(rng.poisson(stroma_area / 60_000))
    hist_pts = band_pts[rng.integers(len(band_pts), size=n_hist)] + rng.normal(0, 15, (n_hist, 2)) \
        if len(band_pts) and n_hist else np.zeros((0, 2))
    # Myoepithelial cells: flat nuclei along the rim of nests still in situ (some tiles have none).
    myo_pts, myo_theta = np.zeros((0, 2)), np.zeros(0)
    rim_px = np.argwhere(tumour & (depth >= 2) & (depth <= 8))
    if rng.random() < 0.5 and len(rim_px):
        gy, gx = np.gradient(depth)
        pick = rim_px[rng.choice(len(rim_px), min(len(rim_px), int(rng.poisson(len(rim_px) / 120))), replace=False)]
        myo_pts = pick[:, ::-1] * 2.0 + 1
        myo_theta = np.arctan2(gy[pick[:, 0], pick[:, 1]], gx[pick[:, 0], pick[:, 1]]) + np.pi / 2
    plasma_pts = plasma_pts[_on_tissue(plasma_pts, w, h, tissue, hole)]
    hist_pts = hist_pts[_on_tissue(hist_pts, w, h, tissue, hole)]
    vessels = int(rng.poisson(stroma_area / 150_000))
    stroma_pts = np.argwhere(stroma)[:, ::-1] * 2.0
    # Capillaries: a small lumen with red cells, its wall lined by two to four endothelial nuclei.
    endo, endo_theta, rbc = np.zeros((0, 2)), np.zeros(0), np.zeros((0, 2))
    vessel_hole = np.zeros(half, np.float32)
    if len(stroma_pts) and vessels:
        centres = stroma_pts[rng.integers(len(stroma_pts), size=vessels)]
        ring, cells = [], []
        yy, xx = np.mgrid[0 : half[0], 0 : half[1]].astype(np.float32) * 2
        for vx, vy in centres:
            rad = rng.uniform(9, 16)
            k = int(rng.integers(2, 5))
            a = rng.uniform(0, 2 * np.pi) + np.arange(k) * 2 * np.pi / k + rng.normal(0, 0.3, k)
            ring.append(np.column_stack([vx + (rad + 3) * np.cos(a), vy + (rad + 3) * np.sin(a), a + np.pi / 2]))
            m = int(rng.integers(0, 4))
            cells.append(np.column_stack([vx, vy]) + rng.normal(0, rad / 3, (m, 2)))
            vessel_hole = np.maximum(vessel_hole, special.expit((rad - np.hypot(xx - vx, yy - vy)) / 1.5))
        ring = np.concatenate(ring)
        endo, endo_theta, rbc = ring[:, :2], ring[:, 2], np.concatenate(cells)

    return {"fib": fib, "near": near, "lymph": lymph_pts, "plasma": plasma_pts, "hist": hist_pts, "myo": myo_pts,
            "myo_theta": myo_theta, "endo": endo, "endo_theta": endo_theta, "rbc": rbc, "vessel_hole": vessel_hole}


def _stain_densities(rng: np.random.Generator, w: int, h: int, half: tuple[int, int], theta_field: np.ndarray,
                     cell_pts: np.ndarray, labels: np.ndarray, special: tuple[np.ndarray, np.ndarray, np.ndarray],
                     tumour: np.ndarray, depth: np.ndarray, tissue: np.ndarray, fat: bool, hole: np.ndarray,
                     vessel_hole: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Haematoxylin and eosin densities at half resolution, before any nucleus: ``special`` holds the
    mitotic, apoptotic and unannotated apoptotic cells' indices, whose cytoplasm differs."""
    mit_idx, apo_idx, extra_apo = special
    # --- Stains. Eosin: stroma with fibres, tumour cytoplasm with cell borders, clefts, lumens, glass / fat.
    fib_tex = _fibres(rng, half, theta_field)
    # How eosinophilic the stroma and the tumour cytoplasm are varies from tumour to tumour (dense collagen or
    # loose oedematous stroma; pale or apocrine-like, eosinophilic cytoplasm), each on its own.
    e_stroma = rng.uniform(0.3, 0.48) + 0.05 * _smooth_field(rng, half, 30.0) + 0.1 * fib_tex - 0.1 * (fib_tex < -0.85)
    cell_tone = rng.normal(0.0, 0.04, len(cell_pts) + 1).astype(np.float32)
    cell_tone[mit_idx] = -0.03  # a mitotic cell rounds up and clears a little
    cell_tone[apo_idx] = 0.18  # an apoptotic cell shrinks into dense eosinophilic cytoplasm
    cell_tone[extra_apo] = 0.18
    tone = cell_tone[labels]
    border = np.zeros(half, bool)
    border[:-1] |= labels[:-1] != labels[1:]
    border[:, :-1] |= labels[:, :-1] != labels[:, 1:]
    e_cyto = rng.uniform(0.2, 0.42) + 0.04 * _smooth_field(rng, half, 20.0) + tone + 0.12 * border
    cleft = tumour & (depth < 5) & (_smooth_field(rng, half, 15.0) > 0.2)
    e_half = np.where(tumour, e_cyto, e_stroma)
    e_half = np.where(cleft, 0.05, e_half)
    glass = np.float32(0.02)
    if fat:  # adipocytes: big empty cells with thin membranes beyond the edge
        fat_seeds = _jittered_grid(rng, w, h, 140.0, 0.35)
        fl, _ = _voronoi(fat_seeds, (h, w))
        fat_border = np.zeros(half, bool)
        fat_border[:-1] |= fl[:-1] != fl[1:]
        fat_border[:, :-1] |= fl[:, :-1] != fl[:, 1:]
        glass = np.where(fat_border, 0.3, 0.02).astype(np.float32)
    e_half = np.where(tissue, e_half, glass)
    secretion = rng.uniform(0.0, 0.12)
    e_half = e_half * (1 - hole) + secretion * hole
    e_half = e_half * (1 - 0.9 * vessel_hole)
    h_half = np.where(tumour, 0.07, 0.04) + 0.015 * _smooth_field(rng, half, 10.0)
    h_half = np.where(tissue, h_half, 0.004) * (1 - 0.9 * hole)

    return h_half, e_half


def _scan(rng: np.random.Generator, H: np.ndarray, E: np.ndarray, hole: np.ndarray, style: SiteStyle) -> np.ndarray:
    """The slide as the site's scanner sees it: section thickness, stain vectors, optics, noise, JPEG."""
    h, w = H.shape
    keep = 1.0 - 0.92 * _up(hole, (h, w))
    thickness = rng.uniform(0.85, 1.15)  # section thickness and staining time vary from slide to slide
    Hs = np.clip(H * keep * (style.h_scale * thickness), 0, 4)
    Es = np.clip(E * (style.e_scale * thickness), 0, 3)
    if style.blur_sigma > 0:  # the scanner's optics: blurring the two stain maps is cheaper than three channels
        Hs = ndimage.gaussian_filter(Hs, style.blur_sigma)
        Es = ndimage.gaussian_filter(Es, style.blur_sigma)
    od = Hs[..., None] * np.array(style.stain_h, np.float32) + Es[..., None] * np.array(style.stain_e, np.float32)
    rgb = 250.0 * np.exp(-od)
    rgb += style.noise_std * rng.standard_normal(rgb.shape, dtype=np.float32)
    image = np.clip(rgb, 0, 255).astype(np.uint8)
    if style.jpeg_quality < 100:
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="JPEG", quality=style.jpeg_quality)
        image = np.asarray(Image.open(buf).convert("RGB"))

    return image


def _points(rng: np.random.Generator, w: int, h: int, counts: dict[str, int], nuc_pts: np.ndarray,
            picked: dict[str, np.ndarray], lumens: list, tumour: np.ndarray, depth: np.ndarray,
            hole: np.ndarray) -> dict[str, list[dict[str, float]]]:
    """The seven BreCaHAD keys' points, normalised to [0, 1], with the annotators' disagreement."""
    tum_idx, non_pts, mit_pts, apo_pts = picked["tumor"], picked["non_tumor"], picked["mitosis"], picked["apoptosis"]
    # Annotator disagreement: a few tumour / non-tumour calls go the other way, as between real pathologists.
    tum_pts = nuc_pts[tum_idx]
    flip_t = rng.random(len(tum_pts)) < ANNOTATION_NOISE
    flip_n = rng.random(len(non_pts)) < ANNOTATION_NOISE
    tum_pts, non_pts = (np.concatenate([tum_pts[~flip_t], non_pts[flip_n]]),
                        np.concatenate([non_pts[~flip_n], tum_pts[flip_t]]))

    lumen_pts = np.array([(lx, ly) for lx, ly, *_ in lumens]).reshape(-1, 2)
    solid = np.argwhere(tumour & (depth > 40) & (hole < 0.05))[:, ::-1] * 2.0 + 1
    non_lumen_pts = solid[rng.choice(len(solid), min(counts["non_lumen"], len(solid)), replace=False)] \
        if len(solid) else np.zeros((0, 2))

    def norm(pts: np.ndarray) -> list[dict[str, float]]:
        pts = np.clip(pts, 0, [w - 1e-3, h - 1e-3])
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
    return points


def _non_tumour_annotations(rng: np.random.Generator, n: int, other: dict) -> np.ndarray:
    """The ``n`` non-tumour cells annotators mark: those of the tumour's field (infiltrating lymphocytes, the
    stroma between nests) far more often than those deep in stroma a field away."""
    pool = np.concatenate([other[k] for k in ("lymph", "fib", "plasma", "endo", "hist", "myo")])
    weight = np.exp(-_at(other["near"], pool, 2) / 60.0)
    pick = rng.choice(len(pool), min(n, len(pool)), replace=False, p=weight / weight.sum()) if len(pool) \
        else np.zeros(0, int)
    return pool[pick]


def render_tile(
    rng: np.random.Generator, spec: TileSpec, style: SiteStyle, grade: float
) -> tuple[np.ndarray, dict[str, list[dict[str, float]]]]:
    """One H&E tile, ``(height, width, 3)`` uint8 RGB, and its ground truth: the seven BreCaHAD keys in order,
    each a list of ``{"x", "y"}`` centres normalised to [0, 1] (``non_mitosis`` always empty, as in the real data).
    """
    w, h = spec.width, spec.height
    half = ((h + 1) // 2, (w + 1) // 2)
    counts = {k: int(rng.poisson(getattr(spec, f"n_{k}"))) for k in ("tumor", "non_tumor", "apoptosis", "lumen",
                                                                     "non_lumen")}
    counts["mitosis"] = int(rng.poisson(spec.n_mitosis * np.exp(0.8 * grade - 0.32)))

    tissue, fat, tumour, lumens, hole, theta_field = _regions(rng, w, h, half, counts["lumen"])
    cell_pts, nuc_pts, labels, tumour = _tumour_cells(rng, w, h, grade, tissue, tumour, hole)
    stroma = tissue & ~tumour
    depth = ndimage.distance_transform_edt(tumour) * 2
    other = _stromal_cells(rng, w, h, half, tissue, tumour, stroma, depth, hole)
    fib, lymph_pts, plasma_pts, hist_pts, myo_pts, endo, rbc = (other[k] for k in (
        "fib", "lymph", "plasma", "hist", "myo", "endo", "rbc"))

    # --- Which cells carry an annotation, and what the special ones become.
    n_cells = len(nuc_pts)
    chosen, rest = _choose(rng, n_cells, counts["mitosis"] + counts["apoptosis"])
    mit_idx, apo_idx = chosen[: counts["mitosis"]], chosen[counts["mitosis"] :]
    ordinary = np.sort(rest)
    extra_apo = ordinary[rng.random(len(ordinary)) < 0.012]  # unannotated apoptotic bodies
    ordinary = np.setdiff1d(ordinary, extra_apo)
    tum_pick, _ = _choose(rng, len(ordinary), counts["tumor"])
    tum_idx = ordinary[tum_pick]
    mit_pts, apo_pts = nuc_pts[mit_idx], nuc_pts[apo_idx]
    non_pts = _non_tumour_annotations(rng, counts["non_tumor"], other)

    h_half, e_half = _stain_densities(rng, w, h, half, theta_field, cell_pts, labels, (mit_idx, apo_idx, extra_apo),
                                      tumour, depth, tissue, fat, hole, other["vessel_hole"])

    H = _up(h_half.astype(np.float32), (h, w))
    E = _up(e_half.astype(np.float32), (h, w))
    # Halos: mitoses and some ordinary tumour cells (fixation retraction) clear; apoptotic bodies sit in one.
    halo_idx = np.concatenate([mit_idx[rng.random(len(mit_idx)) < 0.6], apo_idx, extra_apo,
                               ordinary[rng.random(len(ordinary)) < 0.25]])
    _halo(E, nuc_pts[halo_idx, 0], nuc_pts[halo_idx, 1], rng.uniform(8, 13, len(halo_idx)).astype(np.float32),
          np.full(len(halo_idx), -0.1, np.float32))
    # Red cells: eosin discs, paler in the middle.
    _draw(rng, E, _nuclei(len(rbc), x=rbc[:, 0], y=rbc[:, 1], r=rng.uniform(5.5, 7.0, len(rbc)),
                          aspect=rng.uniform(1.0, 1.3, len(rbc)), theta=rng.uniform(0, np.pi, len(rbc)),
                          density=0.45, rim=0.8, edge=0.7))

    # Haematoxylin: every nucleus, annotated or not, drawn the same way.
    plain = np.setdiff1d(np.arange(n_cells), np.concatenate([mit_idx, apo_idx, extra_apo]))
    tables = [
        _tumour_nuclei(rng, nuc_pts[plain, 0], nuc_pts[plain, 1], grade),
        _lymphocytes(rng, lymph_pts[:, 0], lymph_pts[:, 1]),
        _plasma_cells(rng, plasma_pts[:, 0], plasma_pts[:, 1]),
        _histiocytes(rng, hist_pts[:, 0], hist_pts[:, 1]),
        _spindles(rng, myo_pts[:, 0], myo_pts[:, 1], other["myo_theta"], plump=True),
        _spindles(rng, fib[:, 0], fib[:, 1], _at(theta_field, fib, 2)),
        _spindles(rng, endo[:, 0], endo[:, 1], other["endo_theta"], plump=True),
        _mitoses(rng, mit_pts[:, 0], mit_pts[:, 1]),
        _apoptotic_bodies(rng, np.concatenate([apo_pts[:, 0], nuc_pts[extra_apo, 0]]),
                          np.concatenate([apo_pts[:, 1], nuc_pts[extra_apo, 1]])),
    ]
    # Out-of-focus nuclei from the section's other planes: faint, soft, anywhere in the tissue.
    n_blur = int(rng.poisson(w * h / 25_000))
    bpts = np.column_stack([rng.uniform(0, w, n_blur), rng.uniform(0, h, n_blur)])
    bpts = bpts[_at(tissue, bpts, 2)]
    tables.append(_nuclei(len(bpts), x=bpts[:, 0], y=bpts[:, 1], r=rng.uniform(5, 10, len(bpts)),
                          density=rng.uniform(0.15, 0.35, len(bpts)), edge=2.0))
    _draw(rng, H, _join(tables))

    image = _scan(rng, H, E, hole, style)
    picked = {"tumor": tum_idx, "non_tumor": non_pts, "mitosis": mit_pts, "apoptosis": apo_pts}
    return image, _points(rng, w, h, counts, nuc_pts, picked, lumens, tumour, depth, hole)
