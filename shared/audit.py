"""An empirical lower bound on epsilon from one training run (Steinke, Nasr and Jagielski, NeurIPS 2023).

``m`` canaries are each put into the training data with probability one half, at random. After training, an
auditor who sees only the model guesses, for ``r`` of them, whether each was in (the rest it leaves alone), and
``v`` guesses are right. Under (epsilon, delta)-DP no auditor's right guesses exceed those of randomised response
at epsilon, except with a probability that grows with delta: so a run whose ``v`` would be too unlikely at some
epsilon shows that the training was not that private. :func:`epsilon_lower_bound` is the largest such epsilon at
a chosen confidence; without DP, a model that memorises its canaries gives a bound well above 1.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.stats import binom


def p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """The probability of at least ``v`` right guesses in ``r`` (of ``m`` canaries) under (epsilon, delta)-DP.

    The binomial tail of randomised response at epsilon (each guess right with probability
    e^eps / (1 + e^eps)), plus delta's share: 2 m delta times the largest of P[v - i <= Bin < v] / i over
    i = 1..v (Steinke et al. 2023, Theorem 3 and its algorithm).
    """
    if not (0 <= v <= r <= m and epsilon >= 0 and 0 <= delta <= 1):
        raise ValueError(f"audit: expected 0 <= v <= r <= m, epsilon >= 0, delta in [0, 1]; got m {m}, r {r}, v {v}, "
                         f"epsilon {epsilon}, delta {delta}")
    right = 1.0 / (1.0 + math.exp(-epsilon))
    tail = float(binom.sf(v - 1, r, right))  # P[Bin(r, right) >= v]
    if v == 0 or delta == 0:
        return min(1.0, tail)
    below = np.cumsum(binom.pmf(np.arange(v - 1, -1, -1), r, right))  # i = 1..v: P[v - i <= Bin(r, right) < v]
    return min(1.0, tail + 2 * m * delta * float(np.max(below / np.arange(1, v + 1))))


def epsilon_lower_bound(m: int, r: int, v: int, delta: float, confidence: float = 0.95) -> float:
    """The largest epsilon that ``v`` right guesses in ``r`` reject at ``confidence`` (0.0: none is rejected).

    The p-value grows with epsilon, so the bound is where it crosses ``1 - confidence``, found by bisection to
    1e-4 (rounded down: a lower bound stays one).
    """
    level = 1.0 - confidence
    if p_value(m, r, v, 0.0, delta) >= level:
        return 0.0
    low, high = 0.0, 1.0
    while p_value(m, r, v, high, delta) < level:
        low, high = high, 2 * high
        if high > 100:  # every guess right out of many: the bound is past any epsilon one would report
            return math.inf
    while high - low > 1e-4:
        middle = (low + high) / 2
        low, high = (middle, high) if p_value(m, r, v, middle, delta) < level else (low, middle)
    return low
