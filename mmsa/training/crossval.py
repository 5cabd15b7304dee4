"""Cross-validate one config: train it on every fold, score it by the mean over folds.

Every fold trains the same schedule (warm-up + cosine over `max_epochs`, no early stopping) and
is scored after every epoch. The config's score at epoch e is the mean over folds of the
monitored metric at e; its score is the best of those means, and that epoch is its `best_epoch`,
the number of epochs mmsa.final retrains. One epoch for all folds, chosen on the mean curve:
choosing it per fold, on the fold it is scored on, would score every fold at its luckiest epoch,
and would leave no single epoch count to retrain with.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from mmsa.config import Config
from mmsa.features.prepare import Split

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
    finished, and the state of the fold in training (None between folds). `cross_validate(start=)`
    goes on from it."""

    histories: list[list[dict]]
    fit: FitState | None = None


@dataclass
class CVEpoch:
    """What cross_validate says after every epoch of every fold."""

    fold: int  # 1-based
    epoch: int
    report: dict  # the fold's epoch metrics (mmsa.training.fit's on_epoch report)
    summary: dict | None  # at a fold's last epoch: cv_summary of the folds finished; else None
    state: CVState | None  # where it stands now (with keep_state); else None

    @property
    def fold_end(self) -> bool:
        return self.summary is not None


def cross_validate(cfg: Config, features, folds: list[tuple[Split, Split]],
                   on_epoch: Callable[[CVEpoch], None] | None = None, keep_probs: bool = False,
                   keep_state: bool = False, start: CVState | None = None) -> dict:
    """Train `cfg` on each (train, val) fold in turn; on_epoch(CVEpoch) after every epoch, with the
    summary over the folds finished (cv_summary) at each fold's last one. Returns the summary over
    all folds. `keep_probs`: the last summary's `fold_probs` holds each fold's validation class
    probabilities at the chosen epoch (out-of-fold predictions, in the order of each fold's
    `val.rows`). `keep_state`: every CVEpoch carries where the cross-validation stands, and
    `start=` such a state goes on from there (a trial resumed from its checkpoint).
    Every fold trains the whole schedule (the curves are averaged epoch by epoch): `cfg` must have
    `patience` and `stop_epoch` 0 (search.space.SearchSpec.base_config sets them so)."""
    from mmsa.training.fit import fit
    if cfg.train.patience or cfg.train.stop_epoch:
        raise ValueError(f"cross_validate trains whole schedules: patience {cfg.train.patience} and stop_epoch "
                         f"{cfg.train.stop_epoch} must be 0")
    histories: list[list[dict]] = list(start.histories) if start is not None else []
    summary: dict = cv_summary(histories, cfg.train.monitor, len(folds)) if histories else {}
    if len(histories) == len(folds):  # a start that had finished every fold: its end told again
        if keep_probs:
            summary["fold_probs"] = [h[summary["best_epoch"] - 1]["probs"] for h in histories]
        if on_epoch is not None:
            last = {k: v for k, v in histories[-1][-1].items() if k != "probs"}
            on_epoch(CVEpoch(len(folds), len(histories[-1]), {**last, "final": 1}, summary,
                             CVState(list(histories)) if keep_state else None))
        return summary
    for k in range(len(histories) + 1, len(folds) + 1):
        train, val = folds[k - 1]
        latest: dict = {}  # the fold's last epoch: its report and state, told once the fold is summed up

        def fold_epoch(epoch: int, report: dict, k: int = k) -> None:
            if report["final"]:
                latest["report"] = report
            elif on_epoch is not None:
                state = CVState(list(histories), latest.pop("state")) if keep_state else None
                on_epoch(CVEpoch(k, epoch, report, None, state))

        # Only the fold's curve is kept: its model, gradients and optimizer are freed as fit
        # returns, before the next fold builds its own (on a GPU, two folds' models at once would
        # not fit the memory planned for one).
        history = fit(cfg, features, train, val, on_epoch=fold_epoch, keep_probs=keep_probs,
                      start=start.fit if start is not None and k == len(start.histories) + 1 else None,
                      on_state=(lambda s: latest.__setitem__("state", s)) if keep_state else None,
                      keep_best=False).history
        histories.append(history)
        summary = cv_summary(histories, cfg.train.monitor, len(folds))
        if keep_probs and k == len(folds):
            summary["fold_probs"] = [h[summary["best_epoch"] - 1]["probs"] for h in histories]
        if on_epoch is not None:
            on_epoch(CVEpoch(k, len(history), latest["report"], summary,
                             CVState(list(histories)) if keep_state else None))
    return summary
