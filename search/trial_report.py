"""What a trial tells the driver after an epoch or a fold: one typed `TrialReport`, read by the
scheduler, the stopper, the searcher, the progress lines and the search's record by attribute.

Ray Tune carries a report as a flat dict (its scheduler and searcher look up one metric and one
time key in it): `to_result` writes one, `from_result` reads one back. Its keys are namespaced:
`score/...` the trial's cross-validated scores (what the search records as metrics), `trial/...`
where it stands and what it carries; whatever Ray adds on its own is neither. No Ray import here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

SCORE = "score/"
TRIAL = "trial/"
# also the names of the metrics the search records them as (TrialReport.metrics)
FOLDS_DONE, N_PARAMS = "folds_done", "n_params"


def score_key(name: str) -> str:
    """The key of the score `name` (e.g. best_val_acc) in Ray's result dict: Tune's metric."""
    return SCORE + name


def position_key(rungs: str) -> str:
    """The key ASHA's rungs count in Ray's result dict: folds finished, or epochs trained."""
    return TRIAL + (FOLDS_DONE if rungs == "folds" else "epochs_done")


def scalar_metrics(metrics: dict) -> dict[str, float]:
    """The numbers of a summary (cross-validation's, the probe's) as scores: lists and flags aside."""
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


Curves = dict[int, dict[int, dict[str, float]]]  # {fold: {epoch: that epoch's metrics}}


@dataclass(frozen=True)
class Retry:
    """How a trial went on after an interruption: the micro-batch of an out-of-memory retry, the
    epochs trained before a resume. Recorded as metrics at the epochs done."""

    oom_retries: int = 0
    micro_batch: int = 0
    resumed_after_epochs: int = 0

    def metrics(self) -> dict[str, float]:
        return {k: float(v) for k, v in vars(self).items() if v}


@dataclass(frozen=True)
class TrialReport:
    fold: int  # the fold it is in (1-based)
    epoch: int  # the epoch of that fold just trained
    fold_end: bool  # that epoch ended the fold
    folds_done: int
    epochs_done: int  # all folds together
    scores: dict[str, float]  # the mean over the folds done (in fold 1, its best epoch so far)
    all_folds: bool = False  # the trial's last report: it ran every fold
    curves: Curves = field(default_factory=dict)  # the epochs trained since the last report
    confusion: list | None = None  # at a fold's end: summed over the folds done, at the best epoch
    oof: str | None = None  # with all_folds: out-of-fold predictions (mmsa.training.oof as text)
    device: str = ""
    n_params: int = 0
    node_id: str = ""
    retry: Retry = Retry()

    def score(self, name: str) -> float | None:
        return self.scores.get(name)

    def metrics(self) -> dict[str, float]:
        """What the search records of it as the trial's metrics, at step folds_done."""
        return {**self.scores, FOLDS_DONE: float(self.folds_done), "epochs_done": float(self.epochs_done),
                N_PARAMS: float(self.n_params)}

    def with_node(self, node_id: str) -> TrialReport:
        from dataclasses import replace
        return replace(self, node_id=node_id)

    def to_result(self) -> dict:
        out = {SCORE + k: float(v) for k, v in self.scores.items()}
        out.update({TRIAL + k: v for k, v in (
            ("fold", self.fold), ("epoch", self.epoch), ("fold_end", int(self.fold_end)),
            (FOLDS_DONE, self.folds_done), ("epochs_done", self.epochs_done), ("all_folds", int(self.all_folds)),
            ("device", self.device), (N_PARAMS, self.n_params), ("node_id", self.node_id),
            ("curves", json.dumps(self.curves)), ("retry", json.dumps(vars(self.retry))))})
        if self.confusion is not None:
            out[TRIAL + "confusion"] = json.dumps(self.confusion)
        if self.oof is not None:
            out[TRIAL + "oof"] = self.oof
        return out

    @classmethod
    def from_result(cls, result: dict) -> TrialReport:
        t = {k[len(TRIAL):]: v for k, v in result.items() if k.startswith(TRIAL)}
        curves = {int(f): {int(e): m for e, m in c.items()} for f, c in json.loads(t.get("curves") or "{}").items()}
        return cls(fold=int(t["fold"]), epoch=int(t["epoch"]), fold_end=bool(t["fold_end"]),
                   folds_done=int(t[FOLDS_DONE]), epochs_done=int(t["epochs_done"]),
                   scores={k[len(SCORE):]: float(v) for k, v in result.items() if k.startswith(SCORE)},
                   all_folds=bool(t.get("all_folds")), curves=curves,
                   confusion=json.loads(t["confusion"]) if t.get("confusion") else None, oof=t.get("oof"),
                   device=str(t.get("device", "")), n_params=int(t.get(N_PARAMS, 0)), node_id=str(t.get("node_id", "")),
                   retry=Retry(**json.loads(t.get("retry") or "{}")))


def last_report(trial) -> TrialReport | None:
    """A Ray trial's last report, or None before its first."""
    result = getattr(trial, "last_result", None) or {}
    return TrialReport.from_result(result) if TRIAL + "fold" in result else None
