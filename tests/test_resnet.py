"""ResNet-18: torchvision's keys (so ImageNet weights load), the Opacus-ready variant, freezing."""

import numpy as np
import pytest
import torch
from opacus import GradSampleModule
from opacus.validators import ModuleValidator
from torchvision.models import resnet18

from shared.config import ModelConfig
from shared.models import build_model, load_pretrained_weights
from shared.resnet import ResNetEncoder


@pytest.fixture(scope="module")
def imagenet_like_file(tmp_path_factory):
    """A torchvision ResNet-18 state dict on disk, as a user's downloaded ImageNet file would be."""
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("weights") / "resnet18-imagenet.pth"
    torch.save(resnet18().state_dict(), path)
    return path


@pytest.mark.parametrize("norm", ["group", "batch"])
def test_pretrained_weights_load_and_the_rest_is_listed(norm, imagenet_like_file):
    cfg = ModelConfig(name="resnet18", resnet_norm=norm, pretrained=str(imagenet_like_file))
    model = build_model(cfg, 5, 3)
    report = load_pretrained_weights(model, cfg.pretrained)
    source = torch.load(imagenet_like_file, weights_only=True)
    assert torch.equal(model.image.net.conv1.weight, source["conv1.weight"])
    assert torch.equal(model.image.net.layer4[1].bn2.weight, source["layer4.1.bn2.weight"])
    assert "fc.weight" in report["not_loaded"] and "shape" in report["not_loaded"]["fc.weight"]
    running = [k for k in report["not_loaded"] if "running_" in k or "num_batches" in k]
    assert (len(running) > 0) == (norm == "group")  # GroupNorm has no running statistics
    assert len(report["loaded"]) + len(report["not_loaded"]) == len(source)


def test_group_variant_trains_under_opacus_per_sample_gradients():
    encoder = ResNetEncoder(8, norm="group")
    assert ModuleValidator.validate(encoder, strict=False) == []
    assert ModuleValidator.validate(ResNetEncoder(8, norm="batch"), strict=False) != []
    gsm = GradSampleModule(encoder)
    gsm(torch.rand(4, 3, 32, 32)).sum().backward()
    grad_sample = encoder.net.conv1.weight.grad_sample
    assert grad_sample.shape[0] == 4 and torch.isfinite(grad_sample).all()


def test_freeze_trains_only_the_projection_and_heads():
    model = build_model(ModelConfig(name="fusion", image_encoder="resnet18", freeze=True), 5, 3)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "image.net.fc.weight" in trainable and "head.1.weight" in trainable
    assert not any(n.startswith("image.net.layer") or n.startswith("image.net.conv1") for n in trainable)


def test_missing_weights_file_is_a_clear_error(tmp_path):
    model = build_model(ModelConfig(name="resnet18"), 5, 3)
    with pytest.raises(FileNotFoundError, match="never downloaded"):
        load_pretrained_weights(model, str(tmp_path / "nope.pth"))
    with pytest.raises(ValueError, match="no image encoder"):
        load_pretrained_weights(build_model(ModelConfig(name="mlp"), 5, 3), str(tmp_path / "nope.pth"))


def test_late_fusion_averages_the_two_models_probabilities():
    model = build_model(ModelConfig(name="late_fusion"), 5, 3).eval()
    images, ehr = torch.rand(6, 3, 32, 32), torch.randn(6, 5)
    with torch.no_grad():
        mixed = torch.softmax(model(images, ehr), 1)
        a = torch.softmax(model.image_model(images, ehr), 1)
        b = torch.softmax(model.ehr_model(images, ehr), 1)
    np.testing.assert_allclose(mixed.numpy(), ((a + b) / 2).numpy(), rtol=1e-5, atol=1e-6)
