"""Read a BreCaHAD folder (``images/*.tif`` + ``groundTruth/*.json``) into patches.

The layout is that of the real download (Aksac et al. 2019): RGB TIFF tiles
named ``Case_<case>-<nn>``, and per tile a JSON object with seven keys of
centre points normalised to [0, 1]. Patches are centred on the points of the
classes kept (default mitosis / tumor / non_tumor); a point whose patch would
cross the tile's edge is reflect-padded (``border="reflect"``, the default,
which keeps every annotation) or dropped and counted (``border="drop"``).

Decoded patches are cached (``load_patches``), keyed by a hash of the files'
names, sizes and modification times and of the settings, so a TIFF is decoded
once per data version, not every round.
"""

from __future__ import annotations

import json
import math
import re
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, TiffImagePlugin, UnidentifiedImageError
from tqdm import tqdm

from shared.cache import cached_arrays, fingerprint
from shared.config import BRECAHAD_KEYS
from shared.errors import DataFormatError
from shared.stain import Normaliser

POINT_KEYS = BRECAHAD_KEYS  # the seven keys of a ground-truth file, in the data set's order
NAME = re.compile(r"^Case_(\d+)-(\d+)$")
BRECAHAD_TILE = (1360, 1024)  # width, height of every tile of the real data set
# 64 megapixels (8192 x 8192): 46 times a BreCaHAD tile, so scans at twice the magnification or of a larger field
# still read, while a decoded tile (192 MB as uint8 RGB, about 1.5 GB as float during stain normalisation) fits
# a site's memory. A header claiming more is refused before any pixel is decoded.
MAX_TILE_PIXELS = 8192 * 8192


@dataclass(frozen=True)
class Tile:
    """One image and its ground-truth file."""

    name: str
    case: str  # "Case_<n>": the patient, the unit of every split
    image: Path
    truth: Path


def list_tiles(folder: Path) -> list[Tile]:
    """Tiles of a BreCaHAD folder (the one holding ``images/`` and ``groundTruth/``), sorted by name."""
    folder = Path(folder)
    images, truth = folder / "images", folder / "groundTruth"
    for d in (images, truth):
        if not d.is_dir():
            raise DataFormatError(f"{folder}: expected a BreCaHAD folder with images/ and groundTruth/; "
                                  f"{d.name}/ is missing")
    tiles = []
    for img in sorted(images.iterdir()):
        if img.suffix.lower() not in (".tif", ".tiff"):
            continue
        m = NAME.match(img.stem)
        if not m:
            raise DataFormatError(f"{img}: file name should be Case_<case>-<nn>.tif")
        gt = truth / f"{img.stem}.json"
        if not gt.is_file():
            raise DataFormatError(f"{img}: no ground truth; expected {gt}")
        tiles.append(Tile(img.stem, f"Case_{int(m.group(1))}", img, gt))
    if not tiles:
        raise DataFormatError(f"{images}: no .tif images")
    return tiles


def read_points(path: Path) -> dict[str, np.ndarray]:
    """The seven point lists of a ground-truth file, each ``(n, 2)`` normalised (x, y)."""
    try:
        raw = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataFormatError(f"{path}: not valid JSON: {err}") from None
    except OSError as err:  # a folder, a symlink loop, no permission
        raise DataFormatError(f"{path}: cannot read the file: {err.strerror}") from None
    if not isinstance(raw, dict):
        raise DataFormatError(f"{path}: expected a JSON object with keys {', '.join(POINT_KEYS)}")
    missing = [k for k in POINT_KEYS if k not in raw]
    if missing:
        raise DataFormatError(f"{path}: missing key(s) {', '.join(missing)}; expected all of {', '.join(POINT_KEYS)}")
    out = {}
    for key in POINT_KEYS:
        pts = raw[key]
        if not isinstance(pts, list):
            raise DataFormatError(f"{path}: key {key!r} should be a list of {{'x', 'y'}} points")
        arr = np.zeros((len(pts), 2))
        for i, p in enumerate(pts):
            if not (isinstance(p, dict) and all(isinstance(p.get(c), (int, float)) and not isinstance(p.get(c), bool)
                                                for c in ("x", "y"))):
                raise DataFormatError(f"{path}: {key}[{i}] should be {{'x': number, 'y': number}}, got {p!r}")
            try:
                x, y = float(p["x"]), float(p["y"])
            except OverflowError:  # an integer too large for a float is outside [0, 1] too
                x, y = math.inf, math.inf
            if not (0.0 <= x <= 1.0 and 0.0 <= y <= 1.0):
                raise DataFormatError(f"{path}: {key}[{i}] = ({x}, {y}) is outside [0, 1]; "
                                      "BreCaHAD points are normalised by the image's width and height")
            arr[i] = (x, y)
        out[key] = arr
    return out


def open_tile(path: Path) -> Image.Image:
    """Open an image for its header, refusing one that claims more than :data:`MAX_TILE_PIXELS` pixels.

    The size is checked before a pixel is decoded, so a crafted header cannot make a site allocate
    gigabytes; PIL's own decompression-bomb check (a warning at 89 megapixels, an error at 179) is
    replaced by this one, which names the file and the limit.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # refused below, with the file named
            im = Image.open(path)
    except Image.DecompressionBombError:
        im = TiffImagePlugin.TiffImageFile(path)  # beyond PIL's own limit: read the TIFF header for the size
    width, height = im.size
    if width * height > MAX_TILE_PIXELS:
        im.close()
        side = math.isqrt(MAX_TILE_PIXELS)
        raise DataFormatError(f"{path}: the image claims {width}x{height} pixels ({width * height / 1e6:.0f} "
                              f"megapixels); a tile may have at most {MAX_TILE_PIXELS / 1e6:.0f} megapixels "
                              f"({side}x{side}; BreCaHAD's are {BRECAHAD_TILE[0]}x{BRECAHAD_TILE[1]}): a corrupt or "
                              "crafted header?")
    return im


def read_image(path: Path) -> np.ndarray:
    """Decode a TIFF (uncompressed, LZW, ...) into ``(height, width, 3)`` uint8 RGB."""
    try:
        with open_tile(path) as im:
            im.load()
            return np.asarray(im.convert("RGB"))
    except DataFormatError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise DataFormatError(f"{path}: cannot decode the image (truncated or not a TIFF?): {err}") from None


def _centres(points: np.ndarray, width: int, height: int, patch_size: int, border: str):
    """Pixel centres of normalised points, and which of them a patch can be cut around."""
    if border not in ("reflect", "drop"):
        raise ValueError(f"border must be 'reflect' or 'drop', got {border!r}")
    cx = np.minimum((points[:, 0] * width).astype(int), width - 1)
    cy = np.minimum((points[:, 1] * height).astype(int), height - 1)
    if border == "reflect":
        return cx, cy, np.ones(len(points), bool)
    lo = patch_size // 2
    hi = patch_size - lo
    return cx, cy, (cx >= lo) & (cy >= lo) & (cx + hi <= width) & (cy + hi <= height)


def extract(
    image: np.ndarray, points: np.ndarray, patch_size: int, border: str
) -> tuple[np.ndarray, np.ndarray]:
    """Patches centred on normalised ``points``.

    Returns ``(patches, kept)``: ``(n_kept, P, P, 3)`` uint8 and a boolean mask
    over ``points``. With ``border="drop"`` a patch that would leave the image
    is dropped; with ``"reflect"`` the image is reflect-padded and all are kept.
    """
    h, w = image.shape[:2]
    cx, cy, kept = _centres(points, w, h, patch_size, border)
    if not kept.any():
        return np.zeros((0, patch_size, patch_size, 3), np.uint8), kept
    half = patch_size // 2
    src = np.pad(image, ((half, half), (half, half), (0, 0)), mode="reflect") if border == "reflect" else image
    # In the padded image a point's window starts at its own coordinate.
    ox, oy = (cx, cy) if border == "reflect" else (cx - half, cy - half)
    patches = np.stack([src[y : y + patch_size, x : x + patch_size] for x, y in zip(ox[kept], oy[kept])])
    return patches, kept


@dataclass(frozen=True)
class Patches:
    """Patches of one BreCaHAD folder: pixels, class index, case and tile of each."""

    images: np.ndarray  # (n, P, P, 3) uint8
    labels: np.ndarray  # (n,) int64, index into classes
    cases: np.ndarray  # (n,) str
    tiles: np.ndarray  # (n,) str
    points: np.ndarray  # (n, 2) normalised (x, y) centre of each patch
    dropped_at_border: int
    stain_skipped: int = 0  # tiles kept as they were: too little tissue to estimate their stains


def _decode(folder: Path, classes: tuple[str, ...], patch_size: int, border: str,
            normalise: Normaliser | None) -> dict[str, np.ndarray]:
    imgs, labels, cases, tiles, points_kept, dropped, skipped = [], [], [], [], [], 0, 0
    # A bar on a terminal only (disable=None): in logs and in Flower's worker processes, nothing.
    for tile in tqdm(list_tiles(folder), desc=f"patches {folder.parent.name}", unit="tile", disable=None,
                     leave=False):
        points = read_points(tile.truth)
        image = read_image(tile.image)
        if normalise is not None:
            normalised = normalise(image)
            skipped += normalised is None
            image = image if normalised is None else normalised
        for ci, cls in enumerate(classes):
            patches, kept = extract(image, points[cls], patch_size, border)
            dropped += int((~kept).sum())
            imgs.append(patches)
            labels += [ci] * len(patches)
            cases += [tile.case] * len(patches)
            tiles += [tile.name] * len(patches)
            points_kept.append(points[cls][kept])
    if skipped:  # said once, at extraction
        print(f"stain normalisation ({normalise.method}): {skipped} tile(s) in {folder} kept as scanned, too little "
              "tissue to estimate their stains", file=sys.stderr)
    return {
        "images": np.concatenate(imgs) if imgs else np.zeros((0, patch_size, patch_size, 3), np.uint8),
        "labels": np.array(labels, np.int64),
        "cases": np.array(cases, dtype=str),
        "tiles": np.array(tiles, dtype=str),
        "points": np.concatenate(points_kept) if points_kept else np.zeros((0, 2)),
        "dropped_at_border": np.array(dropped),
        "stain_skipped": np.array(skipped),
    }


def load_patches(
    folder: Path, classes: tuple[str, ...], patch_size: int, border: str, cache_dir: Path | None,
    normalise: Normaliser | None = None,
) -> Patches:
    """All patches of the kept ``classes`` in ``folder``, through the on-disk cache; tiles stain-normalised first
    with ``normalise`` (its method and reference are part of the cache key)."""
    for cls in classes:
        if cls not in POINT_KEYS:
            raise ValueError(f"data.classes: {cls!r} is not a BreCaHAD key; expected some of {', '.join(POINT_KEYS)}")
    folder = Path(folder)
    tiles = list_tiles(folder)
    stain = [(normalise.method, *np.round(normalise.reference, 6).tolist())] if normalise is not None else []
    key = fingerprint("brecahad-v2", str(folder.resolve()), classes, patch_size, border, *stain,
                      *[p for t in tiles for p in (t.image, t.truth)])
    arrays = cached_arrays(cache_dir, f"patches-{key}", lambda: _decode(folder, classes, patch_size, border,
                                                                        normalise))
    return Patches(arrays["images"], arrays["labels"], arrays["cases"], arrays["tiles"], arrays["points"],
                   int(arrays["dropped_at_border"]), int(arrays.get("stain_skipped", 0)))  # older caches: none


def inspect(folder: Path, classes: tuple[str, ...], patch_size: int, border: str) -> dict:
    """Counts of a BreCaHAD folder: images, points per key, patches per class, dropped points."""
    tiles = list_tiles(folder)
    points = dict.fromkeys(POINT_KEYS, 0)
    patches = dict.fromkeys(classes, 0)
    dropped = 0
    for tile in tiles:
        pts = read_points(tile.truth)
        for k in POINT_KEYS:
            points[k] += len(pts[k])
        try:
            with open_tile(tile.image) as im:  # the header is enough to know the size
                w, h = im.size
        except (UnidentifiedImageError, OSError, SyntaxError) as err:
            raise DataFormatError(f"{tile.image}: cannot read the image header: {err}") from None
        for cls in classes:
            kept = _centres(pts[cls], w, h, patch_size, border)[2]
            patches[cls] += int(kept.sum())
            dropped += int((~kept).sum())
    return {"images": len(tiles), "points": points, "patches": patches, "dropped_at_border": dropped}
