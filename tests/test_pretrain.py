"""Weights made outside the federation (`fedfuse pretrain`): their file, provenance and hash; the two splits."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from shared.config import ModelConfig, load
from shared.contrastive import nt_xent
from shared.data import Samples, split_by_case, split_by_patch
from shared.models import build_model, load_pretrained_weights
from shared.pretrain import provenance_path, sha256_of, write_weights
from simulations.cli import absolute_paths
from simulations.flower import federate
from simulations.paper import load_experiment
from simulations.pretrain import PretrainConfig, run_pretrain

ROOT = Path(__file__).resolve().parent.parent


def _cnn_weights(tmp_path: Path, seed: int = 3) -> tuple[Path, dict]:
    torch.manual_seed(seed)
    encoder = build_model(ModelConfig(name="cnn"), 5, 3).image
    path = tmp_path / "cnn.safetensors"
    return path, write_weights(encoder, path, {"made_by": "a test"})


def test_a_file_with_missing_and_extra_keys_loads_what_fits_and_names_the_rest(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    source = build_model(ModelConfig(name="cnn"), 5, 3).image.state_dict()
    state = {k: v for k, v in source.items() if k != "project.bias"}  # one missing
    state["head.extra"] = torch.zeros(2)  # one this model lacks
    state["project.weight"] = torch.zeros(3, 3)  # one of the wrong shape
    path = tmp_path / "partial.safetensors"
    save_file(state, str(path))
    model = build_model(ModelConfig(name="fusion", image_encoder="cnn", pretrained=str(path)), 5, 3)
    report = load_pretrained_weights(model, str(path))
    assert report["missing"] == ["project.bias", "project.weight"]  # both keep their random start
    assert report["not_loaded"]["head.extra"] == "no such parameter in this model"
    assert "shape (3, 3)" in report["not_loaded"]["project.weight"]
    assert torch.equal(model.image.features[0].weight, source["features.0.weight"])
    assert report["sha256"] == sha256_of(path) and report["provenance"] is None


def test_provenance_that_does_not_match_the_weights_is_refused(tmp_path):
    path, record = _cnn_weights(tmp_path)
    assert json.loads(provenance_path(path).read_text())["sha256"] == record["sha256"] == sha256_of(path)
    model = build_model(ModelConfig(name="cnn"), 5, 3)
    assert load_pretrained_weights(model, str(path))["provenance"]["made_by"] == "a test"
    _cnn_weights(tmp_path, seed=4)  # other weights under the same name ...
    provenance_path(path).write_text(json.dumps(record))  # ... beside the first weights' provenance
    with pytest.raises(ValueError, match="sha256 .* but its provenance"):
        load_pretrained_weights(model, str(path))


def test_a_weights_file_holding_something_else_is_a_clear_error(tmp_path):
    path = tmp_path / "w.pth"
    torch.save({"conv1.weight": torch.zeros(1), "note": "a string"}, path)
    with pytest.raises(ValueError, match=r"w\.pth holds no \{name: tensor\}"):
        load_pretrained_weights(build_model(ModelConfig(name="resnet18"), 5, 3), str(path))
    with pytest.raises(ValueError, match="no image encoder"):
        load_pretrained_weights(build_model(ModelConfig(name="mlp"), 5, 3), str(path))


def test_patch_split_puts_cases_on_both_sides_and_case_split_never():
    cases = np.repeat([f"Case_{i}" for i in range(10)], 30)
    samples = Samples(np.zeros((300, 2, 2, 3), np.uint8), np.zeros((300, 4), np.float32),
                      np.arange(300) % 3, cases)
    train, test = split_by_case(samples, 0.3, seed=0)
    assert not set(train.cases) & set(test.cases)
    train, test = split_by_patch(samples, 0.3, seed=0)
    assert len(test) == 90 and len(set(train.cases) & set(test.cases)) == 10  # every case on both sides


def test_nt_xent_is_low_for_matching_views_and_chance_for_unrelated_ones():
    torch.manual_seed(0)
    z = torch.randn(16, 8)
    assert float(nt_xent(z, z, 0.1)) < 0.1
    assert float(nt_xent(torch.ones(16, 8), torch.ones(16, 8), 0.1)) == pytest.approx(np.log(31), rel=1e-4)


@pytest.fixture(scope="module")
def quick_weights(quick_data, tmp_path_factory):
    """`fedfuse pretrain --quick` (supervised CNN) on the quick data, standing for the public set."""
    base, settings = load_experiment(ROOT / "configs/pretrain.yaml", True, "pretrain", PretrainConfig)
    base = dataclasses.replace(base, model=dataclasses.replace(base.model, name="cnn"),
                               data=dataclasses.replace(base.data, root=str(quick_data), sites=2))
    out = tmp_path_factory.mktemp("weights") / "{model}-{method}.safetensors"
    return run_pretrain(base, dataclasses.replace(settings, steps=3, out=str(out)), echo=lambda line: None)


def test_pretrain_writes_weights_whose_hash_and_provenance_a_run_records(quick_weights, quick_data, tmp_path):
    path, provenance = quick_weights
    assert path.name == "cnn-supervised.safetensors" and provenance["sha256"] == sha256_of(path)
    assert provenance["steps"] == 3 and provenance["data"]["labels_used"] and "macro_auc" in provenance["public_test"]
    cfg = absolute_paths(load(ROOT / "configs/quickstart.yaml", {
        "data.root": str(quick_data), "data.sites": 2, "model.pretrained": str(path), "train.steps": 1,
        "federation.rounds": 1, "report.shap_rows": 0, "server.eval_data": None}))
    federate(cfg, tmp_path / "run", engine="inprocess")
    recorded = json.loads((tmp_path / "run" / "metrics.json").read_text())["pretrained"]
    assert recorded["sha256"] == provenance["sha256"] and recorded["provenance"]["steps"] == 3
    assert recorded["missing"] == [] and len(recorded["loaded"]) == provenance["keys"]


def test_pretrain_never_overwrites_a_file_it_did_not_write(quick_weights, quick_data, tmp_path):
    base, settings = load_experiment(ROOT / "configs/pretrain.yaml", True, "pretrain", PretrainConfig)
    mine = tmp_path / "cnn-supervised.safetensors"
    mine.write_bytes(b"a user's own weights")
    base = dataclasses.replace(base, model=dataclasses.replace(base.model, name="cnn"),
                               data=dataclasses.replace(base.data, root=str(quick_data), sites=2))
    with pytest.raises(FileExistsError, match="not written by fedfuse pretrain"):
        run_pretrain(base, dataclasses.replace(settings, out=str(tmp_path / "{model}-{method}.safetensors")))
    assert mine.read_bytes() == b"a user's own weights"
