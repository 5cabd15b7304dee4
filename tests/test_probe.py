import numpy as np
import pytest

from mmsa.data.splits import cv_splits
from mmsa.models.probe import pooled_features, probe_cv


def test_pooled_features_are_normalised_per_modality_and_keep_the_callers_order(subset_prepared):
    _, p = subset_prepared
    f = p.features
    rows = p.train.rows[:40]
    x = pooled_features(f, rows)
    assert x.shape == (40, f.text_dim + f.image_dim)
    assert np.allclose(np.linalg.norm(x[:, :f.text_dim], axis=1), 1, atol=1e-5)
    assert np.allclose(np.linalg.norm(x[:, f.text_dim:], axis=1), 1, atol=1e-5)
    shuffled = np.random.default_rng(0).permutation(len(rows))
    assert np.allclose(pooled_features(f, rows[shuffled]), x[shuffled])
    # text: the mean over real tokens only
    r = int(rows[0])
    mask = f.text_mask[r].astype(bool)
    text = f.text[r][mask].astype(np.float32).mean(0)
    assert np.allclose(x[0, :f.text_dim], text / np.linalg.norm(text), atol=1e-4)


def test_probe_cv_scores_each_fold(subset_prepared):
    _, p = subset_prepared
    folds = cv_splits(p.train, 3, seed=0)
    out = probe_cv(p.features, folds)
    from sklearn.linear_model import LogisticRegression
    for (train, val), acc in zip(folds, out["probe_fold_val_acc"]):  # each fold: sklearn's own score
        model = LogisticRegression(C=1.0, max_iter=2000).fit(pooled_features(p.features, train.rows), train.labels)
        assert acc == pytest.approx(model.score(pooled_features(p.features, val.rows), val.labels))
    assert out["probe_val_acc"] == pytest.approx(np.mean(out["probe_fold_val_acc"]))
    assert out == probe_cv(p.features, folds)  # deterministic


@pytest.mark.parametrize("lexicon", [False, True])
def test_the_probe_as_a_head_gives_the_probe_s_probabilities(subset_prepared, lexicon):
    import torch
    from sklearn.linear_model import LogisticRegression

    from mmsa.config import Config, ModelConfig
    from mmsa.models.factory import probe_head
    from mmsa.models.probe import probe_config
    from mmsa.models.probe import fit_probe, pooled_features
    from mmsa.models.runtime import predict_proba
    data_cfg, data = subset_prepared
    f = data.features
    cfg = probe_config(Config(data=data_cfg, model=ModelConfig(lexicon=lexicon))).with_features(f)
    head = probe_head(cfg, *fit_probe(f, data.train, lexicon=lexicon))
    ours = predict_proba(head, f, data.val.rows, torch.device("cpu"))

    def design(rows):  # the probe's features, written out: the lexicon block standardised on train
        x = pooled_features(f, rows)
        if not lexicon:
            return x
        train_lex = f.lexicon_of(data.train.rows)
        lex = (f.lexicon_of(rows) - train_lex.mean(0)) / (train_lex.std(0) + 1e-6) / 2
        return np.concatenate([x, lex], 1)
    sklearn = LogisticRegression(C=1.0, max_iter=2000).fit(design(data.train.rows), data.train.labels)
    assert np.allclose(ours, sklearn.predict_proba(design(data.val.rows)), atol=1e-5)


def test_the_probe_with_lexicon_scores_reads_them(subset_prepared):
    _, p = subset_prepared
    folds = cv_splits(p.train, 3, seed=0)
    plain, with_lexicon = probe_cv(p.features, folds, keep_probs=True), probe_cv(p.features, folds, keep_probs=True,
                                                                                  lexicon=True)
    assert not np.allclose(plain["probe_fold_probs"][0], with_lexicon["probe_fold_probs"][0])
    lex = p.features.lexicon_of(p.train.rows)
    assert lex.shape == (len(p.train), 4) and lex[:, 3].min() >= -1 and lex[:, :3].max() <= 1
