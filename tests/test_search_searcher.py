from pathlib import Path

from optuna.trial import TrialState
from ray.tune.search.optuna import OptunaSearch

from search.searcher import make_searcher
from search.space import Param, SearchSpec
from search.trial_report import TrialReport


def _spec():
    return SearchSpec(path=Path("space.yaml"), n_startup_trials=2,
                      params={"lr": Param("lr", "loguniform", 1e-4, 1e-2), "pooling": Param("pooling", "choice", values=["mean", "first"])})


def _result(score: float, fold: int, all_folds: bool = False) -> dict:
    report = TrialReport(fold=fold, epoch=1, fold_end=True, folds_done=fold, epochs_done=fold,
                         scores={"best_val_acc": score}, all_folds=all_folds)
    return {**report.to_result(), "training_iteration": fold}


def _play(searcher, final_flags):
    for i, final in enumerate(final_flags):
        tid = f"t{i}"
        config = searcher.suggest(tid)
        assert set(config) == {"lr", "pooling"}
        for fold in (1, 2):
            searcher.on_trial_result(tid, _result(0.5 + 0.01 * fold, fold))
        searcher.on_trial_complete(tid, result=_result(0.52, 2, all_folds=bool(final)))


def test_stopped_early_trials_reach_optuna_as_pruned():
    searcher = make_searcher(_spec())
    _play(searcher, [0, 1, 0])
    states = [t.state for t in searcher.study.trials]
    assert states == [TrialState.PRUNED, TrialState.COMPLETE, TrialState.PRUNED]
    assert searcher.study.trials[1].value == 0.52
    assert searcher.study.trials[0].intermediate_values == {1: 0.51, 2: 0.52}  # still informs TPE


def test_errors_are_failures_not_scores():
    searcher = make_searcher(_spec())
    searcher.suggest("t0")
    searcher.on_trial_complete("t0", error=True)
    assert searcher.study.trials[0].state == TrialState.FAIL


def test_the_trap_in_the_stock_searcher():
    # What this module exists for: Ray's own OptunaSearch records a truncated run as a final score.
    spec = _spec()
    stock = OptunaSearch(space=spec.optuna_space(), metric="score/best_val_acc", mode="max", seed=0)
    _play(stock, [0])
    assert stock._ot_study.trials[0].state == TrialState.COMPLETE


def test_searcher_is_seeded():
    a, b = make_searcher(_spec()), make_searcher(_spec())
    assert [a.suggest(f"t{i}") for i in range(3)] == [b.suggest(f"t{i}") for i in range(3)]
