"""The evaluation matrix's shape, patient-level bootstrap, and the training budget in steps."""

import numpy as np
import pytest
import torch

from shared.config import ModelConfig, TrainConfig
from shared.data import Samples
from shared.evaluation import bootstrap_ci, matrix_row
from shared.models import build_model
from shared.train import train_epochs
from tests.helpers import toy

CLASSES = ("mitosis", "tumor", "non_tumor")


def site(seed, n=30):
    s = toy(n, seed)
    return Samples(s.images, s.ehr, s.labels, np.array([f"Case_{i % 5}" for i in range(n)]))


def oracle(samples):
    """Right on even patches, uniform on odd ones."""
    probs = np.full((len(samples), 3), 1 / 3)
    probs[::2] = np.eye(3)[samples.labels[::2]] * 0.9 + 0.1 / 3
    return probs


def test_matrix_row_scores_each_site_and_the_pooled_split():
    tests = {"site-0": site(0), "site-1": site(1, 45), "site-2": site(2)}
    row = matrix_row(oracle, tests, CLASSES)
    assert list(row) == ["site-0", "site-1", "site-2", "pooled"]
    assert row["pooled"]["n"] == 105 and row["site-1"]["n"] == 45
    from sklearn.metrics import roc_auc_score

    pooled = np.concatenate([tests[k].labels for k in tests])
    for name, labels in [*((k, t.labels) for k, t in tests.items()), ("pooled", pooled)]:
        probs = np.full((len(labels), 3), 1 / 3)
        probs[::2] = np.eye(3)[labels[::2]] * 0.9 + 0.1 / 3  # the oracle, on the same order of patches
        expected = np.mean([roc_auc_score(labels == c, probs[:, c]) for c in range(3)])
        assert row[name]["macro_auc"] == pytest.approx(expected) and 0.5 < expected < 1


@pytest.mark.slow
def test_bootstrap_resamples_patients_and_brackets_the_estimate():
    s = site(0, 60)
    probs = oracle(s)
    ci = bootstrap_ci(s, probs, CLASSES, n=200, seed=0)
    point = matrix_row(lambda x: oracle(x), {"a": s}, CLASSES)["a"]
    assert ci["macro_auc"][0] <= point["macro_auc"] <= ci["macro_auc"][1]
    one_case = Samples(s.images, s.ehr, s.labels, np.array(["Case_0"] * 60))
    flat = bootstrap_ci(one_case, probs, CLASSES, n=50, seed=0)
    assert flat["accuracy"][0] == flat["accuracy"][1]  # one patient: nothing to resample


@pytest.mark.parametrize("steps,expected", [(5, 5), (0, 2 * 3)])  # 0: local_epochs (2) passes of 3 batches
def test_training_budget_counts_optimiser_steps(steps, expected, monkeypatch):
    calls = []
    real_step = torch.optim.Adam.step

    def counting_step(self, *a, **k):
        calls.append(1)
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.Adam, "step", counting_step)
    model = build_model(ModelConfig(name="cnn"), 5, 3)
    train_epochs(model, toy(48), TrainConfig(local_epochs=2, batch_size=16, steps=steps), 3, seed=0)
    assert len(calls) == expected
