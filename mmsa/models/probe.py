"""The linear probe, every search's yardstick: logistic regression on pooled frozen features.

Text tokens mean-pooled over their mask and image tokens mean-pooled, each L2-normalised, then
concatenated; scikit-learn's LogisticRegression(C=1), no class weights. numpy and scikit-learn
only (no torch), so the search driver can score it on the cache it memory-maps.
"""

from __future__ import annotations

import numpy as np

from mmsa.features.prepare import Split

CHUNK = 256  # rows pooled at a time: float32 copies of a chunk stay small


def pooled_features(features, rows: np.ndarray) -> np.ndarray:
    """(len(rows), Dt + Di) float32: [L2-normed mean text token, L2-normed mean image token]."""
    out = np.empty((len(rows), features.text_dim + features.image_dim), dtype=np.float32)
    for s in range(0, len(rows), CHUNK):
        idx = np.sort(rows[s:s + CHUNK])
        order = np.argsort(np.argsort(rows[s:s + CHUNK]))  # back to the caller's order
        mask = features.text_mask[idx].astype(np.float32)[..., None]
        text = (features.text[idx].astype(np.float32) * mask).sum(1) / np.maximum(mask.sum(1), 1)
        image = features.image[idx].astype(np.float32).mean(1)
        out[s:s + CHUNK] = np.concatenate([_l2(text), _l2(image)], 1)[order]
    return out


def _l2(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def probe_cv(features, folds: list[tuple[Split, Split]], c: float = 1.0, keep_probs: bool = False) -> dict:
    """The probe trained on each fold's training part and scored on its validation part:
    probe_val_acc / probe_val_macro_f1 (means over folds) and the per-fold values; with
    `keep_probs`, `probe_fold_probs`: each fold's validation class probabilities."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, f1_score
    # Every row once (folds share them): pooled in sorted order, found again by binary search.
    everything = np.unique(np.concatenate([np.concatenate([tr.rows, va.rows]) for tr, va in folds]))
    x_all = pooled_features(features, everything)
    acc, f1, probs = [], [], []
    for train, val in folds:
        x_train = x_all[np.searchsorted(everything, train.rows)]
        x_val = x_all[np.searchsorted(everything, val.rows)]
        model = LogisticRegression(C=c, max_iter=2000).fit(x_train, train.labels)
        probs.append(model.predict_proba(x_val))
        pred = probs[-1].argmax(1)
        acc.append(float(accuracy_score(val.labels, pred)))
        f1.append(float(f1_score(val.labels, pred, labels=[0, 1, 2], average="macro", zero_division=0)))
    out = {"probe_val_acc": float(np.mean(acc)), "probe_val_macro_f1": float(np.mean(f1)),
           "probe_fold_val_acc": acc, "probe_fold_val_macro_f1": f1}
    if keep_probs:
        out["probe_fold_probs"] = probs
    return out


def fit_probe(features, train: Split, c: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """The probe trained on `train`: (coef (classes, Dt + Di), intercept (classes,)) of the
    logistic regression on pooled_features; mmsa.models.factory.probe_head turns them into a head."""
    from sklearn.linear_model import LogisticRegression
    model = LogisticRegression(C=c, max_iter=2000).fit(pooled_features(features, train.rows), train.labels)
    return model.coef_.astype(np.float32), model.intercept_.astype(np.float32)
