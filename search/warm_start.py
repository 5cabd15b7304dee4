"""`--warm-start RUN_ID` (space key `warm_start:`): earlier searches, as their records hold them
(search.record.EarlierSearch), make the next one better. Their finished trials are never trained again; they

- become the searcher's history (Optuna's TPE is told their configs and scores) where their
  configs lie inside the new space: every searched key within its distribution, every other key
  of the config the new search's own (what does not change a model's score aside: where data and
  cache live, devices, threads, micro-batches);
- enter ensemble selection, with their out-of-fold predictions, where they were scored on the same
  labeled pairs and the same folds: the earlier search's fingerprint of its labeled pairs, fold
  seed and cv_folds equals the new one's (compared, never assumed).

A different metric is fine: each earlier trial's score is recomputed from its out-of-fold
predictions (a trial that ran every fold), or read as the metric its run recorded beside its own
at its best epoch (one stopped early). What came from where is recorded on the new search's run.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from mmsa.errors import UserError
from mmsa.training.plan import stored_config
from search.record import EarlierSearch, TrialRecord

# Config keys that may differ between an earlier trial and the new space: where and how it ran,
# not what it trained; and the metric it monitored (its score is recomputed by the new one).
NOT_COMPARED = {"data_dir", "cache_dir", "num_threads", "device", "loader_workers", "micro_batch", "monitor"}


@dataclass(frozen=True)
class SamplerPoint:
    """An earlier trial, as the searcher is told it."""
    params: dict  # the new space's searched keys -> its values
    value: float | None  # its score (the new metric); None where stopped early
    intermediate: float | None  # a trial stopped early: its score over the folds it finished


@dataclass
class WarmStart:
    searches: list[str]
    sampler: list[SamplerPoint] = field(default_factory=list)
    candidates: list[TrialRecord] = field(default_factory=list)  # trials with predictions to blend
    record: dict = field(default_factory=dict)  # {search: {what happened to its trials}}, recorded on the new search

    def line(self) -> str:
        n = sum(r["finished"] for r in self.record.values())
        return (f"warm start: {n} finished trial(s) of {len(self.searches)} earlier search(es), none trained again: "
                f"{len(self.sampler)} tell the searcher, {len(self.candidates)} are candidates of the ensemble"
                + "".join(f"\n  {r['note']}" for r in self.record.values() if r.get("note")))


def run_ids(flags: list[str] | None, spec) -> list[str]:
    """--warm-start flags, then the space's warm_start list, each once."""
    return list(dict.fromkeys([*(flags or []), *spec.warm_start]))


def refuse_own(ids: list[str], own_id: str | None) -> None:
    """A search resumed with itself as its warm start: one line."""
    if own_id in ids:
        raise UserError(f"--warm-start {own_id}: that is this search itself (--resume continues it)")


def gather(earlier: list[EarlierSearch], spec, fingerprint: str,
           predictions: Callable[[str], dict | None]) -> WarmStart:
    """What the `earlier` searches give the new search `spec` (its labeled pairs and folds:
    `fingerprint`); `predictions(run_id)`: a trial's out-of-fold predictions, for a score by
    another metric. UserError where none of their trials can be used at all."""
    base = spec.base_config().to_flat()
    out = WarmStart([e.run_id for e in earlier])
    for search in earlier:
        same_folds = search.fingerprint == fingerprint
        trials = [t for t in search.trials if t.ended in ("completed", "stopped early") and not math.isnan(t.score)]
        told, blended = [], []
        for t in trials:
            point = sampler_point(t, spec, base, search.metric, predictions)
            if point is not None:
                out.sampler.append(point)
                told.append(t.trial_id)
            if same_folds and t.ended == "completed":
                out.candidates.append(t)
                blended.append(t.trial_id)
        note = ""
        if not same_folds:
            why = "recorded before searches kept one" if search.fingerprint is None else "other labeled pairs or other folds"
            note = (f"search {search.run_id}: its fingerprint of labeled pairs and folds differs ({why}): its trials "
                    f"may tell the searcher, never enter the ensemble")
        out.record[search.run_id] = {"finished": len(trials), "told_the_searcher": told, "ensemble_candidates": blended,
                                     "same_labeled_pairs_and_folds": same_folds, "metric": search.metric, "note": note}
        if not told and not blended:
            raise UserError(f"--warm-start {search.run_id}: nothing to reuse: none of its {len(trials)} finished "
                            f"trial(s) lies in this space{', and its folds differ' if not same_folds else ''}")
    return out


def sampler_point(trial: TrialRecord, spec, base: dict, earlier_metric: str,
                  predictions: Callable[[str], dict | None]) -> SamplerPoint | None:
    """`trial` as a point of the new space, or None where it lies outside."""
    try:
        config = stored_config(trial.params, f"run {trial.run_id} params").to_flat()
    except UserError:  # params of another version of the config
        return None
    for key, value in config.items():
        if key in spec.params:
            if not spec.params[key].contains(value):
                return None
        elif key not in NOT_COMPARED and value != base.get(key):
            return None
    score = trial.score if spec.metric == earlier_metric else _rescored(trial, spec.metric, predictions)
    if score is None or math.isnan(score):
        return None
    params = {name: config[name] for name in spec.params}
    if trial.ended == "completed":
        return SamplerPoint(params, score, None)
    return SamplerPoint(params, None, score)


def _rescored(trial: TrialRecord, metric: str, predictions: Callable[[str], dict | None]) -> float | None:
    """The trial's score by another metric: from its out-of-fold predictions (the mean over folds,
    as a trial's score is), else the metric its run recorded beside its own at its best epoch."""
    if trial.ended == "completed":
        oof = predictions(trial.run_id)
        if oof is not None:
            import numpy as np

            from mmsa.training.selection import score
            return float(np.mean([score(metric, oof["labels"][oof["fold"] == k], oof["probs"][oof["fold"] == k])
                                  for k in np.unique(oof["fold"])]))
    return trial.metrics.get(f"{metric}_at_best")


def tell(searcher, warm: WarmStart) -> None:
    """The earlier trials into the searcher's history (Ray's OptunaSearch.add_evaluated_point)."""
    for p in warm.sampler:
        if p.value is not None:
            searcher.add_evaluated_point(p.params, p.value)
        else:
            searcher.add_evaluated_point(p.params, None, pruned=True, intermediate_values=[p.intermediate])


def recorded_ids(params: dict) -> list[str]:
    """The warm start a search began with (its parent run's params), for --resume."""
    return [r for r in params.get("warm_start", "").split(",") if r]
