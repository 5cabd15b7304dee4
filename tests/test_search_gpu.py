"""The GPU path, proven on this CPU with small models standing in for large ones: spaces/gpu.yaml
(both backbones fine-tuned end to end, ASHA over epochs, checkpoints every epoch) with the
embedded MiniLM and EfficientNet-Lite0, on a small course-layout folder named by a relative path,
as a user types it; then mmsa.final and mmsa.predict on it. And what the GPU path refuses."""

import os
import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient

from mmsa.app.run_tags import TAG_DEVICE, TAG_ENDED
from tests.search_helpers import child_runs
from tests.conftest import make_subset
from tests.search_helpers import ROOT

pytestmark = pytest.mark.slow  # searches that fine-tune both backbones, on a CPU
STAND_INS = ["--set", "text_encoder=minilm", "--set", "image_encoder=efficientnet_lite0", "--set", "max_text_len=32",
             "--gpus-per-trial", "0", "--cpus-per-trial", "1"]


def _run(cwd, *args, timeout=900):
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_the_gpu_space_searches_final_and_predicts_with_relative_paths(tmp_path):
    make_subset(tmp_path / "mini", per_class=20, n_test=8)
    search = _run(tmp_path, "search.run", "--space", str(ROOT / "spaces" / "gpu.yaml"), "--data", "mini",
                  *STAND_INS, "--set", "cache_dir=cache", "--num-samples", "2", "--max-concurrent", "1",
                  "--max-epochs", "1", "--tracking-uri", "sqlite:///mlruns/mlflow.db", "--storage", "ray_results")
    assert search.returncode == 0, search.stdout[-4000:] + search.stderr[-3000:]
    parent_id = search.stdout.strip().splitlines()[-1].split("=", 1)[1]
    assert "baseline: linear probe" in search.stdout and "ensemble: " in search.stdout  # the probe's partner too
    client = MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    trials = child_runs(client, client.get_run(parent_id).info.experiment_id, parent_id)
    completed = [t for t in trials if t.data.tags[TAG_ENDED] == "completed"]
    assert completed and all(t.data.metrics["folds_done"] == 5 for t in completed)
    assert all(t.data.tags[TAG_DEVICE] == "cpu" for t in trials)  # gpu: 0: no GPU, even where one is visible
    assert all(t.data.params["finetune"] == "full" for t in trials)
    # every trial ended (completed or stopped): no checkpoint of one is left, and the summary says so
    assert "no trial checkpoint (each deleted as its trial ended)" in search.stdout
    assert not list((tmp_path / "ray_results").glob("search-*/trial-state/*"))
    final = _run(tmp_path, "mmsa.final", "--run-id", parent_id, "--data", "mini", "--out", "pred.txt",
                 "--tracking-uri", "sqlite:///mlruns/mlflow.db", "--register", "gpu-standin")
    assert final.returncode == 0, final.stdout[-3000:] + final.stderr[-3000:]
    assert final.stdout.strip().splitlines()[-1] == "predictions=pred.txt"
    predict = _run(tmp_path, "mmsa.predict", "--model", "models:/gpu-standin/1", "--data", "mini", "--out", "again.txt",
                   "--tracking-uri", "sqlite:///mlruns/mlflow.db", "--cache-dir", "cache")
    assert predict.returncode == 0, predict.stdout[-3000:] + predict.stderr[-3000:]
    assert (tmp_path / "again.txt").read_text() == (tmp_path / "pred.txt").read_text()


def test_a_gpu_request_where_there_is_no_gpu_is_refused_before_anything_is_recorded(tmp_path):
    out = _run(tmp_path, "search.run", "--space", str(ROOT / "spaces" / "smoke.yaml"), "--gpus-per-trial", "1",
               "--tracking-uri", f"sqlite:///{tmp_path}/db/mlflow.db", timeout=300)
    assert out.returncode == 2 and out.stderr.strip().count("\n") == 0, out.stderr
    assert "resources.gpu 1 per trial (--gpus-per-trial): the Ray cluster has no GPU" in out.stderr
    assert not (tmp_path / "db").exists()
