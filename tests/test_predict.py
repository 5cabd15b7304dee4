"""The final model as an MLflow model: registered, predicted from without training, served."""

import subprocess
import sys

import pytest

from tests.search_helpers import ROOT

pytestmark = pytest.mark.slow  # a real search, a retrain and a model server


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
    df.loc[1, "image"] = None
    df.loc[2, "text"] = ""
    out = model.predict(df)
    assert list(out.columns) == ["label", "p_positive", "p_neutral", "p_negative", "image_status"] and len(out) == 3
    assert list(out["image_status"]) == ["read", "none", "read"]
    assert set(out["label"]) <= {"positive", "neutral", "negative"}
    assert out[["p_positive", "p_neutral", "p_negative"]].sum(axis=1).round(5).eq(1).all()
    first = [ln.split(",")[1] for ln in final_file.read_text().split()[1:]][0]
    assert out["label"][0] == first  # the untouched pair: final's prediction
    with pytest.raises(Exception, match="MMSA_IMAGE_ROOT"):
        model.predict(pd.DataFrame({"text": ["a path, and no root set"], "image_path": ["/etc/passwd"]}))


def test_the_served_model_refuses_hostile_requests_and_keeps_serving(registered, subset_dir, tmp_path):
    """Server-side paths, .., a link out of the root, devices, a FIFO, huge inputs, a decompression
    bomb, wrong columns, an empty frame, nulls, numbers as text (bench/serve.py's cases): each
    answered at once, clearly; a good request answered after each; no file outside the root
    opened (an audit hook logs them)."""
    from bench.serve import ModelServer, hostile_requests, hostile_setup, opened_outside, request_body, run_hostile
    from mmsa.app.pyfunc import input_example
    uri, final_file, _ = registered
    guids = [ln.split(",")[0] for ln in final_file.read_text().split()[1:]][:1]
    good = input_example(str(subset_dir), guids).to_dict("records")
    setup = hostile_setup(tmp_path, good[0]["image"])
    server = ModelServer("models:/mmsa-test/1", uri, env=setup["env"])
    try:
        status, answer, _ = server.post(request_body([{"text": "x", "image_path": "ok.jpg"}]))
        assert status == 200 and answer["predictions"][0]["image_status"] == "read", answer
        rows = run_hostile(server, hostile_requests(good[0]["image"]), request_body(good))
    finally:
        server.stop()
    for r in rows:
        assert r["ok"], r
        assert r["seconds"] < 30 and r["alive"], r
    assert all(r["message"] for r in rows if r["status"] == 400)  # a refusal says why
    opened = setup["open_log"].read_text().splitlines()
    assert any(p.endswith("ok.jpg") for p in opened)  # the hook saw the server open files
    assert opened_outside(setup["open_log"], setup["root"]) == []


def test_mlflow_serves_the_registered_model(registered, subset_dir, tmp_path):
    from bench.serve import ModelServer, request_body
    from mmsa.app.pyfunc import input_example
    uri, final_file, _ = registered
    server = ModelServer("models:/mmsa-test/1", uri)
    try:
        guids = [ln.split(",")[0] for ln in final_file.read_text().split()[1:]][:2]
        status, answer, _ = server.post(request_body(input_example(str(subset_dir), guids).to_dict("records")))
        assert status == 200, answer
        expected = [ln.split(",")[1] for ln in final_file.read_text().split()[1:]][:2]
        assert [r["label"] for r in answer["predictions"]] == expected
    finally:
        server.stop()
