"""mmsa.training.selection: greedy ensemble selection with replacement over out-of-fold predictions."""

import numpy as np
import pytest

from mmsa.training.selection import blend, score, select, selection_cv


def _onehot(pred, sure=0.9):
    out = np.full((len(pred), 3), (1 - sure) / 2)
    out[np.arange(len(pred)), pred] = sure
    return out


def test_equal_scores_go_to_the_surer_model_and_a_worse_log_loss_adds_nothing():
    labels = np.array([0, 1, 2, 0, 1, 2])
    sure, unsure = _onehot(labels, 0.9), _onehot(labels, 0.5)
    chosen = select({"unsure": unsure, "sure": sure}, labels, "val_acc")
    assert chosen.weights == {"sure": 1.0} and chosen.rounds == 1 and chosen.score == 1.0


def test_models_wrong_on_different_pairs_are_blended():
    labels = np.array([0, 1, 2] * 10)
    part = np.arange(30) % 3  # each model is wrong on its own third of the pairs
    models = {name: _onehot(np.where(part == k, (labels + 1) % 3, labels), sure)
              for k, (name, sure) in enumerate([("x", 0.7), ("y", 0.6), ("z", 0.5)])}
    chosen = select(models, labels, "val_acc")
    assert max(score("val_acc", labels, p) for p in models.values()) == pytest.approx(2 / 3)
    assert chosen.score == 1.0 == score("val_acc", labels, blend(models, chosen.weights))
    assert sum(chosen.weights.values()) == pytest.approx(1.0) and len(chosen.weights) >= 2
    # weights are counts of additions (with replacement)
    assert all(w * chosen.rounds == pytest.approx(round(w * chosen.rounds)) for w in chosen.weights.values())


def test_the_metric_decides_what_is_chosen():
    labels = np.array([0] * 8 + [1, 2])
    majority = _onehot(np.zeros(10, dtype=int))  # accuracy 0.8, macro-F1 0.30
    balanced = _onehot(np.array([0] * 5 + [1, 1, 2] + [1, 2]))  # accuracy 0.7, macro-F1 higher
    assert select({"m": majority, "b": balanced}, labels, "val_acc").weights["m"] >= 0.5  # chosen first
    by_f1 = select({"m": majority, "b": balanced}, labels, "val_macro_f1")
    assert by_f1.weights["b"] > 0.5
    assert by_f1.score >= score("val_macro_f1", labels, balanced) > score("val_macro_f1", labels, majority)


def test_selection_cv_scores_each_fold_with_a_choice_made_without_it():
    labels = np.array([0, 1, 2] * 4)
    groups = np.repeat([0, 1], 6)
    wrong = (labels + 1) % 3
    # 'lucky' is right on group 0 only, 'steady' right on two thirds of both
    lucky = _onehot(np.where(groups == 0, labels, wrong))
    steady = _onehot(np.where(np.arange(12) % 3 != 2, labels, wrong))
    cands = {"lucky": lucky, "steady": steady}
    # chosen on group 1 alone: steady; scored on group 0: 4/6. Chosen on group 0: lucky; on group 1: 0
    assert selection_cv(cands, labels, groups, "val_acc") == pytest.approx((4 / 6 + 0) / 2)
    assert select(cands, labels, "val_acc").score == pytest.approx(8 / 12)  # what the same data says


def test_no_candidates_is_an_error():
    with pytest.raises(ValueError):
        select({}, np.array([0]), "val_acc")


def test_a_round_that_does_not_improve_does_not_end_the_path():
    # the old rule stopped at the first addition that did not improve the blend; later ones may
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 3, 40)
    models = {}
    for i in range(4):  # each half noise, half sure of the right class on its own random rows
        p = 0.5 * rng.dirichlet(np.ones(3), 40) + 0.5 * np.eye(3)[labels] * (rng.random((40, 1)) < 0.5)
        models[f"m{i}"] = p / p.sum(1, keepdims=True)
    first, second = select(models, labels, "val_acc", max_rounds=1), select(models, labels, "val_acc", max_rounds=2)
    assert second.weights == first.weights and second.rounds == 1  # the second addition did not improve
    chosen = select(models, labels, "val_acc")
    assert chosen.score > first.score and len(chosen.weights) > 1
    assert chosen.score == score("val_acc", labels, blend(models, chosen.weights))
