"""A search started by `ray job submit` (simulated here by the variable Ray's job supervisor sets):
nothing it records may live in the job's temporary copy of --working-dir. The real submission
runs in tests/test_search_cluster.py."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from search.job import JOB_CONFIG_ENV, check_job_locations, job_cache_dir, job_working_dir, local_path
from mmsa.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
JOB_ENV = {JOB_CONFIG_ENV: json.dumps({"runtime_env": {"working_dir": "gcs://_ray_pkg_0123.zip"}})}


def test_a_job_is_recognised_by_its_working_dir(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(JOB_CONFIG_ENV, raising=False)
    assert job_working_dir() is None
    monkeypatch.setenv(JOB_CONFIG_ENV, json.dumps({"runtime_env": {}}))  # a job without --working-dir
    assert job_working_dir() is None
    monkeypatch.setenv(JOB_CONFIG_ENV, JOB_ENV[JOB_CONFIG_ENV])
    assert job_working_dir() == tmp_path.resolve()


@pytest.mark.parametrize("uri, path", [
    ("sqlite:///mlruns/mlflow.db", "mlruns/mlflow.db"), ("sqlite:////abs/mlflow.db", "/abs/mlflow.db"),
    ("file:///abs/state", "/abs/state"), ("ray_results", "ray_results"),
    ("http://127.0.0.1:5000", None), ("s3://bucket/state", None), ("databricks", "databricks"),
])
def test_local_path_of_a_store(uri, path):
    assert local_path(uri) == (Path(path) if path else None)


def test_records_inside_the_job_are_refused_and_outside_accepted(monkeypatch, tmp_path):
    job = tmp_path / "job"
    (job / "data").mkdir(parents=True)
    monkeypatch.chdir(job)
    outside = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    check_job_locations(job, "http://127.0.0.1:5000", f"file://{tmp_path}/state", "data")  # all fine
    with pytest.raises(UserError, match=r"--tracking-uri sqlite:///mlruns/mlflow.db: this search runs as a Ray "
                                        r"job.*its records would go with it"):
        check_job_locations(job, "sqlite:///mlruns/mlflow.db", f"file://{tmp_path}/state", "data")
    with pytest.raises(UserError, match=r"--storage ray_results: .* the search's state would go with it"):
        check_job_locations(job, outside, "ray_results", "data")
    with pytest.raises(UserError, match=r"--storage file://.*/job/state"):
        check_job_locations(job, outside, f"file://{job}/state", "data")
    with pytest.raises(UserError, match=r"--data ../shared/mvsa: not in the job's copy"):
        check_job_locations(job, outside, "s3://bucket/x", "../shared/mvsa")


def test_the_cache_moves_to_the_nodes_folder_only_from_inside_the_job(tmp_path):
    job = tmp_path / "job"
    job.mkdir()
    assert job_cache_dir(job, str(job / ".cache/mmsa-features"), "/srv/cache") == "/srv/cache"
    assert job_cache_dir(job, str(job / ".cache/mmsa-features"), None) is None  # stays: rebuilt per job
    assert job_cache_dir(job, "/data/cache", "/srv/cache") is None  # given outside the job: kept


def test_a_job_with_the_default_tracking_store_stops_before_recording(tmp_path):
    job = tmp_path / "job"
    job.mkdir()
    out = subprocess.run([sys.executable, "-m", "search.run", "--space", str(ROOT / "spaces" / "smoke.yaml"),
                          "--data", str(tmp_path)], capture_output=True, text=True, timeout=120, cwd=job,
                         env={**os.environ, **JOB_ENV})
    assert out.returncode == 2 and out.stderr.strip().count("\n") == 0, out.stderr
    assert "--tracking-uri sqlite:///mlruns/mlflow.db: this search runs as a Ray job" in out.stderr
    assert not (job / "mlruns").exists()
