"""Ensemble selection (Caruana et al., 2004) over out-of-fold predictions, as auto-sklearn and
AutoGluon build their final models: start from nothing, add with replacement the candidate whose
addition best scores the blend, for a fixed number of rounds, and keep the best blend of that
path (AutoGluon's rule). Stopping at the first round that does not improve (the rule this
replaced) ends on a step metric like accuracy after one to three additions, where a dip is often
followed by a better blend. A candidate added n times weighs n / (additions). numpy and
scikit-learn only.

The blend's score is measured on the same predictions it was chosen on, and so is optimistic;
`selection_cv` chooses on all folds but one and scores on the one left out, for every fold, which
says how much of the gain survives new pairs (nested CV over the whole pipeline is the honest
number).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.metrics import accuracy_score, f1_score

MAX_ROUNDS = 25  # additions made; the blend kept has at most 25, its weights multiples of 1/25 at the finest


def score(metric: str, labels: np.ndarray, probs: np.ndarray) -> float:
    pred = probs.argmax(1)
    if metric == "val_acc":
        return float(accuracy_score(labels, pred))
    return float(f1_score(labels, pred, labels=list(range(probs.shape[1])), average="macro", zero_division=0))


def _log_loss(labels: np.ndarray, probs: np.ndarray) -> float:
    return float(-np.mean(np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, None))))


@dataclass
class Selection:
    weights: dict[str, float]  # candidate -> share of the blend (summing to 1), those chosen only
    score: float  # the blend's score on the predictions it was chosen on
    rounds: int  # additions made


@dataclass(frozen=True)
class Caps:
    """Limits on what a blend may hold, for a final model that must stay small enough to serve:
    distinct members at most, and their summed size at most (0: no limit). `sizes`: each
    candidate's size (e.g. parameters x seeds)."""

    max_members: int = 0
    max_size: float = 0
    sizes: dict | None = None

    def allows(self, chosen: set[str], name: str) -> bool:
        if name in chosen:
            return True
        if self.max_members and len(chosen) + 1 > self.max_members:
            return False
        if self.max_size and self.sizes is not None:
            return sum(self.sizes.get(n, 0) for n in chosen | {name}) <= self.max_size
        return True


def select(candidates: dict[str, np.ndarray], labels: np.ndarray, metric: str,
           max_rounds: int = MAX_ROUNDS, caps: Caps = Caps()) -> Selection:
    """Greedy forward selection with replacement for `max_rounds` additions; the blend kept is the
    best after any round (the earliest of equals). `candidates`: name -> (rows, classes) class
    probabilities of the same rows, `labels` their classes. Ties on the metric (frequent: accuracy
    moves in steps of one pair) go to the lower log-loss, then to the earlier candidate. A candidate
    `caps` does not allow beside those chosen is not added; where none is, the selection ends."""
    if not candidates:
        raise ValueError("ensemble selection needs at least one candidate")
    names = list(candidates)
    stack = np.stack([np.asarray(candidates[n], dtype=np.float64) for n in names])
    counts = np.zeros(len(names), dtype=np.int64)
    total = np.zeros_like(stack[0])
    best_key = None
    for _ in range(max_rounds):
        chosen = {names[i] for i in np.flatnonzero(counts)}
        allowed = [i for i, n in enumerate(names) if caps.allows(chosen, n)]
        if not allowed:
            break
        blends = (total + stack) / (counts.sum() + 1)  # the blend with each candidate added
        keys = {i: (score(metric, labels, blends[i]), -_log_loss(labels, blends[i])) for i in allowed}
        pick = max(allowed, key=lambda i: (keys[i], -i))
        counts[pick] += 1
        total += stack[pick]
        # scored as the weights will blend it: summed in another order, classes tied in the running
        # total can break the other way
        weights = {names[i]: counts[i] / counts.sum() for i in np.flatnonzero(counts)}
        kept = blend(candidates, weights)
        key = (score(metric, labels, kept), -_log_loss(labels, kept))
        if best_key is None or key > best_key:
            best_key, best_weights, rounds = key, weights, int(counts.sum())
    if best_key is None:
        raise ValueError("ensemble selection: no candidate fits the caps (max_members, max_params)")
    return Selection(best_weights, best_key[0], rounds)


def blend(candidates: dict[str, np.ndarray], weights: dict[str, float]) -> np.ndarray:
    return sum(w * np.asarray(candidates[n], dtype=np.float64) for n, w in weights.items())


def selection_cv(candidates: dict[str, np.ndarray], labels: np.ndarray, groups: np.ndarray, metric: str,
                 caps: Caps = Caps()) -> float:
    """The mean over groups (the search's folds) of the score of a selection made on the other
    groups' rows, measured on this group's rows."""
    scores = []
    for g in np.unique(groups):
        held = groups == g
        chosen = select({n: p[~held] for n, p in candidates.items()}, labels[~held], metric, caps=caps)
        scores.append(score(metric, labels[held], blend({n: p[held] for n, p in candidates.items()}, chosen.weights)))
    return float(np.mean(scores))
