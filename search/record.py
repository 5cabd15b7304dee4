"""A search's record in MLflow: the one place in search/ that reads or writes it.

One parent run per search; one child run per trial attempt (all resolved params, its
cross-validation metrics after every fold with step = folds done, each fold's per-epoch curve as
fold<k>_<metric> with step = epoch, and how it ended: completed / stopped early / failed /
interrupted); on the parent, the probe, the warm start, the summary, the best config and the plan
(mmsa.training.plan, which mmsa.final reads). MLflow is the source of truth across processes: the
trial -> run map is rebuilt from it, so a resumed search continues the same parent and never
records a finished trial twice. Within one process, one `SearchRecord` per search
(`SearchRecord.of`): the driver and Ray's callbacks (search.recorder) share it.
"""

from __future__ import annotations

import math
import tempfile
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, ClassVar

from mlflow.entities import Metric, Param
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from mmsa.app.records import context_tags, log_confusion, log_datasets
from mmsa.app.run_tags import (EXPERIMENT_KIND_TAGS, PLAN_ARTIFACT, TAG_ATTEMPT, TAG_BEST_RUN, TAG_DEVICE, TAG_ENDED,
                               TAG_ERROR, TAG_FOLDS, TAG_KIND, TAG_NODE, TAG_NOT_RESUMED, TAG_PARENT, TAG_RAY_PATH,
                               TAG_SPACE, TAG_STATE, TAG_TRIAL, sqlite_file)
from mmsa.errors import UserError
from mmsa.locks import exclusive
from mmsa.training import oof
from search.trial_report import FOLDS_DONE, N_PARAMS, TrialReport

OOF_ARTIFACT = "oof.npz"  # a trial's out-of-fold predictions at its best epoch (mmsa.training.oof)
PROBE_OOF_ARTIFACT = "probe_oof.npz"  # the probe's, on the parent run
WARM_START_ARTIFACT = "warm_start.json"
NOT_RESUMED = "Ray had not saved this trial when the search was killed; it was not trained again"
PAGE = 1000  # runs per search request: a search's trials are read page by page, at any number


@dataclass
class TrialRecord:
    """A trial as its run recorded it."""

    run_id: str
    trial_id: str
    ended: str
    folds: int  # folds trained (of the space's cv_folds)
    epochs: int  # epochs trained, all folds together
    best_epoch: int  # the epoch whose mean over folds is best: what mmsa.final retrains
    score: float
    metrics: dict
    params: dict
    seconds: float = 0.0  # its MLflow run's start to end: the compute it took

    @property
    def n_params(self) -> int:
        """Its model's parameters, as its reports said."""
        return int(self.metrics.get(N_PARAMS, 0))


@dataclass(frozen=True)
class EarlierSearch:
    """A finished search a new one warm-starts from (search.warm_start)."""

    run_id: str
    metric: str
    fingerprint: str | None  # of its labeled pairs and folds (TAG_FOLDS); None: recorded before it kept one
    trials: list[TrialRecord]


def unreachable(error: BaseException) -> bool:
    """Whether `error` says the tracking server did not answer (refused, timed out, 5xx after
    MLflow's own retries), as opposed to refusing what was sent."""
    import requests
    if isinstance(error, (requests.exceptions.ConnectionError, requests.exceptions.Timeout)):
        return True
    text = str(error)
    return isinstance(error, MlflowException) and text.startswith("API request to") and "failed with exception" in text


def metric_items(metrics: dict[str, float], step: int) -> list[Metric]:
    """MLflow Metrics of the finite values in `metrics`, at `step`."""
    now = int(time.time() * 1000)
    return [Metric(k, float(v), now, step) for k, v in metrics.items() if math.isfinite(float(v))]


class TrackingStore:
    """The MLflow store and experiment a search records in. Made ready on first use: a local
    sqlite store is created with its folder, one process at a time (two searches started together
    on one new store both built its tables, and one crashed in the schema migration); the
    experiment is created where missing and tagged as a model-development experiment. A server
    that does not answer is one line."""

    def __init__(self, uri: str, experiment: str):
        import os
        # A tracking server that stops answering mid-search is waited out (search.recorder): each
        # attempt gives up after seconds, not MLflow's default minutes, so the search does not stall.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
        self.uri, self.experiment = uri, experiment
        path = sqlite_file(uri)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            with exclusive(path.with_name(path.name + ".lock")):
                MlflowClient(uri).search_experiments(max_results=1)  # builds the tables if missing
        self.client = MlflowClient(uri)

    @classmethod
    def open(cls, uri: str, experiment: str) -> TrackingStore:
        """The store, its experiment found or created now: a server that does not answer is one line."""
        store = cls(uri, experiment)
        try:
            store.experiment_id  # noqa: B018 - asks the server
        except Exception as e:
            if not unreachable(e):
                raise
            raise UserError(f"--tracking-uri {uri}: the tracking server does not answer") from None
        return store

    @cached_property
    def experiment_id(self) -> str:
        return self._experiment_id()

    def _experiment_id(self) -> str:
        exp = self.client.get_experiment_by_name(self.experiment)
        if exp is not None:
            for key, value in EXPERIMENT_KIND_TAGS.items():
                if exp.tags.get(key) != value:
                    self.client.set_experiment_tag(exp.experiment_id, key, value)
            return exp.experiment_id
        location = None
        if sqlite_file(self.uri) is not None:  # artifacts beside the db, under mlruns/
            location = (sqlite_file(self.uri).parent.resolve() / "artifacts").as_uri()
        try:
            return self.client.create_experiment(self.experiment, artifact_location=location, tags=EXPERIMENT_KIND_TAGS)
        except MlflowException:  # another search created it a moment ago
            exp = self.client.get_experiment_by_name(self.experiment)
            if exp is None:
                raise
            return exp.experiment_id

    def runs(self, filter_string: str, experiment_id: str | None = None) -> list:
        """Every run matching, page by page."""
        out, token = [], None
        while True:
            page = self.client.search_runs([experiment_id or self.experiment_id], filter_string=filter_string,
                                           max_results=PAGE, page_token=token)
            out += list(page)
            token = page.token
            if not token:
                return out

    def child_runs(self, parent_id: str, experiment_id: str | None = None) -> list:
        return self.runs(f"tags.`{TAG_PARENT}` = '{parent_id}' and tags.`{TAG_KIND}` = 'trial'", experiment_id)

    def trials(self, parent_id: str, metric: str, experiment_id: str | None = None) -> list[TrialRecord]:
        """The trials of the search `parent_id`, scored by `metric`."""
        out = []
        for run in self.child_runs(parent_id, experiment_id):
            m = run.data.metrics
            out.append(TrialRecord(run_id=run.info.run_id, trial_id=run.data.tags.get(TAG_TRIAL, "?"),
                                   ended=run.data.tags.get(TAG_ENDED, "running"),
                                   folds=int(m.get(FOLDS_DONE, 0)), epochs=int(m.get("epochs_trained", 0)),
                                   best_epoch=int(m.get("best_epoch", 0)), score=m.get(f"best_{metric}", float("nan")),
                                   metrics=dict(m), params=dict(run.data.params),
                                   seconds=(run.info.end_time - run.info.start_time) / 1000 if run.info.end_time else 0.0))
        return out

    def predictions(self, run_id: str, name: str = OOF_ARTIFACT) -> dict | None:
        """A run's out-of-fold predictions (mmsa.training.oof), or None where it has none."""
        with tempfile.TemporaryDirectory() as tmp:
            try:
                return oof.load(self.client.download_artifacts(run_id, name, tmp))
            except (MlflowException, OSError, ValueError):
                return None

    def resumable(self, space_key: str):
        """The newest search of this space file that did not finish, or None."""
        runs = self.client.search_runs([self.experiment_id],
                                       filter_string=f"tags.`{TAG_KIND}` = 'search' and tags.`{TAG_SPACE}` = '{space_key}'",
                                       order_by=["attributes.start_time DESC"], max_results=20)
        return next((run for run in runs if run.data.tags.get(TAG_STATE) != "finished"), None)

    def search_run(self, run_id: str, flag: str = "--warm-start"):
        """An earlier search's parent run, or a one-line UserError."""
        try:
            run = self.client.get_run(run_id)
        except MlflowException:
            raise UserError(f"{flag} {run_id}: no such run in the tracking store") from None
        kind = run.data.tags.get(TAG_KIND)
        if run.info.lifecycle_stage == "deleted":
            raise UserError(f"{flag} {run_id}: the run is deleted")
        if kind != "search":
            raise UserError(f"{flag} {run_id}: not a search's parent run (it is "
                            f"{'a ' + kind + ' run' if kind else 'no run of mmsa-search'}): give the search's run id")
        return run

    def earlier_search(self, run) -> EarlierSearch:
        """What a warm start reads of an earlier search's parent run (search_run)."""
        metric = run.data.params.get("metric", "val_acc")
        return EarlierSearch(run.info.run_id, metric, run.data.tags.get(TAG_FOLDS),
                             self.trials(run.info.run_id, metric, run.info.experiment_id))


class SearchRecord:
    """One search's parent run and its trials' runs, in this process (`of`)."""

    _open: ClassVar[dict[tuple[str, str], SearchRecord]] = {}

    def __init__(self, store: TrackingStore, parent_id: str):
        self.store, self.client, self.parent_id = store, store.client, parent_id
        self.ray_path = ""  # where Ray keeps the search's state (TAG_RAY_PATH)
        self.budget: dict | None = None  # the time budget's {seconds, left} at the search's end
        self._runs: dict[str, str] | None = None  # trial id -> run id of its live attempt
        self._attempts: dict[str, int] = {}
        self._started_here: set[str] = set()
        self._tagged: set[str] = set()  # trials whose run has its node and device tags

    @classmethod
    def of(cls, uri: str, experiment: str, parent_id: str) -> SearchRecord:
        """This process's record of the search `parent_id`, opened once."""
        return cls._open.get((uri, parent_id)) or cls._registered(TrackingStore(uri, experiment), parent_id)

    @classmethod
    def _registered(cls, store: TrackingStore, parent_id: str) -> SearchRecord:
        return cls._open.setdefault((store.uri, parent_id), cls(store, parent_id))

    @classmethod
    def create(cls, store: TrackingStore, name: str, space_key: str, fingerprint: str, storage: str) -> SearchRecord:
        """A new search's parent run, running; Ray's state for it under `storage` (TAG_RAY_PATH)."""
        import os
        run = store.client.create_run(store.experiment_id, run_name=name, tags=context_tags({
            TAG_KIND: "search", TAG_SPACE: space_key, TAG_STATE: "running", TAG_FOLDS: fingerprint}))
        record = cls._registered(store, run.info.run_id)
        root = os.path.abspath(storage) if "://" not in storage else storage
        record.ray_path = os.path.join(root, f"search-{record.parent_id[:12]}")
        record.client.set_tag(record.parent_id, TAG_RAY_PATH, record.ray_path)
        return record

    @classmethod
    def resume(cls, store: TrackingStore, run) -> SearchRecord:
        record = cls._registered(store, run.info.run_id)
        record.ray_path = run.data.tags[TAG_RAY_PATH]
        record.client.set_tag(record.parent_id, TAG_STATE, "running")
        record.client.update_run(record.parent_id, status="RUNNING")
        return record

    # ---- the parent run ----------------------------------------------------------------------

    def log_params(self, params: dict[str, Any], run_id: str | None = None) -> None:
        items = [Param(k, str(v)[:6000]) for k, v in sorted(params.items())]
        for s in range(0, len(items), 100):
            self.client.log_batch(run_id or self.parent_id, params=items[s:s + 100])

    def log_metrics(self, metrics: dict[str, float], step: int = 0, run_id: str | None = None) -> None:
        items = metric_items(metrics, step)
        if items:
            self.client.log_batch(run_id or self.parent_id, metrics=items)

    def log_start(self, params: dict, data_dir: str, datasets: dict[str, str], space_file: Path,
                  data_report: dict) -> None:
        """What the search starts from: its params, the datasets, the space file, the data report."""
        self.log_params(params)
        log_datasets(self.client, self.parent_id, data_dir, datasets)
        self.client.log_artifact(self.parent_id, str(space_file), artifact_path="space")
        self.client.log_dict(self.parent_id, data_report, "data_report.json")

    def log_probe(self, metrics: dict[str, float], predictions: dict) -> None:
        self._log_bytes(self.parent_id, oof.to_bytes(predictions), PROBE_OOF_ARTIFACT)
        self.log_metrics(metrics)

    def parent_metrics(self) -> dict[str, float]:
        """The parent run's metrics as the store holds them (what earlier processes recorded)."""
        return dict(self.client.get_run(self.parent_id).data.metrics)

    def probe_scores(self) -> dict[str, float]:
        """The probe's metrics as recorded when the search began (a resumed search: another process)."""
        return {k: v for k, v in self.parent_metrics().items() if k.startswith("probe_")}

    def probe_predictions(self) -> dict | None:
        return self.store.predictions(self.parent_id, PROBE_OOF_ARTIFACT)

    def log_warm_start(self, searches: dict, told: int, candidates: int) -> None:
        self.client.log_dict(self.parent_id, {"searches": searches}, WARM_START_ARTIFACT)
        self.log_metrics({"warm_trials_told": told, "warm_trials_candidates": candidates})

    def log_best(self, best: TrialRecord, config: dict, metrics: dict[str, float]) -> None:
        import yaml
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "best_config.yaml"
            path.write_text(yaml.safe_dump(config, sort_keys=True))
            self.client.log_artifact(self.parent_id, str(path))
        self.client.set_tag(self.parent_id, TAG_BEST_RUN, best.run_id)
        self.log_metrics(metrics)

    def log_plots(self, paths: list[Path]) -> None:
        for path in paths:
            self.client.log_artifact(self.parent_id, str(path), artifact_path="plots")

    def log_plan(self, plan) -> None:
        self.client.log_dict(self.parent_id, plan.to_dict(), PLAN_ARTIFACT)

    def log_budget(self, seconds: float, left: float) -> None:
        """What the time budget had left when the search ended or was interrupted."""
        self.budget = {"seconds": seconds, "left": left}
        self.log_metrics({"time_budget_s": seconds, "time_budget_left_s": max(left, 0.0)})

    def end(self, state: str) -> None:
        """finished or interrupted."""
        self.client.set_tag(self.parent_id, TAG_STATE, state)
        self.client.set_terminated(self.parent_id, status="FINISHED" if state == "finished" else "KILLED")

    def trials(self, metric: str) -> list[TrialRecord]:
        return self.store.trials(self.parent_id, metric)

    # ---- the trials' runs --------------------------------------------------------------------

    def _run_map(self) -> dict[str, str]:
        if self._runs is None:
            runs, attempts = {}, {}
            for run in self.store.child_runs(self.parent_id):
                trial_id = run.data.tags.get(TAG_TRIAL)
                attempts[trial_id] = max(attempts.get(trial_id, 0), int(run.data.tags.get(TAG_ATTEMPT, "1")))
                if run.info.status in ("RUNNING", "SCHEDULED"):
                    runs[trial_id] = run.info.run_id
            self._runs = runs
            for trial_id, n in attempts.items():
                self._attempts[trial_id] = max(self._attempts.get(trial_id, 0), n)
        return self._runs

    def start_trial(self, trial_id: str) -> bool:
        """A run for the trial's attempt; False where this process started it already."""
        runs = self._run_map()
        if trial_id in runs:
            if trial_id in self._started_here:
                return False
            # Left RUNNING by a search that was killed outright; the trial starts over now.
            self.end_trial(trial_id, "KILLED", "interrupted", None)
        attempt = self._attempts.get(trial_id, 0) + 1
        name = f"trial-{trial_id}" + (f"-attempt{attempt}" if attempt > 1 else "")
        run = self.client.create_run(self.store.experiment_id, run_name=name, tags=context_tags({
            TAG_PARENT: self.parent_id, TAG_KIND: "trial", TAG_TRIAL: trial_id, TAG_ATTEMPT: str(attempt)}))
        self._attempts[trial_id] = attempt
        runs[trial_id] = run.info.run_id
        self._started_here.add(trial_id)
        return True

    def trial_params(self, trial_id: str, params: dict) -> None:
        if trial_id in self._run_map():
            self.log_params(params, self._runs[trial_id])

    def trial_datasets(self, trial_id: str, data_dir: str, datasets: dict[str, str]) -> None:
        if trial_id in self._run_map():
            log_datasets(self.client, self._runs[trial_id], data_dir, datasets)

    def trial_result(self, trial_id: str, report: TrialReport) -> None:
        """The epochs trained since the last report on their folds' learning curves
        (fold<k>_val_acc, ... with step = epoch; after a resume, those trained before it, on the
        run of the attempt that goes on); at a fold's end, the CV metrics with step = folds done.
        One request."""
        run_id = self._run_map().get(trial_id)
        if not run_id:
            return
        if trial_id not in self._tagged:
            self._tagged.add(trial_id)
            self.client.set_tag(run_id, TAG_NODE, report.node_id or "?")
            self.client.set_tag(run_id, TAG_DEVICE, report.device or "?")
        items = []
        for fold, curve in report.curves.items():
            for epoch, point in curve.items():
                items += metric_items({f"fold{fold}_{k}": v for k, v in point.items()}, epoch)
        items += metric_items(report.retry.metrics(), report.epochs_done)
        if report.fold_end:
            items += metric_items(report.metrics(), report.folds_done)
        if items:
            self.client.log_batch(run_id, metrics=items)

    def trial_predictions(self, trial_id: str, text: str) -> None:
        """The out-of-fold predictions of a trial that ran every fold (mmsa.training.oof as text)."""
        run_id = self._run_map().get(trial_id)
        if run_id:
            self._log_bytes(run_id, oof.to_bytes(oof.from_text(text)), OOF_ARTIFACT)

    def trial_confusion(self, trial_id: str, confusion: list, caption: str) -> None:
        run_id = self._run_map().get(trial_id)
        if run_id:
            log_confusion(self.client, run_id, confusion, caption)

    def end_trial(self, trial_id: str, status: str, ended: str, error: str | None) -> None:
        run_id = self._run_map().get(trial_id)
        if run_id is None:
            return
        self.client.set_tag(run_id, TAG_ENDED, ended)
        if error:
            self.client.set_tag(run_id, TAG_ERROR, error)
        self.client.set_terminated(run_id, status=status)
        self._runs.pop(trial_id, None)

    def forget_trial(self, trial_id: str) -> None:
        """A failed attempt that Ray retries: the retry gets a run of its own."""
        self._started_here.discard(trial_id)
        self._tagged.discard(trial_id)

    def ended_trials(self) -> set[str]:
        """The trials of this search whose runs ended (completed, stopped early or failed), in this
        driver or an earlier one of it (a resumed search): the store is the record across them."""
        return {r.data.tags.get(TAG_TRIAL) for r in self.store.child_runs(self.parent_id)
                if r.info.status in ("FINISHED", "FAILED")}

    def close_open_trials(self, complete: bool = False) -> list[str]:
        """Close the trial runs still open, as interrupted; returns their trial ids.

        Cut off by this interruption, they rerun on --resume. After a `complete` search, a run
        still open was left by an earlier driver killed outright before Ray saved that trial: Ray
        resumed without it and the searcher proposed another config. Those are tagged so."""
        self._runs = None  # from the store: what every process wrote
        runs = self._run_map()
        closed = sorted(runs)
        for trial_id in closed:
            run_id = runs.pop(trial_id)
            self.client.set_tag(run_id, TAG_ENDED, "interrupted")
            if complete:
                self.client.set_tag(run_id, TAG_NOT_RESUMED, NOT_RESUMED)
            self.client.set_terminated(run_id, status="KILLED")
        return closed

    def _log_bytes(self, run_id: str, data: bytes, name: str) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / name
            path.write_bytes(data)
            self.client.log_artifact(run_id, str(path))
