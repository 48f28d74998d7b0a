"""Property-based tests where data enters: any input gives a result or a clear error, never a crash.

A clear error is :class:`DataFormatError` (or :class:`ConfigError`) whose
message names the file (or the config key). Hypothesis generates the inputs;
each test keeps its example count small so the suite stays fast.
"""

import gzip
import io
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from shared.brecahad import POINT_KEYS, read_image, read_points
from shared.config import ConfigError, from_dict, load
from shared.errors import DataFormatError
from shared.mimic import FEATURES, REQUIRED, build_cohort
from tests.test_mimic import make_mimic

FAST = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12)
point = st.fixed_dictionaries({"x": json_values, "y": json_values}) | st.fixed_dictionaries(
    {"x": st.floats(-0.5, 1.5) | st.integers(-10**400, 10**400), "y": st.floats(-0.5, 1.5)})
ground_truth = st.dictionaries(st.sampled_from(POINT_KEYS + ("extra",)), st.lists(point, max_size=3) | json_values,
                               max_size=8)


@FAST
@given(raw=ground_truth | json_values)
@example(raw={k: [{"x": 10**400, "y": 0.5}] for k in POINT_KEYS})
def test_ground_truth_reader_returns_points_in_the_unit_square_or_names_the_file(tmp_path, raw):
    path = tmp_path / "Case_1-01.json"
    path.write_text(json.dumps(raw))
    try:
        points = read_points(path)
    except DataFormatError as err:
        assert str(path) in str(err)
        return
    assert set(points) == set(POINT_KEYS)
    for arr in points.values():
        assert arr.ndim == 2 and arr.shape[1] == 2 and ((arr >= 0) & (arr <= 1)).all()


@FAST
@given(data=st.binary(max_size=64))
def test_ground_truth_reader_on_arbitrary_bytes(tmp_path, data):
    path = tmp_path / "Case_1-01.json"
    path.write_bytes(data)
    try:
        read_points(path)
    except DataFormatError as err:
        assert str(path) in str(err)


def _tiff(width: int, height: int, compression: str | None) -> bytes:
    buf = io.BytesIO()
    rgb = np.random.default_rng(0).integers(0, 255, (height, width, 3), np.uint8)
    Image.fromarray(rgb).save(buf, format="TIFF", compression=compression)
    return buf.getvalue()


VALID_TIFFS = [_tiff(12, 9, None), _tiff(12, 9, "tiff_lzw"), _tiff(5, 7, "tiff_adobe_deflate")]


@FAST
@given(which=st.integers(0, len(VALID_TIFFS) - 1), cut=st.integers(0, 10_000), flips=st.lists(
    st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=4))
def test_tiff_reader_decodes_or_names_the_file(tmp_path, which, cut, flips):
    data = bytearray(VALID_TIFFS[which])
    for pos, value in flips:  # corrupt a few bytes, then maybe truncate
        data[pos % len(data)] = value
    data = bytes(data[: max(1, len(data) - cut % len(data))])
    path = tmp_path / "Case_1-01.tif"
    path.write_bytes(data)
    try:
        image = read_image(path)
    except DataFormatError as err:
        assert str(path) in str(err)
        return
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3


@pytest.fixture(scope="session")
def mimic_tables(tmp_path_factory) -> tuple[dict[str, pd.DataFrame], pd.DataFrame]:
    """tests.test_mimic's hand-written MIMIC-IV set as text tables, and its cohort."""
    root = make_mimic(tmp_path_factory.mktemp("mimic"))
    tables = {f.name.removesuffix(".csv.gz"): pd.read_csv(f, dtype=str, keep_default_na=False)
              for f in sorted((root / "hosp").glob("*.csv.gz"))}
    return tables, build_cohort(root).table.set_index("subject_id")


def _build(root: Path, tables: dict[str, pd.DataFrame]):
    hosp = root / "hosp"
    hosp.mkdir(parents=True, exist_ok=True)
    for name, df in tables.items():
        with gzip.open(hosp / f"{name}.csv.gz", "wt") as f:
            df.to_csv(f, index=False)
    return build_cohort(root)


def _same(a: pd.Series, b: pd.Series) -> bool:
    return all((math.isnan(x) and math.isnan(y)) or x == y for x, y in zip(a.astype(float), b.astype(float)))


cells = st.text(max_size=12) | st.sampled_from(["", "nan", "-1", "1e309", "2150-13-45", "9" * 30, "F", "C50911"])


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), value=cells)
def test_one_bad_cell_in_a_mimic_table_never_changes_another_patient(tmp_path, mimic_tables, data, value):
    """Any cell of any table set to anything: the cohort builds (other subjects unchanged) or names the file."""
    tables, reference = mimic_tables
    tables = {k: v.copy() for k, v in tables.items()}
    name = data.draw(st.sampled_from(sorted(t for t in REQUIRED if len(tables[t]))), label="table")
    df = tables[name]
    row = data.draw(st.integers(0, len(df) - 1), label="row")
    column = data.draw(st.sampled_from(list(df.columns)), label="column")
    touched = {df["subject_id"].iloc[row]} if "subject_id" in df.columns else set()
    df.iloc[row, df.columns.get_loc(column)] = value
    try:
        cohort = _build(tmp_path, tables).table.set_index("subject_id")
    except DataFormatError as err:
        assert "hosp" in str(err) or name in str(err)
        return
    if name.startswith("d_"):  # a dictionary table (lab items) legitimately concerns every patient
        return
    for subject in reference.index:
        if str(subject) in touched or str(subject) == value.strip():
            continue
        assert subject in cohort.index, f"subject {subject} vanished after a bad cell in {name}"
        for col in ("label", *FEATURES):
            assert _same(reference.loc[[subject], col], cohort.loc[[subject], col]), (subject, col, name, column)


config_keys = st.sampled_from(["name", "seed", "data", "model", "train", "federation", "privacy", "faults",
                               "simulation", "server", "bogus"])
sections = st.dictionaries(st.sampled_from(["root", "sites", "rounds", "name", "lr", "mode", "epsilon", "crash",
                                            "classes", "label_map", "min_sites", "batch_size", "strategy"]),
                           json_values, max_size=4)


@FAST
@given(raw=st.dictionaries(config_keys, sections | json_values, max_size=5) | json_values)
def test_config_loader_builds_or_names_the_key(raw):
    try:
        cfg = from_dict(raw, "test.yaml")
    except ConfigError as err:
        assert str(err).startswith("test.yaml")
        return
    assert cfg.federation.rounds >= 1 and cfg.data.sites >= 1


@FAST
@given(text=st.text(max_size=80))
def test_config_file_of_any_text(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    try:
        load(path)
    except ConfigError as err:
        assert str(path) in str(err)

