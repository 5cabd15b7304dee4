"""A real two-node Ray cluster on this machine (loopback only): the search joins it with
--address, trials run on its nodes, and MLflow is written from the driver."""

import contextlib
import os
import secrets
import shutil
import subprocess
import sys
import tempfile

import pytest
from mlflow.tracking import MlflowClient

from mmsa.app.run_tags import TAG_NODE, TAG_SPACE, TAG_TRIAL
from tests.search_helpers import MlflowServer, ROOT, child_runs, free_port, run_search, write_space

pytestmark = pytest.mark.slow  # a two-node Ray cluster

# Every process of the cluster, the driver included, shares one token (Ray's token auth).
ENV = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16)}


def _ray(*args, env=None):
    return subprocess.run([shutil.which("ray") or "ray", *args], capture_output=True, text=True, timeout=180,
                          env=env or ENV)


@contextlib.contextmanager
def _cluster(worker_env: dict | None = None, head_env: dict | None = None, dashboard_port: int | None = None,
             folders: dict | None = None):
    """A head and a worker node, one CPU each; `worker_env` and `head_env` are each node's own
    environment; the head serves Ray's dashboard (the job API) on `dashboard_port` if given;
    `folders` gets each node's session folder ("head", "worker")."""
    if shutil.which("ray") is None:
        pytest.skip("the 'ray' command is not on PATH")
    port = free_port()  # the head's GCS port: never one assumed free (another cluster may hold it)
    temp = tempfile.mkdtemp(prefix="rc-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    dashboard = (["--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}"]
                 if dashboard_port else ["--include-dashboard=false"])
    head = _ray("start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1", "--num-cpus=1",
                *dashboard, "--disable-usage-stats", f"--temp-dir={temp}", env={**ENV, **(head_env or {})})
    assert head.returncode == 0, head.stderr[-2000:]
    # The worker node's own session folder, as on another machine: Ray unpacks a job's working dir
    # there and deletes it when that node is done with it.
    worker_temp = tempfile.mkdtemp(prefix="rw-", dir="/tmp")
    if folders is not None:
        folders.update(head=temp, worker=worker_temp)
    try:
        worker = _ray("start", f"--address=127.0.0.1:{port}", "--node-ip-address=127.0.0.1", "--num-cpus=1",
                      "--disable-usage-stats", f"--temp-dir={worker_temp}", env={**ENV, **(worker_env or {})})
        assert worker.returncode == 0, worker.stderr[-2000:]
        yield f"127.0.0.1:{port}"
    finally:
        _stop_cluster(port, temp, worker_temp)
        for folder in (temp, worker_temp):
            shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def two_node_cluster():
    with _cluster() as address:
        yield address


def _stop_cluster(port: int | None, *temps: str) -> None:
    """End this cluster's processes only (None: those of the nodes of these session folders).
    `ray stop` would end every Ray process of the machine, a user's own searches among them: pick
    ours by their session folder or GCS port instead."""
    import psutil
    ours = set()
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if any(temp in cmdline for temp in temps) or (port is not None and f"127.0.0.1:{port}" in cmdline):
            ours.add(proc)
            try:  # workers and agents rename themselves (ray::IDLE): found as children instead
                ours.update(proc.children(recursive=True))
            except psutil.NoSuchProcess:
                pass
    ours = list(ours)
    for proc in ours:
        try:
            proc.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(ours, timeout=15)
    for proc in alive:
        proc.kill()


def test_search_on_a_two_node_cluster(two_node_cluster, subset_dir, subset_cache, subset_prepared, tmp_path):
    nodes = subprocess.run([sys.executable, "-c", "import ray; ray.init(address='%s'); "
                            "print(sum(n['Alive'] for n in ray.nodes()))" % two_node_cluster],
                           capture_output=True, text=True, timeout=120, env=ENV)
    assert nodes.stdout.strip().splitlines()[-1] == "2", nodes.stderr[-2000:]
    _search_on_both_nodes(two_node_cluster, subset_dir, subset_cache, tmp_path)


def _search_on_both_nodes(address, subset_dir, subset_cache, tmp_path) -> None:
    """A 4-trial search joining the cluster: every trial recorded, and trials ran on both nodes."""
    space = write_space(tmp_path / "space.yaml", str(subset_dir), str(subset_cache), num_samples=4, max_epochs=1)
    out = run_search(space, tmp_path, "--address", address, env=ENV)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    parent_id = out.stdout.strip().splitlines()[-1].split("=", 1)[1]
    client = MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    children = child_runs(client, client.get_run(parent_id).info.experiment_id, parent_id)
    assert len(children) == 4 and all(c.info.status == "FINISHED" for c in children)
    used = {c.data.tags.get(TAG_NODE) for c in children}
    assert None not in used and len(used) == 2  # one CPU per node, two at a time: both nodes ran trials


def test_a_node_without_the_drivers_cache_receives_it_once(subset_dir, subset_cache, subset_prepared, tmp_path):
    """No shared disk for the cache: the worker node has its own cache folder ($MMSA_CACHE_DIR, empty);
    its trials receive the driver's cache there once, through Ray's object store (under a lock), the
    head's trials use the driver's."""
    node_cache = tmp_path / "worker-node-cache"
    with _cluster({"MMSA_CACHE_DIR": str(node_cache)}) as address:
        _search_on_both_nodes(address, subset_dir, subset_cache, tmp_path)
    assert_received(node_cache, subset_cache)


def assert_received(node_cache, driver_cache) -> None:
    """One text and one image cache, byte for byte the driver's (a cache built there would differ:
    its meta.json says when it was made)."""
    got = sorted(p.name for p in node_cache.iterdir() if not p.name.startswith("."))
    assert len(got) == 2 and {name.split("-")[0] for name in got} == {"text", "image"}
    for name in got:
        assert sorted(p.name for p in (node_cache / name).iterdir()) == sorted(
            p.name for p in (driver_cache / name).iterdir())
        assert (node_cache / name / "meta.json").read_bytes() == (driver_cache / name / "meta.json").read_bytes()


def test_a_search_submitted_with_ray_job_submit(subset_dir, subset_prepared, tmp_path):
    """The Ray user's way: `ray job submit --working-dir . -- python -m search.run ...`. The code
    travels with the job; no node shares a disk for the cache (each has its own $MMSA_CACHE_DIR,
    the driver builds it on the head, the worker node receives it);
    MLflow is a tracking server and Ray's state goes to a storage URI, both outside the job's
    temporary copy of the working dir."""
    pytest.importorskip("ray.dashboard.modules.job", reason="`ray job submit` needs ray[default]")
    head_cache, worker_cache = tmp_path / "head-cache", tmp_path / "worker-cache"
    # a relative cache_dir would land in the job's temporary copy: the node's own folder is used
    space = write_space(tmp_path / "space.yaml", str(subset_dir), ".cache/mmsa-features", num_samples=4,
                        max_epochs=1)
    server = MlflowServer(tmp_path / "tracking")
    server.start()
    dashboard = free_port()
    try:
        with _cluster({"MMSA_CACHE_DIR": str(worker_cache)}, {"MMSA_CACHE_DIR": str(head_cache)},
                      dashboard_port=dashboard):
            out = _job(dashboard, "submit", f"--working-dir={ROOT}", "--", "python", "-m", "search.run",
                       "--space", str(space), "--tracking-uri", server.uri, "--storage", f"file://{tmp_path}/state")
    finally:
        server.stop()
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert f"cache: {head_cache} ($MMSA_CACHE_DIR of this node), not the job's temporary copy" in out.stdout
    parent_id = out.stdout.split("parent_run_id=", 1)[1].split()[0]
    server.start()
    try:
        client = MlflowClient(server.uri)
        parent = client.get_run(parent_id)
        children = child_runs(client, parent.info.experiment_id, parent_id)
    finally:
        server.stop()
    assert parent.info.status == "FINISHED" and parent.data.params["address"] == "auto"
    assert len(children) == 4 and all(c.info.status == "FINISHED" for c in children)
    assert len({c.data.tags.get(TAG_NODE) for c in children}) == 2  # both nodes trained
    state = tmp_path / "state" / f"search-{parent_id[:12]}"
    assert any(p.name.startswith("experiment_state") for p in state.iterdir())  # Ray's state, under the URI
    assert_received(worker_cache, head_cache)  # the driver built its cache on the head; the worker received it


def _job(dashboard: int, command: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """`ray job COMMAND`. A head that has just started answers a submission with "please try again
    later" until its job agent is up (seconds, longer on a loaded machine): asked again, for 3 min."""
    import time
    deadline = time.monotonic() + 180
    while True:
        out = subprocess.run([shutil.which("ray"), "job", command, f"--address=http://127.0.0.1:{dashboard}", *args],
                             capture_output=True, text=True, timeout=timeout, env=ENV)
        if out.returncode == 0 or "try again later" not in out.stderr or time.monotonic() > deadline:
            return out
        time.sleep(2)


def test_a_submitted_search_stopped_with_ray_job_stop_resumes_from_an_edited_checkout(subset_dir, tmp_path):
    """`ray job stop`, then the same search submitted again with --resume from a checkout that
    changed meanwhile (so Ray unpacks it into another folder): the search is found by its space
    file's path inside the working dir, and ends with every trial recorded once."""
    pytest.importorskip("ray.dashboard.modules.job", reason="`ray job submit` needs ray[default]")
    import time
    checkout = tmp_path / "checkout"
    shutil.copytree(ROOT, checkout, ignore=shutil.ignore_patterns(
        ".git", ".cache", "mlruns", "ray_results", "*.egg-info", "__pycache__", ".*_cache", ".hypothesis"))
    server = MlflowServer(tmp_path / "tracking")
    server.start()
    dashboard = free_port()
    search = ["--", "python", "-m", "search.run", "--space", "spaces/smoke.yaml", "--data", str(subset_dir),
              "--num-samples", "40", "--set", "d_model=32", "--set", f"cache_dir={tmp_path / 'cache'}",
              "--tracking-uri", server.uri, "--storage", f"file://{tmp_path}/state"]
    try:
        with _cluster(dashboard_port=dashboard):
            first = _job(dashboard, "submit", "--submission-id=first", "--no-wait", f"--working-dir={checkout}",
                         *search)
            assert first.returncode == 0, first.stderr[-3000:]
            deadline, logs = time.time() + 300, ""
            while "completed " not in logs and "stopped early " not in logs and time.time() < deadline:
                time.sleep(2)
                logs = _job(dashboard, "logs", "first").stdout
                assert "error:" not in logs, logs[-3000:]
            assert "parent_run_id=" not in logs, "the search ended before it could be stopped"
            assert _job(dashboard, "stop", "first").returncode == 0
            (checkout / "EDITED").write_text("a change between the two submissions\n")
            second = _job(dashboard, "submit", "--submission-id=second", f"--working-dir={checkout}",
                          *search, "--resume")
        out = second.stdout + second.stderr
        client = MlflowClient(server.uri)
        searches = [(r.data.tags.get(TAG_SPACE), r.data.tags.get("mmsa.state"), r.info.status)
                    for r in client.search_runs(client.get_experiment_by_name("mmsa-search").experiment_id)
                    if r.data.tags.get(TAG_SPACE)]
        assert second.returncode == 0, f"{searches}\n{logs[-3000:]}\n{out[-3000:]}"
        parent_id = out.split("parent_run_id=", 1)[1].split()[0]
        assert f"resuming search {parent_id}" in out
        parent = client.get_run(parent_id)
        children = child_runs(client, parent.info.experiment_id, parent_id)
    finally:
        server.stop()
    assert parent.info.status == "FINISHED" and parent.data.tags[TAG_SPACE] == "ray-job:spaces/smoke.yaml"
    ended = [c for c in children if c.info.status == "FINISHED"]
    assert len({c.data.tags[TAG_TRIAL] for c in ended}) == len(ended) == 40


def test_a_node_lost_mid_search(subset_dir, subset_cache, subset_prepared, tmp_path):
    """The worker node killed (every process of it) while its trial trains: Ray retries that
    trial on the head node from its last epoch's checkpoint, the search completes, and each trial
    ends recorded once (the lost attempt as failed and retried)."""
    import time

    from mmsa.app.run_tags import TAG_ENDED
    from tests.search_helpers import search_cmd, wait_until
    space = write_space(tmp_path / "space.yaml", str(subset_dir), str(subset_cache), num_samples=2, cv_folds=2,
                        max_failures=2, scheduler={"type": "fifo", "rungs": "epochs", "max_epochs": 6})
    uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    folders: dict = {}
    with _cluster(folders=folders) as address:
        nodes = subprocess.run([sys.executable, "-c", "import ray; ray.init(address='%s'); "
                                "print('\\n'.join(n['NodeID'] + ' ' + n['ObjectStoreSocketName'] for n in ray.nodes()))"
                                % address], capture_output=True, text=True, timeout=120, env=ENV).stdout
        worker_node = next(line.split()[0] for line in nodes.splitlines() if folders["worker"] in line)
        proc = subprocess.Popen(search_cmd(space, tmp_path, "--address", address), cwd=ROOT, env=ENV,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        client = MlflowClient(uri)

        def trained_on_the_worker():
            runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])
                    if r.data.tags.get(TAG_NODE) == worker_node and r.info.status == "RUNNING"]
            return [r for r in runs if client.get_metric_history(r.info.run_id, "fold1_val_acc")]
        try:
            lost, = wait_until(trained_on_the_worker, 300, "a trial trained an epoch on the worker node", proc)
            _stop_cluster(None, folders["worker"])  # the node goes away, its trial process with it
            out = proc.communicate(timeout=900)[0]
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == 0, out[-4000:]
    parent_id = out.strip().splitlines()[-1].split("=", 1)[1]
    children = child_runs(client, client.get_run(parent_id).info.experiment_id, parent_id)
    finished = [c for c in children if c.info.status == "FINISHED"]
    assert len(finished) == len({c.data.tags[TAG_TRIAL] for c in finished}) == 2  # each trial once
    lost_trial = lost.data.tags[TAG_TRIAL]
    failed = [c for c in children if c.info.status == "FAILED"]
    assert [c.data.tags[TAG_TRIAL] for c in failed] == [lost_trial]
    assert failed[0].data.tags[TAG_ENDED] == "failed (retried)"
    resumed, = [c for c in finished if c.data.tags[TAG_TRIAL] == lost_trial]
    assert resumed.data.tags[TAG_NODE] != worker_node and resumed.data.metrics["resumed_after_epochs"] >= 1
    assert resumed.data.metrics["epochs_trained"] == 12  # both folds' whole schedules in its one record
