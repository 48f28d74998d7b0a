"""Site shift remedies: stain normalisation (fixed and federated reference), stain augmentation, FedBN."""

import dataclasses

import numpy as np
import pytest
import torch

from shared import learner, stain
from shared.brecahad import list_tiles, read_image
from shared.config import apply_overrides, load
from shared.data import load_folder
from shared.train import make_batch
from tests.helpers import CONFIG


@pytest.mark.parametrize("method", ["reinhard", "macenko"])
def test_normalisation_moves_a_tiles_stain_statistics_toward_the_reference(quick_data, method):
    """Measured on normalised tiles of two hospitals (two stain styles): their colour statistics (Reinhard's LAB
    means and spreads, Macenko's stain vectors) come on average at least halfway to the reference's, and every
    tile's statistics come closer. On average over both sites, not per site: a site whose stain already sits
    at the reference (Macenko colour distance about 0.08 for site-0 of the quick data) cannot come halfway
    closer than Macenko's own re-estimation noise (about 0.05 on a normalised tile)."""
    reference = stain.shipped(method)  # what the sites read: the shipped image's statistics, as numbers
    np.testing.assert_allclose(reference, stain.reference_from_image(method, stain.SHIPPED_IMAGE), rtol=1e-9)
    normalise = stain.Normaliser(method, reference)
    colour = slice(0, 6)  # reinhard: all six; macenko: the H and E vectors (the rest: concentration percentiles)
    before_colour, after_colour = [], []
    for site in ("site-0", "site-1"):
        for tile in list_tiles(quick_data / site / "BreCaHAD")[:4]:
            image = read_image(tile.image)
            before = stain.statistics(method, image) - reference
            after = stain.statistics(method, normalise(image)) - reference
            assert np.linalg.norm(after) < np.linalg.norm(before), (site, tile.image.name, before, after)
            before_colour.append(np.linalg.norm(before[colour]))
            after_colour.append(np.linalg.norm(after[colour]))
    assert np.mean(after_colour) < 0.5 * np.mean(before_colour), (before_colour, after_colour)


def test_the_federated_reference_is_the_sites_average_and_reaches_every_patch(federation, quick_data, tmp_path):
    metrics = federation(tmp_path / "run", {"federation.rounds": 1, "data.stain_norm": "macenko",
                                              "data.stain_reference": "federated"})
    parts = [stain.site_statistics("macenko", (read_image(t.image) for t in list_tiles(quick_data / s / "BreCaHAD")))
             for s in ("site-0", "site-1")]
    assert metrics["stain"]["images_per_site"] == {"site-0": parts[0][1], "site-1": parts[1][1]}
    expected = (parts[0][0] * parts[0][1] + parts[1][0] * parts[1][1]) / (parts[0][1] + parts[1][1])
    np.testing.assert_allclose(metrics["stain"]["reference"], expected, rtol=1e-12)
    # The holdout the server scored was normalised with that reference: its patches differ from the raw ones.
    cfg = apply_overrides(load(CONFIG), {"data.stain_norm": "macenko", "data.stain_reference": "federated",
                                         "data.patch_size": 32})
    raw = load_folder(quick_data / "holdout", dataclasses.replace(cfg.data, stain_norm="none"))
    normalised = load_folder(quick_data / "holdout", cfg.data, 0, "patch", metrics["stain"]["reference"])
    assert raw.images.shape == normalised.images.shape and np.abs(raw.images.astype(int) - normalised.images).mean() > 1


def test_augmentation_changes_training_batches_but_never_evaluation(quick_data):
    cfg = apply_overrides(load(CONFIG), {"data.patch_size": 32, "model.name": "cnn", "train.hed_jitter": 0.2})
    samples = load_folder(quick_data / "site-0", cfg.data)
    idx = np.arange(16)
    plain, _, _ = make_batch(samples, idx, None, None)
    augmented, _, _ = make_batch(samples, idx, cfg.train, torch.Generator().manual_seed(0))
    assert (augmented - plain).abs().mean() > 0.01  # training sees jittered, rotated patches
    weights, _ = learner.initial_weights(cfg, np.zeros(27), np.ones(27))
    first, _ = learner.predict(cfg, weights, samples)
    second, _ = learner.predict(cfg, weights, samples)
    off = apply_overrides(cfg, {"train.hed_jitter": 0.0, "train.flips": False})
    np.testing.assert_array_equal(first, second)
    np.testing.assert_array_equal(first, learner.predict(off, weights, samples)[0])


def test_under_fedbn_no_batch_norm_weight_leaves_a_site(federation, tmp_path, monkeypatch):
    import simulations.inprocess as inprocess

    replies = []
    transmit = inprocess._transmitted

    def spy(message):
        if message.metadata.reply_to_message_id:  # a site's reply, as it leaves the site
            replies.append(message)
        return transmit(message)

    monkeypatch.setattr(inprocess, "_transmitted", spy)
    changes = {"federation.rounds": 2, "model.cnn_norm": "batch", "federation.fedbn": True, "report.shap_rows": 20,
               "model.name": "fusion"}
    metrics = federation(tmp_path / "run", changes)
    cfg = apply_overrides(load(CONFIG), changes)
    local = learner.bn_names(cfg)
    assert len(local) == 12  # 4 BatchNorm layers: running mean, variance and count each
    sent = {k for m in replies if not m.has_error() for record in m.content.array_records.values() for k in record}
    assert sent and not sent & local
    assert sent == set(learner.trained_names(cfg)) | {"ehr.mean", "ehr.std"}  # everything else did travel
    assert all(r["sites"] and r["central"] for r in metrics["rounds"])
    saved = torch.load(tmp_path / "run" / "model.pt", weights_only=True)
    assert all(float(saved[k].abs().sum()) == 0 for k in local if k.endswith("running_mean"))  # never averaged


def test_a_new_site_estimates_batch_norm_statistics_from_its_own_patches(quick_data):
    cfg = apply_overrides(load(CONFIG), {"data.patch_size": 32, "model.name": "cnn", "model.cnn_norm": "batch",
                                         "federation.fedbn": True})
    samples = load_folder(quick_data / "site-1", cfg.data)
    samples = samples.subset(np.arange(len(samples)) < 512)  # two whole batches: the average of batch means is exact
    weights, _ = learner.initial_weights(cfg, np.zeros(27), np.ones(27))
    adapted = learner.adapt_bn(cfg, weights, samples)
    conv = learner.network(cfg, weights).image.features[0]
    with torch.no_grad():
        first = conv(torch.from_numpy(samples.images).permute(0, 3, 1, 2).float() / 255 - 0.5).mean((0, 2, 3))
    np.testing.assert_allclose(adapted["image.features.1.running_mean"], first.numpy(), rtol=1e-4, atol=1e-6)
    assert not np.allclose(weights["image.features.1.running_mean"], adapted["image.features.1.running_mean"])


@pytest.mark.parametrize("content", [b"not an image", b"II*\x00" + b"\x00" * 12])
def test_an_unreadable_reference_image_is_one_error_naming_it(tmp_path, content):
    from shared.errors import DataFormatError

    path = tmp_path / "reference.tif"
    path.write_bytes(content)
    with pytest.raises(DataFormatError, match="reference.tif"):
        stain.reference_from_image("reinhard", path)
