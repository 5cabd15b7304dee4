import math

from search.report import TrialRecord, best_trial, top_table


def _trial(trial_id: str, ended: str, score: float, folds: int = 5) -> TrialRecord:
    return TrialRecord(run_id=f"run-{trial_id}", trial_id=trial_id, ended=ended, folds=folds, epochs=folds * 2,
                       best_epoch=2, score=score, metrics={"val_macro_f1_at_best": 0.5}, params={"lr": "0.001"})


def test_the_winner_is_the_best_trial_that_ran_every_fold():
    trials = [_trial("a", "completed", 0.71), _trial("b", "stopped early", 0.80, folds=1),
              _trial("c", "completed", 0.73), _trial("d", "failed", math.nan, folds=0),
              _trial("e", "completed", math.nan, folds=5)]
    assert best_trial(trials).trial_id == "c"  # not b: a one-fold mean is noisier and would win by luck


def test_without_a_completed_trial_the_best_stopped_one_wins_and_failed_ones_never():
    assert best_trial([_trial("a", "stopped early", 0.6, 1), _trial("b", "stopped early", 0.7, 1)]).trial_id == "b"
    assert best_trial([_trial("a", "failed", math.nan, 0), _trial("b", "interrupted", 0.9, 2)]) is None
    assert best_trial([]) is None


def test_equal_scores_keep_the_first_recorded():
    assert best_trial([_trial("a", "completed", 0.7), _trial("b", "completed", 0.7)]).trial_id == "a"


def test_the_top_table_ranks_completed_trials_first():
    table = top_table([_trial("a", "stopped early", 0.9, 1), _trial("b", "completed", 0.7)], "val_acc", ["lr"])
    rows = table.splitlines()
    assert rows[0].split()[:6] == ["rank", "trial", "ended", "folds", "epoch", "cv_val_acc"]
    assert rows[1].split()[1] == "b" and rows[2].split()[1] == "a"
