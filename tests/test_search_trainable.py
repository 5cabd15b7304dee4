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
    from mmsa.data.splits import cv_splits
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

        def emit(report, state, trial_id=trial_id):
            reports[trial_id].append(report)
            searcher.on_trial_result(trial_id, {**report.to_result(), "training_iteration": report.folds_done})
            if trial_id == "cut":
                raise Stopped
        try:
            fit_trial(emit, config, data)
        except Stopped:
            pass
        searcher.on_trial_complete(trial_id, result=reports[trial_id][-1].to_result())

    full, cut = searcher.study.trials
    assert [r.folds_done for r in reports["full"]] == [1, 2, 3] and reports["full"][-1].all_folds
    assert full.state == TrialState.COMPLETE
    # one epoch per fold here, so the score is the plain mean of the three folds' own scores
    assert full.value == reports["full"][-1].scores["best_val_acc"] == pytest.approx(
        np.mean([r.scores["fold_val_acc"] for r in reports["full"]]))
    assert set(full.intermediate_values) == {1, 2, 3}
    assert len(reports["cut"]) == 1 and not reports["cut"][0].all_folds
    assert cut.state == TrialState.PRUNED and cut.intermediate_values == {1: reports["cut"][0].scores["best_val_acc"]}


def test_a_node_without_the_cache_and_nothing_offered_says_which_node_and_what(tmp_path, monkeypatch):
    import socket

    from mmsa.config import Config
    from mmsa.errors import DataError
    from mmsa.config import CACHE_DIR_ENV
    from search.trainable import TrialData
    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path / "node-cache"))
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

    from mmsa.config import CACHE_DIR_ENV
    from search.trainable import TrialData
    _, p = subset_prepared
    f = p.features
    offered = {}
    for folder in (f.text_dir, f.image_dir):
        for path in sorted(folder.iterdir()):
            offered[f"{folder.name}/{path.name}"] = np.fromfile(path, dtype=np.uint8)
    node = tmp_path / "node-cache"
    monkeypatch.setenv(CACHE_DIR_ENV, str(node))
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


def _trial_data(subset_prepared, folds=3):
    from mmsa.config import Config
    from mmsa.data.splits import cv_splits
    from search.trainable import TrialData
    data_cfg, p = subset_prepared
    base = Config(data=data_cfg).to_flat() | {"d_model": 16, "heads": 2, "batch_size": 16, "max_epochs": 1,
                                               "patience": 0}
    f = p.features
    return TrialData(guids=f.guids, text_dir=str(f.text_dir), image_dir=str(f.image_dir),
                     folds=cv_splits(p.train, folds, seed=0), base=base, threads=1)


def test_out_of_memory_is_retried_at_half_the_micro_batch_with_nothing_of_the_failed_fold_left(
        subset_prepared, monkeypatch, capsys):
    """cuBLAS failing to allocate is a plain RuntimeError, not torch's OutOfMemoryError: retried too,
    from the last finished fold, once the failed step's model is gone (its traceback held it)."""
    import weakref

    import mmsa.training.fit as fit_module
    from search.trainable import fit_trial
    data = _trial_data(subset_prepared)
    epochs, models = [], []
    train_epoch, build = fit_module._train_epoch, fit_module.create_model

    def failing_in_fold_2(member, train, epoch):
        epochs.append(member.micro)
        if len(epochs) == 2:
            raise RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`")
        return train_epoch(member, train, epoch)

    def tracked(cfg, *args, **kwargs):
        assert all(ref() is None for ref in models), "a model of an earlier fold or attempt is alive"
        model = build(cfg, *args, **kwargs)
        models.extend(weakref.ref(t) for t in model.parameters())
        return model
    monkeypatch.setattr(fit_module, "_train_epoch", failing_in_fold_2)
    monkeypatch.setattr(fit_module, "create_model", tracked)
    reports = []
    fit_trial(lambda report, state: reports.append(report), {"lr": 1e-3}, data)
    assert epochs == [16, 16, 8, 8]  # fold 1; fold 2 fails; fold 2 again and fold 3 at half the micro-batch
    assert [r.folds_done for r in reports] == [1, 2, 3] and reports[-1].all_folds
    assert reports[-1].retry.oom_retries == 1 and reports[-1].retry.micro_batch == 8
    assert reports[0].device == "cpu"  # where it trained, not `auto`
    assert "trying again from the last finished epoch at micro-batch 8" in capsys.readouterr().out


def test_other_errors_are_not_retried(subset_prepared, monkeypatch):
    import mmsa.training.fit as fit_module
    from search.trainable import fit_trial
    data = _trial_data(subset_prepared, folds=2)

    def broken(member, train, epoch):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")
    monkeypatch.setattr(fit_module, "_train_epoch", broken)
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        fit_trial(lambda report, state: None, {"lr": 1e-3}, data)


def test_a_packed_trial_is_held_to_its_share_of_the_card(monkeypatch):
    import torch

    from search.gpu_memory import CUDA_CONTEXT, GIB
    from search.trainable import hold_to_share
    held = []

    class Props:
        total_memory = 16 * GIB
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: Props)
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda f, device: held.append((f, device)))
    hold_to_share(0.25)
    assert held == [((4 * GIB - CUDA_CONTEXT) / (16 * GIB), 0)]


def test_a_trial_past_the_time_budget_ends_with_the_epoch_it_is_in(subset_prepared):
    """Told the budget's deadline, a trial does not run to its fold's end: the epoch in training
    is its last, reported (its checkpoint and score: the folds it finished), and it ends cleanly."""
    import time
    from dataclasses import replace

    from search.trainable import fit_trial
    data = _trial_data(subset_prepared)
    data = replace(data, base={**data.base, "max_epochs": 3})
    reports = []
    fit_trial(lambda report, state: reports.append(report), {"lr": 1e-3}, data)
    assert [(r.fold, r.epoch) for r in reports][-1] == (3, 3) and reports[-1].all_folds  # no deadline: every fold
    reports.clear()
    fit_trial(lambda report, state: reports.append(report), {"lr": 1e-3}, replace(data, deadline=time.time() - 1))
    assert len(reports) == 1 and (reports[0].fold, reports[0].epoch, reports[0].fold_end) == (1, 1, False)
    assert not reports[0].all_folds and reports[0].folds_done == 0 and "best_val_acc" in reports[0].scores
