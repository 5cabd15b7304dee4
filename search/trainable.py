"""The Ray Tune trainable: a thin wrapper over `mmsa.crossval.cross_validate` that reports every fold.

Trials receive the cache folders' paths, not the arrays: each trial memory-maps the same files,
so N concurrent trials share one copy of the features through the OS page cache. Training runs
in a fork of the driver's fork server where there is one (search/forkserver.py), so concurrent
trials also share torch itself. Ray is imported only in `train_trial`: the fork server preloads
this module without it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import json
from dataclasses import dataclass

from mmsa.config import Config
from mmsa.features import FeatureSet
from mmsa.rawsource import RawSource
from mmsa.prepare import Split
from search import forkserver

# Set on a trial's report of its last fold. A trial whose last result lacks it was stopped by the
# scheduler.
FINAL_KEY = "final"


@dataclass
class TrialData:
    """What every trial needs, small enough to ship through the object store once."""

    guids: list[str]
    text_dir: str
    image_dir: str
    folds: list[tuple[Split, Split]]  # (train, val) per cross-validation fold, the same for every trial
    base: dict  # flat config: defaults + the space file's fixed values
    threads: int
    raw: RawSource | None = None  # finetune=full: batches read from the files, no cache
    fork_address: str | None = None  # the driver's fork server (search/forkserver.py), if any

    def features(self) -> FeatureSet | RawSource:
        if self.raw is not None:
            return self.raw
        return FeatureSet.open(self.guids, self.text_dir, self.image_dir)


def scalar_metrics(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def release_freed_memory() -> None:
    """Hand memory that Python and torch have freed back to the OS (glibc's malloc_trim).

    glibc keeps freed heap memory for reuse; a trial process that Ray reuses for the next trial
    (reuse_actors) otherwise carries each earlier trial's largest batches. A no-op where libc is
    not glibc."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim():
    """glibc's malloc_trim, looked up once per process (find_library runs ldconfig), or None."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def train_trial(config: dict, data: TrialData) -> None:
    import ray
    from ray import tune
    node = ray.get_runtime_context().get_node_id()

    conn = forkserver.connect(data.fork_address)
    process = "fork" if conn is not None else "ray worker"

    def report(metrics: dict) -> None:
        tune.report({**metrics, "node_id": node, "trial_process": process})

    if conn is not None:  # train in a fork of the warm server: torch's pages are shared
        forkserver.run_forked(conn, (config, data), report)
    else:  # no server on this machine (e.g. another node of a cluster): train here
        fit_trial(report, config, data)


def fit_trial(emit, config: dict, data: TrialData) -> None:
    """One trial: cross-validation over `data.folds`; emit(metrics) after every fold, with
    training_iteration = folds done and the score = the mean over those folds, so that ASHA
    halves trials over folds (emit may stop the trial by raising)."""
    release_freed_memory()  # what the previous trial in this process left behind
    from mmsa.crossval import cross_validate  # torch: imported by trial processes, not by the driver
    cfg = Config.from_flat({**data.base, **config}, source="trial config")
    cfg.train.num_threads = data.threads

    def on_fold(k: int, summary: dict) -> None:
        out = scalar_metrics(summary)
        # The curve travels as JSON text: Ray's TensorBoard logger warns, with the whole value, on a
        # list of dicts in a result, and skips text quietly.
        out.update(val_confusion=summary["val_confusion"], fold_curve=json.dumps(summary["fold_curve"]))
        if k == len(data.folds):
            out[FINAL_KEY] = 1
        emit(out)

    cross_validate(cfg, data.features(), data.folds, on_fold=on_fold, on_epoch=lambda *_: release_freed_memory())
