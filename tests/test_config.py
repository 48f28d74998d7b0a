import dataclasses
import re
import tomllib
import typing
from pathlib import Path

import pytest

from shared.config import (
    RUN_KEYS,
    WEEK_S,
    Config,
    ConfigError,
    apply_overrides,
    flat_keys,
    flatten,
    from_run_config,
    load,
    parse_assignments,
    read_envelope,
    run_envelope,
)

ROOT = Path(__file__).resolve().parent.parent


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_quickstart_loads_and_is_typed():
    cfg = load(ROOT / "configs/quickstart.yaml")
    assert cfg.model.name == "fusion"
    assert isinstance(cfg.train.lr, float) and isinstance(cfg.federation.rounds, int)
    assert cfg.data.classes == ("mitosis", "tumor", "non_tumor")


def test_unknown_key_names_its_dotted_path(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.learning_rate: unknown key"):
        load(write(tmp_path, "train:\n  learning_rate: 0.1\n"))


def test_wrong_type_names_path_and_expected_type(tmp_path):
    with pytest.raises(ConfigError, match=r"federation\.rounds: expected int, got str"):
        load(write(tmp_path, "federation:\n  rounds: many\n"))
    with pytest.raises(ConfigError, match=r"data\.classes: expected a list of str"):
        load(write(tmp_path, "data:\n  classes: mitosis\n"))


def test_choice_is_checked(tmp_path):
    with pytest.raises(ConfigError, match=r"data\.border: expected one of reflect, drop"):
        load(write(tmp_path, "data:\n  border: wrap\n"))


def test_set_overrides_parse_by_field_type():
    cfg = apply_overrides(Config(), parse_assignments(["federation.rounds=3", "model.name=cnn",
                                                       "data.classes=[mitosis, tumor]", "server.eval_data=null"]))
    assert cfg.federation.rounds == 3 and cfg.model.name == "cnn"
    assert cfg.data.classes == ("mitosis", "tumor") and cfg.server.eval_data is None
    with pytest.raises(ConfigError, match=r"federation\.round: unknown key; did you mean federation\.rounds"):
        apply_overrides(Config(), {"federation.round": "3"})
    with pytest.raises(ConfigError, match=r"train\.lr: expected float"):
        apply_overrides(Config(), {"train.lr": "fast"})
    with pytest.raises(ConfigError, match="expected section.key=value"):
        parse_assignments(["rounds"])


def test_run_config_round_trip(tmp_path):
    cfg = apply_overrides(Config(), {"train.lr": "0.01", "data.cache_dir": "/tmp/c"})
    run_config = run_envelope(cfg, tmp_path / "run", ROOT / "configs/quickstart.yaml", resume=True)
    assert all(isinstance(v, (bool, int, float, str)) for v in run_config.values())
    assert read_envelope(run_config, ROOT) == (cfg, str(tmp_path / "run"), True)
    assert read_envelope({**run_config, "resume": ""}, ROOT)[2] is False


def test_empty_run_config_value_means_as_in_yaml():
    run_config = {"config": "configs/quickstart.yaml", "train.lr": "", "federation.rounds": 2}
    cfg = from_run_config(run_config, ROOT)
    assert cfg.train.lr == load(ROOT / "configs/quickstart.yaml").train.lr
    assert cfg.federation.rounds == 2


def test_pyproject_app_config_lists_every_setting_and_no_defaults():
    app_config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]

    def flat(d, prefix=""):
        for k, v in d.items():
            if isinstance(v, dict):
                yield from flat(v, f"{prefix}{k}.")
            else:
                yield f"{prefix}{k}", v

    items = dict(flat(app_config))
    assert sorted(set(items) - set(RUN_KEYS)) == flat_keys()
    assert all(v == "" for k, v in items.items() if k != "config")  # the YAML holds the defaults


@pytest.mark.parametrize("overrides,message", [
    ({"model.name": "xgboost", "federation.strategy": "xgb_bagging", "model.xgb_local_rounds": "3"},
     r"model\.xgb_local_rounds: xgb_bagging appends one tree"),
    ({"federation.min_sites": "5"}, r"federation\.min_sites: expected between 1 and data\.sites \(3\)"),
    ({"data.test_fraction": "1.0"}, r"data\.test_fraction: expected between 0 and 1"),
    ({"model.pretrained": "w.pth", "model.name": "mlp"},
     r"model\.pretrained / model\.freeze: only for a model with an image encoder"),
    ({"data.positive": "[invasive, metastatic]"}, r"data\.positive\[1\]: expected one of invasive"),
    ({"data.classes": "[mitosis, nucleus]"}, r"data\.classes\[1\]: expected one of mitosis, non_mitosis"),
    ({"model.name": "cnn", "federation.strategy": "xgb_cyclic"}, r"does not fit model\.name 'cnn'"),
])
def test_settings_that_cannot_work_together_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        apply_overrides(Config(), overrides)


def test_path_overrides_stay_strings():
    cfg = apply_overrides(Config(), {"server.eval_data": "2024-01-01", "data.cache_dir": "yes"})
    assert cfg.server.eval_data == "2024-01-01" and cfg.data.cache_dir == "yes"
    assert apply_overrides(Config(), {"server.eval_data": "null"}).server.eval_data is None


def test_the_update_bound_defaults_to_10_and_null_turns_it_off():
    assert Config().federation.max_relative_update == 10.0
    assert load(ROOT / "configs/quickstart.yaml").federation.max_relative_update == 10.0
    assert apply_overrides(Config(), {"federation.max_relative_update": "null"}).federation.max_relative_update is None


@pytest.mark.parametrize("yaml_text,message", [
    ("data:\n  classes: []\n", r"data\.classes: expected at least 2 classes, each named once, got \[\]"),
    ("data:\n  classes: [mitosis, tumor, mitosis]\n", r"data\.classes: expected at least 2 classes, each named once"),
    ("data:\n  positive: []\n", r"data\.positive: expected at least 1 ICD group"),
    ("data:\n  label_map: {mitosis: 2, tumor: 1, non_tumor: 0}\n",
     r"data\.label_map: expected BreCaHAD keys mapped to EHR labels 0 or 1"),
    ("model:\n  hidden: 0\n", r"model\.hidden: expected between 1 and 4096, got 0"),
    ("model:\n  image_latent: -3\n", r"model\.image_latent: expected between 1 and 4096, got -3"),
    ("model:\n  xgb_eta: 0\n", r"model\.xgb_eta: expected in \(0, 1\], got 0\.0"),
    ("train:\n  weight_decay: -0.001\n", r"train\.weight_decay: expected in \[0, 1\], got -0\.001"),
    ("train:\n  lr: .nan\n", r"train\.lr: expected positive, at most 10, got nan"),
    ("train:\n  local_epochs: -2\n  steps: 5\n", r"train\.local_epochs: expected between 0 and 1000, got -2"),
    ("federation:\n  server_lr: -0.01\n", r"federation\.server_lr: expected positive, at most 10, got -0\.01"),
    ("federation:\n  beta_2: 1.0\n", r"federation\.beta_2: expected in \[0, 1\)"),
    ("federation:\n  tau: 0\n", r"federation\.tau: expected in \(0, 1\]"),
    ("federation:\n  round_timeout: .inf\n", r"federation\.round_timeout: expected positive, at most 604800"),
    ("federation:\n  krum_malicious: 3\n", r"federation\.krum_malicious: expected between 0 and data\.sites - 1 \(2\)"),
    ("federation:\n  max_update_ratio: .inf\n", r"federation\.max_update_ratio: expected above 1 and finite"),
    ("federation:\n  max_relative_update: 0\n", r"federation\.max_relative_update: expected positive and finite, or "
                                                r"null, got 0\.0"),
    ("federation:\n  max_relative_update: .inf\n", r"federation\.max_relative_update: expected positive and finite"),
    ("privacy:\n  noise_multiplier: .inf\n", r"privacy\.noise_multiplier: expected in \[0, 1000\]"),
    ("privacy:\n  clip_norm: .inf\n", r"privacy\.clip_norm: expected positive and finite"),
    ("privacy:\n  secagg_quantization_range: 4294967296\n", r"privacy\.secagg_quantization_range: expected between 2"),
    ("seed: -1\n", r"seed: expected between 0 and 2\*\*32 - 1 \(a 32-bit seed\), got -1"),
    ("simulation:\n  cpus_per_site: 0\n", r"simulation\.cpus_per_site: expected between 0\.01 and 1024, got 0\.0"),
    ("simulation:\n  cpus_per_site: " + "9" * 400 + "\n", r"simulation\.cpus_per_site: expected float, got an integer "
                                                           r"of \d+ bits, beyond any float"),
    ("data:\n  sites: " + "9" * 40 + "\n", r"data\.sites: expected between 1 and 1000, got an integer of 133 bits"),
    ("faults:\n  crash: ['5@1']\n", r"faults\.crash\[0\]: expected SITE@ROUND, a site in 0\.\.2 and a round in 1\.\.6"),
    ("faults:\n  nan: ['0@0']\n", r"faults\.nan\[0\]: expected SITE@ROUND"),
    ("data:\n  root: ''\n", r"data\.root: expected a path \(not empty, no NUL character\), got ''"),
    ("data:\n  cache_dir: \"a\\0b\"\n", r"data\.cache_dir: expected a path \(not empty, no NUL character\) or null"),
])
def test_nonsense_values_are_refused_with_the_key_and_what_was_expected(tmp_path, yaml_text, message):
    with pytest.raises(ConfigError, match=message) as err:
        load(write(tmp_path, yaml_text))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("name", ["../../x", "a/b", "a\\b", "..", "", "run\x00", "tab\there", "new\nline",
                                  "x" * 101])
def test_a_name_that_is_not_one_folder_name_is_refused(name):
    with pytest.raises(ConfigError, match=r"^overrides: name \(it names the run's folder.*\): expected one plain name"):
        apply_overrides(Config(), {"name": name})


def test_plain_names_and_the_bounds_themselves_are_accepted():
    cfg = apply_overrides(Config(), {
        "name": "Oslo_2024.v2 (re-run)", "seed": 2**32 - 1, "model.hidden": 4096, "train.weight_decay": 0.0,
        "federation.server_lr": 10.0, "federation.krum_malicious": 2, "simulation.cpus_per_site": 0.01,
        "data.classes": ["mitosis", "tumor"], "privacy.epsilon": ".inf", "federation.round_timeout": 604800})
    assert cfg.name == "Oslo_2024.v2 (re-run)" and cfg.seed == 2**32 - 1 and cfg.privacy.epsilon == float("inf")


def _fields(cls=Config, prefix=""):
    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            yield from _fields(tp, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", tp, f


def test_every_number_has_its_bound_beside_its_type_and_every_choice_is_a_literal():
    numbers = {key: f for key, tp, f in _fields() if {int, float} & {tp, *typing.get_args(tp)}}
    assert "train.lr" in numbers and "federation.round_timeout" in numbers and len(numbers) > 50
    unbounded = sorted(key for key, f in numbers.items() if "ok" not in f.metadata)
    assert unbounded == [], f"numbers without a bound (shared.config.bounded): {unbounded}"
    free_text = sorted(key for key, tp, f in _fields() if tp in (str, str | None) and "path" not in f.metadata)
    assert free_text == ["name"], f"strings that are neither a Literal nor a path: {free_text}"


@pytest.mark.parametrize("key,below,at_edge,beyond", [
    ("data.sites", 0, 1000, 1001), ("train.lr", 0.0, 10.0, 10.5), ("federation.beta_1", -0.1, 0.0, 1.0),
    ("federation.round_timeout", 0.0, WEEK_S, WEEK_S + 1), ("model.xgb_eta", 0.0, 1.0, 1.01),
    ("simulation.cpus_per_site", 0.0, 0.01, 1025.0), ("privacy.epsilon", -1.0, 1000.0, 1001.0),
])
def test_a_field_bound_refuses_on_both_sides_and_takes_its_edge(key, below, at_edge, beyond):
    assert flatten(apply_overrides(Config(), {key: at_edge}))[key] == at_edge
    for value in (below, beyond):
        with pytest.raises(ConfigError, match=rf"^overrides: {re.escape(key)}: expected "):
            apply_overrides(Config(), {key: value})


def test_every_preset_loads():
    from simulations.paper import PaperConfig, load_experiment, load_paper
    from simulations.pretrain import PretrainConfig, check
    from simulations.shift_study import ShiftStudyConfig

    load(ROOT / "configs/quickstart.yaml")
    for quick in (False, True):
        load_experiment(ROOT / "configs/paper.yaml", quick, "paper", PaperConfig)
        load_paper(ROOT / "configs/paper.yaml", quick)  # every row, variants included, builds a valid config
        check(*load_experiment(ROOT / "configs/pretrain.yaml", quick, "pretrain", PretrainConfig))
        load_experiment(ROOT / "configs/shift_study.yaml", quick, "study", ShiftStudyConfig)
