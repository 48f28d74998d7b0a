"""An empirical lower bound on epsilon from one training run (Steinke, Nasr and Jagielski, NeurIPS 2023).

``m`` canaries are each put into the training data with probability one half, at random. After training, an
auditor who sees only the model guesses, for ``r`` of them, whether each was in (the rest it leaves alone), and
``v`` guesses are right. Under (epsilon, delta)-DP no auditor's right guesses exceed those of randomised response
at epsilon, except with a probability that grows with delta: so a run whose ``v`` would be too unlikely at some
epsilon shows that the training was not that private. :func:`epsilon_lower_bound` is the largest such epsilon at
a chosen confidence; without DP, a model that memorises its canaries gives a bound well above 1.

fedfuse's canaries (:func:`canaries`, ``privacy.canaries`` a site) are training patches given a wrong label: a
model that learns one has memorised it. The auditor scores each canary's loss under its wrong label and guesses
"in" for the lowest, "out" for the highest (:func:`guess`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.stats import binom

from shared.config import Config, classes_of
from shared.data import Samples, concat
from shared.privacy import audit_split

CANARY_STREAM = 104729  # the canaries' random stream beside a site's seed (the audit split's is 7919)


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


def canaries(train: Samples, count: int, n_classes: int, seed: int) -> tuple[Samples, Samples, np.ndarray]:
    """(the training samples with the canaries drawn in, every canary, which of them were drawn in).

    ``count`` samples chosen at random become canaries: each gets another class's label, drawn at random, and is
    trained on with probability one half; those left out are out of training altogether. The same ``seed``
    gives the auditor the same canaries and draws.
    """
    rng = np.random.default_rng([seed, CANARY_STREAM])
    chosen = np.zeros(len(train), bool)
    chosen[rng.choice(len(train), size=min(count, len(train)), replace=False)] = True
    pool = train.subset(chosen)
    pool = Samples(pool.images, pool.ehr, (pool.labels + rng.integers(1, n_classes, len(pool))) % n_classes,
                   pool.cases)
    drawn = rng.random(len(pool)) < 0.5
    return concat([train.subset(~chosen), pool.subset(drawn)]), pool, drawn


def guess(losses: np.ndarray, drawn: np.ndarray, guesses: int) -> tuple[int, int]:
    """(r, v): "in" for the ``guesses // 2`` canaries of lowest loss, "out" for as many of highest loss; v of the
    r guesses are right. The number of guesses is fixed before the losses are seen, as the bound requires."""
    k = min(guesses // 2, len(losses) // 2)
    order = np.argsort(losses, kind="stable")
    return 2 * k, int(drawn[order[:k]].sum() + (~drawn[order[len(order) - k:]]).sum())


@dataclass(frozen=True)
class Audited:
    """A site's training samples as the audits leave them (None where an audit is off)."""

    train: Samples  # what the site trains on
    members: Samples  # its own training samples, the canaries aside: the membership attack's members
    others: Samples | None  # the membership attack's non-members, kept out of training (privacy.audit_fraction)
    canaries: Samples | None  # every canary, under its wrong label (privacy.canaries)
    drawn: np.ndarray  # which canaries are in training


def audited(cfg: Config, index: int, train: Samples) -> Audited:
    """The audits applied to site ``index``'s training samples. The site (``shared.partition.site_samples``) and
    the auditor (``fedfuse privacy-sweep``) both call it, so both see the same draws."""
    members, others, pool, drawn = train, None, None, np.zeros(0, bool)
    if cfg.privacy.audit_fraction > 0:  # the membership attack's non-members never reach training
        members, others = audit_split(train, cfg.privacy.audit_fraction, cfg.seed + index, cfg.privacy.unit)
    train = members
    if cfg.privacy.canaries > 0:
        train, pool, drawn = canaries(members, cfg.privacy.canaries, len(classes_of(cfg)), cfg.seed + index)
        members = train.subset(np.arange(len(train)) < len(train) - int(drawn.sum()))  # the canaries come last
    return Audited(train, members, others, pool, drawn)
