"""Compact uploads: only trained weights and/or float16 from the site, whole float32 models at the server."""

import numpy as np
import pytest
import torch

from shared import learner
from shared.config import ConfigError, apply_overrides, load
from shared.wire import compact, expand
from tests.helpers import CONFIG


def test_a_site_sends_its_trained_weights_in_half_the_bytes_and_the_server_restores_the_model():
    cfg = apply_overrides(load(CONFIG), {"federation.upload": "trainable", "federation.upload_dtype": "float16"})
    weights, _ = learner.initial_weights(cfg, np.zeros(27), np.ones(27))
    sent = compact(cfg, weights)
    assert set(sent) == learner.trained_names(cfg) and set(sent) < set(weights)
    assert {v.dtype for v in sent.values()} == {np.dtype(np.float16)}
    full = sum(v.nbytes for v in weights.values())
    assert 0.45 * full < sum(v.nbytes for v in sent.values()) < 0.5 * full
    restored = expand(cfg, weights, sent)
    assert set(restored) == set(weights)
    for k, v in weights.items():
        assert restored[k].dtype == v.dtype
        if k in sent:
            np.testing.assert_allclose(restored[k], v, rtol=2**-10, atol=1e-7)
        else:  # a buffer the site did not send: the global model's own
            np.testing.assert_array_equal(restored[k], v)


def test_a_run_with_compact_uploads_tracks_the_full_precision_run(federation, tmp_path):
    models = {}
    for name, upload in [("full", {}), ("compact", {"federation.upload": "trainable",
                                                    "federation.upload_dtype": "float16"})]:
        metrics = federation(tmp_path / name / "run", {"federation.rounds": 2, **upload})
        assert [r["round"] for r in metrics["rounds"]] == [1, 2] and not any(r.get("failed") for r in metrics["rounds"])
        models[name] = torch.load(tmp_path / name / "run" / "model.pt", weights_only=True)
    assert set(models["full"]) == set(models["compact"])
    diffs = [float((models["full"][k].float() - models["compact"][k].float()).abs().max()) for k in models["full"]]
    assert 0 < max(diffs) < 5e-3  # float16 rounding, not another model


@pytest.mark.parametrize("upload", [{"federation.upload_dtype": "float16"},
                                    {"federation.fedbn": True, "model.cnn_norm": "batch"}])
def test_an_upload_without_the_whole_float32_model_cannot_be_clipped_at_the_site(upload):
    """Flower's client-side clipping mod rejects a reply whose arrays differ from what the site received."""
    private = {"privacy.mode": "central", "privacy.clipping": "client", "privacy.epsilon": None,
               "privacy.noise_multiplier": 0.5}
    apply_overrides(load(CONFIG), {**private, "privacy.clipping": "server", **upload})  # server-side: fine
    with pytest.raises(ConfigError, match=r"fedbn.*privacy\.clipping: client"):
        apply_overrides(load(CONFIG), {**private, **upload})
