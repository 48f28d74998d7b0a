"""The BreCaHAD reader on folders fedfuse did not write, and on bad files."""

import json
import re
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from shared.brecahad import BRECAHAD_TILE, POINT_KEYS, extract, inspect, load_patches, read_image, read_points
from shared.config import DataConfig
from shared.errors import DataFormatError
from shared.site_check import check_site
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


def tiff_claiming(width: int, height: int) -> bytes:
    """A grayscale TIFF whose header claims ``width`` x ``height`` pixels, with no pixel data behind it."""
    tags = [(256, 4, width), (257, 4, height), (258, 3, 8), (259, 3, 1), (262, 3, 1), (273, 4, 8), (277, 3, 1),
            (278, 4, height), (279, 4, width * height % 2**32)]  # (tag, type: 3 SHORT / 4 LONG, value)
    ifd = struct.pack("<H", len(tags)) + b"".join(struct.pack("<HHII", t, k, 1, v) for t, k, v in tags)
    return struct.pack("<2sHI", b"II", 42, 16) + bytes(8) + ifd + struct.pack("<I", 0)


def one_line_error(capsys, args: list[str], code: int) -> str:
    assert main(args) == code
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert "Traceback" not in captured.err + captured.out and len(err.splitlines()) == 1, captured.err
    return err


def test_a_symlink_loop_instead_of_a_tiff_names_the_file(tmp_path, capsys):
    folder = tmp_path / "BreCaHAD"
    make_foreign_folder(folder, np.random.default_rng(4))
    tif = folder / "images" / "Case_1-01.tif"
    tif.unlink()
    tif.symlink_to(tif)  # a link to itself: every stat() fails with ELOOP
    with pytest.raises(DataFormatError, match=r"Case_1-01\.tif: cannot read the file: Too many levels"):
        load_patches(folder, CLASSES, 16, "reflect", tmp_path / "cache")
    with pytest.raises(DataFormatError, match=r"Case_1-01\.tif: cannot read the image header"):
        inspect(folder, CLASSES, 16, "reflect")
    assert str(tif) in one_line_error(capsys, ["data", "inspect", str(folder), "--json"], 2)


def test_a_tiff_header_claiming_60000x60000_pixels_is_refused_before_decoding(tmp_path, capsys):
    folder = tmp_path / "BreCaHAD"
    make_foreign_folder(folder, np.random.default_rng(5))
    tif = folder / "images" / "Case_2-02.tif"
    tif.write_bytes(tiff_claiming(60000, 60000))
    claim = r"Case_2-02\.tif: the image claims 60000x60000 pixels \(3600 megapixels\); a tile may have at most 67 "
    with pytest.raises(DataFormatError, match=claim + r"megapixels \(8192x8192; BreCaHAD's are 1360x1024\)"):
        read_image(tif)
    with pytest.raises(DataFormatError, match=claim):
        load_patches(folder, CLASSES, 16, "reflect", None)
    with pytest.raises(DataFormatError, match=claim):
        inspect(folder, CLASSES, 16, "reflect")
    assert re.search(claim, one_line_error(capsys, ["data", "inspect", str(folder), "--json"], 2))
    tif.write_bytes(tiff_claiming(9000, 9000))  # below PIL's own limit, above ours
    with pytest.raises(DataFormatError, match=r"the image claims 9000x9000 pixels"):
        read_image(tif)
    tif.write_bytes(tiff_claiming(*BRECAHAD_TILE))  # a real tile's size passes the check; its pixels are missing
    with pytest.raises(DataFormatError, match=r"Case_2-02\.tif: cannot decode the image"):
        read_image(tif)


def test_site_check_reports_a_tile_smaller_than_a_patch_and_a_claimed_bomb(quick_data, tmp_path, capsys):
    site = tmp_path / "site"
    shutil.copytree(quick_data / "site-0", site, ignore=shutil.ignore_patterns(".fedfuse-cache"))
    tiny, bomb = sorted((site / "BreCaHAD/images").glob("*.tif"))[:2]
    Image.fromarray(np.full((1, 1, 3), 200, np.uint8)).save(tiny)
    bomb.write_bytes(tiff_claiming(60000, 60000))
    report = check_site(site, DataConfig())
    assert not report.ok and len(report.problems) == 2, report.problems
    assert report.problems[0].startswith(f"{tiny}: 1x1 pixels, smaller than one 64x64 patch (data.patch_size)")
    assert report.problems[1].startswith(f"{bomb}: the image claims 60000x60000 pixels")
    assert main(["site", "check", str(site)]) == 1
    assert capsys.readouterr().out.count("problem: ") == 2
    Image.fromarray(np.full((40, 50, 3), 200, np.uint8)).save(tiny)  # a whole 32 px patch fits: no problem
    bomb.unlink()
    (site / "BreCaHAD/groundTruth" / f"{bomb.stem}.json").unlink()
    assert check_site(site, DataConfig(patch_size=32)).ok
    assert check_site(site, DataConfig(patch_size=48)).problems == [
        f"{tiny}: 50x40 pixels, smaller than one 48x48 patch (data.patch_size); expected a tile of a slide, such as "
        "BreCaHAD's 1360x1024"]
