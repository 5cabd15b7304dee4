"""Every benchmark, run as a user runs it (`python -m bench.NAME`) on a tiny subset, so that none
rots unseen: it ends well and writes its table with the command that made it. The numbers are
not checked (a few pairs and seconds measure nothing); bench/results/ holds the real runs."""

import os
import subprocess
import sys

import pytest

from tests.search_helpers import ROOT, write_space

pytestmark = pytest.mark.slow


@pytest.fixture
def bench(subset_cache, tmp_path):
    """run(module, *args) -> the text of the result file it wrote (in tmp_path, not bench/results)."""
    env = {**os.environ, "MMSA_CACHE_DIR": str(subset_cache), "MMSA_BENCH_RESULTS": str(tmp_path / "results")}

    def run(module: str, *args: str, out: str, timeout: int = 600) -> str:
        done = subprocess.run([sys.executable, "-m", f"bench.{module}", *args], capture_output=True, text=True,
                              timeout=timeout, cwd=ROOT, env=env)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        text = (tmp_path / "results" / f"{out}.md").read_text()
        assert f"Command: `python -m bench.{module} " in text and "|---" in text, text[:2000]
        return text
    return run


@pytest.fixture
def tiny_space(subset_dir, subset_cache, tmp_path):
    return write_space(tmp_path / "space.yaml", str(subset_dir), str(subset_cache), num_samples=2, max_epochs=1,
                       cv_folds=2)


def test_cv(bench, subset_dir, subset_prepared):
    text = bench("cv", "--data", str(subset_dir), "--folds", "2", "--workers", "1",
                 "--config", "tiny:max_epochs=1,d_model=16,heads=2,batch_size=16", "--out", "cv-tiny", out="cv-tiny")
    assert "linear probe" in text and "tiny (max_epochs=1" in text


def test_nested_cv(bench, subset_dir, tiny_space, tmp_path):
    text = bench("nested_cv", "--data", str(subset_dir), "--space", str(tiny_space), "--outer", "2",
                 "--work", str(tmp_path / "work"), "--final", "ensemble", "probe", "--warm-budget", "1m",
                 "--out", "nested-tiny", out="nested-tiny")
    assert "pipeline, final ensemble" in text and "pipeline, final probe" in text
    assert "warm-started minus pipeline (ensemble)" in text
    curve = bench("anytime", "--runs", f"1m={tmp_path / 'work'}", "--plot", str(tmp_path / "curve.png"),
                  "--out", "anytime-tiny", out="anytime-tiny")
    assert "The smallest budget within one standard error" in curve and (tmp_path / "curve.png").stat().st_size


def test_vs_stock(bench, subset_dir, tiny_space, tmp_path):
    text = bench("vs_stock", "--data", str(subset_dir), "--space", str(tiny_space), "--budgets", "1m", "--outer", "2",
                 "--only", "0", "--systems", "project", "stock_tune", "optuna", "--work", str(tmp_path / "work"),
                 "--out", "vs-tiny", out="vs-tiny", timeout=900)
    assert "stock_tune" in text or "stock Ray Tune" in text


def test_search_cost(bench, subset_dir, subset_prepared):
    text = bench("search_cost", "--data", str(subset_dir), "--batches", "1", "--reports", "--out", "cost-tiny",
                 out="cost-tiny", timeout=900)
    assert "speed-up of the cache" in text and "rungs: epochs (30 reports" in text and "one report" in text


def test_finetune_speed(bench, subset_dir, subset_prepared):
    text = bench("finetune_speed", "--data", str(subset_dir), "--layers", "1", "--epochs", "1",
                 "--set", "batch_size=16", "--out", "ft-tiny", out="ft-tiny")
    assert "text layers trained" in text


def test_memory(bench, subset_dir, tiny_space, subset_prepared):
    text = bench("memory", "--data", str(subset_dir), "--space", str(tiny_space), "--num-samples", "2",
                 "--out", "memory-tiny", out="memory-tiny")
    assert "2 concurrent trial(s)" in text


def test_cluster_cache(bench, subset_dir, tiny_space, subset_prepared):
    text = bench("cluster_cache", "--data", str(subset_dir), "--space", str(tiny_space), "--out", "cluster-tiny",
                 out="cluster-tiny", timeout=900)
    assert "shared disk" in text


def test_serve(bench, registered, subset_dir):
    uri, _, _ = registered
    text = bench("serve", "--model", "models:/mmsa-test/1", "--tracking-uri", uri, "--data", str(subset_dir),
                 "--requests", "3", "--out", "serve-tiny", out="serve-tiny")
    assert "single pair, p50 / p99" in text


def test_gpu_check_on_the_cpu(bench):
    """On a machine without a GPU the check runs its whole path (plan, trials in processes of their
    own, the injected out-of-memory retried) on the CPU, on synthetic pairs."""
    text = bench("gpu_check", "--cpu", "--pairs", "24", "--folds", "2", "--out", "gpu-tiny", out="gpu-tiny",
                 timeout=900)
    assert "out-of-memory injected" in text and "retried" in text


def test_fold_memory(bench, subset_dir):
    text = bench("fold_memory", "--data", str(subset_dir), "--pairs", "24", "--folds", "2", "--out", "folds-tiny",
                 out="folds-tiny", timeout=900)
    assert "over fold 1" in text


def test_loader(bench, subset_dir, tmp_path):
    text = bench("loader", "--data", str(subset_dir), "--images", "16", "--epoch-pairs", "16", "--cache-dir",
                 str(tmp_path / "pixels"), "--out", "loader-tiny", out="loader-tiny", timeout=900)
    assert "identical, bit for bit" in text


def test_image_build(bench, subset_dir):
    text = bench("image_build", "--data", str(subset_dir), "--images", "16", "--out", "image-tiny", out="image-tiny")
    assert "build from scratch" in text and "x its floor" in text


def test_checkpoint_storage(bench, subset_dir):
    text = bench("checkpoint_storage", "--data", str(subset_dir), "--pairs", "45", "--trials", "2",
                 "--concurrent", "1", "--out", "storage-tiny", out="storage-tiny", timeout=900)
    assert "storage: " in text


def test_notebook_time(bench, subset_dir):
    text = bench("notebook_time", "--data", str(subset_dir), "--out", "notebook-tiny", out="notebook-tiny", timeout=900)
    assert "features ready in" in text
