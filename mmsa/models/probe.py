"""The linear probe, every search's yardstick: logistic regression on pooled frozen features.

Text tokens mean-pooled over their mask and image tokens mean-pooled, each L2-normalised, then
concatenated; with `lexicon`, the texts' four lexicon scores too (mmsa.features.lexicon),
standardised on the training pairs and scaled to norm about 1 like the other two blocks;
scikit-learn's LogisticRegression(C=1), no class weights. numpy and scikit-learn only (no torch),
so the search driver can score it on the cache it memory-maps.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from mmsa.config import Config
from mmsa.data.splits import Split

PROBE_HEAD = {"head": "linear", "pooling": "mean", "modalities": "both", "dropout": 0.0, "token_dropout": 0.0,
              "image_grid": 0, "text_layers": 0}


def probe_config(cfg: Config) -> Config:
    """`cfg` (its data and feature sizes) with the linear probe's head, reading cached features:
    the model mmsa.models.factory.probe_head builds from the probe's weights."""
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, finetune="none"),
                               model=dataclasses.replace(cfg.model, **PROBE_HEAD))


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


class LexiconScaler:
    """The lexicon block's standardisation, fitted on training rows: (x - mean) / std / sqrt(dim)."""

    def __init__(self, lexicon: np.ndarray):
        self.mean, self.std = lexicon.mean(0), lexicon.std(0) + 1e-6
        self.scale = 1.0 / (self.std * np.sqrt(lexicon.shape[1]))

    def __call__(self, lexicon: np.ndarray) -> np.ndarray:
        return ((lexicon - self.mean) * self.scale).astype(np.float32)

    def on_raw_scores(self, coef: np.ndarray, intercept: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The weights of a model trained on scaled scores, rewritten for the raw scores."""
        return coef * self.scale, intercept - coef @ (self.mean * self.scale)


def _design(features, rows: np.ndarray, pooled: np.ndarray, scaler: LexiconScaler | None) -> np.ndarray:
    return pooled if scaler is None else np.concatenate([pooled, scaler(features.lexicon_of(rows))], 1)


def probe_cv(features, folds: list[tuple[Split, Split]], c: float = 1.0, keep_probs: bool = False,
             lexicon: bool = False) -> dict:
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
        scaler = LexiconScaler(features.lexicon_of(train.rows)) if lexicon else None
        x_train = _design(features, train.rows, x_all[np.searchsorted(everything, train.rows)], scaler)
        x_val = _design(features, val.rows, x_all[np.searchsorted(everything, val.rows)], scaler)
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


def fit_probe(features, train: Split, c: float = 1.0, lexicon: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The probe trained on `train`: (coef (classes, Dt + Di [+ 4]), intercept (classes,)) of the
    logistic regression on pooled_features [and the raw lexicon scores: the standardisation is
    folded into the weights]; mmsa.models.factory.probe_head turns them into a head."""
    from sklearn.linear_model import LogisticRegression
    scaler = LexiconScaler(features.lexicon_of(train.rows)) if lexicon else None
    x = _design(features, train.rows, pooled_features(features, train.rows), scaler)
    model = LogisticRegression(C=c, max_iter=2000).fit(x, train.labels)
    coef, intercept = model.coef_, model.intercept_
    if scaler is not None:
        pooled = coef.shape[1] - len(scaler.mean)
        lex_coef, intercept = scaler.on_raw_scores(coef[:, pooled:], intercept)
        coef = np.concatenate([coef[:, :pooled], lex_coef], 1)
    return coef.astype(np.float32), intercept.astype(np.float32)
