"""The Ray Tune trainable: a thin wrapper over `mmsa.training.crossval.cv_epochs` that reports its epochs.

Trials receive the cache folders' paths, not the arrays: each trial memory-maps the same files,
so N concurrent trials share one copy of the features through the OS page cache. Ray is imported
only in `train_trial`, so that the driver's memory plan and the tests can import this module
without it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from mmsa.config import CACHE_DIR_ENV  # set on a node (before `ray start`): its own cache folder
from mmsa.config import Config, DataConfig
from mmsa.features.featureset import Features, FeatureSet
from mmsa.features.heap import trim_freed_memory
from mmsa.features.rawsource import RawSource
from mmsa.data.splits import Split
from search.trial_report import TrialReport, scalar_metrics



@dataclass
class TrialData:
    """What every trial needs, small enough to ship through the object store once."""

    guids: list[str]
    text_dir: str
    image_dir: str
    folds: list[tuple[Split, Split]]  # (train, val) per cross-validation fold, the same for every trial
    base: dict  # flat config: defaults + the space file's fixed values
    threads: int
    raw: RawSource | None = None  # what finetune=full trials read (batches made from the files), where any do
    # On a cluster: the driver's cache files in Ray's object store, for nodes that lack them
    # (search/cache_transfer.py); {"folder/file": ObjectRef}
    cache_files: dict | None = None
    # A space that searches fine-tuning (search.space.FEATURE_CHOICES): the text cache of each
    # other kind of features, by text_variant()
    text_dirs: dict[str, str] = field(default_factory=dict)
    every_epoch: bool = False  # report (and checkpoint) after every epoch: ASHA's rungs count epochs
    # Where trials write their checkpoints' states (search.checkpoints.state_dir); None: into Ray's
    # checkpoint, which Ray uploads (remote storage)
    state_dir: str | None = None
    gpu_share: float = 1.0  # of a GPU each trial reserves: below 1, its process is held to that share
    # When the search's time budget runs out (time.time()): a trial stops at the end of the epoch it
    # is in then, scored on the folds it finished. None: no budget, or one Ray's restored stopper holds.
    deadline: float | None = None

    def config(self, sampled: dict, gpu: bool = False) -> Config:
        """A trial's config: the base config with the values the searcher sampled, on its CPU share;
        its device where it trains (what its run records), never `auto`."""
        flat = {**self.base, **sampled, "num_threads": self.threads}
        if flat.get("device", "auto") == "auto":
            flat["device"] = "cuda" if gpu else "cpu"
        return Config.from_flat(flat, source="trial config")

    def features(self, cfg: DataConfig) -> Features:
        """The features a trial of data config `cfg` reads: the pairs themselves (finetune=full),
        or the cache of its kind."""
        if cfg.finetune == "full":
            return node_raw(self)
        return node_features(self, self.text_dirs.get(text_variant(cfg), self.text_dir))


def text_variant(cfg: DataConfig) -> str:
    """Which text cache a data config reads: the last hidden states (k0), or those entering the
    top k layers that train (finetune=last_k)."""
    return f"k{cfg.text_depth}"




def _on_node(folder: str) -> str:
    """Where this node keeps a cache folder of the driver's: under $MMSA_CACHE_DIR where the node
    sets one (a cluster without a shared disk), else at the driver's path."""
    root = os.environ.get(CACHE_DIR_ENV)
    return os.path.join(root, os.path.basename(folder)) if root else folder


def _complete(folder: str) -> bool:
    return os.path.exists(os.path.join(folder, "meta.json"))  # written last (mmsa.features.cache)


def node_features(data: TrialData, text_dir: str) -> FeatureSet:
    """The driver's feature cache (`text_dir` with the image cache) as this node sees it: the
    driver's folders where the node shares its disk; under $MMSA_CACHE_DIR where the node sets one
    (a cluster without a shared disk). Absent there, the node receives the driver's copy through
    Ray's object store, once."""
    import socket

    from mmsa.errors import DataError
    from search.cache_transfer import receive
    text_dir, image_dir = _on_node(text_dir), _on_node(data.image_dir)
    if not (_complete(text_dir) and _complete(image_dir)):
        if not data.cache_files:
            raise DataError(f"node {socket.gethostname()}: {os.path.dirname(text_dir)}: the search's feature "
                            f"cache is not here, and the driver offered none (a search on one machine)")
        receive(data.cache_files, Path(os.path.dirname(text_dir)),
                [os.path.basename(text_dir), os.path.basename(image_dir)])
    return FeatureSet.open(data.guids, text_dir, image_dir)


def node_raw(data: TrialData) -> RawSource:
    """What finetune=full reads where it trains: the driver's pixel cache as this node sees it (at
    the driver's path, under $MMSA_CACHE_DIR, or received from the driver, as node_features), else
    the images' files. Where this node lacks those, say so rather than train on blank images (an
    unreadable image is one)."""
    import socket

    from mmsa.errors import DataError
    from search.cache_transfer import receive
    raw = data.raw
    if raw.pixel_dir is not None:
        folder = _on_node(raw.pixel_dir)
        name = os.path.basename(folder)
        if not _complete(folder) and data.cache_files and any(key.startswith(name + "/") for key in data.cache_files):
            receive(data.cache_files, Path(os.path.dirname(folder)), [name])
        if _complete(folder):
            return raw if folder == raw.pixel_dir else RawSource(raw.examples, raw.cfg, pixel_dir=folder)
        raw = raw.without_pixel_cache()
    sample = next((ex for ex in raw.examples if ex.has_image), None)
    if sample is not None and not os.path.exists(sample.image_path):
        raise DataError(f"node {socket.gethostname()}: {os.path.dirname(os.path.abspath(sample.image_path))}: the "
                        f"dataset's images are not here (finetune=full reads them on every node that trains)")
    return raw


# With rungs by folds a trial reports (and checkpoints) at every fold's end, and after an epoch
# only where its last report is this long ago: a report costs a round trip through Ray's driver,
# which an epoch of minutes does not notice and an epoch of two seconds does
# (`python -m bench.search_cost --reports` measures it). With rungs by epochs, after every epoch.
CHECKPOINT_S = 30.0


def train_trial(config: dict, data: TrialData) -> None:
    """The Ray Tune function trainable: a report with a checkpoint after every epoch; resumed from
    the last one where Ray restarts the trial (a retry after a failure, or --resume)."""
    import logging
    import tempfile

    import ray
    from ray import tune

    from search.checkpoints import TrialStates, read_checkpoint, write_checkpoint
    # Ray logs every checkpoint's path, one line per report on the user's screen; where a trial
    # stands is search.progress's line, and the checkpoints are in Ray's state folder.
    logging.getLogger("ray.train._internal.storage").setLevel(logging.WARNING)
    node = ray.get_runtime_context().get_node_id()
    gpu = bool(ray.get_gpu_ids())
    if not gpu:  # a trial that reserved no GPU uses none, even where one is visible
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    states = TrialStates(data.state_dir, tune.get_context().get_trial_id()) if data.state_dir else None
    start = None
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            start = read_checkpoint(folder, states)

    def emit(report: TrialReport, state) -> None:
        with tempfile.TemporaryDirectory(prefix="mmsa-checkpoint-") as folder:
            name = write_checkpoint(state, folder, states)
            tune.report(report.with_node(node).to_result(), checkpoint=tune.Checkpoint.from_directory(folder))
        if name is not None:  # Ray's checkpoint now names the new state: the older one goes
            states.keep_only(name)

    fit_trial(emit, config, data, start=start, gpu=gpu)


class _Reporter:
    """Turns cv_epochs' epochs into a trial's reports: which epochs are due a report, what
    each carries (the epochs since the last, the score of the folds done, the predictions at the
    end), and when the last one went."""

    def __init__(self, data: TrialData, cfg: Config, start):
        import time

        from mmsa.training.crossval import cv_summary
        self.data, self.cfg, self.last = data, cfg, time.monotonic()
        self.unreported = _curves(start)  # after a resume, the first report carries what was trained before
        self.resumed = sum(len(c) for c in self.unreported.values())
        self.score = (scalar_metrics(cv_summary(start.histories, cfg.train.monitor, len(data.folds)))
                      if start is not None and start.histories else {})
        self.state, self.retries = start, 0

    def on_epoch(self, ev, emit) -> bool:
        """Report `ev` where one is due; False where the trial ends here: the time budget ran out."""
        import time

        from mmsa.training.crossval import CURVE_KEYS
        self.unreported.setdefault(ev.fold, {})[ev.epoch] = {k: float(ev.report[k]) for k in CURVE_KEYS
                                                             if k in ev.report}
        self.state = ev.state
        if ev.summary is not None:
            self.score = scalar_metrics(ev.summary)
        out_of_time = self.data.deadline is not None and time.time() >= self.data.deadline
        if self.data.every_epoch or ev.fold_end or out_of_time or time.monotonic() - self.last >= CHECKPOINT_S:
            emit(self.report(ev), ev.state)
            self.unreported, self.resumed, self.last = {}, 0, time.monotonic()
        trim_freed_memory()
        return not out_of_time

    def report(self, ev) -> TrialReport:
        from search.trial_report import Retry
        monitor, train = self.cfg.train.monitor, self.cfg.train
        # fold 1 in training: its best epoch so far
        scores = self.score or {f"best_{monitor}": float(ev.report[f"best_{monitor}"])}
        last = ev.fold_end and ev.fold == len(self.data.folds)
        oof = None
        if last:
            from mmsa.training import oof as oof_text
            oof = oof_text.to_text(oof_text.oof_arrays(self.data.folds, ev.summary["fold_probs"]))
        return TrialReport(
            fold=ev.fold, epoch=ev.epoch, fold_end=ev.fold_end, folds_done=ev.fold - (not ev.fold_end),
            epochs_done=(ev.fold - 1) * train.max_epochs + ev.epoch,
            scores=scores, all_folds=last, curves=self.unreported,
            confusion=ev.summary["val_confusion"] if ev.fold_end else None, oof=oof, device=train.device,
            n_params=int(ev.report.get("n_params", 0)),
            retry=Retry(self.retries, train.micro_batch if self.retries else 0, self.resumed))


def fit_trial(emit, config: dict, data: TrialData, start=None, gpu: bool = False) -> None:
    """One trial: cross-validation over `data.folds`; emit(TrialReport, state) after every epoch
    with `data.every_epoch` (rungs by epochs), else at every fold's end and after an epoch whose
    last report is CHECKPOINT_S ago (emit may stop the trial by raising); `state` is where it
    stands, its checkpoint. `start`: a CVState to go on from. `gpu`: whether the trial reserved one
    (without, it trains on the CPU). A CUDA out-of-memory is retried once from the last finished
    epoch at half the micro-batch (the same effective batch); a second fails the trial. Past
    `data.deadline`, it ends after the epoch it is in, that epoch reported."""
    from dataclasses import replace

    trim_freed_memory()  # what the previous trial in this process left behind
    from mmsa.models.runtime import is_out_of_memory, release_device_memory
    from mmsa.training.crossval import cv_epochs
    from mmsa.training.fit import TrainingError
    cfg = data.config(config, gpu)
    if gpu and data.gpu_share < 1:
        hold_to_share(data.gpu_share)
    reporter = _Reporter(data, cfg, start)
    features = data.features(cfg.data)
    while True:
        try:
            for ev in cv_epochs(reporter.cfg, features, data.folds, keep_probs=True, keep_state=True,
                                start=reporter.state):
                if not reporter.on_epoch(ev, emit):
                    return
            return
        except Exception as e:  # noqa: BLE001 - only running out of GPU memory is retried
            if not is_out_of_memory(e):
                raise
            failure = str(e).splitlines()[0][:200]
        # Out of the except block: the exception's traceback, which held the failed step's frames
        # (its graph, the fold's model and optimizer), is gone, so their memory can go back now.
        release_device_memory()
        train = reporter.cfg.train
        micro = min(train.micro_batch or train.batch_size, train.batch_size)
        if reporter.retries or micro <= 1:
            raise TrainingError(
                f"CUDA out of memory again at micro-batch {micro} ({failure}): lower micro_batch or batch_size, "
                f"or max_text_len, set grad_checkpointing: true, or give each trial more of the GPU "
                f"(resources.gpu); `python -m search.run --dry-run` plans it")
        reporter.retries += 1
        reporter.cfg = replace(reporter.cfg, train=replace(train, micro_batch=micro // 2))
        print(f"CUDA out of memory at micro-batch {micro}: trying again from the last finished epoch at "
              f"micro-batch {micro // 2} (the same effective batch)", flush=True)


def hold_to_share(share: float) -> None:
    """Hold this process's CUDA allocations to its `share` of the card, less what CUDA keeps
    outside torch's allocator (search.gpu_memory.CUDA_CONTEXT): Ray's fractional GPUs are a count,
    not a limit, and a packed trial that outgrew its plan would otherwise take its neighbour's
    memory. It fails alone instead (an out-of-memory, retried at half the micro-batch)."""
    import torch

    from search.gpu_memory import memory_fraction
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(memory_fraction(share, total), 0)


def _curves(state) -> dict:
    """{fold: {epoch: metrics}} of what a trial trained before it was stopped: its
    finished folds and the epochs of the fold it was in."""
    from mmsa.training.crossval import CURVE_KEYS
    if state is None:
        return {}
    folds = list(state.histories) + ([state.fit.history] if state.fit is not None else [])
    return {k: {e: {key: float(m[key]) for key in CURVE_KEYS if key in m} for e, m in enumerate(h, 1)}
            for k, h in enumerate(folds, 1)}
