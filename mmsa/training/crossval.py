"""Cross-validate one config: train it on every fold, score it by the mean over folds.

Every fold trains the same schedule (warm-up + cosine over `max_epochs`, no early stopping) and
is scored after every epoch. The config's score at epoch e is the mean over folds of the
monitored metric at e; its score is the best of those means, and that epoch is its `best_epoch`,
the number of epochs mmsa.final retrains. One epoch for all folds, chosen on the mean curve:
choosing it per fold, on the fold it is scored on, would score every fold at its luckiest epoch,
and would leave no single epoch count to retrain with.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from mmsa.config import Config
from mmsa.data.splits import Split

if TYPE_CHECKING:
    from mmsa.training.fit import FitState

# What a fold's learning curve records per epoch (those present: the GPU peaks on a GPU only).
CURVE_KEYS = ("val_acc", "val_macro_f1", "train_loss", "epoch_seconds", "gpu_peak_mb", "gpu_reserved_mb")


def cv_summary(histories: list[list[dict]], monitor: str, total_folds: int) -> dict:
    """Scalars of the folds trained so far (each a list of per-epoch metrics from `fit`): the
    metrics at the epoch whose mean over folds is best, their spread over folds, and the summed
    confusion matrix there."""
    epochs = min(len(h) for h in histories)
    mean_curve = [np.mean([h[e][monitor] for h in histories]) for e in range(epochs)]
    best = int(np.argmax(mean_curve))  # the earliest of equal means
    at_best = [h[best] for h in histories]
    other = "val_macro_f1" if monitor == "val_acc" else "val_acc"
    out = {name: float(np.mean([m[name] for m in at_best]))
           for name in at_best[0] if name.startswith("val_") and name != "val_confusion"}
    out.update({
        "folds_done": len(histories), "cv_folds": total_folds, "best_epoch": best + 1,
        f"best_{monitor}": out[monitor], f"{other}_at_best": out[other],
        f"{monitor}_fold_std": float(np.std([m[monitor] for m in at_best])),
        f"fold_{monitor}": float(at_best[-1][monitor]),
        "fold_accs": [float(m["val_acc"]) for m in at_best],
        "fold_macro_f1s": [float(m["val_macro_f1"]) for m in at_best],
        "train_loss": float(np.mean([m["train_loss"] for m in at_best])),
        "epochs_trained": sum(len(h) for h in histories),
        "mean_epoch_seconds": float(np.mean([m["epoch_seconds"] for h in histories for m in h])),
        "val_confusion": np.sum([m["val_confusion"] for m in at_best], 0).tolist(),
    })
    return out


@dataclass
class CVState:
    """Where a cross-validation stands after a finished epoch: the per-epoch histories of the folds
    finished, and the state of the fold in training (None between folds). `cv_epochs(start=)`
    goes on from it."""

    histories: list[list[dict]]
    fit: FitState | None = None


@dataclass
class CVEpoch:
    """What cross-validation says after every epoch of every fold."""

    fold: int  # 1-based
    epoch: int
    report: dict  # the fold's epoch metrics (mmsa.training.fit.Epoch.metrics)
    summary: dict | None  # at a fold's last epoch: cv_summary of the folds finished; else None
    state: CVState | None  # where it stands (with keep_state); else None

    @property
    def fold_end(self) -> bool:
        return self.summary is not None


def cv_epochs(cfg: Config, features, folds: list[tuple[Split, Split]], keep_probs: bool = False,
              keep_state: bool = False, start: CVState | None = None) -> Iterator[CVEpoch]:
    """Train `cfg` on each (train, val) fold in turn, saying so after every epoch: the summary over
    the folds finished (cv_summary) at each fold's last one. `keep_probs`: the last fold's summary
    has `fold_probs`, each fold's validation class probabilities at the chosen epoch (out-of-fold
    predictions, in the order of each fold's `val.rows`). `keep_state`: every CVEpoch carries where
    the cross-validation stands, and `start=` such a state goes on from there (a trial resumed from
    its checkpoint). Every fold trains the whole schedule (the curves are averaged epoch by epoch):
    `cfg` must have `patience` and `stop_epoch` 0 (search.space.SearchSpec.base_config sets them so)."""
    from mmsa.training.fit import Training
    if cfg.train.patience or cfg.train.stop_epoch:
        raise ValueError(f"cross_validate trains whole schedules: patience {cfg.train.patience} and stop_epoch "
                         f"{cfg.train.stop_epoch} must be 0")
    histories: list[list[dict]] = list(start.histories) if start is not None else []
    if len(histories) == len(folds):  # a start that had finished every fold: its end told again
        summary = cv_summary(histories, cfg.train.monitor, len(folds))
        if keep_probs:
            summary["fold_probs"] = [h[summary["best_epoch"] - 1]["probs"] for h in histories]
        last = {k: v for k, v in histories[-1][-1].items() if k != "probs"}
        yield CVEpoch(len(folds), len(histories[-1]), last, summary, CVState(list(histories)) if keep_state else None)
        return
    for k in range(len(histories) + 1, len(folds) + 1):
        train, val = folds[k - 1]
        training = Training(cfg, features, train, val, keep_probs=keep_probs, keep_state=keep_state, keep_best=False,
                            start=start.fit if start is not None and k == len(start.histories) + 1 else None)
        for epoch in training:
            if epoch.last:  # told once the fold is summed up
                last = (epoch.number, epoch.metrics)
            else:
                yield CVEpoch(k, epoch.number, epoch.metrics, None,
                              CVState(list(histories), epoch.state) if keep_state else None)
        histories.append(training.result.history)
        # Only the fold's curve is kept: its model, gradients and optimizer go now, before the next
        # fold builds its own (on a GPU, two folds' models at once would not fit the memory planned for one).
        del training
        epoch = None  # noqa: F841 - with keep_state, the last epoch's state too
        summary = cv_summary(histories, cfg.train.monitor, len(folds))
        if keep_probs and k == len(folds):
            summary["fold_probs"] = [h[summary["best_epoch"] - 1]["probs"] for h in histories]
        yield CVEpoch(k, last[0], last[1], summary, CVState(list(histories)) if keep_state else None)


def cross_validate(cfg: Config, features, folds: list[tuple[Split, Split]], keep_probs: bool = False) -> dict:
    """cv_epochs run to its end: the summary over all folds."""
    summary: dict = {}
    for ev in cv_epochs(cfg, features, folds, keep_probs=keep_probs):
        if ev.summary is not None:
            summary = ev.summary
    return summary
