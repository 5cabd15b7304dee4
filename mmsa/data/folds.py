"""Seeded stratified splits of the labeled pairs: one held-out split, or K cross-validation folds.

Indices only (of whatever list of labels the caller holds), so every trial of a search, the
linear probe and the benchmarks cut the data the same way from the same (labels, k, seed).
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from mmsa.data.dataset import LABELS, Example
from mmsa.errors import DataError


def holdout_indices(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) positions: a seeded split holding out `val_fraction`, stratified where every
    class can be on both sides (tiny data falls back to a seeded shuffle)."""
    labels = np.asarray(labels)
    n = len(labels)
    if n < 2:
        raise DataError(f"only {n} usable labeled pair(s): too few to hold out a validation split")
    counts = Counter(labels.tolist())
    n_val = max(1, round(val_fraction * n))
    stratify = labels if min(counts.values()) >= 2 and len(counts) <= n_val <= n - len(counts) else None
    from sklearn.model_selection import train_test_split
    train, val = train_test_split(np.arange(n), test_size=n_val, random_state=seed, stratify=stratify)
    return train, val


def cv_indices(labels: np.ndarray, k: int, seed: int, val_fraction: float = 0.2
               ) -> list[tuple[np.ndarray, np.ndarray]]:
    """K (train, val) position pairs. k >= 2: stratified K-fold, shuffled with `seed` (every pair is
    validated exactly once). k == 1: the single held-out split of `holdout_indices`."""
    if k == 1:
        return [holdout_indices(labels, val_fraction, seed)]
    labels = np.asarray(labels)
    counts = Counter(labels.tolist())
    rarest, count = min(counts.items(), key=lambda kv: kv[1])
    if count < k:
        name = LABELS[rarest] if 0 <= rarest < len(LABELS) else rarest
        raise DataError(f"cv_folds={k} needs at least {k} labeled pairs of every class; '{name}' has {count}")
    from sklearn.model_selection import StratifiedKFold
    folds = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    return [(np.sort(train), np.sort(val)) for train, val in folds.split(np.zeros(len(labels)), labels)]


def split_train_val(examples: list[Example], val_fraction: float, seed: int
                    ) -> tuple[list[Example], list[Example]]:
    """Seeded stratified split (holdout_indices). `val_fraction=0` returns (all, [])."""
    if val_fraction <= 0:
        return list(examples), []
    train, val = holdout_indices([ex.label for ex in examples], val_fraction, seed)
    return [examples[i] for i in train], [examples[i] for i in val]
