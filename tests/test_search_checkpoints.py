"""search/checkpoints.py: a trial's state written once, named by Ray's checkpoint, read back
exactly with the weights-only unpickler, and deleted with the trial."""

import pickle

import numpy as np
import pytest
import torch

from search.checkpoints import (CHECKPOINT_FILE, POINTER_FILE, TrialStates, delete_trial_state, load,
                                read_checkpoint, state_dir, storage_line, write_checkpoint)


@pytest.fixture(scope="module")
def states(subset_prepared):
    """Where a 2-fold cross-validation stands after each of its epochs."""
    from mmsa.config import Config
    from mmsa.data.splits import cv_splits
    from mmsa.training.crossval import cv_epochs
    data_cfg, p = subset_prepared
    cfg = Config(data=data_cfg).updated({"max_epochs": 2, "batch_size": 16, "d_model": 16, "heads": 2, "patience": 0, "ema": 0.5})
    return [ev.state for ev in cv_epochs(cfg, p.features, cv_splits(p.train, 2, seed=0), keep_probs=True,
                                         keep_state=True)]


def _same(a, b) -> None:
    assert len(a.histories) == len(b.histories)
    for ha, hb in zip(a.histories, b.histories):
        for ma, mb in zip(ha, hb):
            assert ma.keys() == mb.keys()
            assert all(np.array_equal(ma[k], mb[k]) if isinstance(ma[k], np.ndarray) else ma[k] == mb[k] for k in ma)
    assert (a.fit is None) == (b.fit is None)
    if a.fit is not None:
        assert a.fit.epoch == b.fit.epoch and a.fit.rng == b.fit.rng and a.fit.scheduler == b.fit.scheduler
        assert all(torch.equal(a.fit.model[k], b.fit.model[k]) for k in a.fit.model)
        assert torch.equal(a.fit.torch_rng, b.fit.torch_rng)
        assert isinstance(b.fit.history[0]["probs"], np.ndarray)


def test_a_state_in_the_storage_folder_is_written_once_and_named_by_rays_checkpoint(states, tmp_path):
    trial = TrialStates(str(tmp_path / "trial-state"), "abc_00001")
    for number, state in enumerate(states[:2], 1):
        ray_folder = tmp_path / f"ray-{number}"
        ray_folder.mkdir()
        name = write_checkpoint(state, str(ray_folder), trial)
        assert sorted(p.name for p in ray_folder.iterdir()) == [POINTER_FILE]  # Ray copies a few bytes
        trial.keep_only(name)
        assert sorted(p.name for p in trial.folder.iterdir()) == [name]  # the older one gone
        _same(state, read_checkpoint(str(ray_folder), trial))


def test_on_remote_storage_rays_checkpoint_holds_the_state(states, tmp_path):
    for state in (states[1], states[2]):  # mid-fold, and between folds
        folder = tmp_path / str(id(state))
        folder.mkdir()
        assert write_checkpoint(state, str(folder), None) is None
        assert [p.name for p in folder.iterdir()] == [CHECKPOINT_FILE]
        _same(state, read_checkpoint(str(folder), None))


def test_a_checkpoint_holding_anything_but_tensors_and_plain_data_is_refused(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("ran",))
    path = tmp_path / "evil.pt"
    torch.save({"histories": [], "fit": Payload()}, path)
    with pytest.raises(pickle.UnpicklingError):
        load(str(path))


def test_a_trial_that_ended_leaves_nothing_and_the_summary_says_what_stays(states, tmp_path):
    ray_path = str(tmp_path / "search-1")
    for trial_id in ("ended_1", "failed_2"):
        TrialStates(state_dir(ray_path), trial_id).write(states[0])
    delete_trial_state(ray_path, "ended_1")
    line = storage_line(ray_path)
    assert line.startswith("storage: ") and "1 trial(s) that failed or were cut off (failed_2)" in line
    assert state_dir("s3://bucket/search-1") is None
    assert "remote" in storage_line("s3://bucket/search-1")
