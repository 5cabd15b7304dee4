"""`--warm-start RUN_ID` (space key `warm_start:`): earlier searches, read from MLflow alone, make
the next one better. Their finished trials are never trained again; they

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
from dataclasses import dataclass, field

from mmsa.app.run_tags import TAG_FOLDS, TAG_KIND
from mmsa.errors import UserError

# Config keys that may differ between an earlier trial and the new space: where and how it ran,
# not what it trained; and the metric it monitored (its score is recomputed by the new one).
NOT_COMPARED = {"data_dir", "cache_dir", "num_threads", "device", "loader_workers", "micro_batch", "monitor"}
RECORD_ARTIFACT = "warm_start.json"


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
    candidates: list = field(default_factory=list)  # search.report.TrialRecord of trials with predictions to blend
    record: dict = field(default_factory=dict)  # {search: {what happened to its trials}}: RECORD_ARTIFACT

    def line(self) -> str:
        n = sum(r["finished"] for r in self.record.values())
        return (f"warm start: {n} finished trial(s) of {len(self.searches)} earlier search(es), none trained again: "
                f"{len(self.sampler)} tell the searcher, {len(self.candidates)} are candidates of the ensemble"
                + "".join(f"\n  {r['note']}" for r in self.record.values() if r.get("note")))


def run_ids(flags: list[str] | None, spec) -> list[str]:
    """--warm-start flags, then the space's warm_start list, each once."""
    return list(dict.fromkeys([*(flags or []), *spec.warm_start]))


def check_runs(client, ids: list[str], own_id: str | None = None) -> list:
    """Each id an earlier search's parent run, or a one-line UserError; the runs."""
    from mlflow.exceptions import MlflowException
    runs = []
    for run_id in ids:
        if run_id == own_id:
            raise UserError(f"--warm-start {run_id}: that is this search itself (--resume continues it)")
        try:
            run = client.get_run(run_id)
        except MlflowException:
            raise UserError(f"--warm-start {run_id}: no such run in the tracking store") from None
        kind = run.data.tags.get(TAG_KIND)
        if run.info.lifecycle_stage == "deleted":
            raise UserError(f"--warm-start {run_id}: the run is deleted")
        if kind != "search":
            raise UserError(f"--warm-start {run_id}: not a search's parent run (it is "
                            f"{'a ' + kind + ' run' if kind else 'no run of mmsa-search'}): give the search's run id")
        runs.append(run)
    return runs


def gather(client, runs: list, spec, fingerprint: str) -> WarmStart:
    """What the earlier searches `runs` give the new search `spec` (its labeled pairs and folds:
    `fingerprint`). UserError where none of their trials can be used at all."""
    from search.report import collect_trials
    base = spec.base_config().to_flat()
    out = WarmStart([r.info.run_id for r in runs])
    for run in runs:
        search_id, earlier_metric = run.info.run_id, run.data.params.get("metric", "val_acc")
        same_folds = run.data.tags.get(TAG_FOLDS) == fingerprint
        trials = [t for t in collect_trials(client, run.info.experiment_id, search_id, earlier_metric)
                  if t.ended in ("completed", "stopped early") and not math.isnan(t.score)]
        told, blended = [], []
        for t in trials:
            point = _sampler_point(client, t, spec, base, earlier_metric)
            if point is not None:
                out.sampler.append(point)
                told.append(t.trial_id)
            if same_folds and t.ended == "completed":
                out.candidates.append(t)
                blended.append(t.trial_id)
        note = ""
        if not same_folds:
            why = ("recorded before searches kept one" if TAG_FOLDS not in run.data.tags
                   else "other labeled pairs or other folds")
            note = (f"search {search_id}: its fingerprint of labeled pairs and folds differs ({why}): its trials "
                    f"may tell the searcher, never enter the ensemble")
        out.record[search_id] = {"finished": len(trials), "told_the_searcher": told, "ensemble_candidates": blended,
                                 "same_labeled_pairs_and_folds": same_folds, "metric": earlier_metric, "note": note}
        if not told and not blended:
            raise UserError(f"--warm-start {search_id}: nothing to reuse: none of its {len(trials)} finished trial(s) "
                            f"lies in this space{', and its folds differ' if not same_folds else ''}")
    return out


def _sampler_point(client, trial, spec, base: dict, earlier_metric: str) -> SamplerPoint | None:
    """`trial` (search.report.TrialRecord) as a point of the new space, or None where it lies outside."""
    from search.report import config_from_params
    try:
        config = config_from_params(trial.params)
    except UserError:  # params of another version of the config
        return None
    for key, value in config.items():
        if key in spec.params:
            if not _inside(spec.params[key], value):
                return None
        elif key not in NOT_COMPARED and value != base.get(key):
            return None
    score = trial.score if spec.metric == earlier_metric else _rescored(client, trial, spec.metric)
    if score is None or math.isnan(score):
        return None
    params = {name: config[name] for name in spec.params}
    if trial.ended == "completed":
        return SamplerPoint(params, score, None)
    return SamplerPoint(params, None, score)


def _inside(param, value) -> bool:
    if param.kind == "choice":
        return value in param.values or str(value) in map(str, param.values)
    return param.low <= float(value) <= param.high


def _rescored(client, trial, metric: str) -> float | None:
    """The trial's score by another metric: from its out-of-fold predictions (the mean over folds,
    as a trial's score is), else the metric its run recorded beside its own at its best epoch."""
    if trial.ended == "completed":
        oof = _predictions(client, trial.run_id)
        if oof is not None:
            import numpy as np

            from mmsa.training.selection import score
            return float(np.mean([score(metric, oof["labels"][oof["fold"] == k], oof["probs"][oof["fold"] == k])
                                  for k in np.unique(oof["fold"])]))
    return trial.metrics.get(f"{metric}_at_best")


def _predictions(client, run_id: str) -> dict | None:
    from search.ensemble import download
    from search.trainable import OOF_ARTIFACT
    return download(client, run_id, OOF_ARTIFACT)


def tell(searcher, warm: WarmStart) -> None:
    """The earlier trials into the searcher's history (Ray's OptunaSearch.add_evaluated_point)."""
    for p in warm.sampler:
        if p.value is not None:
            searcher.add_evaluated_point(p.params, p.value)
        else:
            searcher.add_evaluated_point(p.params, None, pruned=True, intermediate_values=[p.intermediate])


def record(client, parent_id: str, warm: WarmStart) -> None:
    """On the new search's run: which earlier searches, and what each gave."""
    from search.tracking import log_metrics
    client.log_dict(parent_id, {"searches": warm.record}, RECORD_ARTIFACT)
    log_metrics(client, parent_id, {"warm_trials_told": len(warm.sampler),
                                    "warm_trials_candidates": len(warm.candidates)}, step=0)


def recorded_ids(run) -> list[str]:
    """The warm start a search began with (its param), for --resume."""
    return [r for r in run.data.params.get("warm_start", "").split(",") if r]
