"""Cross-validate one config: train it on every fold, score it by the mean over folds.

Every fold trains the same schedule (warm-up + cosine over `max_epochs`, no early stopping) and
is scored after every epoch. The config's score at epoch e is the mean over folds of the
monitored metric at e; its score is the best of those means, and that epoch is its `best_epoch`,
the number of epochs mmsa.final retrains. One epoch for all folds, chosen on the mean curve:
choosing it per fold, on the fold it is scored on, would score every fold at its luckiest epoch,
and would leave no single epoch count to retrain with.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import numpy as np

from mmsa.config import Config
from mmsa.features.prepare import Split

FoldCallback = Callable[[int, dict], None]
CURVE_KEYS = ("val_acc", "val_macro_f1", "train_loss", "epoch_seconds", "gpu_peak_mb")  # those present


def cv_summary(histories: list[list[dict]], monitor: str, total_folds: int) -> dict:
    """Scalars of the folds trained so far (each a list of per-epoch metrics from `fit`): the
    metrics at the epoch whose mean over folds is best, their spread over folds, the summed
    confusion matrix there, and the last fold's own curve."""
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
        "fold_curve": [{k: float(m[k]) for k in CURVE_KEYS if k in m} for m in histories[-1]],
    })
    return out


def cross_validate(cfg: Config, features, folds: list[tuple[Split, Split]],
                   on_fold: FoldCallback | None = None, on_epoch=None, keep_probs: bool = False) -> dict:
    """Train `cfg` on each (train, val) fold in turn; after each, on_fold(folds done, cv_summary).
    Returns the summary over all folds. `on_epoch` is passed to every fold's `fit`.
    `keep_probs`: the last summary's `fold_probs` holds each fold's validation class probabilities
    at the chosen epoch (out-of-fold predictions, in the order of each fold's `val.rows`)."""
    from mmsa.training.fit import fit
    cfg = copy.deepcopy(cfg)
    cfg.train.patience, cfg.train.stop_epoch = 0, 0  # whole schedules: curves are averaged epoch by epoch
    histories: list[list[dict]] = []
    summary: dict = {}
    for k, (train, val) in enumerate(folds, 1):
        histories.append(fit(cfg, features, train, val, on_epoch=on_epoch, keep_probs=keep_probs).history)
        summary = cv_summary(histories, cfg.train.monitor, len(folds))
        if keep_probs and k == len(folds):
            summary["fold_probs"] = [h[summary["best_epoch"] - 1]["probs"] for h in histories]
        if on_fold is not None:
            on_fold(k, summary)
    return summary
