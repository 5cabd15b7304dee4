"""The final model as an MLflow model: registered, predicted from without training, served."""

import json
import os
import subprocess
import sys
import time
import urllib.request

import pytest

from tests.search_helpers import ROOT, free_port

pytestmark = pytest.mark.slow  # a real search, a retrain and a model server


@pytest.fixture(scope="module")
def registered(smoke_search, subset_dir, subset_cache, tmp_path_factory):
    """final --register on the smoke search: (tracking uri, its predictions file, final's stdout)."""
    _, uri, parent_id, _ = smoke_search
    out_file = tmp_path_factory.mktemp("final") / "pred.txt"
    out = subprocess.run([sys.executable, "-m", "mmsa.final", "--run-id", parent_id, "--tracking-uri", uri,
                          "--out", str(out_file), "--seeds", "2", "--register", "mmsa-test"],
                         capture_output=True, text=True, timeout=400, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    return uri, out_file, out.stdout


def test_final_registers_the_model(registered):
    uri, _, stdout = registered
    assert "registered: models:/mmsa-test/1" in stdout
    from mlflow.tracking import MlflowClient
    version = MlflowClient(uri).get_model_version("mmsa-test", "1")
    assert version.run_id  # linked to the final run


def test_predict_gives_final_s_predictions_without_training(registered, subset_dir, subset_cache, tmp_path):
    uri, final_file, _ = registered
    out_file = tmp_path / "again.txt"
    out = subprocess.run([sys.executable, "-m", "mmsa.predict", "--model", "models:/mmsa-test/1", "--data",
                          str(subset_dir), "--out", str(out_file), "--tracking-uri", uri,
                          "--cache-dir", str(subset_cache)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == f"predictions={out_file}"
    assert "epoch" not in out.stdout  # nothing trained
    assert out_file.read_text() == final_file.read_text()


def test_predict_refuses_a_model_it_cannot_load(registered, subset_dir, tmp_path):
    uri, _, _ = registered
    out = subprocess.run([sys.executable, "-m", "mmsa.predict", "--model", "models:/no-such-model/1", "--data",
                          str(subset_dir), "--tracking-uri", uri], capture_output=True, text=True, timeout=120,
                         cwd=ROOT)
    assert out.returncode == 2 and out.stderr.strip().count("\n") == 0 and "no-such-model" in out.stderr


def test_the_pyfunc_model_predicts_raw_pairs_even_without_an_image_or_text(registered, subset_dir, tmp_path):
    import mlflow
    import pandas as pd
    uri, final_file, _ = registered
    mlflow.set_tracking_uri(uri)
    model = mlflow.pyfunc.load_model("models:/mmsa-test/1")
    guids = [ln.split(",")[0] for ln in final_file.read_text().split()[1:]]
    from mmsa.app.pyfunc import input_example
    df = input_example(str(subset_dir), guids[:3])
    df.loc[1, "image"] = str(tmp_path / "missing.jpg")
    df.loc[2, "text"] = ""
    out = model.predict(df)
    assert list(out.columns) == ["label", "p_positive", "p_neutral", "p_negative"] and len(out) == 3
    assert set(out["label"]) <= {"positive", "neutral", "negative"}
    assert out[["p_positive", "p_neutral", "p_negative"]].sum(axis=1).round(5).eq(1).all()
    first = [ln.split(",")[1] for ln in final_file.read_text().split()[1:]][0]
    assert out["label"][0] == first  # the untouched pair: final's prediction
    with pytest.raises(Exception, match="image"):
        model.predict(pd.DataFrame({"text": ["no image column"]}))


def test_mlflow_serves_the_registered_model(registered, subset_dir, tmp_path):
    uri, final_file, _ = registered
    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", "models:/mmsa-test/1",
                               "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                              start_new_session=True)
    try:
        deadline = time.time() + 180
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2):
                    break
            except OSError:
                if server.poll() is not None or time.time() > deadline:
                    raise AssertionError(server.stdout.read().decode()[-3000:]) from None
                time.sleep(1)
        from mmsa.app.pyfunc import input_example
        guids = [ln.split(",")[0] for ln in final_file.read_text().split()[1:]][:2]
        df = input_example(str(subset_dir), guids)
        body = json.dumps({"dataframe_split": {"columns": list(df.columns), "data": df.values.tolist()}}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as response:
            answer = json.loads(response.read())
        rows = answer["predictions"]
        expected = [ln.split(",")[1] for ln in final_file.read_text().split()[1:]][:2]
        assert [r["label"] for r in rows] == expected
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)
