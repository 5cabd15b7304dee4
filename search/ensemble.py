"""The search's last step: the model to submit, chosen by ensemble selection
(mmsa.training.selection) over the out-of-fold predictions of the trials that ran every fold and
of the linear probe, all on the same folds. Written on the parent run as ENSEMBLE_ARTIFACT, which
mmsa.final retrains, and as metrics.
"""

from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass, field

import numpy as np

from mmsa.app.run_tags import ENSEMBLE_ARTIFACT
from mmsa.training import oof
from mmsa.training.selection import score, select, selection_cv
from search.trainable import OOF_ARTIFACT

PROBE_OOF_ARTIFACT = "probe_oof.npz"
PROBE = "probe"  # the probe's name among the candidates; trials go by their trial id


@dataclass
class Ensemble:
    metric: str
    members: list[dict]  # {"name", "weight", "run_id" (None for the probe), "best_epoch"}
    score: float  # the blend's out-of-fold score, on the predictions it was chosen on (optimistic)
    selection_cv: float  # chosen on all folds but one, scored on that one, averaged over folds
    best_single: str
    best_single_score: float  # out of fold, pooled over all rows like the blend's
    probe_score: float | None
    candidates: int
    skipped: list[str] = field(default_factory=list)  # trials that ran every fold without predictions to blend

    def line(self) -> str:
        parts = " + ".join(f"{m['name']} {m['weight']:.2f}" for m in self.members)
        probe = f"; the probe {self.probe_score:.4f}" if self.probe_score is not None else ""
        held = (f"{self.selection_cv:.4f} chosen without each fold in turn and scored on it"
                if self.selection_cv == self.selection_cv else "one validation split: no estimate without it")
        return (f"ensemble: {parts} (chosen from {self.candidates} candidates: the trials that ran every fold and "
                f"the probe)\n"
                f"  out-of-fold {self.metric} {self.score:.4f} on the predictions it was chosen on (optimistic); "
                f"{held}; best single: {self.best_single} {self.best_single_score:.4f}{probe}")


def _download(client, run_id: str, name: str) -> dict | None:
    from mlflow.exceptions import MlflowException
    with tempfile.TemporaryDirectory() as tmp:
        try:
            return oof.load(client.download_artifacts(run_id, name, tmp))
        except (MlflowException, OSError, ValueError):
            return None


def select_ensemble(client, parent_id: str, trials: list, metric: str) -> Ensemble | None:
    """Ensemble selection over the completed `trials` (search.report.TrialRecord) and the probe;
    logged on the parent run. None where no candidate has out-of-fold predictions."""
    arrays: dict[str, dict] = {}
    runs: dict[str, object] = {}
    probe = _download(client, parent_id, PROBE_OOF_ARTIFACT)
    if probe is not None:
        arrays[PROBE] = probe
    skipped = []
    for t in sorted((t for t in trials if t.ended == "completed"), key=lambda t: t.trial_id):
        got = _download(client, t.run_id, OOF_ARTIFACT)
        reference = next(iter(arrays.values()), got)
        if got is None or not oof.same_rows(got, reference):
            skipped.append(t.trial_id)
            continue
        arrays[t.trial_id], runs[t.trial_id] = got, t
    if not arrays:
        return None
    first = next(iter(arrays.values()))
    labels, folds = first["labels"], first["fold"]
    probs = {name: a["probs"] for name, a in arrays.items()}
    chosen = select(probs, labels, metric)
    singles = {name: score(metric, labels, p) for name, p in probs.items()}
    best_single = max(singles, key=lambda n: (singles[n], n != PROBE))
    members = [{"name": name, "weight": float(w), "run_id": getattr(runs.get(name), "run_id", None),
                "best_epoch": getattr(runs.get(name), "best_epoch", None)} for name, w in chosen.weights.items()]
    members.sort(key=lambda m: -m["weight"])
    out = Ensemble(metric, members, chosen.score,
                   selection_cv(probs, labels, folds, metric) if len(np.unique(folds)) > 1 else float("nan"),
                   best_single, singles[best_single], singles.get(PROBE), len(arrays), skipped)
    record = asdict(out)
    if out.selection_cv != out.selection_cv:  # one validation split: strict JSON has no NaN
        record["selection_cv"] = None
    client.log_dict(parent_id, record, ENSEMBLE_ARTIFACT)
    from search.tracking import log_metrics
    log_metrics(client, parent_id, {f"ensemble_{metric}": out.score, f"ensemble_selection_cv_{metric}": out.selection_cv,
                                    "ensemble_members": len(members), f"best_single_oof_{metric}": out.best_single_score},
                step=0)
    return out
