from collections import Counter

import numpy as np
import pytest

from mmsa.errors import DataError
from mmsa.data.folds import cv_indices, holdout_indices

LABELS = np.array([0] * 60 + [1] * 12 + [2] * 28)


def test_folds_are_stratified_and_partition_the_pairs():
    folds = cv_indices(LABELS, 4, seed=0)
    assert len(folds) == 4
    held = np.concatenate([val for _, val in folds])
    assert sorted(held.tolist()) == list(range(len(LABELS)))  # every pair validated exactly once
    for train, val in folds:
        assert not set(train) & set(val) and len(train) + len(val) == len(LABELS)
        assert Counter(LABELS[val].tolist()) == {0: 15, 1: 3, 2: 7}  # each class split evenly


def test_folds_are_the_same_for_every_caller_with_the_same_seed():
    a, b, c = cv_indices(LABELS, 5, seed=0), cv_indices(LABELS, 5, seed=0), cv_indices(LABELS, 5, seed=1)
    assert all(np.array_equal(x[1], y[1]) for x, y in zip(a, b))
    assert not all(np.array_equal(x[1], y[1]) for x, y in zip(a, c))


def test_one_fold_is_the_held_out_split():
    (train, val), = cv_indices(LABELS, 1, seed=3, val_fraction=0.2)
    t, v = holdout_indices(LABELS, 0.2, 3)
    assert np.array_equal(train, t) and np.array_equal(val, v) and len(val) == 20


def test_too_few_pairs_of_a_class_for_the_folds():
    with pytest.raises(DataError, match="cv_folds=13 needs at least 13 labeled pairs of every class; 'neutral' has 12"):
        cv_indices(LABELS, 13, seed=0)
