"""Ray Tune's trial events into the search's record (search.record): a callback in the driver.

Every event becomes one typed write (picklable: Ray saves callbacks with the experiment state),
done in order. While the tracking server is unreachable, the writes wait in order and the search
goes on; they are tried again every RETRY_S seconds and done once it is back. At the experiment's
end (or its interruption) the recorder records what the time budget has left and waits for every
write (`flush`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from ray.tune import Callback

from mmsa.errors import UserError
from search.record import SearchRecord, unreachable
from search.trial_report import TrialReport, last_report

MAX_TAG_CHARS = 5000
# How Ray says that a trial's process vanished without a word: SIGKILL from
# outside, as the kernel's out-of-memory killer sends it, or a crash in native code.
PROCESS_DIED = ("worker process has died", "Worker unexpectedly exits", "ended without a result")
KILLED = "trial process killed (signal 9, possibly out of memory) or crashed"


@dataclass(frozen=True)
class StartTrial:
    trial_id: str
    params: dict  # the base config with the trial's sampled values
    data_dir: str
    datasets: dict  # {context: digest} of what every trial uses (mmsa.app.records)

    def write(self, record: SearchRecord) -> list:
        if not record.start_trial(self.trial_id):
            return []
        # next, before anything queued after the start: a retry after an outage redoes only these
        return [TrialParams(self.trial_id, self.params)] + (
            [TrialDatasets(self.trial_id, self.data_dir, self.datasets)] if self.datasets else [])


@dataclass(frozen=True)
class TrialParams:
    trial_id: str
    params: dict

    def write(self, record: SearchRecord) -> list:
        record.trial_params(self.trial_id, self.params)
        return []


@dataclass(frozen=True)
class TrialDatasets:
    trial_id: str
    data_dir: str
    datasets: dict

    def write(self, record: SearchRecord) -> list:
        record.trial_datasets(self.trial_id, self.data_dir, self.datasets)
        return []


@dataclass(frozen=True)
class TrialResult:
    trial_id: str
    report: TrialReport

    def write(self, record: SearchRecord) -> list:
        record.trial_result(self.trial_id, self.report)
        return [TrialPredictions(self.trial_id, self.report.oof)] if self.report.oof is not None else []


@dataclass(frozen=True)
class TrialPredictions:
    trial_id: str
    text: str

    def write(self, record: SearchRecord) -> list:
        record.trial_predictions(self.trial_id, self.text)
        return []


@dataclass(frozen=True)
class TrialConfusion:
    trial_id: str
    confusion: list
    caption: str

    def write(self, record: SearchRecord) -> list:
        record.trial_confusion(self.trial_id, self.confusion, self.caption)
        return []


@dataclass(frozen=True)
class EndTrial:
    trial_id: str
    status: str  # MLflow's run status
    ended: str  # completed | stopped early | failed | failed (retried)
    error: str | None = None
    retried: bool = False  # Ray tries it again: the retry gets a run of its own

    def write(self, record: SearchRecord) -> list:
        record.end_trial(self.trial_id, self.status, self.ended, self.error)
        if self.retried:
            record.forget_trial(self.trial_id)
        return []


@dataclass(frozen=True)
class BudgetLeft:
    seconds: float
    left: float

    def write(self, record: SearchRecord) -> list:
        record.log_budget(self.seconds, self.left)
        return []


class TrialRecorder(Callback):
    """Writes each trial as a child run of the search's parent run, through its SearchRecord."""

    RETRY_S = 15.0

    def __init__(self, uri: str, experiment: str, parent_id: str, base: dict,
                 datasets: dict[str, str] | None = None, budget=None):
        self.uri, self.experiment, self.parent_id, self.base = uri, experiment, parent_id, base
        self.datasets = datasets or {}
        self.budget = budget  # the search's TimeBudget (shared with its searcher and stopper), or None
        self._pending: list = []  # writes not done yet, oldest first
        self._down_since: float | None = None  # when the tracking server stopped answering
        self._last_try = 0.0

    def __getstate__(self):
        return {**self.__dict__, "_down_since": None, "_last_try": 0.0}

    @property
    def record(self) -> SearchRecord:
        return SearchRecord.of(self.uri, self.experiment, self.parent_id)

    # ---- the queue of writes ---------------------------------------------------------------

    def _write(self, op) -> None:
        self._pending.append(op)
        if self._down_since is None or time.monotonic() - self._last_try >= self.RETRY_S:
            self._drain()

    def _drain(self) -> bool:
        """Do the pending writes in order; False if the server stopped answering on the way."""
        while self._pending:
            self._last_try = time.monotonic()
            try:
                follow = self._pending[0].write(self.record)
            except Exception as e:  # noqa: BLE001 - only an unreachable server is waited out
                if not unreachable(e):
                    raise
                if self._down_since is None:
                    self._down_since = time.monotonic()
                    print(f"tracking: {self.uri} is not answering; the search goes on, and its "
                          f"records wait here to be written when it is back", flush=True)
                return False
            self._pending[0:1] = follow
        if self._down_since is not None:
            print(f"tracking: {self.uri} answers again after "
                  f"{time.monotonic() - self._down_since:.0f} s without it; every waiting record is written",
                  flush=True)
            self._down_since = None
        return True

    def flush(self, wait_s: float = 1800.0) -> None:
        """Write what waits, waiting up to `wait_s` for the server; UserError if it stays away."""
        deadline, said = time.monotonic() + wait_s, time.monotonic()
        while not self._drain():
            if time.monotonic() > deadline:
                raise UserError(f"tracking: {self.uri} did not answer for {wait_s / 60:.0f} min: "
                                f"{len(self._pending)} records of this search are not written. Ray kept its state: "
                                f"run the same command with --resume once the server is back")
            if time.monotonic() - said >= 60:
                said = time.monotonic()
                print(f"tracking: waiting for {self.uri} to write {len(self._pending)} records "
                      f"(Ctrl-C stops; --resume writes them later)", flush=True)
            time.sleep(self.RETRY_S)

    # ---- Ray Tune events -----------------------------------------------------------------------

    def on_experiment_end(self, trials, **info):
        if self.budget is not None:
            state = self.budget.state()
            self._write(BudgetLeft(state["seconds"], state["left"]))
        self.flush()

    def on_trial_start(self, iteration, trials, trial, **info):
        self._write(StartTrial(trial.trial_id, {**self.base, **trial.config}, self.base.get("data_dir", "."),
                               self.datasets))

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self._write(TrialResult(trial.trial_id, TrialReport.from_result(result)))

    def on_trial_complete(self, iteration, trials, trial, **info):
        last = last_report(trial)
        if last is not None and last.confusion:
            self._write(TrialConfusion(trial.trial_id, last.confusion,
                                       f"trial {trial.trial_id}: {last.folds_done} fold(s) at epoch "
                                       f"{int(last.scores.get('best_epoch', 0)) or '?'}, summed"))
        self._write(EndTrial(trial.trial_id, "FINISHED",
                             "completed" if last is not None and last.all_folds else "stopped early"))

    def on_trial_error(self, iteration, trials, trial, **info):
        self._write(EndTrial(trial.trial_id, "FAILED", "failed", trial_error_text(trial)))

    def on_trial_recover(self, iteration, trials, trial, **info):
        """A failed attempt that Ray retries (max_failures): close it; the retry gets a new run."""
        self._write(EndTrial(trial.trial_id, "FAILED", "failed (retried)", trial_error_text(trial), retried=True))


def trial_error_text(trial) -> str:
    path = getattr(trial, "error_file", None) or getattr(getattr(trial, "run_metadata", None), "error_filename", None)
    text = ""
    if path:
        try:
            text = Path(path).read_text(errors="replace")
        except OSError:
            text = ""
    if not text:
        text = str(getattr(trial, "error_msg", "") or "unknown error")
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    if not lines:
        return text[:MAX_TAG_CHARS]
    if any(hint in text for hint in PROCESS_DIED):
        lines.append(KILLED)  # Ray's own words stay below it
    # The exception line ends the traceback; keep it first so the UI shows it, then as much of the
    # traceback's end (the innermost frames) as the tag holds.
    head = lines[-1][:MAX_TAG_CHARS // 2]
    return head + "\n" + "\n".join(lines[:-1])[-(MAX_TAG_CHARS - len(head) - 1):]
