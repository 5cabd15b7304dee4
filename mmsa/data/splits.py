"""Rows of the labeled pairs, with their labels: a `Split`, and the seeded folds every caller shares."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mmsa.data.dataset import Example


@dataclass
class Split:
    """Rows of a FeatureSet, with labels (-1 where unknown) and guids, in a fixed order."""

    rows: np.ndarray
    labels: np.ndarray
    guids: list[str]

    @classmethod
    def of(cls, features, examples: list[Example]) -> Split:
        """`features`: what gives the pairs' rows (mmsa.features: a FeatureSet or RawSource)."""
        labels = np.array([-1 if ex.label is None else ex.label for ex in examples], dtype=np.int64)
        guids = [ex.guid for ex in examples]
        return cls(rows=features.rows(guids), labels=labels, guids=guids)

    def __len__(self) -> int:
        return len(self.rows)

    def take(self, positions: np.ndarray) -> Split:
        return Split(rows=self.rows[positions], labels=self.labels[positions],
                     guids=[self.guids[i] for i in positions])


def cv_splits(labeled: Split, k: int, seed: int, val_fraction: float = 0.2) -> list[tuple[Split, Split]]:
    """(train, val) Splits of `labeled` for K stratified folds (k = 1: one held-out split),
    the same for every caller with the same labels, k and seed (mmsa.data.folds)."""
    from mmsa.data.folds import cv_indices
    return [(labeled.take(tr), labeled.take(va)) for tr, va in cv_indices(labeled.labels, k, seed, val_fraction)]
