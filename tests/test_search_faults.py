"""Faults a long search meets, produced for real on this machine: a trial process killed from
outside, two searches on one new sqlite store at once, the tracking server away for a while."""

import os
import signal
import subprocess
import time

import psutil
import pytest
from mlflow.tracking import MlflowClient

from mmsa.app.run_tags import TAG_ENDED, TAG_ERROR, TAG_STATE, TAG_TRIAL
from search.recorder import KILLED
from tests.search_helpers import ROOT, TrialHold, child_runs, fault_env, search_cmd, wait_until, write_space

pytestmark = pytest.mark.slow  # real searches in subprocesses


def _long_trials_space(tmp_path, subset_dir, subset_cache, epochs: int, **extra):
    return write_space(tmp_path / "space.yaml", str(subset_dir), str(subset_cache), cv_folds=1,
                       max_epochs=epochs, scheduler={"type": "fifo", "max_epochs": epochs}, **extra)


def _trial_runs(uri: str) -> list:
    client = MlflowClient(uri)
    return [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])
            if r.data.tags.get(TAG_TRIAL)]


def test_a_trial_process_killed_from_outside_is_recorded_and_retried(subset_dir, subset_cache, subset_prepared,
                                                                     tmp_path):
    """SIGKILL to the trial's worker, as the kernel's out-of-memory killer sends it. The first
    trial is held alive (tests/trial_hooks) until it is recorded and killed: no race with its end."""
    space = _long_trials_space(tmp_path, subset_dir, subset_cache, epochs=20, num_samples=2, max_concurrent=1,
                               max_failures=1)
    hold = TrialHold(tmp_path / "hold", nth=1)
    proc = subprocess.Popen(search_cmd(space, tmp_path), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=hold.env())
    uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    try:
        worker = psutil.Process(hold.wait_held(proc))
        wait_until(lambda: _trial_runs(uri), 120, "the held trial is recorded in MLflow", proc)
        assert "ImplicitFunc" in " ".join(worker.cmdline())  # the Ray worker that runs the trial
        worker.send_signal(signal.SIGKILL)
    finally:
        hold.release()
    out = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, out[-3000:]
    assert f"trying again: {KILLED}" in out  # what the user sees when it happens
    client = MlflowClient(uri)
    parent_id = out.strip().splitlines()[-1].split("=", 1)[1]
    children = child_runs(client, client.get_run(parent_id).info.experiment_id, parent_id)
    failed = [c for c in children if c.info.status == "FAILED"]
    assert len(failed) == 1 and failed[0].data.tags[TAG_ENDED] == "failed (retried)"
    assert failed[0].data.tags[TAG_ERROR].splitlines()[0] == KILLED
    finished = [c for c in children if c.info.status == "FINISHED"]
    assert len(finished) == 2 and len({c.data.tags[TAG_TRIAL] for c in finished}) == 2  # each trial once
    assert failed[0].data.tags[TAG_TRIAL] in {c.data.tags[TAG_TRIAL] for c in finished}  # the retry finished


def test_two_searches_started_at_once_on_one_new_store_both_finish(subset_dir, subset_cache, subset_prepared,
                                                                   tmp_path):
    """Two users, one sqlite store that does not exist yet, two searches started together."""
    spaces = [write_space(tmp_path / f"space{i}.yaml", str(subset_dir), str(subset_cache), num_samples=3,
                          max_concurrent=1, cv_folds=2, max_epochs=1) for i in range(2)]
    procs = [subprocess.Popen(search_cmd(space, tmp_path), cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for space in spaces]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    client = MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    parents = [out.strip().splitlines()[-1].split("=", 1)[1] for out in outs]
    assert len(set(parents)) == 2
    for parent_id in parents:
        parent = client.get_run(parent_id)
        assert parent.data.tags[TAG_STATE] == "finished" and parent.info.status == "FINISHED"
        children = child_runs(client, parent.info.experiment_id, parent_id)
        assert len(children) == 3 and len({c.data.tags[TAG_TRIAL] for c in children}) == 3
        assert all(c.info.status == "FINISHED" for c in children)


@pytest.fixture
def mlflow_server(tmp_path):
    from tests.search_helpers import MlflowServer
    server = MlflowServer(tmp_path / "tracking")
    server.start()
    yield server
    server.stop()


def test_a_search_outlives_its_tracking_server_being_away(subset_dir, subset_cache, subset_prepared, tmp_path,
                                                          mlflow_server):
    """The tracking server stops mid-search for 40 s (longer than a write's retries), then comes
    back on the same store: the search goes on and every trial is recorded once."""
    space = _long_trials_space(tmp_path, subset_dir, subset_cache, epochs=15, num_samples=3, max_concurrent=1)
    cmd = search_cmd(space, tmp_path)
    cmd[cmd.index("--tracking-uri") + 1] = mlflow_server.uri
    hold = TrialHold(tmp_path / "hold", nth=1)  # the first trial waits, recorded, until the server is down
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=hold.env())
    try:
        hold.wait_held(proc)
        wait_until(lambda: _trial_runs(mlflow_server.uri), 120, "the held trial is recorded in MLflow", proc)
        mlflow_server.stop()
    finally:
        hold.release()
    time.sleep(40)  # the outage itself: longer than one write's retries
    mlflow_server.start()
    out = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, out[-3000:]
    assert "is not answering; the search goes on" in out
    assert "answers again after" in out
    client = MlflowClient(mlflow_server.uri)
    parent_id = out.strip().splitlines()[-1].split("=", 1)[1]
    parent = client.get_run(parent_id)
    assert parent.data.tags[TAG_STATE] == "finished"
    children = child_runs(client, parent.info.experiment_id, parent_id)
    assert len(children) == 3 and len({c.data.tags[TAG_TRIAL] for c in children}) == 3
    for child in children:
        assert child.info.status == "FINISHED" and child.data.tags[TAG_ENDED] == "completed"
        assert child.data.metrics["folds_done"] == 1 and "lr" in child.data.params
        assert len(client.get_metric_history(child.info.run_id, "fold1_val_acc")) == 15  # every epoch's point


def test_without_address_a_search_starts_its_own_ray_beside_a_dead_cluster(subset_dir, subset_cache,
                                                                           subset_prepared, tmp_path):
    """RAY_ADDRESS (like a stale /tmp/ray/ray_current_cluster) points at a cluster that is gone:
    a search without --address never tries to join it."""
    space = write_space(tmp_path / "space.yaml", str(subset_dir), str(subset_cache), num_samples=1, cv_folds=1,
                        max_epochs=1, scheduler={"type": "fifo", "max_epochs": 1})
    out = subprocess.run(search_cmd(space, tmp_path), cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "RAY_ADDRESS": "127.0.0.1:1"})
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1].startswith("parent_run_id=")


def _attempts(uri: str) -> list:
    """The trial runs, oldest first."""
    return sorted(_trial_runs(uri), key=lambda r: r.info.start_time)


def _steps(client, run, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run.info.run_id, key))


def test_a_trial_killed_mid_fold_goes_on_from_its_last_epoch(subset_dir, subset_cache, subset_prepared, tmp_path):
    """With rungs by epochs every epoch is a checkpoint: the trial process killed after epoch 2 of
    fold 1 (of 3); Ray's retry goes on from epoch 3, not from fold 1, and its run holds the whole curve."""
    space = write_space(tmp_path / "space.yaml", str(subset_dir), str(subset_cache), cv_folds=2, num_samples=1,
                        max_concurrent=1, max_failures=1, scheduler={"type": "fifo", "rungs": "epochs", "max_epochs": 3})
    out = subprocess.run(search_cmd(space, tmp_path), cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env=fault_env("kill-after-epoch", tmp_path / "faults", 2))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert f"trying again: {KILLED}" in out.stdout
    uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    client = MlflowClient(uri)
    killed, retried = _attempts(uri)
    assert killed.data.tags[TAG_ENDED] == "failed (retried)" and retried.data.tags[TAG_ENDED] == "completed"
    assert _steps(client, killed, "fold1_val_acc") == [1, 2]  # what it trained before it died
    assert retried.data.metrics["resumed_after_epochs"] == 2  # it went on from there ...
    assert _steps(client, retried, "fold1_val_acc") == [1, 2, 3] and _steps(client, retried, "fold2_val_acc") == [1, 2, 3]
    assert retried.data.metrics["epochs_trained"] == 6  # ... to the end of both folds


def _one_trial_meeting(fault: str, n: int, subset_dir, subset_cache, tmp_path):
    """A search of one trial (2 folds of 2 epochs) whose trial meets a fault n times: (its output, its run)."""
    space = write_space(tmp_path / "space.yaml", str(subset_dir), str(subset_cache), cv_folds=2, num_samples=1,
                        max_concurrent=1, scheduler={"type": "fifo", "max_epochs": 2})
    out = subprocess.run(search_cmd(space, tmp_path), cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env=fault_env(fault, tmp_path / "faults", n))
    run, = _trial_runs(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    return out, run


def test_a_cuda_out_of_memory_is_retried_once_at_half_the_micro_batch(subset_dir, subset_cache, subset_prepared,
                                                                      tmp_path):
    out, run = _one_trial_meeting("oom", 1, subset_dir, subset_cache, tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "CUDA out of memory at micro-batch 16: trying again from the last finished epoch at micro-batch 8" in \
        out.stdout + out.stderr
    assert run.data.tags[TAG_ENDED] == "completed"
    assert run.data.metrics["oom_retries"] == 1 and run.data.metrics["micro_batch"] == 8  # recorded on its run


def test_a_second_cuda_out_of_memory_fails_the_trial_naming_the_fix(subset_dir, subset_cache, subset_prepared,
                                                                    tmp_path):
    out, run = _one_trial_meeting("oom", 2, subset_dir, subset_cache, tmp_path)
    assert run.data.tags[TAG_ENDED] == "failed"
    error = run.data.tags[TAG_ERROR].splitlines()[0]
    assert "CUDA out of memory again at micro-batch 8" in error and "--dry-run" in error and "micro_batch" in error
    assert "no trial produced a score" in out.stdout
