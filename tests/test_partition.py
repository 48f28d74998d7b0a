"""Partitions deal whole cases (patients) to simulated sites, never single patches."""

import dataclasses

import numpy as np
import pytest

from shared.config import DataConfig
from shared.partition import load_partition, partition_cases


def cohort(n_cases=24, seed=0):
    """Per-patch case ids and labels; a few 'high-grade' cases hold most mitoses (class 0)."""
    rng = np.random.default_rng(seed)
    cases, labels = [], []
    for c in range(n_cases):
        n = int(rng.integers(20, 80))
        p_mit = 0.3 if c % 6 == 0 else 0.02
        labels += list(rng.choice(3, n, p=[p_mit, 0.75 - p_mit, 0.25]))
        cases += [f"Case_{c}"] * n
    return np.array(cases), np.array(labels)


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "quantity"])
def test_every_case_goes_to_exactly_one_site(scheme):
    cases, labels = cohort()
    groups = partition_cases(cases, labels, 4, scheme, alpha=0.3, seed=1)
    flat = np.concatenate(groups)
    assert sorted(flat) == sorted(set(cases)) and len(flat) == len(set(flat))
    assert all(len(g) >= 2 for g in groups)
    again = partition_cases(cases, labels, 4, scheme, alpha=0.3, seed=1)
    assert all(np.array_equal(a, b) for a, b in zip(groups, again))


def patches_per_site(groups, cases):
    return np.array([np.isin(cases, g).sum() for g in groups])


def test_iid_balances_sizes_and_quantity_skews_them():
    cases, labels = cohort(40)
    iid = patches_per_site(partition_cases(cases, labels, 4, "iid", 1.0, seed=0), cases)
    skews = [patches_per_site(partition_cases(cases, labels, 4, "quantity", 0.2, seed=s), cases) for s in range(5)]
    assert iid.max() / iid.min() < 1.3
    assert np.mean([s.max() / s.min() for s in skews]) > 2.0


def test_dirichlet_skews_labels_more_than_iid():
    cases, labels = cohort(60)

    def spread(groups):  # how far apart the sites' mitosis shares are
        return np.std([labels[np.isin(cases, g)].__eq__(0).mean() for g in groups])

    iid = np.mean([spread(partition_cases(cases, labels, 3, "iid", 1.0, seed=s)) for s in range(5)])
    skew = np.mean([spread(partition_cases(cases, labels, 3, "dirichlet", 0.1, seed=s)) for s in range(5)])
    assert skew > 1.5 * iid


def test_too_few_cases_is_explained():
    cases, labels = cohort(5)
    with pytest.raises(ValueError, match="5 cases cannot make 3 sites with at least 2 cases each"):
        partition_cases(cases, labels, 3, "iid", 1.0, seed=0)


def test_partitions_of_generated_folders_keep_patients_whole(quick_data):
    cfg = dataclasses.replace(DataConfig(), sites=3, partition="iid")
    seen = {}
    for k in range(3):
        train, test = load_partition(quick_data, cfg, k, seed=0)
        assert not set(train.cases) & set(test.cases)
        for case in set(train.cases) | set(test.cases):
            assert case not in seen, f"{case} at sites {seen.get(case)} and {k}"
            seen[case] = k
    assert len(seen) == 12 and all("/" in c for c in seen)  # site-<k>/Case_<c>: names stay distinct
