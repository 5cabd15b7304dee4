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

from mmsa.run_tags import TAG_NODE, TAG_PROCESS
from search.tracking import child_runs
from tests.search_helpers import run_search, write_space

pytestmark = pytest.mark.slow  # a two-node Ray cluster

PORT = "6391"


# Every process of the cluster, the driver included, shares one token (Ray's token auth).
ENV = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16)}


def _ray(*args, env=None):
    return subprocess.run([shutil.which("ray") or "ray", *args], capture_output=True, text=True, timeout=180,
                          env=env or ENV)


@contextlib.contextmanager
def _cluster(worker_env: dict | None = None):
    """A head and a worker node, one CPU each; `worker_env` is the worker node's own environment."""
    if shutil.which("ray") is None:
        pytest.skip("the 'ray' command is not on PATH")
    temp = tempfile.mkdtemp(prefix="rc-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    head = _ray("start", "--head", f"--port={PORT}", "--node-ip-address=127.0.0.1", "--num-cpus=1",
                "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp}")
    assert head.returncode == 0, head.stderr[-2000:]
    try:
        worker = _ray("start", f"--address=127.0.0.1:{PORT}", "--node-ip-address=127.0.0.1", "--num-cpus=1",
                      "--disable-usage-stats", env={**ENV, **(worker_env or {})})
        assert worker.returncode == 0, worker.stderr[-2000:]
        yield f"127.0.0.1:{PORT}"
    finally:
        _stop_cluster(temp)
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture
def two_node_cluster():
    with _cluster() as address:
        yield address


def _stop_cluster(temp: str) -> None:
    """End this cluster's processes only. `ray stop` would end every Ray process of the machine,
    a user's own searches among them: pick ours by their session folder or GCS port instead."""
    import psutil
    ours = set()
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if temp in cmdline or f"127.0.0.1:{PORT}" in cmdline:
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
    # No fork server on a cluster (the driver's machine may run no trials): trials train in Ray's workers.
    assert {c.data.tags.get(TAG_PROCESS) for c in children} == {"ray worker"}


def test_a_node_without_the_drivers_cache_builds_its_own_once(subset_dir, subset_cache, subset_prepared, tmp_path):
    """No shared disk for the cache: the worker node has its own cache folder ($MMSA_CACHE_DIR, empty);
    its trials build the features there once (under a lock), the head's trials use the driver's."""
    node_cache = tmp_path / "worker-node-cache"
    with _cluster({"MMSA_CACHE_DIR": str(node_cache)}) as address:
        _search_on_both_nodes(address, subset_dir, subset_cache, tmp_path)
    built = sorted(p.name for p in node_cache.iterdir() if not p.name.startswith("."))
    driver = sorted(p.name for p in subset_cache.iterdir() if p.name.startswith(("text-", "image-"))
                    and p.name in built)
    assert len(built) == 2 and built == driver  # one text and one image cache, the driver's keys
    assert all((node_cache / name / "meta.json").exists() for name in built)
