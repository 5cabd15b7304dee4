"""A trial's checkpoint: where its cross-validation stands (mmsa.training.crossval.CVState),
written once per report, and deleted when the trial ends.

Ray Tune persists a reported checkpoint by copying its folder into the search's storage. A fully
fine-tuned trial's state is gigabytes (RoBERTa-base + ConvNeXt-T: weights and AdamW's two moments,
about 1.9 GB): saved to a temporary folder and copied, every report would write it twice, and Ray
never deletes the last checkpoint of a trial that ended. So, where the storage is a folder (a local
disk, NFS, a Drive mount), the state is written once, straight into
`<search folder>/trial-state/<trial id>/` (a new file, renamed into place when whole), Ray's
checkpoint names that file, and the trial's older file is removed once Ray holds the new name.
Elsewhere (s3://, gs://) the state goes into Ray's checkpoint, which Ray uploads. When a trial
ends (completed, or stopped by ASHA or the time budget) the driver deletes its state
(`delete_trial_state`); a failed trial's stays, for its retry and for --resume.

Saved without pickled objects: tensors, numbers, strings, lists and dicts, so that loading runs
torch's weights-only unpickler.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

STATE_FOLDER = "trial-state"  # beside Ray's own folders, in the search's storage folder
POINTER_FILE = "state.json"  # Ray's checkpoint where the state lies in STATE_FOLDER: its file name
CHECKPOINT_FILE = "cv_state.pt"  # Ray's checkpoint holding the state itself (remote storage)


def state_dir(ray_path: str) -> str | None:
    """Where the trials of the search stored at `ray_path` write their states; None where the
    storage is not a folder this machine writes to (a URI: s3://, gs://, ...)."""
    return None if "://" in ray_path else os.path.join(ray_path, STATE_FOLDER)


def _portable(value):
    """numpy arrays as tensors (the weights-only unpickler reads no numpy objects)."""
    import numpy as np
    import torch
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value))
    if isinstance(value, dict):
        return {k: _portable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_portable(v) for v in value]
    return value


def _arrays(value):
    """The inverse of _portable for a fold's metrics: tensors back to numpy arrays."""
    import torch
    if isinstance(value, torch.Tensor):
        return value.numpy()
    if isinstance(value, dict):
        return {k: _arrays(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_arrays(v) for v in value]
    return value


def _to_dict(state) -> dict:
    fit = None
    if state.fit is not None:
        fit = {**vars(state.fit), "history": _portable(state.fit.history), "best": _portable(state.fit.best)}
    return {"histories": _portable(state.histories), "fit": fit}


def _from_dict(saved: dict):
    from mmsa.training.crossval import CVState
    from mmsa.training.fit import FitState
    fit = saved["fit"]
    if fit is not None:
        fit = FitState(**{**fit, "history": _arrays(fit["history"]), "best": _arrays(fit["best"])})
    return CVState(_arrays(saved["histories"]), fit)


def save(state, path: str) -> None:
    """`state` (a CVState) to `path`, whole or not at all: written beside it, then renamed."""
    import torch
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        torch.save(_to_dict(state), tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load(path: str):
    import torch
    return _from_dict(torch.load(path, map_location="cpu", weights_only=True))


class TrialStates:
    """One trial's state files in the search's storage folder: each report's state written once,
    the older ones removed once Ray holds the newer one's name."""

    def __init__(self, root: str, trial_id: str):
        self.folder = Path(root) / trial_id

    def write(self, state) -> str:
        """`state` in this folder, named by the epochs it holds (each report's state holds more than
        the one before, also across a resume); returns its name."""
        self.folder.mkdir(parents=True, exist_ok=True)
        epochs = sum(len(h) for h in state.histories) + (state.fit.epoch if state.fit is not None else 0)
        name = f"state-{epochs:06d}.pt"
        save(state, str(self.folder / name))
        return name

    def keep_only(self, name: str) -> None:
        """Remove every state file but `name` (the one Ray's latest checkpoint names)."""
        for path in self.folder.glob("state-*.pt*"):
            if path.name != name:
                path.unlink(missing_ok=True)


def write_checkpoint(state, folder: str, states: TrialStates | None) -> str | None:
    """Ray's checkpoint folder for `state`: the name of its file among `states` (written there now),
    or, without `states`, the state itself. Returns the state file's name (None: in the folder)."""
    if states is None:
        save(state, os.path.join(folder, CHECKPOINT_FILE))
        return None
    name = states.write(state)
    Path(folder, POINTER_FILE).write_text(json.dumps({"state": name}))
    return name


def read_checkpoint(folder: str, states: TrialStates | None):
    """The CVState a Ray checkpoint folder holds or names."""
    pointer = Path(folder, POINTER_FILE)
    if pointer.exists():
        if states is None:
            raise FileNotFoundError(f"{folder}: names a state file, and this trial has no state folder")
        name = json.loads(pointer.read_text())["state"]
        return load(str(states.folder / name))
    return load(os.path.join(folder, CHECKPOINT_FILE))


def delete_trial_state(ray_path: str, trial_id: str, checkpoint=None) -> None:
    """A trial that ended: its state file(s), and Ray's latest checkpoint of it (`checkpoint`, a
    ray.tune.Checkpoint: on remote storage, the state itself) removed."""
    root = state_dir(ray_path)
    if root is not None:
        shutil.rmtree(os.path.join(root, trial_id), ignore_errors=True)
    if checkpoint is not None:
        try:
            checkpoint.filesystem.delete_dir(checkpoint.path)
        except (OSError, FileNotFoundError):
            pass  # gone already


def folder_size(path: str) -> int:
    """Bytes of the files under a local folder (0 where it does not exist)."""
    total = 0
    for base, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(base, name)).st_size
            except OSError:
                pass
    return total


def storage_line(ray_path: str) -> str:
    """What the search keeps in its storage folder: `storage: ...` of the search's summary."""
    root = state_dir(ray_path)
    if root is None:
        return f"storage: {ray_path} (remote: trials' checkpoints deleted as they ended; failed ones kept)"
    kept = sorted(p.name for p in Path(root).iterdir() if p.is_dir()) if os.path.isdir(root) else []
    states = f"the checkpoints of {len(kept)} trial(s) that failed or were cut off ({', '.join(kept)})" if kept \
        else "no trial checkpoint (each deleted as its trial ended)"
    return f"storage: {folder_size(ray_path) / 2**20:.1f} MiB kept in {ray_path}: {states}"
