"""Progress lines a person can follow while trials run (a Ray Tune callback in the driver)."""

from __future__ import annotations

import sys
import time

from ray.tune import Callback

from search.recorder import trial_error_text
from search.trial_report import last_report


def _short(config: dict, limit: int = 6) -> str:
    parts = []
    for k, v in list(config.items())[:limit]:
        parts.append(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}")
    return " ".join(parts)


class ProgressPrinter(Callback):
    def __init__(self, metric: str, num_samples: int, folds: int = 1):
        self.metric, self.num_samples, self.folds = metric, num_samples, folds
        self.start = time.time()

    def __setstate__(self, state):  # a resumed search counts its time from the resume
        self.__dict__.update(state)
        self.start = time.time()

    def _line(self, text: str) -> None:
        elapsed = int(time.time() - self.start)
        print(f"[{elapsed // 60:02d}:{elapsed % 60:02d}] {text}", file=sys.stdout, flush=True)

    def _summary(self, trials) -> str:
        done = sum(t.status == "TERMINATED" for t in trials)
        failed = sum(t.status == "ERROR" for t in trials)
        running = sum(t.status == "RUNNING" for t in trials)
        # Only trials scored on every fold: a mean over fewer folds is a noisier number.
        reports = [(last_report(t), t.trial_id) for t in trials]
        scored = [(r.score(self.metric), trial_id) for r, trial_id in reports
                  if r is not None and r.all_folds and r.score(self.metric) is not None]
        best = ""
        if scored:
            value, trial_id = max(scored)
            best = f" | best of those run on every fold: {value:.4f} ({trial_id})"
        return f"{done} ended, {failed} failed, {running} running of {self.num_samples}{best}"

    def on_trial_start(self, iteration, trials, trial, **info):
        self._line(f"start {trial.trial_id}: {_short(trial.config)}")

    def on_trial_complete(self, iteration, trials, trial, **info):
        last = last_report(trial)
        if last is None:
            self._line(f"stopped early {trial.trial_id} before its first report | {self._summary(trials)}")
            return
        how = "completed" if last.all_folds else "stopped early"
        score, epoch = last.score(self.metric), last.score("best_epoch")
        self._line(f"{how} {trial.trial_id} after {last.folds_done} of {self.folds} folds: "
                   f"{self.metric} {score if score is not None else float('nan'):.4f} at epoch "
                   f"{int(epoch) if epoch else '?'} | {self._summary(trials)}")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._line(f"FAILED {trial.trial_id}: {trial_error_text(trial).splitlines()[0]} | {self._summary(trials)}")

    def on_trial_recover(self, iteration, trials, trial, **info):
        self._line(f"failed {trial.trial_id}, trying again: {trial_error_text(trial).splitlines()[0]}")
