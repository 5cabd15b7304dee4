"""A served model measured like a service, against the backbones' own time on the same pairs.

    python bench/serve.py --model models:/mmsa-sentiment/1 --tracking-uri sqlite:///mlruns/mlflow.db
        [--data ../shared/mvsa] [--requests 60] [--paths] [--out serve]

Starts the real server (`mlflow models serve --env-manager local` on 127.0.0.1) and measures it
with a bounded client of its own (a fixed number of requests, each with a time limit): the first
request, single-pair latency p50 / p99, throughput with 1, 4 and 16 concurrent clients sending
single pairs, and a 32-pair request. In the same run, the floor: the model's two backbones
loaded once in this process, one forward pass of each alone on the same pairs (tokenized and
preprocessed beforehand), with as many threads as the server has. `--paths` sends each image as
a path on this machine instead of its bytes (what models logged before images travelled as bytes
read).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from bench.common import ROOT, table, write_result  # noqa: E402


class ModelServer:
    """`mlflow models serve` of `model` on 127.0.0.1, in its own process group."""

    def __init__(self, model: str, tracking_uri: str, env: dict | None = None, timeout: float = 300):
        import socket
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "models", "serve", "-m", model, "--env-manager", "local",
             "-h", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True,
            env={**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, **(env or {})})
        deadline = time.time() + timeout
        while not self.alive():
            if self.proc.poll() is not None or time.time() > deadline:
                self.stop()
                raise RuntimeError(f"the model server did not start:\n{self.proc.stdout.read().decode()[-3000:]}")
            time.sleep(1)

    def alive(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/ping", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def post(self, body: bytes, timeout: float = 120) -> tuple[int, dict, float]:
        """(HTTP status, the JSON answer, seconds)."""
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}/invocations", data=body,
                                         headers={"Content-Type": "application/json"})
        start = time.perf_counter()
        try:
            with urllib.request.urlopen(request, timeout=timeout) as r:
                status, raw = r.status, r.read()
        except urllib.error.HTTPError as e:
            status, raw = e.code, e.read()
        seconds = time.perf_counter() - start
        try:
            answer = json.loads(raw)
        except ValueError:
            answer = {"raw": raw[:500].decode(errors="replace")}
        return status, answer, seconds

    def stop(self) -> None:
        import signal
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(self.proc.pid, signal.SIGKILL)


def request_body(rows: list[dict]) -> bytes:
    """JSON of a request: `dataframe_split`, bytes as base64 (what MLflow decodes for a binary column)."""
    columns = sorted({k for r in rows for k in r}, key=["text", "image", "image_path"].index)
    data = [[base64.b64encode(r[c]).decode() if isinstance(r.get(c), bytes) else r.get(c) for c in columns]
            for r in rows]
    return json.dumps({"dataframe_split": {"columns": columns, "data": data}}).encode()


def test_pairs(data_dir: str, n: int, paths: bool) -> list[dict]:
    from mmsa.data.dataset import load_dataset
    examples = [ex for ex in load_dataset(data_dir).test if ex.has_image][:n]
    return [{"text": ex.text, "image": str(ex.image_path.resolve()) if paths else ex.image_path.read_bytes()}
            for ex in examples]


def member_configs(model_uri: str) -> list:
    """The data configs of the model's members, read from its checkpoint (the model's own code,
    which may be an older version of mmsa, is not loaded here)."""
    import mlflow
    import torch

    from mmsa.config import Config
    folder = Path(mlflow.artifacts.download_artifacts(model_uri)) / "artifacts"
    ckpt = torch.load(next(folder.iterdir()), map_location="cpu", weights_only=True)
    entries = ckpt.get("members") or [{"config": ckpt["config"]}]
    return [Config.from_stored(e["config"]).data for e in entries]


def floor(model_uri: str, pairs: list[dict], repeats: int) -> dict:
    """Seconds of the backbones' forward pass alone: one pair (median over pairs), 32 pairs."""
    import io

    import torch
    from PIL import Image

    from mmsa.data.images import to_rgb
    from mmsa.features.resident import Backbones, backbone_key
    configs = {backbone_key(cfg): cfg for cfg in member_configs(model_uri)}
    device = torch.device("cpu")
    backbones = [(Backbones(cfg, device), cfg) for cfg in configs.values()]
    images = [to_rgb(Image.open(io.BytesIO(p["image"]) if isinstance(p["image"], bytes) else p["image"]))
              for p in pairs]
    texts = [p["text"] for p in pairs]

    @torch.no_grad()
    def forward(idx: list[int]) -> float:
        inputs = []
        for b, cfg in backbones:  # tokenized and preprocessed beforehand: the forward pass alone is timed
            tok = b.text.tokenizer([texts[i] for i in idx], padding="longest", truncation=True,
                                   max_length=cfg.max_text_len, return_tensors="pt")
            inputs.append((tok, torch.stack([b.transform(images[i]) for i in idx])))
        start = time.perf_counter()
        for (b, _), (tok, pixels) in zip(backbones, inputs):
            b.text(tok["input_ids"], tok["attention_mask"])
            b.image(pixels)
        return time.perf_counter() - start
    forward([0, 1])  # warm-up
    one = [forward([i % len(pairs)]) for i in range(repeats)]
    batch = [forward(list(range(min(32, len(pairs))))) for _ in range(3)]
    return {"one": float(np.median(one)), "batch": float(np.median(batch)), "batch_pairs": min(32, len(pairs)),
            "threads": torch.get_num_threads()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--tracking-uri", required=True)
    p.add_argument("--data", default="../shared/mvsa")
    p.add_argument("--requests", type=int, default=60, help="single-pair requests for the latency (default 60)")
    p.add_argument("--paths", action="store_true", help="send image paths, not bytes (models logged before)")
    p.add_argument("--out", default="serve")
    args = p.parse_args()
    os.environ["MLFLOW_TRACKING_URI"] = args.tracking_uri
    pairs = test_pairs(args.data, 32, args.paths)
    rows = []
    server = ModelServer(args.model, args.tracking_uri)
    try:
        status, answer, first = server.post(request_body(pairs[:1]))
        assert status == 200, answer
        rows.append(["first request (1 pair)", f"{first * 1000:.0f} ms", ""])
        lat = []
        for i in range(args.requests):
            status, answer, s = server.post(request_body([pairs[i % len(pairs)]]))
            assert status == 200, answer
            lat.append(s)
        p50, p99 = np.percentile(lat, 50), np.percentile(lat, 99)
        print(f"single pair: p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms", flush=True)
        throughput = {}
        for clients in (1, 4, 16):
            per_client = max(2, 32 // clients)
            errors: list = []

            def client(k: int) -> None:
                for j in range(per_client):
                    try:
                        code, body, _ = server.post(request_body([pairs[(k * per_client + j) % len(pairs)]]))
                    except OSError as e:  # a timeout: counted, not served
                        code, body = 0, repr(e)
                    if code != 200:
                        errors.append(body)
            threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
            start = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            served = clients * per_client - len(errors)
            throughput[clients] = (served / (time.perf_counter() - start), len(errors), clients * per_client)
            print(f"{clients} clients: {throughput[clients][0]:.1f} pairs/s, {len(errors)} failed", flush=True)
        batch = []
        for _ in range(3):
            status, answer, s = server.post(request_body(pairs))
            assert status == 200, answer
            batch.append(s)
        batch_s = float(np.median(batch))
    finally:
        server.stop()
    f = floor(args.model, pairs, repeats=20)
    n = f["batch_pairs"]
    rows += [["single pair, p50 / p99", f"{p50 * 1000:.0f} / {p99 * 1000:.0f} ms",
              f"floor {f['one'] * 1000:.0f} ms: p50 {p50 / f['one']:.2f}x it"],
             *[[f"throughput, {c} concurrent client{'s' if c > 1 else ''} (single pairs)", f"{t:.1f} pairs/s",
                f"{failed} of {sent} requests failed (120 s timeout)" if failed else ""]
               for c, (t, failed, sent) in throughput.items()],
             [f"one request of {n} pairs", f"{batch_s * 1000:.0f} ms, {n / batch_s:.1f} pairs/s",
              f"floor {f['batch'] * 1000:.0f} ms, {n / f['batch']:.1f} pairs/s: {f['batch'] / batch_s:.2f}x its rate"]]
    body = table(["what", "served", "against the floor"], rows)
    body += (f"\n\nThe floor: the model's backbones' forward pass alone on the same pairs, in this process with "
             f"{f['threads']} torch threads (tokenized and preprocessed beforehand; single pair: median of 20). "
             f"Images sent as {'paths' if args.paths else 'bytes (base64 in JSON)'}; test pairs of {args.data}.")
    write_result(args.out, "The served model, measured like a service", body,
                 "python bench/serve.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
