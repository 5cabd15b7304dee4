"""search/trainable.py: what a trial process does besides calling fit."""

import subprocess
import sys
import textwrap

import numpy as np
import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc_trim and /proc are Linux")

CHILD = textwrap.dedent("""
    from search.trainable import release_freed_memory

    def anon_mib():
        for line in open("/proc/self/smaps_rollup"):
            if line.startswith("Anonymous:"):
                return int(line.split()[1]) / 1024

    # 64 KiB blocks live on the heap (under glibc's mmap threshold); keeping every 8th one alive
    # pins the heap's top, so freeing the rest does not shrink it on its own.
    blocks = [bytearray(64 * 1024) for _ in range(6000)]
    kept = blocks[::8]
    del blocks
    before = anon_mib()
    release_freed_memory()
    print(before, anon_mib(), len(kept))
""")


def test_release_freed_memory_returns_freed_heap_to_the_os():
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, check=True).stdout
    before, after, _ = map(float, out.split())
    freed = 6000 * 7 / 8 * 64 / 1024  # MiB freed by `del blocks`: about 328
    assert before - after > 0.5 * freed, (before, after)


def test_a_trial_cut_after_fold_1_is_pruned_in_the_optuna_study(subset_prepared):
    """A trial reports once per fold (the running mean over folds); one that ASHA stops after fold 1
    reaches TPE as PRUNED with that one intermediate value, one that runs every fold as COMPLETE
    with the mean over all folds."""
    from pathlib import Path

    from optuna.trial import TrialState

    from mmsa.config import Config
    from mmsa.prepare import cv_splits
    from search.searcher import make_searcher
    from search.space import Param, SearchSpec
    from search.trainable import TrialData, fit_trial

    data_cfg, p = subset_prepared
    base = Config(data=data_cfg).to_flat() | {"max_epochs": 1, "d_model": 16, "heads": 2, "batch_size": 16}
    f = p.features
    data = TrialData(guids=f.guids, text_dir=str(f.text_dir), image_dir=str(f.image_dir),
                     folds=cv_splits(p.train, 3, seed=0), base=base, threads=1)
    spec = SearchSpec(path=Path("space.yaml"), cv_folds=3, n_startup_trials=2,
                      params={"lr": Param("lr", "loguniform", 1e-4, 1e-2)})
    searcher = make_searcher(spec)

    class Stopped(Exception):
        """What ASHA's stop does to a trial: it ends after the report it was judged on."""

    reports: dict[str, list] = {"full": [], "cut": []}
    for trial_id in reports:
        config = searcher.suggest(trial_id)

        def emit(metrics, trial_id=trial_id):
            result = {**metrics, "training_iteration": metrics["folds_done"]}
            reports[trial_id].append(result)
            searcher.on_trial_result(trial_id, result)
            if trial_id == "cut":
                raise Stopped
        try:
            fit_trial(emit, config, data)
        except Stopped:
            pass
        searcher.on_trial_complete(trial_id, result=reports[trial_id][-1])

    full, cut = searcher.study.trials
    assert [r["folds_done"] for r in reports["full"]] == [1, 2, 3] and reports["full"][-1]["final"] == 1
    assert full.state == TrialState.COMPLETE
    # one epoch per fold here, so the score is the plain mean of the three folds' own scores
    assert full.value == reports["full"][-1]["best_val_acc"] == pytest.approx(
        np.mean([r["fold_val_acc"] for r in reports["full"]]))
    assert set(full.intermediate_values) == {1, 2, 3}
    assert len(reports["cut"]) == 1 and "final" not in reports["cut"][0]
    assert cut.state == TrialState.PRUNED and cut.intermediate_values == {1: reports["cut"][0]["best_val_acc"]}


def test_a_node_that_cannot_read_the_dataset_says_which_node_and_what(tmp_path, monkeypatch):
    import socket

    from mmsa.config import Config
    from mmsa.errors import DataError
    from search.trainable import NODE_CACHE_ENV, TrialData
    monkeypatch.setenv(NODE_CACHE_ENV, str(tmp_path / "node-cache"))
    base = {**Config().to_flat(), "data_dir": str(tmp_path / "not-on-this-node")}
    data = TrialData(guids=["1"], text_dir="/driver/cache/text-minilm-x", image_dir="/driver/cache/image-y",
                     folds=[], base=base, threads=1)
    with pytest.raises(DataError, match=f"node {socket.gethostname()}: .*not-on-this-node") as e:
        data.features()
    assert "\n" not in str(e.value)
