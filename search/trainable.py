"""The Ray Tune trainable: a thin wrapper over `mmsa.crossval.cross_validate` that reports every fold.

Trials receive the cache folders' paths, not the arrays: each trial memory-maps the same files,
so N concurrent trials share one copy of the features through the OS page cache. Ray is imported
only in `train_trial`, so that the driver's memory plan and the tests can import this module
without it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from mmsa.config import CACHE_DIR_ENV as NODE_CACHE_ENV  # set on a node (before `ray start`)
from mmsa.config import Config, DataConfig
from mmsa.features.featureset import Features, FeatureSet
from mmsa.features.rawsource import RawSource
from mmsa.features.prepare import Split

# Set on a trial's report of its last fold. A trial whose last result lacks it was stopped by the
# scheduler.
FINAL_KEY = "final"
# On the report of the last fold: the trial's out-of-fold predictions at its best epoch
# (mmsa.training.oof as text), which the driver keeps as the trial run's OOF_ARTIFACT.
OOF_KEY = "oof"
OOF_ARTIFACT = "oof.npz"


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
    # On a cluster: the driver's cache files in Ray's object store, for nodes that lack them
    # (search/cache_transfer.py); {"folder/file": ObjectRef}
    cache_files: dict | None = None
    # A space that searches fine-tuning (search.space.FEATURE_CHOICES): the text cache of each
    # other kind of features, by text_variant()
    text_dirs: dict[str, str] = field(default_factory=dict)

    def features(self, cfg: DataConfig | None = None) -> Features:
        """The features a trial of data config `cfg` reads (default: the base config's)."""
        if self.raw is not None:
            return node_raw(self.raw)
        text_dir = self.text_dirs.get(text_variant(cfg), self.text_dir) if cfg is not None else self.text_dir
        return node_features(self, text_dir)


def text_variant(cfg: DataConfig) -> str:
    """Which text cache a data config reads: the last hidden states (k0), or those entering the
    top k layers that train (finetune=last_k)."""
    return f"k{cfg.text_finetune_layers}" if cfg.finetune == "last_k" else "k0"




def node_features(data: TrialData, text_dir: str) -> FeatureSet:
    """The driver's feature cache (`text_dir` with the image cache) as this node sees it: the
    driver's folders where the node shares its disk; under $MMSA_CACHE_DIR where the node sets one
    (a cluster without a shared disk). Absent there, the node receives the driver's copy through
    Ray's object store, once."""
    import socket

    from mmsa.errors import DataError
    from search.cache_transfer import receive
    root = os.environ.get(NODE_CACHE_ENV)
    image_dir = data.image_dir
    if root:
        text_dir, image_dir = (os.path.join(root, os.path.basename(d)) for d in (text_dir, image_dir))
    if not all(os.path.exists(os.path.join(d, "meta.json")) for d in (text_dir, image_dir)):
        if not data.cache_files:
            raise DataError(f"node {socket.gethostname()}: {os.path.dirname(text_dir)}: the search's feature "
                            f"cache is not here, and the driver offered none (a search on one machine)")
        receive(data.cache_files, Path(os.path.dirname(text_dir)),
                [os.path.basename(text_dir), os.path.basename(image_dir)])
    return FeatureSet.open(data.guids, text_dir, image_dir)


def node_raw(raw: RawSource) -> RawSource:
    """finetune=full reads the images where it trains: where this node lacks them, say so rather
    than train on blank images (an unreadable image is one)."""
    import socket

    from mmsa.errors import DataError
    sample = next((ex for ex in raw.examples if ex.has_image), None)
    if sample is not None and not os.path.exists(sample.image_path):
        raise DataError(f"node {socket.gethostname()}: {os.path.dirname(os.path.abspath(sample.image_path))}: the "
                        f"dataset's images are not here (finetune=full reads them on every node that trains)")
    return raw


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

    fit_trial(lambda metrics: tune.report({**metrics, "node_id": node}), config, data)


def fit_trial(emit, config: dict, data: TrialData) -> None:
    """One trial: cross-validation over `data.folds`; emit(metrics) after every fold, with
    training_iteration = folds done and the score = the mean over those folds, so that ASHA
    halves trials over folds (emit may stop the trial by raising). The last fold's report carries
    the out-of-fold predictions (OOF_KEY)."""
    release_freed_memory()  # what the previous trial in this process left behind
    from mmsa.training.crossval import cross_validate  # torch: imported by trial processes, not by the driver
    cfg = Config.from_flat({**data.base, **config}, source="trial config")
    cfg.train.num_threads = data.threads

    def on_fold(k: int, summary: dict) -> None:
        out = scalar_metrics(summary)
        # The curve travels as JSON text: Ray's TensorBoard logger warns, with the whole value, on a
        # list of dicts in a result, and skips text quietly.
        out.update(val_confusion=summary["val_confusion"], fold_curve=json.dumps(summary["fold_curve"]))
        if k == len(data.folds):
            from mmsa.training import oof
            out[FINAL_KEY] = 1
            out[OOF_KEY] = oof.to_text(oof.oof_arrays(data.folds, summary["fold_probs"]))
        emit(out)

    cross_validate(cfg, data.features(cfg.data), data.folds, on_fold=on_fold, on_epoch=lambda *_: release_freed_memory(),
                   keep_probs=True)
