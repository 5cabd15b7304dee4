"""Ray Tune wiring: Tuner with Optuna (TPE) + ASHA over `train_trial`; start, resume, interrupt."""

from __future__ import annotations

import logging
import os
import signal
import time

import ray
from ray import tune
from ray.tune import Callback, Stopper
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search import ConcurrencyLimiter
from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

from mmsa.errors import UserError
from mmsa.app.run_tags import TAG_NOT_RESUMED
from search import cache_transfer
from search.checkpoints import delete_trial_state, state_dir
from search.progress import ProgressPrinter
from search.record import SearchRecord
from search.recorder import TrialRecorder
from search.searcher import make_searcher
from search.time_budget import TimeBudget, parse_duration
from search.trainable import TrialData, train_trial
from search.trial_report import TrialReport, position_key, score_key


def make_scheduler(spec):
    """A trial reports after every epoch, its score the mean over the folds it finished (during
    fold 1, that fold's best epoch so far). ASHA's rungs count folds finished (`rungs: folds`) or
    epochs trained (`rungs: epochs`), so it judges cheap trials on whole folds and expensive ones
    after their first epochs."""
    if spec.scheduler == "fifo":
        return FIFOScheduler()
    return ASHAScheduler(time_attr=position_key(spec.rungs), max_t=spec.max_rung,
                         grace_period=spec.grace_period, reduction_factor=spec.reduction_factor)


class BudgetStopper(Callback, Stopper):
    """Stops each trial at its next rung once the time budget is spent: the end of a fold with
    `rungs: folds`, of an epoch with `rungs: epochs`. As a callback it carries the budget's state in
    Ray's experiment checkpoints (get_state / set_state), restored on --resume into the one
    TimeBudget the searcher and the MLflow logger share."""

    def __init__(self, budget: TimeBudget, at_folds: bool = True):
        self.budget, self.at_folds = budget, at_folds

    def __call__(self, trial_id, result) -> bool:
        if self.at_folds and not TrialReport.from_result(result).fold_end:
            return False
        return self.budget.spent()

    def stop_all(self) -> bool:
        return False  # the searcher ends the search: it proposes nothing once the budget is spent

    def get_state(self) -> dict:
        return self.budget.state()

    def set_state(self, state: dict) -> None:
        self.budget.restore(state)


class CheckpointCleaner(Callback):
    """Deletes a trial's checkpoint when it ends, completed or stopped (by ASHA or the time budget):
    Ray keeps the last one of every trial (num_to_keep counts per trial), gigabytes each for a
    fine-tuned trial. A failed trial's stays, for its retry and for --resume (search.checkpoints)."""

    def __init__(self, ray_path: str):
        self.ray_path = ray_path

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        delete_trial_state(self.ray_path, trial.trial_id, trial.checkpoint)


def make_trainable(search, data, ray_path: str, offer_cache: bool = False, deadline: float | None = None):
    """`search` (search.setup.Search) over `data` (search.search_data.SearchData), its state stored
    at `ray_path`. `offer_cache` (on a cluster): the cache's files go into Ray's object store once,
    for the nodes that do not share the driver's disk. `deadline`: the time budget's end."""
    f, spec = data.prepared.features, search.spec
    folders = [str(f.text_dir.resolve()), str(f.image_dir.resolve()), *data.text_dirs.values()]
    offered = folders + ([data.raw.pixel_dir] if data.raw is not None and data.raw.pixel_dir else [])
    trial_data = TrialData(guids=f.guids, text_dir=folders[0], image_dir=folders[1], folds=data.folds,
                           base=search.base.to_flat(), threads=max(1, int(spec.cpu)), raw=data.raw,
                           cache_files=cache_transfer.offer(offered) if offer_cache else None,
                           text_dirs=dict(data.text_dirs), every_epoch=spec.rungs == "epochs",
                           state_dir=state_dir(ray_path), gpu_share=spec.gpu or 1.0, deadline=deadline)
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
    """Ray for the search: the cluster at `address`, or a new local instance (never a cluster that
    `ray start` left on this machine). search.run shuts it down at the end."""
    kwargs = dict(include_dashboard=False, configure_logging=True, logging_level=logging.WARNING,
                  log_to_driver=True)
    if address:
        ray.init(address=address, **kwargs)
    else:
        # A Ray that lives as long as this search, reachable from this machine only: its notice
        # that token authentication is on says nothing the user acts on.
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
        ray.init(address="local", num_cpus=os.cpu_count(), **kwargs)


def check_resources(spec) -> None:
    """Refuse, in one line, trials that no node of the cluster can hold: they would wait for
    ever, and the search's time budget would never start."""
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    for kind, name, flag, asked in (("GPU", "resources.gpu", "--gpus-per-trial", spec.gpu),
                                    ("CPU", "resources.cpu", "--cpus-per-trial", spec.cpu)):
        most = max((r.get(kind, 0) for r in nodes), default=0)
        if asked > most:
            where = "has no GPU" if kind == "GPU" and not most else f"has at most {most:g} {kind}s on one node"
            raise UserError(f"{spec.path}: {name} {asked:g} per trial ({flag}): the Ray cluster {where}, so no "
                            f"trial could start" + ("; set resources.gpu: 0 to train on CPUs" if kind == "GPU" else ""))


# Ray Tune's settings that only environment variables reach, set before a Tuner exists.
RAY_TUNE_ENV = {
    "RAY_AIR_NEW_OUTPUT": "0",  # the trial lines are search.progress's; Ray's own table stays off
    # Ray saves the search state (which trials finished, the searcher, the budget) every 10 s or
    # more by default; a driver killed outright (SIGKILL, out of memory) then re-ran the trials that
    # had finished since, and lost the ones started since. Every second costs little: it is small.
    "TUNE_GLOBAL_CHECKPOINT_S": "1",
    # ... and, so saved, Ray would warn at every few trial checkpoints that it saves often: by design.
    "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0",
    # Ray's default TensorBoard logger imports torch into the driver (tensorboardX does). Loaded that
    # late, after Ray, grpc and pyarrow, torch once died loading its MKL in a submitted job. MLflow
    # is the record; Ray's own JSON and CSV logs per trial are kept.
    "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1",
}


def make_tuner(search, data, record: SearchRecord, ready: float) -> tune.Tuner:
    """A new Tuner for `search`, or the one --resume restores from Ray's state at the record's
    `ray_path` (its searcher, scheduler, stopper and callbacks then come from that state, and carry
    theirs). The time budget counts from `ready` (time.time() when the features were)."""
    spec, metric, ray_path = search.spec, f"best_{search.spec.metric}", record.ray_path
    offer = search.address is not None
    if search.resumed is not None and tune.Tuner.can_restore(ray_path):
        # what the budget had left when this search was last interrupted (another process recorded it)
        left = record.parent_metrics().get("time_budget_left_s") if spec.time_budget else None
        trainable = make_trainable(search, data, ray_path, offer, None if left is None else time.time() + left)
        return tune.Tuner.restore(ray_path, trainable=trainable, resume_unfinished=True,
                                  resume_errored=False, restart_errored=False)
    budget = (TimeBudget(parse_duration(spec.time_budget, "time_budget"), spent_already=time.time() - ready)
              if spec.time_budget else None)
    trainable = make_trainable(search, data, ray_path, offer, budget.deadline() if budget is not None else None)
    stopper = BudgetStopper(budget, at_folds=spec.rungs == "folds") if budget is not None else None
    recorder = TrialRecorder(record.store.uri, record.store.experiment, record.parent_id, search.base.to_flat(),
                             data.datasets, budget)
    callbacks = [recorder, ProgressPrinter(metric, spec.num_samples, spec.cv_folds), CSVLoggerCallback(),
                 JsonLoggerCallback(), CheckpointCleaner(ray_path), *([stopper] if stopper is not None else [])]
    searcher = make_searcher(spec, budget, data.warm)
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            metric=score_key(metric), mode="max", num_samples=spec.num_samples,
            search_alg=ConcurrencyLimiter(searcher, max_concurrent=spec.max_concurrent),
            scheduler=make_scheduler(spec), reuse_actors=True),
        run_config=tune.RunConfig(
            name=os.path.basename(ray_path), storage_path=os.path.dirname(ray_path), callbacks=callbacks,
            failure_config=tune.FailureConfig(max_failures=spec.max_failures), stop=stopper, verbose=0,
            # a trial's latest epoch is all a retry or --resume needs (mmsa.training.crossval.CVState)
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1)))


def run_tuner(search, data, record: SearchRecord, ready: float) -> bool:
    """Run (or continue) `search` (search.setup.Search) under its record. Returns True when it was
    interrupted before the end: not every trial has ended in the record (which holds the earlier
    drivers' of a resumed search too; Ray marks a trial cut off by Ctrl-C as terminated), and the
    time budget (as the recorder left it on the record at the experiment's end) was not spent."""
    spec = search.spec
    for key, value in RAY_TUNE_ENV.items():
        os.environ.setdefault(key, value)
    tuner = make_tuner(search, data, record, ready)
    previous = signal.signal(signal.SIGTERM, lambda *_: os.kill(os.getpid(), signal.SIGINT))
    try:
        tuner.fit()
    finally:
        signal.signal(signal.SIGTERM, previous)
    spent = record.budget is not None and record.budget["left"] <= 0
    interrupted = len(record.ended_trials()) < spec.num_samples and not spent
    # Runs still open now belong to trials cut off by this interruption, or left open by an
    # earlier driver that was killed outright and not restarted by Ray: close them as interrupted.
    lost = record.close_open_trials(complete=not interrupted)
    if lost:
        print(f"note: {len(lost)} trial(s) ({', '.join(lost)}) were running when an earlier run of this search "
              f"was killed, before Ray saved them: they were not trained again (the searcher proposed other "
              f"configs). Their runs stay in MLflow as interrupted, tagged {TAG_NOT_RESUMED}.", flush=True)
    return interrupted
