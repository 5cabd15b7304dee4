"""search.time_budget: durations, a budget that survives a resume, and the search ending at fold boundaries."""

import pickle

import pytest

from mmsa.errors import UserError
from tests.search_helpers import ROOT
from search.time_budget import TimeBudget, parse_duration


@pytest.mark.parametrize("text, seconds", [("20m", 1200), ("1h30m", 5400), ("90s", 90), ("1.5h", 5400),
                                           ("600", 600), (" 2M ", 120)])
def test_durations(text, seconds):
    assert parse_duration(text, "--time-budget") == seconds


@pytest.mark.parametrize("text, said", [("soon", "not a duration"), ("20x", "not a duration"), ("", "not a duration"),
                                        ("-5m", "not a duration"), ("30s", "too short for one fold")])
def test_bad_durations_are_one_line(text, said):
    with pytest.raises(UserError, match=said) as e:
        parse_duration(text, "--time-budget")
    assert str(e.value).startswith(f"--time-budget {text}") and "\n" not in str(e.value)


def test_the_budget_counts_running_time_and_not_the_time_between_a_kill_and_a_resume(monkeypatch):
    from search.driver import BudgetStopper
    from search.searcher import make_searcher
    from search.space import load_space
    now = [1000.0]
    monkeypatch.setattr("search.time_budget.time.monotonic", lambda: now[0])
    budget = TimeBudget(100)
    assert not budget.spent()  # the clock starts when it is made (the features ready)
    now[0] += 60
    assert not budget.spent() and budget.left == 40
    stopper = BudgetStopper(budget)
    saved = stopper.get_state()  # what Ray's experiment checkpoint holds
    # The driver was killed; an hour later the search resumes. Ray restores the searcher, the
    # stopper and the logger from one pickle (so they share one budget), then the stopper's state.
    now[0] += 3600
    searcher = make_searcher(load_space(ROOT / "spaces" / "smoke.yaml"), TimeBudget(100))
    restored_stopper, restored_searcher = pickle.loads(pickle.dumps((BudgetStopper(searcher.budget), searcher)))
    assert restored_stopper.budget is restored_searcher.budget
    restored_stopper.set_state(saved)
    resumed = restored_searcher.budget
    assert resumed.left == 40  # its clock runs from the restore: trials Ray restarts count
    now[0] += 10
    assert not resumed.spent() and resumed.left == 30
    from search.trial_report import TrialReport
    fold_end = TrialReport(fold=1, epoch=2, fold_end=True, folds_done=1, epochs_done=2, scores={}).to_result()
    now[0] += 29
    assert not restored_stopper("trial", fold_end) and not restored_stopper.stop_all()
    now[0] += 2
    assert restored_stopper("trial", fold_end) and resumed.spent() and not restored_stopper.stop_all()


def test_the_searcher_saves_its_own_state_and_keeps_the_shared_budget(tmp_path):
    from search.searcher import make_searcher
    from search.space import load_space
    budget = TimeBudget(100)
    searcher = make_searcher(load_space(ROOT / "spaces" / "smoke.yaml"), budget)
    searcher.save(str(tmp_path / "searcher.pkl"))
    assert searcher.budget is budget
    other = TimeBudget(50)
    restored = make_searcher(load_space(ROOT / "spaces" / "smoke.yaml"), other)
    restored.restore(str(tmp_path / "searcher.pkl"))
    assert restored.budget is other  # Ray's restore keeps the budget the stopper shares


def test_the_searcher_proposes_nothing_once_the_budget_is_spent(tmp_path, monkeypatch):
    from search.searcher import make_searcher
    from search.space import load_space
    space = tmp_path / "space.yaml"
    space.write_text("num_samples: 5\ntime_budget: 2m\nparams:\n  lr: {type: loguniform, low: 1.0e-4, high: 1.0e-2}\n")
    spec = load_space(space)
    assert spec.time_budget == "2m"
    now = [0.0]
    monkeypatch.setattr("search.time_budget.time.monotonic", lambda: now[0])
    searcher = make_searcher(spec, TimeBudget(120))
    searcher.set_search_properties("best_val_acc", "max", {})
    assert isinstance(searcher.suggest("t1"), dict)
    now[0] += 121
    assert searcher.suggest("t2") == searcher.FINISHED


def test_a_bad_time_budget_in_a_space_file_is_one_line(tmp_path):
    from search.space import load_space
    space = tmp_path / "space.yaml"
    space.write_text("time_budget: 10s\n")
    with pytest.raises(UserError, match="space.yaml: time_budget 10s: shorter than 60 s"):
        load_space(space)
