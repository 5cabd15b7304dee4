"""search/trainable.py: what a trial process does besides calling fit."""

import numpy as np
import pytest


def test_a_trial_cut_after_fold_1_is_pruned_in_the_optuna_study(subset_prepared):
    """A trial reports once per fold (the running mean over folds); one that ASHA stops after fold 1
    reaches TPE as PRUNED with that one intermediate value, one that runs every fold as COMPLETE
    with the mean over all folds."""
    from pathlib import Path

    from optuna.trial import TrialState

    from mmsa.config import Config
    from mmsa.features.prepare import cv_splits
    from search.searcher import make_searcher
    from search.space import Param, SearchSpec
    from search.trainable import TrialData, fit_trial

    data_cfg, p = subset_prepared
    spec = SearchSpec(path=Path("space.yaml"), cv_folds=3, n_startup_trials=2, max_epochs=1,
                      fixed={"d_model": 16, "heads": 2, "batch_size": 16},
                      params={"lr": Param("lr", "loguniform", 1e-4, 1e-2)})
    base = spec.base_config().to_flat() | {k: v for k, v in Config(data=data_cfg).to_flat().items()
                                           if k in vars(data_cfg)}
    f = p.features
    data = TrialData(guids=f.guids, text_dir=str(f.text_dir), image_dir=str(f.image_dir),
                     folds=cv_splits(p.train, 3, seed=0), base=base, threads=1)
    searcher = make_searcher(spec)

    class Stopped(Exception):
        """What ASHA's stop does to a trial: it ends after the report it was judged on."""

    reports: dict[str, list] = {"full": [], "cut": []}
    for trial_id in reports:
        config = searcher.suggest(trial_id)

        def emit(metrics, state, trial_id=trial_id):
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


def test_a_node_without_the_cache_and_nothing_offered_says_which_node_and_what(tmp_path, monkeypatch):
    import socket

    from mmsa.config import Config
    from mmsa.errors import DataError
    from search.trainable import NODE_CACHE_ENV, TrialData
    monkeypatch.setenv(NODE_CACHE_ENV, str(tmp_path / "node-cache"))
    data = TrialData(guids=["1"], text_dir="/driver/cache/text-minilm-x", image_dir="/driver/cache/image-y",
                     folds=[], base=Config().to_flat(), threads=1)
    with pytest.raises(DataError, match=f"node {socket.gethostname()}: .*node-cache: the search's feature cache "
                                        f"is not here") as e:
        data.features(Config().data)
    assert "\n" not in str(e.value)


def test_a_node_receives_the_offered_cache_into_its_own_folder_once(subset_prepared, tmp_path, monkeypatch):
    """What a node of a cluster without a shared disk does with the driver's offered files (the
    object store's get is the identity here; the real transfer runs in tests/test_search_cluster.py)."""
    import ray

    from search.trainable import NODE_CACHE_ENV, TrialData
    _, p = subset_prepared
    f = p.features
    offered = {}
    for folder in (f.text_dir, f.image_dir):
        for path in sorted(folder.iterdir()):
            offered[f"{folder.name}/{path.name}"] = np.fromfile(path, dtype=np.uint8)
    node = tmp_path / "node-cache"
    monkeypatch.setenv(NODE_CACHE_ENV, str(node))
    calls = []
    monkeypatch.setattr(ray, "get", lambda ref: (calls.append(1), ref)[1])
    data = TrialData(guids=f.guids, text_dir=str(f.text_dir), image_dir=str(f.image_dir), folds=[],
                     base={}, threads=1, cache_files=offered)
    from mmsa.config import DataConfig
    got = data.features(DataConfig())
    assert got.text_dir.parent == node and np.array_equal(got.text, f.text) and np.array_equal(got.image, f.image)
    assert sorted(p.name for p in node.iterdir()) == sorted([f.text_dir.name, f.image_dir.name])
    fetched = len(calls)
    data.features(DataConfig())  # a second trial on this node: nothing fetched again
    assert len(calls) == fetched == len(offered)


def test_full_finetuning_on_a_node_without_the_images_says_so_rather_than_train_on_blanks(tmp_path):
    import socket

    from mmsa.config import DataConfig
    from mmsa.data.dataset import Example
    from mmsa.errors import DataError
    from mmsa.features.rawsource import RawSource
    from search.trainable import TrialData
    raw = RawSource([Example("1", "a tweet", tmp_path / "not-here" / "1.jpg", 0)], DataConfig(finetune="full"))
    data = TrialData(guids=["1"], text_dir="", image_dir="", folds=[], base={}, threads=1, raw=raw)
    with pytest.raises(DataError, match=f"node {socket.gethostname()}: .*not-here: the dataset's images are not "
                                        f"here"):
        data.features(raw.cfg)
    (tmp_path / "not-here").mkdir()
    (tmp_path / "not-here" / "1.jpg").write_bytes(b"")
    assert data.features(raw.cfg) is raw
