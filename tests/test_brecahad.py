"""The BreCaHAD reader on folders fedfuse did not write, and on bad files."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from shared.brecahad import POINT_KEYS, extract, inspect, load_patches, read_points
from shared.errors import DataFormatError
from simulations.cli import main

CLASSES = ("mitosis", "tumor", "non_tumor")


def make_foreign_folder(root: Path, rng: np.random.Generator) -> dict:
    """A BreCaHAD-layout folder written by hand: mixed raw/LZW TIFFs, odd sizes, points 3 px from edges."""
    (root / "images").mkdir(parents=True)
    (root / "groundTruth").mkdir()
    edge = {"drop_expected": 0}
    for n, (w, h, compression) in enumerate([(200, 150, None), (160, 120, "tiff_lzw"), (240, 100, "tiff_lzw")]):
        name = f"Case_{n + 1}-0{n + 1}"
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(
            root / "images" / f"{name}.tif", compression=compression)
        points = {k: [] for k in POINT_KEYS}
        for k in POINT_KEYS:
            if k == "non_mitosis":
                continue
            for _ in range(int(rng.integers(1, 6))):
                points[k].append({"x": float(rng.uniform(0.4, 0.6)), "y": float(rng.uniform(0.4, 0.6))})
        # Points 3 px from each edge, in the kept classes and in others.
        for k, (px, py) in zip(("mitosis", "tumor", "non_tumor", "lumen"),
                               [(3, h / 2), (w - 3, h / 2), (w / 2, 3), (w / 2, h - 3)]):
            points[k].append({"x": px / w, "y": py / h})
            edge["drop_expected"] += k in CLASSES
        # Keys written in another order than the canonical one: a reader must not care.
        (root / "groundTruth" / f"{name}.json").write_text(json.dumps(dict(reversed(list(points.items())))))
    return edge


def run_inspect(capsys, folder: Path, border: str) -> dict:
    assert main(["data", "inspect", str(folder), "--json", "--border", border]) == 0
    return json.loads(capsys.readouterr().out)


def test_inspect_counts_a_foreign_folder_under_both_border_policies(tmp_path, capsys):
    folder = tmp_path / "BreCaHAD"
    edge = make_foreign_folder(folder, np.random.default_rng(0))
    truth = {k: 0 for k in POINT_KEYS}
    for f in (folder / "groundTruth").glob("*.json"):
        for k, v in json.loads(f.read_text()).items():
            truth[k] += len(v)
    kept_points = sum(truth[c] for c in CLASSES)
    for border in ("reflect", "drop"):
        out = run_inspect(capsys, folder, border)
        assert out["images"] == 3
        assert out["points"] == truth
        assert sum(out["patches"].values()) + out["dropped_at_border"] == kept_points
    assert run_inspect(capsys, folder, "reflect")["dropped_at_border"] == 0
    assert run_inspect(capsys, folder, "drop")["dropped_at_border"] == edge["drop_expected"]


def test_patches_are_centred_and_reflect_pads_at_edges():
    image = np.zeros((50, 60, 3), np.uint8)
    image[20, 30] = 255  # the one bright pixel
    patches, kept = extract(image, np.array([[30 / 60, 20 / 50], [1 / 60, 1 / 50]]), 8, "reflect")
    assert kept.all() and patches.shape == (2, 8, 8, 3)
    assert patches[0, 4, 4, 0] == 255 and patches[0].sum() == 255 * 3
    patches, kept = extract(image, np.array([[30 / 60, 20 / 50], [1 / 60, 1 / 50]]), 8, "drop")
    assert kept.tolist() == [True, False] and len(patches) == 1


def test_load_patches_uses_the_cache(tmp_path, monkeypatch):
    folder = tmp_path / "BreCaHAD"
    make_foreign_folder(folder, np.random.default_rng(1))
    first = load_patches(folder, CLASSES, 16, "reflect", tmp_path / "cache")
    def no_decoding(path):
        raise RuntimeError(f"decoded {path} despite the cache")

    monkeypatch.setattr("shared.brecahad.read_image", no_decoding)
    again = load_patches(folder, CLASSES, 16, "reflect", tmp_path / "cache")
    assert np.array_equal(first.images, again.images) and np.array_equal(first.labels, again.labels)
    assert set(again.cases) == {"Case_1", "Case_2", "Case_3"}
    with pytest.raises(RuntimeError, match="despite the cache"):  # other settings: another cache entry
        load_patches(folder, CLASSES, 16, "drop", tmp_path / "cache")


def test_truncated_tiff_names_the_file(tmp_path):
    folder = tmp_path / "BreCaHAD"
    make_foreign_folder(folder, np.random.default_rng(2))
    tif = folder / "images" / "Case_1-01.tif"
    tif.write_bytes(tif.read_bytes()[: 2000])
    with pytest.raises(DataFormatError, match=r"Case_1-01\.tif: cannot decode"):
        load_patches(folder, CLASSES, 16, "reflect", None)


def test_point_outside_unit_square_names_file_key_and_index(tmp_path):
    p = tmp_path / "Case_1-01.json"
    p.write_text(json.dumps({**{k: [] for k in POINT_KEYS}, "tumor": [{"x": 0.5, "y": 0.5}, {"x": 1.2, "y": 0.1}]}))
    with pytest.raises(DataFormatError, match=r"Case_1-01\.json: tumor\[1\] = \(1\.2, 0\.1\) is outside \[0, 1\]"):
        read_points(p)


def test_missing_key_names_file_and_key(tmp_path):
    p = tmp_path / "Case_1-01.json"
    p.write_text(json.dumps({k: [] for k in POINT_KEYS if k != "apoptosis"}))
    with pytest.raises(DataFormatError, match=r"Case_1-01\.json: missing key\(s\) apoptosis"):
        read_points(p)


def test_image_without_ground_truth_and_bad_names(tmp_path):
    folder = tmp_path / "BreCaHAD"
    make_foreign_folder(folder, np.random.default_rng(3))
    (folder / "groundTruth" / "Case_2-02.json").unlink()
    with pytest.raises(DataFormatError, match=r"Case_2-02\.tif: no ground truth"):
        inspect(folder, CLASSES, 16, "reflect")
    (folder / "images" / "Case_2-02.tif").rename(folder / "images" / "slide 2.tif")
    with pytest.raises(DataFormatError, match=r"slide 2\.tif: file name should be Case_<case>-<nn>\.tif"):
        inspect(folder, CLASSES, 16, "reflect")


def test_cli_reports_data_errors_cleanly(tmp_path, capsys):
    assert main(["data", "inspect", str(tmp_path), "--json"]) == 2
    assert "neither a BreCaHAD folder" in capsys.readouterr().err
