"""The search's last step: the model to submit, chosen by ensemble selection
(mmsa.training.selection) over the out-of-fold predictions of the trials that ran every fold and
of the linear probe, all on the same folds; written on the parent run as the plan mmsa.final
executes (PLAN_ARTIFACT, mmsa.training.plan) and as metrics.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field

import numpy as np

from mmsa.app.run_tags import PLAN_ARTIFACT
from mmsa.config import Config
from mmsa.training import oof
from mmsa.training.plan import Plan, PlanMember, default_seeds
from mmsa.training.selection import Caps, score, select, selection_cv
from search.trainable import OOF_ARTIFACT

PROBE_OOF_ARTIFACT = "probe_oof.npz"
PROBE = "probe"  # the probe's name among the candidates; trials go by their trial id


@dataclass
class Ensemble:
    metric: str
    members: list[tuple[str, float]]  # (candidate: a trial id or PROBE, weight), heaviest first
    score: float  # the blend's out-of-fold score, on the predictions it was chosen on (optimistic)
    selection_cv: float  # chosen on all folds but one, scored on that one, averaged over folds
    best_single: str
    best_single_score: float  # out of fold, pooled over all rows like the blend's
    probe_score: float | None
    candidates: int
    skipped: list[str] = field(default_factory=list)  # trials that ran every fold without predictions to blend

    def line(self) -> str:
        parts = " + ".join(f"{name} {weight:.2f}" for name, weight in self.members)
        probe = f"; the probe {self.probe_score:.4f}" if self.probe_score is not None else ""
        held = (f"{self.selection_cv:.4f} chosen without each fold in turn and scored on it"
                if self.selection_cv == self.selection_cv else "one validation split: no estimate without it")
        return (f"ensemble: {parts} (chosen from {self.candidates} candidates: the trials that ran every fold and "
                f"the probe)\n"
                f"  out-of-fold {self.metric} {self.score:.4f} on the predictions it was chosen on (optimistic); "
                f"{held}; best single: {self.best_single} {self.best_single_score:.4f}{probe}")


def download(client, run_id: str, name: str) -> dict | None:
    """A run's out-of-fold predictions artifact (mmsa.training.oof), or None where it has none."""
    from mlflow.exceptions import MlflowException
    with tempfile.TemporaryDirectory() as tmp:
        try:
            return oof.load(client.download_artifacts(run_id, name, tmp))
        except (MlflowException, OSError, ValueError):
            return None


def member_size(trial) -> float:
    """What a trial's member of the final model holds: its model's parameters (as its run
    recorded them) times its seeds."""
    from search.report import config_from_params
    from mmsa.config import Config
    cfg = Config.from_flat(config_from_params(trial.params), source=f"run {trial.run_id} params")
    return float(trial.metrics.get("n_params", 0)) * default_seeds(cfg)


def select_ensemble(client, parent_id: str, trials: list, metric: str, max_members: int = 0,
                    max_params: float = 0, probe_params: int = 0) -> Ensemble | None:
    """Ensemble selection over the completed `trials` (search.report.TrialRecord: this search's,
    and earlier searches' on the same labeled pairs and folds, search.warm_start) and the probe
    (its `probe_params` parameters), the blend at most `max_members` distinct members of at most
    `max_params` parameters in all (0: no limit); its metrics logged on the parent run. None where
    no candidate has out-of-fold predictions, or none fits the limits."""
    arrays: dict[str, dict] = {}
    probe = download(client, parent_id, PROBE_OOF_ARTIFACT)
    if probe is not None:
        arrays[PROBE] = probe
    skipped = []
    for t in sorted((t for t in trials if t.ended == "completed"), key=lambda t: t.trial_id):
        got = download(client, t.run_id, OOF_ARTIFACT)
        reference = next(iter(arrays.values()), got)
        if got is None or not oof.same_rows(got, reference):
            skipped.append(t.trial_id)
            continue
        arrays[t.trial_id] = got
    if not arrays:
        return None
    first = next(iter(arrays.values()))
    labels, folds = first["labels"], first["fold"]
    probs = {name: a["probs"] for name, a in arrays.items()}
    by_id = {t.trial_id: t for t in trials}
    caps = Caps(max_members, max_params, {name: probe_params if name == PROBE else member_size(by_id[name])
                                          for name in probs})
    try:
        chosen = select(probs, labels, metric, caps=caps)
    except ValueError:  # not one candidate fits max_params
        return None
    singles = {name: score(metric, labels, p) for name, p in probs.items()}
    best_single = max(singles, key=lambda n: (singles[n], n != PROBE))
    members = sorted(((name, float(w)) for name, w in chosen.weights.items()), key=lambda m: -m[1])
    out = Ensemble(metric, members, chosen.score,
                   selection_cv(probs, labels, folds, metric, caps) if len(np.unique(folds)) > 1 else float("nan"),
                   best_single, singles[best_single], singles.get(PROBE), len(arrays), skipped)
    from search.tracking import log_metrics
    log_metrics(client, parent_id, {f"ensemble_{metric}": out.score, f"ensemble_selection_cv_{metric}": out.selection_cv,
                                    "ensemble_members": len(members), "ensemble_candidates": len(arrays),
                                    f"best_single_oof_{metric}": out.best_single_score},
                step=0)
    return out


def trial_member(trial, weight: float = 1.0) -> PlanMember:
    """A trial (search.report.TrialRecord) as a member of a plan: its whole config (its run's
    params), trained for its best epoch."""
    from search.report import config_from_params
    cfg = Config.from_flat(config_from_params(trial.params), source=f"run {trial.run_id} params")
    return PlanMember(f"trial {trial.trial_id}", "model", cfg, trial.best_epoch, weight, default_seeds(cfg),
                      trial.run_id)


def write_plan(client, parent_id: str, metric: str, ensemble: Ensemble | None, best, trials: list,
               probe: Config) -> Plan | None:
    """The plan mmsa.final executes, logged on the parent run: the selected ensemble, else (no
    out-of-fold predictions to select from: finetune=full has no probe) the best trial alone; None
    where nothing scored. `probe`: the probe's config (mmsa.models.probe.probe_config of the base config)."""
    by_id = {t.trial_id: t for t in trials}
    if ensemble is not None:
        members = tuple(PlanMember("linear probe", "probe", probe, 0, weight, 1, parent_id) if name == PROBE
                        else trial_member(by_id[name], weight) for name, weight in ensemble.members)
    elif best is not None:
        members = (trial_member(best),)
    else:
        return None
    plan = Plan(members, metric=metric, origin=f"search {parent_id}")
    client.log_dict(parent_id, plan.to_dict(), PLAN_ARTIFACT)
    return plan
