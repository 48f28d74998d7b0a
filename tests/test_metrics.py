import math

import numpy as np

from shared.metrics import classification_metrics, weighted_mean
from shared.serde import flatten_metrics, unflatten_metrics

CLASSES = ("mitosis", "tumor", "non_tumor")


def test_perfect_and_reversed_scores():
    labels = np.array([0, 1, 2, 1, 0, 2])
    probs = np.eye(3)[labels] * 0.8 + 0.1
    m = classification_metrics(labels, probs, CLASSES)
    assert m["accuracy"] == 1.0 and m["macro_auc"] == 1.0 and m["macro_f1"] == 1.0
    assert m["confusion"] == [[2, 0, 0], [0, 2, 0], [0, 0, 2]]
    worst = classification_metrics(labels, 1.0 - probs, CLASSES)
    assert worst["macro_auc"] == 0.0


def test_balanced_accuracy_is_the_mean_recall():
    labels = np.array([0, 1, 1, 1, 1, 1, 1, 1, 2, 2])
    pred = np.array([1, 1, 1, 1, 1, 1, 1, 1, 2, 1])  # recalls: 0, 1, 0.5
    m = classification_metrics(labels, np.eye(3)[pred], CLASSES)
    assert m["accuracy"] == 0.8 and m["balanced_accuracy"] == 0.5


def test_class_absent_is_nan_and_left_out_of_the_mean():
    labels = np.array([1, 2, 1, 2])
    probs = np.array([[0.2, 0.7, 0.1], [0.1, 0.3, 0.6], [0.3, 0.4, 0.3], [0.0, 0.6, 0.4]])
    m = classification_metrics(labels, probs, CLASSES)
    assert math.isnan(m["auc"]["mitosis"])
    assert m["macro_auc"] == np.mean([m["auc"]["tumor"], m["auc"]["non_tumor"]])


def test_weighted_mean_skips_nan():
    assert weighted_mean([1.0, math.nan, 0.0], [3, 100, 1]) == 0.75
    assert math.isnan(weighted_mean([math.nan], [1]))


def test_serde_round_trip_has_fixed_keys():
    labels = np.array([0, 1, 2, 1])
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6], [0.5, 0.4, 0.1]])
    m = {**classification_metrics(labels, probs, CLASSES), "loss": 0.5}
    flat = flatten_metrics(m, CLASSES)
    empty = flatten_metrics({}, CLASSES)
    assert set(flat) == set(empty)
    back = unflatten_metrics(flat, CLASSES)
    assert back["auc"] == m["auc"] and back["confusion"] == m["confusion"] and back["loss"] == 0.5
