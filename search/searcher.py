"""Optuna TPE behind Ray Tune, told the truth about trials that ASHA stopped early.

Ray's stock `OptunaSearch.on_trial_complete` hands Optuna the last reported score of every
trial as COMPLETE, including the truncated score of a trial the scheduler stopped after one
epoch. TPE then ranks half-trained configs as if finished. Here such a trial reaches Optuna as
PRUNED: its per-epoch values (reported as intermediate values) still inform TPE, as Optuna's own
pruners would have it, but it is not counted as a final score.
"""

from __future__ import annotations

import logging

from optuna.trial import TrialState
from ray.tune.search.optuna import OptunaSearch

from search.trial_report import TrialReport, score_key

log = logging.getLogger(__name__)


class PruneAwareOptunaSearch(OptunaSearch):
    """Also proposes no more trials once its time budget (search.time_budget.TimeBudget) is spent."""

    def __init__(self, *args, budget=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.budget = budget

    def save(self, checkpoint_path: str) -> None:
        """The searcher's own state; the budget it shares with the stopper is saved by the stopper
        (search.driver.BudgetStopper), and a restore keeps the shared object."""
        budget, self.budget = self.budget, None
        try:
            super().save(checkpoint_path)
        finally:
            self.budget = budget

    def restore(self, checkpoint_path: str) -> None:
        budget = self.budget
        super().restore(checkpoint_path)
        self.budget = budget

    def suggest(self, trial_id: str):
        if self.budget is not None and self.budget.spent():
            return self.FINISHED
        return super().suggest(trial_id)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        stopped_early = bool(result) and not error and not TrialReport.from_result(result).all_folds
        if not stopped_early or trial_id in self._completed_trials:
            super().on_trial_complete(trial_id, result=result, error=error)
            return
        self._ot_study.tell(self._ot_trials[trial_id], state=TrialState.PRUNED)
        self._completed_trials.add(trial_id)

    @property
    def study(self):
        return self._ot_study


def make_searcher(spec, budget=None, warm=None) -> PruneAwareOptunaSearch:
    """TPE (or random search) over the space; `warm` (search.warm_start.WarmStart): earlier trials
    it starts from, its history; the default config is not trained again where one of them is it."""
    import optuna
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if spec.searcher == "tpe":
        sampler = optuna.samplers.TPESampler(seed=spec.seed, n_startup_trials=spec.n_startup_trials)
    else:
        sampler = optuna.samplers.RandomSampler(seed=spec.seed)
    first = default_point(spec)
    if warm is not None and first and any(p.params == first[0] for p in warm.sampler):
        first = None
    searcher = PruneAwareOptunaSearch(space=spec.optuna_space(), metric=score_key(f"best_{spec.metric}"), mode="max",
                                      sampler=sampler, points_to_evaluate=first, budget=budget)
    if warm is not None:
        from search.warm_start import tell
        tell(searcher, warm)
    return searcher


def default_point(spec) -> list[dict] | None:
    """The defaults (plus the space's fixed values) as the first trial, when the space contains
    them: the search then never ends below the default config."""
    if not spec.start_from_defaults:
        return None
    flat = spec.base_config().to_flat()
    point = {name: flat[name] for name in spec.params}
    return [point] if all(p.contains(point[name]) for name, p in spec.params.items()) else None
