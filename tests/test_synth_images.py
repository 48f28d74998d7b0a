"""The tile generator: reproducible per seed whatever the worker count; patches hold tissue, not one nucleus."""

import gzip
import hashlib

import numpy as np
from scipy import ndimage

from shared.config import BRECAHAD_KEYS
from simulations.synth import PRESETS, Preset, synth
from simulations.synth_images import SiteStyle, TileSpec, render_tile

SPEC = TileSpec(320, 256, n_tumor=20, n_non_tumor=8, n_mitosis=2, n_apoptosis=1, n_lumen=1, n_non_lumen=1)


def _tile(seed: int, grade: float = 0.0):
    rng = np.random.default_rng(seed)
    return render_tile(rng, SPEC, SiteStyle.sample(rng), grade)


def test_a_tile_is_reproducible_from_its_seed():
    a, pa = _tile(5)
    b, pb = _tile(5)
    c, _ = _tile(6)
    assert np.array_equal(a, b) and pa == pb and not np.array_equal(a, c)
    assert a.shape == (256, 320, 3) and a.dtype == np.uint8
    assert list(pa) == list(BRECAHAD_KEYS) and pa["non_mitosis"] == []


def test_a_patch_round_a_tumour_point_holds_several_nuclei():
    image, points = _tile(1)
    # Nuclei are where haematoxylin darkens the tile; count the dark blobs in 64 px windows round tumour points.
    grey = ndimage.gaussian_filter(image.astype(float).mean(-1), 1.5)
    nuclei, _ = ndimage.label(grey < np.percentile(grey, 20))
    counts = []
    for p in points["tumor"]:
        x, y = int(p["x"] * 320), int(p["y"] * 256)
        if 32 <= x < 288 and 32 <= y < 224:
            window = nuclei[y - 32 : y + 32, x - 32 : x + 32]
            counts.append(len(np.unique(window[window > 0])))
    assert counts and np.median(counts) >= 3


def test_synth_output_does_not_depend_on_the_worker_count(tmp_path, monkeypatch):
    tiny = Preset(tile=SPEC, total_cases=None, cases_per_site=2, images_per_case=1, total_images=None,
                  holdout_cases=1, extra_subjects=4)
    monkeypatch.setitem(PRESETS, "tiny", tiny)
    synth(tmp_path / "one", sites=2, seed=0, preset="tiny", workers=1)
    synth(tmp_path / "two", sites=2, seed=0, preset="tiny", workers=2)

    def digest(root):  # gzip headers and synth's marker carry the time of writing: compare the data alone
        files = sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".fedfuse-"))
        return {str(p.relative_to(root)): hashlib.sha256(gzip.decompress(p.read_bytes()) if p.suffix == ".gz"
                                                         else p.read_bytes()).hexdigest() for p in files}

    one = digest(tmp_path / "one")
    assert one == digest(tmp_path / "two") and any(k.endswith(".tif") for k in one)
