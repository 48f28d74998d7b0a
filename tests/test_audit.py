"""The one-run audit's epsilon lower bound (shared/audit.py): exact where it can be checked by hand, and sound."""

import math

import numpy as np
import pytest
from scipy.stats import binom

from shared import learner
from shared.audit import audited, canaries, epsilon_lower_bound, guess, p_value
from shared.config import Config, apply_overrides
from shared.data import Samples
from shared.metrics import sample_losses
from tests.helpers import quick_config


def test_without_delta_the_p_value_is_randomised_responses_binomial_tail():
    for epsilon in (0.0, 0.5, 2.0):
        right = math.exp(epsilon) / (1 + math.exp(epsilon))
        assert p_value(100, 40, 30, epsilon, 0.0) == pytest.approx(sum(binom.pmf(k, 40, right) for k in range(30, 41)))
    assert p_value(100, 40, 0, 1.0, 0.0) == 1.0  # at least no right guess: certain


def test_delta_only_adds_and_the_p_value_grows_with_epsilon():
    values = [p_value(1000, 100, 80, eps, 1e-5) for eps in (0.0, 0.5, 1.0, 2.0, 4.0)]
    assert values == sorted(values) and values[0] < 1e-3 and values[-1] > 0.5
    assert p_value(1000, 100, 80, 1.0, 1e-5) > p_value(1000, 100, 80, 1.0, 0.0)


def test_the_bound_is_where_the_p_value_crosses_the_level():
    eps = epsilon_lower_bound(1000, 100, 80, 1e-5)
    assert 0.5 < eps < 2.0  # 80 of 100 right: randomised response at about ln 4 = 1.39 gets 80 on average
    assert p_value(1000, 100, 80, eps, 1e-5) < 0.05 <= p_value(1000, 100, 80, eps + 2e-4, 1e-5)
    assert epsilon_lower_bound(1000, 100, 50, 1e-5) == 0.0  # a coin's score rejects nothing
    assert epsilon_lower_bound(1000, 100, 100, 0.0) > epsilon_lower_bound(1000, 100, 90, 0.0) > eps


def test_guesses_about_a_randomised_response_at_epsilon_one_stay_under_one():
    """Soundness, measured: an auditor of a mechanism that is exactly 1-DP (each canary's presence reported through
    randomised response at epsilon 1) proves at most 1, in all but about 5 % of runs."""
    rng = np.random.default_rng(0)
    right = math.exp(1) / (1 + math.exp(1))
    bounds = [epsilon_lower_bound(500, 500, int(rng.binomial(500, right)), 0.0) for _ in range(400)]
    assert np.mean(np.array(bounds) > 1.0) <= 0.08 and max(bounds) < 1.5
    assert np.median(bounds) > 0.5  # and the bound is not trivially 0: it sees most of the 1


def test_nonsense_counts_are_refused():
    with pytest.raises(ValueError, match="expected 0 <= v <= r <= m"):
        p_value(10, 20, 5, 1.0, 0.0)


def noise(n: int, seed: int) -> Samples:
    """EHR rows of noise with random labels: whatever a model gets right on its training rows, it memorised."""
    rng = np.random.default_rng(seed)
    return Samples(np.zeros((n, 8, 8, 3), np.uint8), rng.normal(size=(n, 27)).astype(np.float32),
                   rng.integers(0, 2, n), np.array([f"p{i}" for i in range(n)]))


def test_canaries_are_relabelled_drawn_in_by_half_and_the_same_for_the_auditor():
    data = noise(300, 0)
    train, pool, drawn = canaries(data, 120, 2, seed=5)
    assert len(pool) == 120 and len(train) == 180 + drawn.sum() and 40 < drawn.sum() < 80
    original = {bytes(row): label for row, label in zip(data.ehr, data.labels)}
    assert all(original[bytes(row)] != label for row, label in zip(pool.ehr, pool.labels))  # a wrong label each
    again = canaries(data, 120, 2, seed=5)
    assert np.array_equal(again[2], drawn) and np.array_equal(again[1].ehr, pool.ehr)
    assert not np.array_equal(canaries(data, 120, 2, seed=6)[1].ehr, pool.ehr)  # another site, other canaries


EPOCHS = 20  # 20 passes: bound 1.82 (40: 1.47); the model that never saw a canary: 0.0


def mlp_bound(train_on_canaries: bool) -> float:
    """The bound an auditor proves about an MLP trained for EPOCHS passes (no DP) on noise with 200 canaries."""
    cfg = apply_overrides(Config(), {"model.name": "mlp", "model.hidden": 256, "model.dropout": 0.0,
                                     "train.local_epochs": EPOCHS, "train.batch_size": 64, "train.lr": 0.01,
                                     "train.class_weights": "none"})
    data = noise(400, 1)
    train, pool, drawn = canaries(data, 200, 2, seed=0)
    if not train_on_canaries:  # a model that never saw a canary (what DP promises, in the extreme): they come last
        train = train.subset(np.arange(len(train)) < len(data) - len(pool))
    weights, _ = learner.initial_weights(cfg, np.zeros(27, np.float32), np.ones(27, np.float32))
    weights, _ = learner.local_update(cfg, weights, train, seed=0)
    r, v = guess(sample_losses(pool.labels, learner.predict(cfg, weights, pool)[0]), drawn, 100)
    return epsilon_lower_bound(200, r, v, 1e-5)


@pytest.mark.slow
def test_the_audit_catches_a_memorising_model_and_proves_nothing_of_one_that_never_saw_a_canary():
    assert mlp_bound(train_on_canaries=True) > 1.0
    assert mlp_bound(train_on_canaries=False) < 0.5


def test_a_site_trains_on_the_canaries_drawn_in_and_never_on_the_others(quick_data):
    from shared.partition import site_samples

    cfg = quick_config(quick_data, {"privacy.canaries": 40, "privacy.audit_fraction": 0.25})
    plain = site_samples(quick_config(quick_data, {}), {"partition-id": 1}, "patch")[2]
    index, _, train, _ = site_samples(cfg, {"partition-id": 1}, "patch")
    site = audited(cfg, index, plain)
    assert len(site.canaries) == 40 and len(site.members) + 40 + len(site.others) == len(plain)
    assert len(train) == len(site.members) + site.drawn.sum() and np.array_equal(train.labels, site.train.labels)
    trained = {bytes(image) for image in train.images}
    assert [bytes(image) in trained for image in site.canaries.images] == list(site.drawn)
