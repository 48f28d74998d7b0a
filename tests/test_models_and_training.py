import numpy as np
import pytest
import torch

from shared.config import ModelConfig, TrainConfig
from shared.models import build_model
from shared.train import class_weights, predict, train_epochs
from tests.helpers import toy


@pytest.mark.parametrize("name", ["fusion", "late_fusion", "cnn", "resnet18", "mlp"])
def test_every_model_maps_a_batch_to_class_logits(name):
    model = build_model(ModelConfig(name=name), n_features=5, n_classes=3)
    probs, loss = predict(model, toy())
    assert probs.shape == (48, 3) and np.allclose(probs.sum(1), 1, atol=1e-5) and np.isfinite(loss)


def test_training_reduces_the_loss_on_a_learnable_task():
    torch.manual_seed(0)
    data = toy()
    model = build_model(ModelConfig(name="fusion"), 5, 3)
    _, before = predict(model, data)
    train_epochs(model, data, TrainConfig(local_epochs=15, batch_size=16, lr=0.003), 3, seed=0)
    probs, after = predict(model, data)
    assert after < before * 0.5
    assert (probs.argmax(1) == data.labels).mean() > 0.9


def test_training_is_deterministic_for_a_seed():
    outs = []
    for _ in range(2):
        torch.manual_seed(123)
        model = build_model(ModelConfig(name="cnn"), 5, 3)
        train_epochs(model, toy(), TrainConfig(local_epochs=1, batch_size=16), 3, seed=7)
        outs.append(predict(model, toy())[0])
    np.testing.assert_array_equal(outs[0], outs[1])


def test_class_weights():
    labels = np.array([0] * 10 + [1] * 80 + [2] * 10)
    w = class_weights(labels, 3, "balanced")
    assert w[0] == pytest.approx(100 / 30) and w[1] == pytest.approx(100 / 240)
    assert torch.allclose(class_weights(labels, 3, "sqrt") ** 2, w)
    assert torch.equal(class_weights(labels, 3, "none"), torch.ones(3))


def test_fusion_image_auxiliary_loss_trains_the_image_encoder_without_changing_predictions():
    torch.manual_seed(0)
    images, ehr = torch.rand(6, 3, 64, 64), torch.randn(6, 12)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    loss_fn = torch.nn.CrossEntropyLoss()
    with_aux = build_model(ModelConfig(name="fusion", image_aux_weight=1.0), 12, 3)
    plain = build_model(ModelConfig(name="fusion", image_aux_weight=0.0), 12, 3)
    assert plain.image_aux is None and with_aux.image_aux is not None
    state = {k: v for k, v in with_aux.state_dict().items() if not k.startswith("image_aux.")}
    plain.load_state_dict(state)
    with_aux.eval(), plain.eval()
    assert torch.equal(with_aux(images, ehr), plain(images, ehr))  # predictions use the fused head only
    fused = loss_fn(plain(images, ehr), labels)
    aux = loss_fn(with_aux.image_aux(with_aux.image_norm(with_aux.image(images))), labels)
    assert torch.allclose(with_aux.loss(images, ehr, labels, loss_fn), fused + aux)
    # the auxiliary head is image-only: image-only models do not get one
    assert build_model(ModelConfig(name="cnn", image_aux_weight=1.0), 12, 3).image_aux is None


def test_learning_rate_schedule_warms_up_then_decays_over_the_whole_run():
    from shared.train import lr_factor

    cfg = TrainConfig(schedule="cosine", warmup=0.1)
    assert lr_factor(cfg, 0.0) == pytest.approx(0.01) and lr_factor(cfg, 0.05) == pytest.approx(0.51)
    assert lr_factor(cfg, 0.1) == pytest.approx(1.0) and lr_factor(cfg, 0.55) == pytest.approx(0.5)
    assert lr_factor(cfg, 0.999) < 1e-4
    assert lr_factor(TrainConfig(), 0.7) == 1.0  # constant, no warm-up: the default


def test_a_rounds_steps_take_their_share_of_the_schedule_and_the_encoder_its_own_rate():
    seen = []

    class Recording(torch.optim.Adam):
        def step(self, *args, **kwargs):
            seen.append([g["lr"] for g in self.param_groups])
            return super().step(*args, **kwargs)

    cfg = TrainConfig(steps=4, batch_size=8, lr=0.01, encoder_lr=0.001, schedule="cosine")
    model = build_model(ModelConfig(name="fusion"), 5, 3)
    original, torch.optim.Adam = torch.optim.Adam, Recording
    try:
        train_epochs(model, toy(), cfg, 3, seed=0, progress=(2, 4))  # round 3 of 4: positions 0.5 to 0.6875
    finally:
        torch.optim.Adam = original
    encoder, rest = zip(*seen)
    np.testing.assert_allclose(rest, [0.01 * 0.5 * (1 + np.cos(np.pi * (0.5 + s / 16))) for s in range(4)])
    np.testing.assert_allclose(np.array(encoder) * 10, rest)
