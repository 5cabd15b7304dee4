"""MLflow records of a search, written from the driver process only.

One parent run per search; one child run per trial (all resolved params, its cross-validation
metrics after every fold with step = folds done, each fold's per-epoch curve as fold<k>_<metric>
with step = epoch, and how it ended: completed / stopped early / failed / interrupted). MLflow is the
source of truth: the trial -> run map is rebuilt from it, so a resumed search continues the same
parent and never records a finished trial twice.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from ray.tune import Callback
from ray.tune.result import AUTO_RESULT_KEYS

from mmsa.app.run_tags import (EXPERIMENT_KIND_TAGS, TAG_ATTEMPT, TAG_ENDED, TAG_ERROR, TAG_KIND, TAG_NODE,
                            TAG_NOT_RESUMED, TAG_PARENT, TAG_SPACE, TAG_STATE, TAG_TRIAL, TAG_DEVICE, sqlite_file)
from mmsa.errors import UserError
from mmsa.locks import exclusive
from mmsa.app.records import context_tags, log_confusion, log_datasets
from search.trainable import CURVES_KEY, FINAL_KEY, OOF_ARTIFACT, OOF_KEY, scalar_metrics

MAX_TAG_CHARS = 5000
# How Ray says that a trial's process vanished without a word: SIGKILL from
# outside, as the kernel's out-of-memory killer sends it, or a crash in native code.
PROCESS_DIED = ("worker process has died", "Worker unexpectedly exits", "ended without a result")
KILLED = "trial process killed (signal 9, possibly out of memory) or crashed"
NOT_RESUMED = "Ray had not saved this trial when the search was killed; it was not trained again"
# What Ray adds to every reported result (and the trainable's own bookkeeping): not results.
NOT_METRICS = frozenset(AUTO_RESULT_KEYS) | {"done", "trial_id", "experiment_tag", "should_checkpoint",
                                             "node_id", "device", "fold", "epoch", "fold_end", CURVES_KEY,
                                             FINAL_KEY, OOF_KEY}


def prepare_tracking_uri(uri: str) -> str:
    """Create a local sqlite store, its folder included (MLflow does not), one process at a time.

    MLflow builds a new store's tables on first use; two searches started together on one new
    store both did, and one crashed in the schema migration. Under an exclusive lock beside the
    database, the first builds it and the other finds it ready."""
    path = sqlite_file(uri)
    if path is None:
        return uri
    path.parent.mkdir(parents=True, exist_ok=True)
    with exclusive(path.with_name(path.name + ".lock")):
        MlflowClient(uri).search_experiments(max_results=1)  # builds the tables if missing
    return uri


def get_experiment_id(client: MlflowClient, name: str, tracking_uri: str) -> str:
    """The experiment's id, created where missing; tagged as a model-development experiment either
    way (stores made before the tag get it too)."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        for key, value in EXPERIMENT_KIND_TAGS.items():
            if exp.tags.get(key) != value:
                client.set_experiment_tag(exp.experiment_id, key, value)
        return exp.experiment_id
    location = None
    if sqlite_file(tracking_uri) is not None:  # artifacts beside the db, under mlruns/
        location = (sqlite_file(tracking_uri).parent.resolve() / "artifacts").as_uri()
    try:
        return client.create_experiment(name, artifact_location=location, tags=EXPERIMENT_KIND_TAGS)
    except MlflowException:  # another search created it a moment ago
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def log_params(client: MlflowClient, run_id: str, params: dict[str, Any]) -> None:
    items = [Param(k, str(v)[:6000]) for k, v in sorted(params.items())]
    for s in range(0, len(items), 100):
        client.log_batch(run_id, params=items[s:s + 100])


def log_bytes(client: MlflowClient, run_id: str, data: bytes, name: str) -> None:
    """A file of these bytes as an artifact of the run, under `name`."""
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_bytes(data)
        client.log_artifact(run_id, str(path))


def metric_items(metrics: dict, step: int) -> list[Metric]:
    """MLflow Metrics of the finite scalar values in `metrics`, at `step`."""
    now = int(time.time() * 1000)
    return [Metric(k, float(v), now, step) for k, v in scalar_metrics(metrics).items() if math.isfinite(float(v))]


def log_metrics(client: MlflowClient, run_id: str, metrics: dict, step: int) -> None:
    items = metric_items(metrics, step)
    if items:
        client.log_batch(run_id, metrics=items)


def child_runs(client: MlflowClient, experiment_id: str, parent_run_id: str, kind: str = "trial") -> list:
    return client.search_runs([experiment_id],
                              filter_string=f"tags.`{TAG_PARENT}` = '{parent_run_id}' "
                                            f"and tags.`{TAG_KIND}` = '{kind}'",
                              max_results=5000)


def find_resumable_search(client: MlflowClient, experiment_id: str, space: str):
    """The newest search of this space file that did not finish, or None."""
    runs = client.search_runs([experiment_id],
                              filter_string=f"tags.`{TAG_KIND}` = 'search' and tags.`{TAG_SPACE}` = '{space}'",
                              order_by=["attributes.start_time DESC"], max_results=20)
    for run in runs:
        if run.data.tags.get(TAG_STATE) != "finished":
            return run
    return None


class MlflowTrialLogger(Callback):
    """Ray Tune callback (runs in the driver) that writes each trial as a child run.

    Every event becomes one write operation (picklable data: Ray saves callbacks with the
    experiment state), done in order. While the tracking server is unreachable, the operations
    wait in order and the search goes on; they are tried again every RETRY_S seconds and written
    once it is back: at the experiment's end (`on_experiment_end`) the logger records what the time
    budget has left and waits for every write (`flush`). The client and the trial map are rebuilt
    after a restore. The driver reads what it needs afterwards from MLflow, not from this object
    (on --resume, Ray calls its own restored copy).
    """

    RETRY_S = 15.0

    def __init__(self, tracking_uri: str, experiment_id: str, parent_run_id: str, base: dict,
                 datasets: dict[str, str] | None = None, budget=None):
        self.tracking_uri, self.experiment_id = tracking_uri, experiment_id
        self.parent_run_id, self.base = parent_run_id, base
        self.datasets = datasets or {}  # {context: digest} of what every trial uses (mmsa.app.records)
        self.budget = budget  # the search's TimeBudget (shared with its searcher and stopper), or None
        self._client: MlflowClient | None = None
        self._runs: dict[str, str] | None = None  # trial id -> run id of its live attempt
        self._attempts: dict[str, int] = {}
        self._started_here: set[str] = set()
        self._tagged: set[str] = set()  # trials whose run has its node and device tags
        self._pending: list[tuple] = []  # write operations not done yet, oldest first
        self._down_since: float | None = None  # when the tracking server stopped answering
        self._last_try = 0.0

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_client"], state["_runs"], state["_attempts"], state["_started_here"] = None, None, {}, set()
        state["_tagged"] = set()
        state["_down_since"], state["_last_try"] = None, 0.0
        return state

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            self._client = MlflowClient(self.tracking_uri)
        return self._client

    def _run_map(self) -> dict[str, str]:
        if self._runs is None:
            runs, attempts = {}, {}
            for run in child_runs(self.client, self.experiment_id, self.parent_run_id):
                trial_id = run.data.tags.get(TAG_TRIAL)
                attempts[trial_id] = max(attempts.get(trial_id, 0), int(run.data.tags.get(TAG_ATTEMPT, "1")))
                if run.info.status in ("RUNNING", "SCHEDULED"):
                    runs[trial_id] = run.info.run_id
            self._runs = runs
            for trial_id, n in attempts.items():
                self._attempts[trial_id] = max(self._attempts.get(trial_id, 0), n)
        return self._runs

    # ---- the queue of writes ---------------------------------------------------------------

    def _write(self, *op) -> None:
        self._pending.append(op)
        if self._down_since is None or time.monotonic() - self._last_try >= self.RETRY_S:
            self._drain()

    def _drain(self) -> bool:
        """Do the pending writes in order; False if the server stopped answering on the way."""
        while self._pending:
            self._last_try = time.monotonic()
            try:
                getattr(self, "_op_" + self._pending[0][0])(*self._pending[0][1:])
            except Exception as e:  # noqa: BLE001 - only an unreachable server is waited out
                if not unreachable(e):
                    raise
                if self._down_since is None:
                    self._down_since = time.monotonic()
                    print(f"tracking: {self.tracking_uri} is not answering; the search goes on, and its "
                          f"records wait here to be written when it is back", flush=True)
                return False
            self._pending.pop(0)
        if self._down_since is not None:
            print(f"tracking: {self.tracking_uri} answers again after "
                  f"{time.monotonic() - self._down_since:.0f} s without it; every waiting record is written",
                  flush=True)
            self._down_since = None
        return True

    def flush(self, wait_s: float = 1800.0) -> None:
        """Write what waits, waiting up to `wait_s` for the server; UserError if it stays away."""
        deadline, said = time.monotonic() + wait_s, time.monotonic()
        while not self._drain():
            if time.monotonic() > deadline:
                raise UserError(f"tracking: {self.tracking_uri} did not answer for {wait_s / 60:.0f} min: "
                                f"{len(self._pending)} records of this search are not written. Ray kept its state: "
                                f"run the same command with --resume once the server is back")
            if time.monotonic() - said >= 60:
                said = time.monotonic()
                print(f"tracking: waiting for {self.tracking_uri} to write {len(self._pending)} records "
                      f"(Ctrl-C stops; --resume writes them later)", flush=True)
            time.sleep(self.RETRY_S)

    # ---- Ray Tune events -> write operations -----------------------------------------------

    def on_experiment_end(self, trials, **info):
        """The search's end, or its interruption: what the time budget has left, recorded on the
        parent run (the driver reads it there), and every waiting write done."""
        if self.budget is not None:
            state = self.budget.state()
            self._write("parent_metrics", {"time_budget_s": state["seconds"], "time_budget_left_s": max(state["left"], 0.0)})
        self.flush()

    def on_trial_start(self, iteration, trials, trial, **info):
        self._write("start", trial.trial_id, dict(trial.config))

    def on_trial_result(self, iteration, trials, trial, result, **info):
        keep = {k: v for k, v in result.items() if k not in ("config", OOF_KEY)}
        self._write("result", trial.trial_id, keep)
        if result.get(OOF_KEY):
            self._write("oof", trial.trial_id, result[OOF_KEY])

    def on_trial_complete(self, iteration, trials, trial, **info):
        last = trial.last_result or {}
        if last.get("val_confusion"):
            self._write("confusion", trial.trial_id, last["val_confusion"],
                        f"trial {trial.trial_id}: {last.get('folds_done', '?')} fold(s) at epoch "
                        f"{last.get('best_epoch', '?')}, summed")
        self._write("end", trial.trial_id, "FINISHED", "completed" if last.get(FINAL_KEY) else "stopped early", None)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._write("end", trial.trial_id, "FAILED", "failed", trial_error_text(trial))

    def on_trial_recover(self, iteration, trials, trial, **info):
        """A failed attempt that Ray retries (max_failures): close it; the retry gets a new run."""
        self._write("end", trial.trial_id, "FAILED", "failed (retried)", trial_error_text(trial))
        self._write("forget", trial.trial_id)

    # ---- the writes --------------------------------------------------------------------------

    def _op_start(self, trial_id: str, config: dict) -> None:
        runs = self._run_map()
        if trial_id in runs:
            if trial_id in self._started_here:
                return
            # Left RUNNING by a search that was killed outright; the trial starts over now.
            self._op_end(trial_id, "KILLED", "interrupted", None)
        attempt = self._attempts.get(trial_id, 0) + 1
        name = f"trial-{trial_id}" + (f"-attempt{attempt}" if attempt > 1 else "")
        run = self.client.create_run(self.experiment_id, run_name=name, tags=context_tags({
            TAG_PARENT: self.parent_run_id, TAG_KIND: "trial", TAG_TRIAL: trial_id, TAG_ATTEMPT: str(attempt)}))
        self._attempts[trial_id] = attempt
        runs[trial_id] = run.info.run_id
        self._started_here.add(trial_id)
        self._pending[1:1] = [("params", trial_id, config)] + ([("datasets", trial_id)] if self.datasets else [])

    def _op_params(self, trial_id: str, config: dict) -> None:
        if trial_id in self._run_map():
            log_params(self.client, self._runs[trial_id], {**self.base, **config})

    def _op_datasets(self, trial_id: str) -> None:
        if trial_id in self._run_map():
            log_datasets(self.client, self._runs[trial_id], self.base.get("data_dir", "."), self.datasets)

    def _op_result(self, trial_id: str, result: dict) -> None:
        """The epochs trained since the last report on their folds' learning curves
        (fold<k>_val_acc, ... with step = epoch; after a resume, those trained before it, on the
        run of the attempt that goes on); at a fold's end, the CV metrics with step = folds done.
        One request."""
        run_id = self._run_map().get(trial_id)
        if not run_id:
            return
        if trial_id not in self._tagged:
            self._tagged.add(trial_id)
            self.client.set_tag(run_id, TAG_NODE, result.get("node_id", "?"))
            self.client.set_tag(run_id, TAG_DEVICE, str(result.get("device", "?")))
        items = []
        for fold, curve in json.loads(result.get(CURVES_KEY) or "{}").items():
            for epoch, point in curve.items():
                items += metric_items({f"fold{fold}_{k}": v for k, v in point.items()}, int(epoch))
        retried = {k: result[k] for k in ("oom_retries", "micro_batch", "resumed_after_epochs") if k in result}
        items += metric_items(retried, int(result.get("epochs_done", 0)))
        if result.get("fold_end", 1):
            scores = {k: v for k, v in result.items() if k not in NOT_METRICS and k not in retried}
            items += metric_items(scores, int(result.get("folds_done", 0)))
        if items:
            self.client.log_batch(run_id, metrics=items)

    def _op_oof(self, trial_id: str, text: str) -> None:
        run_id = self._run_map().get(trial_id)
        if run_id:
            from mmsa.training import oof
            log_bytes(self.client, run_id, oof.to_bytes(oof.from_text(text)), OOF_ARTIFACT)

    def _op_confusion(self, trial_id: str, confusion: list, caption: str) -> None:
        run_id = self._run_map().get(trial_id)
        if run_id:
            log_confusion(self.client, run_id, confusion, caption)

    def _op_end(self, trial_id: str, status: str, ended: str, error: str | None) -> None:
        run_id = self._run_map().get(trial_id)
        if run_id is None:
            return
        self.client.set_tag(run_id, TAG_ENDED, ended)
        if error:
            self.client.set_tag(run_id, TAG_ERROR, error)
        self.client.set_terminated(run_id, status=status)
        self._runs.pop(trial_id, None)

    def _op_parent_metrics(self, metrics: dict) -> None:
        log_metrics(self.client, self.parent_run_id, metrics, step=0)

    def _op_forget(self, trial_id: str) -> None:
        self._started_here.discard(trial_id)
        self._tagged.discard(trial_id)

    def mark_interrupted(self, complete: bool = False) -> list[str]:
        """Close the trial runs still open, as interrupted; returns their trial ids.

        Cut off by this interruption, they rerun on --resume. After a `complete` search, a run
        still open was left by an earlier driver killed outright before Ray saved that trial: Ray
        resumed without it and the searcher proposed another config. Those are tagged so."""
        runs = self._run_map()
        closed = sorted(runs)
        for trial_id in closed:
            run_id = runs.pop(trial_id)
            self.client.set_tag(run_id, TAG_ENDED, "interrupted")
            if complete:
                self.client.set_tag(run_id, TAG_NOT_RESUMED, NOT_RESUMED)
            self.client.set_terminated(run_id, status="KILLED")
        return closed


def unreachable(error: BaseException) -> bool:
    """Whether `error` says the tracking server did not answer (refused, timed out, 5xx after
    MLflow's own retries), as opposed to refusing what was sent."""
    import requests
    if isinstance(error, (requests.exceptions.ConnectionError, requests.exceptions.Timeout)):
        return True
    text = str(error)
    return isinstance(error, MlflowException) and text.startswith("API request to") and "failed with exception" in text


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
