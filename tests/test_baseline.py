"""The colour-statistics baseline: its features, its split and its numbers are what scikit-learn gives."""

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from shared.config import DataConfig
from shared.data import load_folder, load_site
from simulations.baseline import CENTRE_TEXTURE, FEATURES, ROWS, patch_features, run_baseline
from simulations.cli import main

CFG = DataConfig()


def test_features_are_the_named_statistics():
    rng = np.random.default_rng(0)
    patches = rng.integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    feats = patch_features(patches)
    assert feats.shape == (3, len(FEATURES))
    grey = patches.astype(float).mean(-1)
    col = dict(zip(FEATURES, feats.T))
    np.testing.assert_allclose(col["mean_r"], patches[..., 0].reshape(3, -1).mean(1), rtol=1e-5)
    np.testing.assert_allclose(col["grey_std"], grey.reshape(3, -1).std(1), rtol=1e-4)
    np.testing.assert_allclose(col["dark_share"], (grey < 110).reshape(3, -1).mean(1))
    np.testing.assert_allclose(col["centre_grey"], grey[:, 24:40, 24:40].reshape(3, -1).mean(1), rtol=1e-5)
    texture = dict(zip(CENTRE_TEXTURE, patch_features(patches, CENTRE_TEXTURE).T))
    np.testing.assert_allclose(texture["centre_grey_std"], grey[:, 24:40, 24:40].reshape(3, -1).std(1), rtol=1e-4)
    np.testing.assert_allclose(texture["centre_dark_share"], (grey[:, 24:40, 24:40] < 110).reshape(3, -1).mean(1))
    assert ROWS["colour + centre texture"] == FEATURES + CENTRE_TEXTURE


def test_unknown_feature_and_row_are_named():
    with pytest.raises(ValueError, match="centre_entropy"):
        patch_features(np.zeros((1, 64, 64, 3), np.uint8), ("mean_r", "centre_entropy"))
    with pytest.raises(ValueError, match="texture only"):
        run_baseline(None, CFG, row="texture only")


@pytest.mark.parametrize("row", list(ROWS))
def test_baseline_equals_sklearn_on_the_simulations_split(quick_data, row):
    result = run_baseline(quick_data, CFG, seed=0, row=row)
    # The same split by hand: site k with seed k (as `fedfuse simulate` with seed 0), the holdout to test.
    train = [load_site(quick_data / f"site-{k}", CFG, seed=k)[0] for k in range(2)]
    grey = lambda images: images.astype(np.float32).mean(-1)  # noqa: E731
    by_hand = {"colour": lambda images: patch_features(images),
               "colour + centre texture": lambda images: np.column_stack([
                   patch_features(images), grey(images)[:, 24:40, 24:40].reshape(len(images), -1).std(1),
                   (grey(images)[:, 24:40, 24:40] < 110).reshape(len(images), -1).mean(1)])}[row]
    x = np.concatenate([by_hand(t.images) for t in train])
    y = np.concatenate([t.labels for t in train])
    test = load_folder(quick_data / "holdout", CFG, 0)
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, class_weight="balanced",
                                                               random_state=0)).fit(x, y)
    probs = model.predict_proba(by_hand(test.images))
    expected = {c: roc_auc_score(test.labels == i, probs[:, i]) for i, c in enumerate(CFG.classes)}
    assert result.row == row and result.features == ROWS[row]
    assert result.n_train == len(y) and result.metrics["n"] == len(test) and result.test_source == "holdout"
    assert result.metrics["auc"] == pytest.approx(expected)
    assert result.metrics["macro_auc"] == pytest.approx(np.mean(list(expected.values())))


def test_cli_prints_macro_and_per_class_auc(quick_data, capsys):
    assert main(["data", "baseline", str(quick_data)]) == 0
    out = capsys.readouterr().out
    assert "macro AUC" in out and all(c in out for c in CFG.classes)
    assert all(f"{row} baseline" in out for row in ROWS)
