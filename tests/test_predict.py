"""The final model as an MLflow model: registered, predicted from without training, served."""

import json
import os
import subprocess
import sys

import pytest

from tests.search_helpers import ROOT

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


@pytest.fixture
def image_root(tmp_path, subset_dir):
    """An image root holding one real image; beside it a secret, a link out, a FIFO; and the file
    of an audit hook (sitecustomize) that logs every file a Python process opens."""
    root = tmp_path / "root"
    root.mkdir()
    image = next((subset_dir / "data").glob("*.jpg"))
    (root / "ok.jpg").write_bytes(image.read_bytes())
    (tmp_path / "secret.jpg").write_bytes(image.read_bytes())
    (root / "escape.jpg").symlink_to(tmp_path / "secret.jpg")
    os.mkfifo(root / "fifo.jpg")
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import os, sys\n"
        "_log = os.environ.get('OPEN_LOG')\n"
        "def _hook(event, args):\n"
        "    if _log and event == 'open' and isinstance(args[0], (str, bytes, os.PathLike)):\n"
        "        with open(_log, 'a') as f:\n"
        "            f.write(os.fsdecode(args[0]) + '\\n')\n"
        "if _log:\n"
        "    sys.addaudithook(_hook)\n")
    return root, tmp_path / "secret.jpg", hook


def test_the_served_model_refuses_hostile_requests_and_keeps_serving(registered, subset_dir, image_root, tmp_path):
    """Server-side paths, .., a link out of the root, devices, a FIFO, huge inputs, a decompression
    bomb, wrong columns, an empty frame, nulls, numbers as text: each answered at once, clearly;
    a good request answered after each; no file outside the root opened (an audit hook logs them)."""
    import io

    from PIL import Image

    from bench.serve import ModelServer, request_body
    uri, final_file, _ = registered
    root, secret, hook = image_root
    open_log = tmp_path / "opened.txt"
    guids = [ln.split(",")[0] for ln in final_file.read_text().split()[1:]][:1]
    from mmsa.app.pyfunc import input_example
    good = input_example(str(subset_dir), guids).to_dict("records")
    bomb = io.BytesIO()
    Image.new("1", (20000, 20000)).save(bomb, "PNG")
    hostile = [  # (what, rows or a raw body, the status, what the message says)
        ("a server path", [{"text": "x", "image_path": "/etc/passwd"}], 400, "not a file under"),
        ("..", [{"text": "x", "image_path": "../secret.jpg"}], 400, "not a file under"),
        ("a link out of the root", [{"text": "x", "image_path": "escape.jpg"}], 400, "not a file under"),
        ("/proc/self/environ", [{"text": "x", "image_path": "/proc/self/environ"}], 400, "not a file under"),
        ("/dev/zero", [{"text": "x", "image_path": "/dev/zero"}], 400, "not a file under"),
        ("a FIFO", [{"text": "x", "image_path": "fifo.jpg"}], 400, "not a file under"),
        ("a 5 MB text", [{"text": "y" * 5_000_000, "image": good[0]["image"]}], 200, ""),
        ("an 11 MB image", [{"text": "x", "image": b"\xff" * (11 * 2**20)}], 400, "over the limit"),
        ("a decompression bomb", [{"text": "x", "image": bomb.getvalue()}], 400, "pixels"),
        ("bytes that are no image", [{"text": "x", "image": b"GIF89a garbage"}], 200, ""),
        ("no text column", [{"image": good[0]["image"]}], 400, "text"),
        # MLflow drops columns its signature lacks (and logs it): the answer says no image was read
        ("an unknown column", [{"text": "x", "imgae": "y"}], 200, '"image_status": "none"'),
        ("a null image", [{"text": "x", "image": None}], 400, "image"),
        ("an empty frame", b'{"dataframe_split": {"columns": ["text"], "data": []}}', 400, ""),
        ("a null text, an empty image", [{"text": None, "image": b""}], 200, '"image_status": "none"'),
        ("a number as text", b'{"dataframe_split": {"columns": ["text"], "data": [[12]]}}', 400, "text"),
        ("not JSON", b"{", 400, ""),
    ]
    server = ModelServer("models:/mmsa-test/1", uri, env={"MMSA_IMAGE_ROOT": str(root), "OPEN_LOG": str(open_log),
                                                          "PYTHONPATH": os.pathsep.join(
                                                              [str(hook), *filter(None, [os.environ.get("PYTHONPATH")])])})
    try:
        status, answer, _ = server.post(request_body([{"text": "x", "image_path": "ok.jpg"}]))
        assert status == 200 and answer["predictions"][0]["image_status"] == "read", answer
        for what, rows, want_status, says in hostile:
            body = rows if isinstance(rows, bytes) else request_body(rows)
            status, answer, seconds = server.post(body, timeout=60)
            assert status == want_status, (what, answer)
            assert says in json.dumps(answer), (what, answer)
            assert seconds < 30, (what, seconds)
            if what == "bytes that are no image":
                assert answer["predictions"][0]["image_status"] == "undecodable"
            status, answer, _ = server.post(request_body(good))
            assert status == 200, (f"after {what}", answer)
    finally:
        server.stop()
    opened = open_log.read_text().splitlines()
    assert any(p.endswith("ok.jpg") for p in opened)  # the hook saw the server open files
    for outside in (str(secret), "/etc/passwd", "/proc/self/environ", "/dev/zero"):
        assert outside not in opened
    assert not any(p.endswith(("fifo.jpg", "escape.jpg")) and not p.startswith(str(root)) for p in opened)


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
