"""The search's last step: the model to submit, chosen by ensemble selection
(mmsa.training.selection) over the out-of-fold predictions of the trials that ran every fold and
of the linear probe, all on the same folds, and the plan mmsa.final executes
(mmsa.training.plan). Pure over the trials' records and their predictions: search.run records
the plan and the ensemble's metrics on the parent run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from mmsa.config import Config
from mmsa.training import oof
from mmsa.training.plan import Plan, PlanMember, default_seeds, stored_config, trial_member
from mmsa.training.selection import Caps, score, select, selection_cv
from search.record import TrialRecord

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

    def metrics(self) -> dict[str, float]:
        return {f"ensemble_{self.metric}": self.score, f"ensemble_selection_cv_{self.metric}": self.selection_cv,
                "ensemble_members": len(self.members), "ensemble_candidates": self.candidates,
                f"best_single_oof_{self.metric}": self.best_single_score}

    def line(self) -> str:
        parts = " + ".join(f"{name} {weight:.2f}" for name, weight in self.members)
        probe = f"; the probe {self.probe_score:.4f}" if self.probe_score is not None else ""
        held = (f"{self.selection_cv:.4f} chosen without each fold in turn and scored on it"
                if self.selection_cv == self.selection_cv else "one validation split: no estimate without it")
        return (f"ensemble: {parts} (chosen from {self.candidates} candidates: the trials that ran every fold and "
                f"the probe)\n"
                f"  out-of-fold {self.metric} {self.score:.4f} on the predictions it was chosen on (optimistic); "
                f"{held}; best single: {self.best_single} {self.best_single_score:.4f}{probe}")


def member_size(trial: TrialRecord) -> float:
    """What a trial's member of the final model holds: its model's parameters (as its run
    recorded them) times its seeds."""
    cfg = stored_config(trial.params, f"run {trial.run_id} params")
    return float(trial.n_params) * default_seeds(cfg)


def select_ensemble(trials: list[TrialRecord], predictions: Callable[[str], dict | None], probe: dict | None,
                    metric: str, max_members: int = 0, max_params: float = 0,
                    probe_params: int = 0) -> Ensemble | None:
    """Ensemble selection over the completed `trials` (this search's, and earlier searches' on the
    same labeled pairs and folds, search.warm_start), each with its out-of-fold predictions
    (`predictions(run_id)`), and the probe's (`probe`, of `probe_params` parameters), the blend at
    most `max_members` distinct members of at most `max_params` parameters in all (0: no limit).
    None where no candidate has out-of-fold predictions, or none fits the limits."""
    arrays: dict[str, dict] = {}
    if probe is not None:
        arrays[PROBE] = probe
    skipped = []
    for t in sorted((t for t in trials if t.ended == "completed"), key=lambda t: t.trial_id):
        got = predictions(t.run_id)
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
    return out


def member(trial: TrialRecord, weight: float = 1.0) -> PlanMember:
    return trial_member(f"trial {trial.trial_id}", trial.params, trial.best_epoch, trial.run_id, weight)


def make_plan(parent_id: str, metric: str, ensemble: Ensemble | None, best: TrialRecord | None,
              trials: list[TrialRecord], probe: Config) -> Plan | None:
    """The plan mmsa.final executes: the selected ensemble, else (no out-of-fold predictions to
    select from: finetune=full has no probe) the best trial alone; None where nothing scored.
    `probe`: the probe's config (mmsa.models.probe.probe_config of the base config)."""
    by_id = {t.trial_id: t for t in trials}
    if ensemble is not None:
        members = tuple(PlanMember("linear probe", "probe", probe, 0, weight, 1, parent_id) if name == PROBE
                        else member(by_id[name], weight) for name, weight in ensemble.members)
    elif best is not None:
        members = (member(best),)
    else:
        return None
    return Plan(members, metric=metric, origin=f"search {parent_id}")
