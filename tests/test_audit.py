"""The one-run audit's epsilon lower bound (shared/audit.py): exact where it can be checked by hand, and sound."""

import math

import numpy as np
import pytest
from scipy.stats import binom

from shared.audit import epsilon_lower_bound, p_value


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
