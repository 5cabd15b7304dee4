import numpy as np
import pytest
import torch

from mmsa.config import Config
from mmsa.training.crossval import cross_validate, cv_epochs, cv_summary
from mmsa.data.splits import cv_splits
from mmsa.models.runtime import predict_proba
from mmsa.training.fit import fit


def _epoch(acc, f1=0.5, loss=1.0):
    return {"val_acc": acc, "val_macro_f1": f1, "train_loss": loss, "epoch_seconds": 1.0,
            "val_f1_positive": 0.1, "val_confusion": [[1, 0, 0], [0, 1, 0], [0, 0, 1]]}


def test_one_epoch_for_all_folds_chosen_on_their_mean():
    # fold 1 peaks at epoch 1, fold 2 at epoch 3; their mean peaks at epoch 2
    histories = [[_epoch(0.80), _epoch(0.78), _epoch(0.60)], [_epoch(0.60), _epoch(0.70), _epoch(0.71)]]
    s = cv_summary(histories, "val_acc", total_folds=5)
    assert s["best_epoch"] == 2 and s["best_val_acc"] == pytest.approx(0.74) == s["val_acc"]
    assert s["folds_done"] == 2 and s["cv_folds"] == 5 and s["epochs_trained"] == 6
    assert s["fold_accs"] == [0.78, 0.70] and s["fold_val_acc"] == 0.70
    assert s["val_acc_fold_std"] == pytest.approx(0.04)
    assert s["val_confusion"] == [[2, 0, 0], [0, 2, 0], [0, 0, 2]]


def test_equal_means_choose_the_earlier_epoch():
    s = cv_summary([[_epoch(0.7), _epoch(0.7)]], "val_acc", 1)
    assert s["best_epoch"] == 1


def test_cross_validate_reports_after_every_fold(subset_prepared):
    data_cfg, p = subset_prepared
    cfg = Config(data=data_cfg).updated({"max_epochs": 2, "batch_size": 16, "d_model": 16, "heads": 2, "patience": 1})
    labeled = p.train  # every labeled pair of the subset's training part
    folds = cv_splits(labeled, 3, seed=0)
    with pytest.raises(ValueError, match="whole schedules: patience 1"):  # never cut short quietly
        cross_validate(cfg, p.features, folds)
    cfg = cfg.updated({"patience": 0})
    epochs = list(cv_epochs(cfg, p.features, folds))
    seen = [(ev.fold, ev.epoch, ev.summary["folds_done"] if ev.fold_end else None) for ev in epochs]
    assert seen == [(1, 1, None), (1, 2, 1), (2, 1, None), (2, 2, 2), (3, 1, None), (3, 2, 3)]
    assert epochs[-1].summary["epochs_trained"] == 6


def test_a_cross_validation_stopped_anywhere_goes_on_to_the_same_result(subset_prepared):
    """A trial's checkpoint: the state after any epoch of any fold, resumed, gives the numbers of an
    uninterrupted run, bit for bit (the weights, optimizer, schedule, EMA and random states)."""
    import copy
    data_cfg, p = subset_prepared
    cfg = Config(data=data_cfg).updated({"max_epochs": 3, "batch_size": 16, "d_model": 16, "heads": 2, "patience": 0, "token_dropout": 0.2})
    folds = cv_splits(p.train, 2, seed=0)
    states = [(ev.fold, ev.epoch, copy.deepcopy(ev.state))
              for ev in cv_epochs(cfg, p.features, folds, keep_probs=True, keep_state=True)]
    whole = cross_validate(cfg, p.features, folds, keep_probs=True)
    for fold, epoch, state in (states[1], states[3]):  # fold 1 epoch 2; fold 2 epoch 1
        resumed = list(cv_epochs(cfg, p.features, folds, keep_probs=True, keep_state=True, start=state))
        resumed_epochs, again = [(ev.fold, ev.epoch) for ev in resumed], resumed[-1].summary
        assert resumed_epochs[0] == ((fold, epoch + 1) if epoch < 3 else (fold + 1, 1))  # from the next epoch on
        assert again["fold_accs"] == whole["fold_accs"] and again["best_epoch"] == whole["best_epoch"]
        assert all(np.array_equal(a, b) for a, b in zip(again["fold_probs"], whole["fold_probs"]))


@pytest.mark.parametrize("head", ["linear", "mlp"])
def test_simple_heads_train_and_predict(subset_prepared, head):
    data_cfg, p = subset_prepared
    cfg = Config(data=data_cfg).updated({"head": head, "pooling": "mean", "max_epochs": 3, "batch_size": 16, "lr": 3e-3})
    result = fit(cfg, p.features, p.train, p.val)
    probs = predict_proba(result.model, p.features, p.val.rows, torch.device("cpu"))
    assert probs.shape == (len(p.val), 3) and np.allclose(probs.sum(1), 1, atol=1e-5)
    assert result.metrics["val_acc"] == pytest.approx(float((probs.argmax(1) == p.val.labels).mean()))  # the kept model's
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]


def test_a_folds_model_is_freed_before_the_next_fold_builds_its_own(subset_prepared, monkeypatch):
    """On a GPU a fold's model, its gradients and AdamW's moments alive while the next fold trains
    would double what the memory plan counts for one: nothing of them may outlive their fold."""
    import weakref

    import mmsa.training.fit as fit_module
    data_cfg, p = subset_prepared
    cfg = Config(data=data_cfg).updated({"max_epochs": 2, "batch_size": 16, "d_model": 16, "heads": 2, "patience": 0, "ema": 0.5})
    earlier: list = []
    built = fit_module.create_model

    def tracked(c, *args, **kwargs):
        alive = sum(ref() is not None for ref in earlier)
        assert alive == 0, f"{alive} parameter(s) of an earlier fold's model alive as the next fold starts"
        model = built(c, *args, **kwargs)
        earlier.extend(weakref.ref(t) for t in model.parameters())
        return model
    monkeypatch.setattr(fit_module, "create_model", tracked)
    states = [ev.state for ev in cv_epochs(cfg, p.features, cv_splits(p.train, 3, seed=0), keep_probs=True,
                                           keep_state=True)]
    assert earlier and len(states) == 6  # three folds built, each checked against the ones before


def test_cross_validation_keeps_no_copy_of_a_folds_best_weights(subset_prepared):
    """A fold's model is discarded: a copy of its best epoch's weights would be memory, and a
    checkpoint's size, for nothing."""
    data_cfg, p = subset_prepared
    cfg = Config(data=data_cfg).updated({"max_epochs": 2, "batch_size": 16, "d_model": 16, "heads": 2, "patience": 0})
    fits = [ev.state.fit for ev in cv_epochs(cfg, p.features, cv_splits(p.train, 2, seed=0), keep_state=True)]
    assert [f.best_state for f in fits if f is not None] == [{}, {}]
