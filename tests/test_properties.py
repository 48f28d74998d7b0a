"""Property-based tests where data enters: any input gives a result or a clear error, never a crash.

A clear error is :class:`DataFormatError` (or :class:`ConfigError`) whose
message names the file (or the config key). Hypothesis generates the inputs;
each test keeps its example count small so the suite stays fast.
"""

import functools
import gzip
import io
import json
import math
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from shared.brecahad import POINT_KEYS, read_image, read_points
from shared.config import (
    BRECAHAD_KEYS,
    Config,
    ConfigError,
    apply_overrides,
    flat_keys,
    flatten,
    from_dict,
    load,
    to_dict,
)
from shared.errors import DataFormatError
from shared.mimic import FEATURES, REQUIRED, build_cohort
from tests.helpers import make_mimic, quick_config

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


@pytest.mark.slow
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
    assert from_dict(to_dict(cfg), "again") == cfg  # what was accepted is written back and read the same
    given = {f"{section}.{key}": value for section, keys in raw.items() if isinstance(keys, dict)
             for key, value in keys.items() if isinstance(value, (bool, int, float, str))}
    given.update({key: value for key, value in raw.items() if isinstance(value, (bool, int, float, str))})
    flat = flatten(cfg)
    assert all(flat[key] == value for key, value in given.items()), (given, flat)  # kept as written, never altered


@FAST
@given(text=st.text(max_size=80))
def test_config_file_of_any_text(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    try:
        load(path)
    except ConfigError as err:
        assert str(path) in str(err) and "\n" not in str(err)



# What an accepted value must be, stated here (not read from shared/config.py): a count is positive and fits a
# C int (what torch, Flower and XGBoost take), a rate is finite, a probability lies in its range, a name is one
# path component. ``v`` is the accepted value, ``c`` the whole config.
C_INT = 2**31


def count(v, c) -> bool:
    return 1 <= v < C_INT


def finite(lo: float, lo_open: bool = False):
    return lambda v, c: math.isfinite(v) and (v > lo if lo_open else v >= lo)


def within(lo: float, hi: float):
    return lambda v, c: lo <= v <= hi


def optional(check):
    return lambda v, c: v is None or check(v, c)


def one_component(v, c) -> bool:
    """One path component: joined to a folder it stays directly inside it, and no control character."""
    base = Path("/runs")
    return (bool(v) and v not in (".", "..") and (base / v).parent == base and "\\" not in v
            and not any(ord(ch) < 32 or 127 <= ord(ch) < 160 for ch in v))


def a_path(v, c) -> bool:
    return bool(v) and "\0" not in v


def fault_fires(entry: str, c) -> bool:
    """SITE@ROUND naming a site and a round of this run (another entry would never fire)."""
    site, at, when = entry.partition("@")
    return bool(at) and site.isascii() and when.isascii() and site.isdigit() and when.isdigit() and (
        int(site) < c.data.sites and 1 <= int(when) <= c.federation.rounds)


def distinct(allowed: tuple[str, ...] | None = None):
    return lambda v, c: len(v) >= 1 and len(set(v)) == len(v) and (allowed is None or set(v) <= set(allowed))


SANE = {
    "name": one_component, "seed": lambda v, c: 0 <= v < 2**32,
    "data.root": a_path, "data.cache_dir": optional(a_path), "data.stain_reference": a_path,
    "data.sites": count, "data.alpha": finite(0, lo_open=True), "data.patch_size": lambda v, c: 8 <= v < C_INT,
    "data.leave_out": optional(lambda v, c: 0 <= v < c.data.sites), "data.test_fraction": lambda v, c: 0 < v < 1,
    "data.classes": distinct(BRECAHAD_KEYS), "data.positive": distinct(),
    "data.label_map": lambda v, c: all(x in (0, 1) for x in v.values()),
    "model.image_latent": count, "model.ehr_latent": count, "model.hidden": count, "model.xgb_max_depth": count,
    "model.xgb_local_rounds": count, "model.dropout": lambda v, c: 0 <= v < 1,
    "model.image_aux_weight": finite(0), "model.xgb_eta": lambda v, c: 0 < v <= 1,
    "model.pretrained": optional(a_path),
    "train.local_epochs": lambda v, c: 0 <= v < C_INT and (v >= 1 or c.train.steps >= 1),
    "train.steps": lambda v, c: 0 <= v < C_INT, "train.batch_size": count, "train.threads": count,
    "train.lr": finite(0, lo_open=True), "train.encoder_lr": optional(finite(0, lo_open=True)),
    "train.warmup": lambda v, c: 0 <= v < 1, "train.weight_decay": finite(0), "train.hed_jitter": lambda v, c: 0 <= v < 1,
    "federation.rounds": count, "federation.min_sites": lambda v, c: 1 <= v <= c.data.sites,
    "federation.fraction_train": lambda v, c: 0 < v <= 1, "federation.fraction_evaluate": within(0, 1),
    "federation.proximal_mu": finite(0), "federation.server_lr": finite(0, lo_open=True),
    "federation.beta_1": lambda v, c: 0 <= v < 1, "federation.beta_2": lambda v, c: 0 <= v < 1,
    "federation.tau": finite(0, lo_open=True), "federation.trim_beta": lambda v, c: 0 <= v < 0.5,
    "federation.krum_malicious": lambda v, c: 0 <= v < c.data.sites,
    "federation.round_timeout": finite(0, lo_open=True), "federation.connect_timeout": finite(0, lo_open=True),
    "federation.setup_timeout": finite(0, lo_open=True), "federation.max_update_ratio": optional(finite(1, True)),
    "federation.max_relative_update": optional(finite(0, lo_open=True)),
    "server.eval_data": optional(a_path), "server.bootstrap": lambda v, c: 1 <= v <= 100_000,
    "privacy.epsilon": optional(lambda v, c: v > 0), "privacy.delta": lambda v, c: 0 < v < 1,
    "privacy.noise_multiplier": optional(finite(0)), "privacy.clip_norm": finite(0, lo_open=True),
    "privacy.max_grad_norm": finite(0, lo_open=True), "privacy.patches_per_patient": count,
    "privacy.budget": optional(lambda v, c: v > 0), "privacy.ledger_dir": optional(a_path),
    "privacy.audit_fraction": lambda v, c: 0 <= v < 1, "privacy.canaries": lambda v, c: 0 <= v <= 100_000,
    "privacy.secagg_clipping_range": finite(0, lo_open=True),
    "privacy.secagg_quantization_range": lambda v, c: 2 <= v < 2**32,
    "report.shap_rows": lambda v, c: 0 <= v < C_INT,
    "simulation.cpus_per_site": finite(0, lo_open=True),
    **{f"faults.{kind}": lambda v, c: all(fault_fires(e, c) for e in v) for kind in ("crash", "hang", "nan")},
}

odd_ints = st.integers() | st.sampled_from([0, -1, 1, 2, 7, 8, 2**31, 2**32, 2**63, 10**30, -10**30, 10**400])
odd_floats = st.floats() | st.sampled_from([0.0, -0.0, -1e-9, 0.5, 1.0, 1e300, math.nan, math.inf, -math.inf])
odd_strings = st.text(max_size=10) | st.sampled_from(["", ".", "..", "../../x", "a/b", "a\\b", "/abs", "x\0y", "\n",
                                                      "shipped", "federated", "run-1"])
names = st.sampled_from(BRECAHAD_KEYS + ("invasive", "in_situ", "history", "bogus")) | st.text(max_size=4)
faults = st.from_regex(r"\A[0-9]{1,3}@[0-9]{1,3}\Z") | st.sampled_from(["1@2", "0@1", "2@6", "3@1", "0@0", "١@٢"])
odd_lists = (st.lists(names, max_size=5) | st.lists(st.sampled_from(BRECAHAD_KEYS[:2]), min_size=2, max_size=3)
             | st.lists(faults, max_size=3))
odd_maps = st.dictionaries(names, odd_ints | st.sampled_from([0, 1]), max_size=3)
anything = st.none() | st.booleans() | odd_ints | odd_floats | odd_strings | odd_lists | odd_maps


def _default(key: str):
    return functools.reduce(getattr, key.split("."), Config())


def _values_for(key: str):
    """Values of the key's own kind, mostly; now and then anything at all."""
    default = _default(key)
    own = {int: odd_ints, float: odd_floats | odd_ints, str: odd_strings, tuple: odd_lists, dict: odd_maps}
    kind = own.get(type(default), odd_ints | odd_floats | odd_strings)  # None by default: a number or a path
    return st.one_of(kind, kind, kind, anything)


config_cases = st.sampled_from(sorted(SANE)).flatmap(lambda k: st.tuples(st.just(k), _values_for(k), st.booleans()))


def test_every_number_and_list_of_the_config_has_a_stated_bound():
    numeric = {k for k in flat_keys() if isinstance(_default(k), (int, float, tuple, dict)) and
               not isinstance(_default(k), bool)}
    assert numeric <= set(SANE), sorted(numeric - set(SANE))


@settings(max_examples=300, deadline=None)
@given(case=config_cases)
@example(case=("data.classes", [], True))
@example(case=("data.classes", ["tumor", "tumor"], False))
@example(case=("model.hidden", 0, True))
@example(case=("train.weight_decay", -0.5, True))
@example(case=("federation.server_lr", -0.01, False))
@example(case=("seed", -1, True))
@example(case=("simulation.cpus_per_site", 0, True))
@example(case=("name", "../../x", True))
@example(case=("train.lr", math.nan, False))
@example(case=("privacy.clip_norm", math.inf, True))
@example(case=("federation.round_timeout", 10**400, True))
def test_a_config_value_is_refused_by_its_key_or_accepted_and_sane(case):
    """Any value at any key: ConfigError naming the key, or a config whose value holds the bound stated above."""
    key, value, as_yaml_file = case
    try:
        if as_yaml_file:  # the YAML file's route: a nested mapping
            raw = to_dict(Config())
            *parents, leaf = key.split(".")
            functools.reduce(lambda node, k: node[k], parents, raw)[leaf] = value
            cfg = from_dict(raw, "test.yaml")
        else:  # the --set / run_config route: text read as YAML for a non-text setting
            text = value if isinstance(value, str) else yaml.safe_dump(value)
            cfg = apply_overrides(Config(), {key: text})
    except ConfigError as err:
        assert key in str(err) and "\n" not in str(err), str(err)
        return
    accepted = functools.reduce(getattr, key.split("."), cfg)
    assert SANE[key](accepted, cfg), f"{key}: accepted {accepted!r}"


# Settings that change what a run does, each with values across its accepted range (edges included) and a few
# beyond it. The upper edge of train.steps (a million) would only cost time: the test above checks that bound.
NEURAL = ("fedavg", "fedprox", "fedadam", "fedyogi", "fedmedian", "fedtrimmedavg")
RUN_VALUES = {
    "train.lr": st.sampled_from([5e-324, 1e-3, 0.1, 10.0, 10.5, 0.0, -1e-3, math.nan, math.inf]),
    "train.batch_size": st.sampled_from([1, 2, 65536, 65537, 0, -1, 2**31]),
    "train.local_epochs": st.sampled_from([0, 1, 1000, 1001, -1]),  # with train.steps 2 the steps decide
    "train.steps": st.sampled_from([0, 1, 3, 1_000_001, -1]),  # 0: one local epoch
    "model.hidden": st.sampled_from([1, 2, 64, 4096, 4097, 0, -3]),
    "model.ehr_latent": st.sampled_from([1, 2, 32, 4096, 4097, 0, -3]),
    "model.dropout": st.sampled_from([0.0, 0.5, 0.999, 1.0, -0.1, math.nan]),
    "federation.strategy": st.sampled_from(NEURAL + ("bogus", "", "xgb_bagging")),
    "federation.fraction_train": st.sampled_from([1e-9, 0.5, 1.0, 0.0, 1.5, math.nan]),
    "seed": st.sampled_from([0, 1, 2**32 - 1, -1, 2**32]),
}
run_cases = st.sampled_from(sorted(RUN_VALUES)).flatmap(lambda k: st.tuples(st.just(k), RUN_VALUES[k]))


def _finite_numbers(block) -> bool:
    """Every number in a metrics block (nested lists and mappings too) is finite."""
    if isinstance(block, dict):
        return all(_finite_numbers(v) for v in block.values())
    if isinstance(block, list):
        return all(_finite_numbers(v) for v in block)
    return not isinstance(block, float) or math.isfinite(block)


@settings(max_examples=6, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=run_cases)
@example(case=("train.lr", 10.0))  # the largest accepted: may diverge, then refused on the record
@example(case=("federation.strategy", "fedadam"))
@example(case=("train.batch_size", 0))
@example(case=("model.hidden", 0))
def test_a_drawn_setting_is_refused_by_its_key_or_runs_a_sane_federation(federation, quick_data, tmp_path_factory,
                                                                          case):
    """A setting the config accepts runs one round of the EHR MLP at two sites in process, without a warning, to
    a finite final block or a stop recorded with its reason; one it refuses is a ConfigError naming the key."""
    key, value = case
    base = quick_config(quick_data, {"model.name": "mlp", "train.local_epochs": 1, "federation.rounds": 1})
    try:
        cfg = apply_overrides(base, {key: value if isinstance(value, str) else yaml.safe_dump(value)})
    except ConfigError as err:
        assert key in str(err) and "\n" not in str(err), str(err)
        return
    run_dir = tmp_path_factory.mktemp("run") / "run"
    with warnings.catch_warnings(record=True) as caught:  # torch's or numpy's warning: a value gone silently wrong
        warnings.simplefilter("always", UserWarning)
        warnings.simplefilter("always", RuntimeWarning)
        metrics = federation(run_dir, cfg)
    odd = sorted({f"{w.category.__name__}: {w.message}" for w in caught
                  if issubclass(w.category, (UserWarning, RuntimeWarning))})
    assert not odd, f"{key}={value!r}: {odd}"
    ran = functools.reduce(getattr, key.split("."), load(run_dir / "config.yaml"))
    assert ran == value, f"{key}: drawn {value!r}, ran with {ran!r}"  # never silently replaced
    # A site's error is a crash the value caused (its traceback's last line); only the server's reply checks
    # may refuse a site, saying why.
    failed = [why for r in metrics["rounds"] for part in ("failed", "evaluate_failed")
              for why in r.get(part, {}).values()]
    assert all(why.startswith("rejected ") for why in failed), failed
    stopped = metrics.get("stopped")
    assert stopped is None or (isinstance(stopped, str) and stopped), stopped
    assert _finite_numbers(metrics["final"]), metrics["final"]
    if stopped or failed:  # the drawn value diverged and the server refused it: on the record, with why
        return
    assert [r["round"] for r in metrics["rounds"]] == [1] and all(len(r["sites"]) == 2 for r in metrics["rounds"])
    assert metrics["final"]["source"] == "central" and math.isfinite(metrics["final"]["macro_auc"])
