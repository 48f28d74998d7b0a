import tomllib
from pathlib import Path

import pytest

from shared.config import (
    Config,
    ConfigError,
    apply_overrides,
    flat_keys,
    flatten,
    from_run_config,
    load,
    parse_assignments,
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


def test_run_config_round_trip():
    cfg = apply_overrides(Config(), {"train.lr": "0.01", "data.cache_dir": "/tmp/c"})
    run_config = {"config": str(ROOT / "configs/quickstart.yaml"), **flatten(cfg)}
    assert all(isinstance(v, (bool, int, float, str)) for v in run_config.values())
    assert from_run_config(run_config, ROOT) == cfg


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
    assert sorted(set(items) - {"config", "run-dir", "resume"}) == flat_keys()
    assert all(v == "" for k, v in items.items() if k != "config")  # the YAML holds the defaults


@pytest.mark.parametrize("overrides,message", [
    ({"model.name": "xgboost", "federation.strategy": "xgb_bagging", "model.xgb_local_rounds": "3"},
     r"model\.xgb_local_rounds: xgb_bagging appends one tree"),
    ({"federation.min_sites": "5"}, r"federation\.min_sites: expected between 1 and data\.sites \(3\)"),
    ({"data.test_fraction": "1.0"}, r"data\.test_fraction: expected between 0 and 1"),
    ({"model.pretrained": "w.pth"}, r"model\.pretrained / model\.freeze: only for a ResNet-18 encoder"),
    ({"data.positive": "[invasive, metastatic]"}, r"data\.positive\[1\]: expected one of invasive"),
    ({"data.classes": "[mitosis, nucleus]"}, r"data\.classes: \['nucleus'\] are not BreCaHAD keys"),
    ({"model.name": "cnn", "federation.strategy": "xgb_cyclic"}, r"does not fit model\.name 'cnn'"),
])
def test_settings_that_cannot_work_together_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        apply_overrides(Config(), overrides)


def test_path_overrides_stay_strings():
    cfg = apply_overrides(Config(), {"server.eval_data": "2024-01-01", "data.cache_dir": "yes"})
    assert cfg.server.eval_data == "2024-01-01" and cfg.data.cache_dir == "yes"
    assert apply_overrides(Config(), {"server.eval_data": "null"}).server.eval_data is None
