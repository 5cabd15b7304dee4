"""search.time_budget: durations, a budget that survives a resume, and the search ending at fold boundaries."""

import pickle

import pytest

from mmsa.errors import UserError
from search.time_budget import FoldBoundaryStopper, TimeBudget, parse_duration


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
    now = [1000.0]
    monkeypatch.setattr("search.time_budget.time.monotonic", lambda: now[0])
    budget = TimeBudget(100, "search-a")
    assert not budget.spent()  # the clock starts at the first look
    now[0] += 60
    assert not budget.spent() and budget.left == 40
    saved = pickle.dumps(budget)
    now[0] += 3600  # the driver was killed; an hour later the search resumes
    resumed = pickle.loads(saved)  # its clock runs from the restore: trials Ray restarts count
    assert TimeBudget.live["search-a"] is resumed and resumed.left == 40
    now[0] += 10
    assert not resumed.spent() and resumed.left == 30
    now[0] += 29
    assert not resumed.spent()
    stopper = FoldBoundaryStopper("search-a")
    assert not stopper("trial", {}) and not stopper.stop_all()
    now[0] += 2
    assert stopper("trial", {}) and resumed.spent() and not stopper.stop_all()  # trials stop; the search ends them


def test_the_searcher_proposes_nothing_once_the_budget_is_spent(tmp_path, monkeypatch):
    from search.searcher import make_searcher
    from search.space import load_space
    space = tmp_path / "space.yaml"
    space.write_text("num_samples: 5\ntime_budget: 2m\nparams:\n  lr: {type: loguniform, low: 1.0e-4, high: 1.0e-2}\n")
    spec = load_space(space)
    assert spec.time_budget == "2m"
    now = [0.0]
    monkeypatch.setattr("search.time_budget.time.monotonic", lambda: now[0])
    searcher = make_searcher(spec, TimeBudget(120, "search-b"))
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
