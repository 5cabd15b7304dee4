"""Ray Tune wiring: Tuner with Optuna (TPE) + ASHA over `train_trial`; start, resume, interrupt."""

from __future__ import annotations

import logging
import os
import signal

import ray
from mlflow.tracking import MlflowClient
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search import ConcurrencyLimiter
from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

from mmsa.errors import UserError
from mmsa.features.rawsource import RawSource
from mmsa.app.run_tags import TAG_NOT_RESUMED, TAG_TRIAL
from search import cache_transfer
from search.progress import ProgressPrinter
from search.searcher import make_searcher
from search.time_budget import FoldBoundaryStopper, TimeBudget, parse_duration
from search.tracking import MlflowTrialLogger, child_runs
from search.trainable import TrialData, train_trial


def make_scheduler(spec):
    if spec.scheduler == "fifo":
        return FIFOScheduler()
    # A trial reports once per fold: ASHA's rungs are folds done, its score the mean over them.
    return ASHAScheduler(time_attr="training_iteration", max_t=spec.cv_folds,
                         grace_period=spec.grace_period, reduction_factor=spec.reduction_factor)


def make_trainable(spec, base, data, folds, offer_cache: bool = False, text_dirs: dict | None = None):
    """`offer_cache` (on a cluster): the cache's files go into Ray's object store once, for the
    nodes that do not share the driver's disk. `text_dirs`: the other text caches of a space that
    searches fine-tuning (TrialData.text_dirs)."""
    f = data.features
    common = dict(guids=f.guids, folds=folds, base=base.to_flat(), threads=max(1, int(spec.cpu)))
    if isinstance(f, RawSource):  # finetune=full
        trial_data = TrialData(text_dir="", image_dir="", raw=f, **common)
    else:
        folders = [str(f.text_dir.resolve()), str(f.image_dir.resolve()), *(text_dirs or {}).values()]
        trial_data = TrialData(text_dir=folders[0], image_dir=folders[1], text_dirs=dict(text_dirs or {}),
                               cache_files=cache_transfer.offer(folders) if offer_cache else None, **common)
    resources = {"cpu": spec.cpu, "gpu": spec.gpu}
    return tune.with_resources(tune.with_parameters(train_trial, data=trial_data), resources)


def check_cluster(address: str) -> None:
    """Refuse at once, in one line, an --address where no Ray cluster answers: ray.init would wait
    there for minutes (e.g. `auto` after a head died without `ray stop`)."""
    import socket

    from ray._private.services import canonicalize_bootstrap_address
    try:
        resolved = canonicalize_bootstrap_address(address) or ""
    except (ConnectionError, ValueError) as e:
        raise UserError(f"--address {address}: {str(e).splitlines()[0]}") from None
    host, _, port = resolved.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=3).close()
    except (OSError, ValueError):
        raise UserError(f"--address {address}: no Ray cluster answers at {resolved or address} "
                        f"(not started, or a head that stopped without `ray stop`)") from None


def start_ray(address: str | None) -> None:
    if ray.is_initialized():
        return
    kwargs = dict(include_dashboard=False, configure_logging=True, logging_level=logging.WARNING,
                  log_to_driver=True)
    if address:
        ray.init(address=address, **kwargs)
    else:  # a new local instance, never a cluster that `ray start` left on this machine
        ray.init(address="local", num_cpus=os.cpu_count(), **kwargs)


def run_tuner(search, data, folds, parent_id: str, ray_path: str, datasets: dict[str, str]) -> bool:
    """Run (or continue) `search` (search.run.Search) under its parent run. Returns True when it was
    interrupted before the end. `datasets`: {context: digest} that every trial run logs as its
    inputs (mmsa.app.records)."""
    spec, base, address = search.spec, search.base, search.args.address
    tracking_uri, experiment_id = search.tracking_uri, search.experiment_id
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # Ray saves the search state (which trials finished, the searcher) every 10 s or more by
    # default; a driver killed outright (SIGKILL, out of memory) then re-ran the trials that had
    # finished since, and lost the ones started since. Every second costs little: the state is small.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "1")
    # Ray's default TensorBoard logger imports torch into the driver (tensorboardX does). Loaded
    # that late, after Ray, grpc and pyarrow, torch once died loading its MKL in a submitted job.
    # MLflow is the record; Ray's own JSON and CSV logs per trial are kept.
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    metric = f"best_{spec.metric}"
    logger = MlflowTrialLogger(tracking_uri, experiment_id, parent_id, base.to_flat(), datasets)
    budget = TimeBudget(parse_duration(spec.time_budget, "time_budget"), parent_id) if spec.time_budget else None
    try:
        start_ray(address)
        trainable = make_trainable(spec, base, data, folds, offer_cache=address is not None,
                                   text_dirs=search.text_dirs)
        if search.resumed is not None and tune.Tuner.can_restore(ray_path):
            tuner = tune.Tuner.restore(ray_path, trainable=trainable, resume_unfinished=True,
                                       resume_errored=False, restart_errored=False)
        else:
            tuner = tune.Tuner(
                trainable,
                tune_config=tune.TuneConfig(
                    metric=metric, mode="max", num_samples=spec.num_samples,
                    search_alg=ConcurrencyLimiter(make_searcher(spec, budget), max_concurrent=spec.max_concurrent),
                    scheduler=make_scheduler(spec), reuse_actors=True),
                run_config=tune.RunConfig(
                    name=os.path.basename(ray_path), storage_path=os.path.dirname(ray_path),
                    callbacks=[logger, ProgressPrinter(metric, spec.num_samples, spec.cv_folds),
                               CSVLoggerCallback(), JsonLoggerCallback()],
                    failure_config=tune.FailureConfig(max_failures=spec.max_failures),
                    stop=FoldBoundaryStopper(parent_id) if budget is not None else None,
                    verbose=0))
        previous = signal.signal(signal.SIGTERM, lambda *_: os.kill(os.getpid(), signal.SIGINT))
        try:
            tuner.fit()
        finally:
            signal.signal(signal.SIGTERM, previous)
    finally:
        ray.shutdown()  # stops a local Ray; only disconnects from a cluster
    # Records that waited for an unreachable tracking server: written now (waiting for it if need be).
    MlflowTrialLogger.of_search(parent_id).flush()
    # MLflow is the record: the search is complete when every trial has ended there.
    client = MlflowClient(tracking_uri)
    runs = child_runs(client, experiment_id, parent_id)
    ended = {r.data.tags.get(TAG_TRIAL) for r in runs
             if r.info.status in ("FINISHED", "FAILED")}
    # The live budget: on a resume, the copy Ray restored with the searcher.
    budget = TimeBudget.live.get(parent_id)
    interrupted = len(ended) < spec.num_samples and not (budget is not None and budget.left <= 0)
    # Runs still open now belong to trials cut off by this interruption, or left open by an
    # earlier driver that was killed outright and not restarted by Ray: close them as interrupted.
    lost = MlflowTrialLogger(tracking_uri, experiment_id, parent_id, {}).mark_interrupted(complete=not interrupted)
    if lost:
        print(f"note: {len(lost)} trial(s) ({', '.join(lost)}) were running when an earlier run of this search "
              f"was killed, before Ray saved them: they were not trained again (the searcher proposed other "
              f"configs). Their runs stay in MLflow as interrupted, tagged {TAG_NOT_RESUMED}.", flush=True)
    return interrupted
