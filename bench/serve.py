"""A served model measured like a service, against the backbones' own time on the same pairs.

    python -m bench.serve --model models:/mmsa-sentiment/1 --tracking-uri sqlite:///mlruns/mlflow.db
        [--data ../shared/mvsa] [--requests 60] [--paths] [--out serve]

Starts the real server (`mlflow models serve --env-manager local` on 127.0.0.1) and measures it
with a bounded client of its own (a fixed number of requests, each with a time limit): the first
request, single-pair latency p50 / p99, throughput with 1, 4 and 16 concurrent clients sending
single pairs, and a 32-pair request. In the same run, the floor: the model's two backbones
loaded once in this process, one forward pass of each alone on the same pairs (tokenized and
preprocessed beforehand), with as many threads as the server has, timed right after each served
request of the same pairs (the ratio is taken between neighbours in time). `--paths` sends each image as
a path on this machine instead of its bytes (what models logged before images travelled as bytes
read).

    python -m bench.serve --hostile --model ... --tracking-uri ... [--out serve_hostile]

sends instead the hostile requests (server-side paths, `..`, a link out of the image root,
devices, a FIFO, huge inputs, a decompression bomb, wrong columns, an empty frame, nulls, numbers
as text), each followed by a good request, and tables request, answer, time and whether the server
still answered; an audit hook in the server logs every file it opens, and the report lists those
outside the image root (tests/test_predict.py asserts the same cases).
"""

from __future__ import annotations

import argparse
import base64
import collections
import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path


import numpy as np

from bench.common import ROOT, command_line, table, write_result


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
        # Read and drop its output from now on: a full pipe would block the server.
        threading.Thread(target=collections.deque, args=(self.proc.stdout, 0), daemon=True).start()

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
        except ProcessLookupError:  # already gone
            pass
        except subprocess.TimeoutExpired:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def request_body(rows: list[dict]) -> bytes:
    """JSON of a request: `dataframe_split`, bytes as base64 (what MLflow decodes for a binary column)."""
    order = ["text", "image", "image_path"]  # any other column (a hostile request's) after them
    columns = sorted({k for r in rows for k in r}, key=lambda c: (order.index(c) if c in order else len(order), c))
    data = [[base64.b64encode(r[c]).decode() if isinstance(r.get(c), bytes) else r.get(c) for c in columns]
            for r in rows]
    return json.dumps({"dataframe_split": {"columns": columns, "data": data}}).encode()


# Logs every file a Python process opens (sys.addaudithook), when $OPEN_LOG names a file. The log
# is opened before the hook is installed and written with os.write, which raises no audit event:
# a hook that called open() would re-enter itself.
OPEN_HOOK = """import os, sys
_log = os.environ.get('OPEN_LOG')
if _log:
    _fd = os.open(_log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    def _hook(event, args):
        if event == 'open' and isinstance(args[0], (str, bytes, os.PathLike)):
            os.write(_fd, os.fsencode(args[0]) + b'\\n')
    sys.addaudithook(_hook)
"""


def hostile_setup(folder: Path, image: bytes) -> dict:
    """Under `folder`: an image root holding ok.jpg, a link out of it and a FIFO; beside the root
    a secret (secret.jpg); the audit hook. Returns the root, the server's env and its open log."""
    root = folder / "root"
    root.mkdir()
    (root / "ok.jpg").write_bytes(image)
    secret = folder / "secret.jpg"
    secret.write_bytes(image)
    (root / "escape.jpg").symlink_to(secret)
    os.mkfifo(root / "fifo.jpg")
    hook = folder / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(OPEN_HOOK)
    open_log = folder / "opened.txt"
    env = {"MMSA_IMAGE_ROOT": str(root), "OPEN_LOG": str(open_log),
           "PYTHONPATH": os.pathsep.join([str(hook), *filter(None, [os.environ.get("PYTHONPATH")])])}
    return {"root": root, "env": env, "open_log": open_log}


def hostile_requests(image: bytes) -> list[tuple[str, bytes, int, str]]:
    """(what, the request body, the status it must get, what its answer must say)."""
    import io

    from PIL import Image
    bomb = io.BytesIO()
    Image.new("1", (20000, 20000)).save(bomb, "PNG")  # 400 MP, 50 kB
    cases = [
        ("a server path", [{"text": "x", "image_path": "/etc/passwd"}], 400, "not a file under"),
        ("..", [{"text": "x", "image_path": "../secret.jpg"}], 400, "not a file under"),
        ("a link out of the root", [{"text": "x", "image_path": "escape.jpg"}], 400, "not a file under"),
        ("/proc/self/environ", [{"text": "x", "image_path": "/proc/self/environ"}], 400, "not a file under"),
        ("/dev/zero", [{"text": "x", "image_path": "/dev/zero"}], 400, "not a file under"),
        ("a FIFO", [{"text": "x", "image_path": "fifo.jpg"}], 400, "not a file under"),
        ("a 5 MB text", [{"text": "y" * 5_000_000, "image": image}], 200, ""),
        ("an 11 MB image", [{"text": "x", "image": b"\xff" * (11 * 2**20)}], 400, "over the limit"),
        ("a decompression bomb (400 MP PNG)", [{"text": "x", "image": bomb.getvalue()}], 400, "pixels"),
        ("bytes that are no image", [{"text": "x", "image": b"GIF89a garbage"}], 200, '"image_status": "undecodable"'),
        ("no text column", [{"image": image}], 400, "text"),
        # MLflow drops columns its signature lacks (and logs it): the answer says no image was read
        ("an unknown column", [{"text": "x", "imgae": "y"}], 200, '"image_status": "none"'),
        ("a null image", [{"text": "x", "image": None}], 400, "image"),
        ("an empty frame", b'{"dataframe_split": {"columns": ["text"], "data": []}}', 400, ""),
        ("a null text, an empty image", [{"text": None, "image": b""}], 200, '"image_status": "none"'),
        ("a number as text", b'{"dataframe_split": {"columns": ["text"], "data": [[12]]}}', 400, "text"),
        ("300 rows", [{"text": "x", "image": b""}] * 300, 400, "at most"),
        ("not JSON", b"{", 400, ""),
    ]
    return [(what, rows if isinstance(rows, bytes) else request_body(rows), status, says)
            for what, rows, status, says in cases]


def run_hostile(server: ModelServer, cases, good: bytes) -> list[dict]:
    """Each case posted, then the good request: what came back, in how long, and whether the
    server still answered 200."""
    out = []
    for what, body, want, says in cases:
        status, answer, seconds = server.post(body, timeout=60)
        after, _, _ = server.post(good)
        text = json.dumps(answer)
        message = answer.get("message") if isinstance(answer, dict) else None
        if message is None:  # a prediction: what it says about the image
            preds = answer.get("predictions") if isinstance(answer, dict) else None
            message = (f"predicted; image_status {preds[0].get('image_status')}" if preds else text[:120])
        message = " ".join(str(message).split())
        if ". Error: " in message:  # MLflow's wrapper echoes the request's rows first: keep what follows
            message = "(MLflow: 'Failed to predict data ...') " + message.split(". Error: ", 1)[1]
        out.append({"what": what, "status": status, "want": want, "ok": status == want and says in text,
                    "message": message[:200], "seconds": seconds, "alive": after == 200})
    return out


def opened_outside(open_log: Path, root: Path) -> list[str]:
    """The files the server opened that name the secret, a device, /proc or /etc, or lie behind
    the root's link and FIFO."""
    opened = open_log.read_text().splitlines() if open_log.exists() else []
    suspects = ("/etc/passwd", "/proc/self/environ", "/dev/zero", "secret.jpg")
    return [p for p in opened if p.endswith(suspects) or
            (p.endswith(("fifo.jpg", "escape.jpg")) and not p.startswith(str(root)))]


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
    return [Config.from_stored(e["config"]).data for e in ckpt["members"]]


class Floor:
    """The model's backbones loaded once in this process, with as many threads as the server has:
    `seconds(idx)` times their forward pass alone on those pairs (tokenized and preprocessed
    beforehand, through the served model's own featurizers); `seconds(idx, from_bytes=True)` times
    decoding, preprocessing and tokenizing too."""

    def __init__(self, model_uri: str, pairs: list[dict]):
        import torch

        from mmsa.features.resident import Backbones, backbone_key
        configs = {backbone_key(cfg): cfg for cfg in member_configs(model_uri)}
        self.backbones = [(Backbones(cfg, torch.device("cpu")), cfg) for cfg in configs.values()]
        self.pairs = pairs
        self.threads = torch.get_num_threads()
        self.seconds([0, 1])  # warm-up
        self.seconds(list(range(len(pairs))))  # the heap grown to a full batch's activations

    def seconds(self, idx: list[int], from_bytes: bool = False) -> float:
        import io

        import torch
        from PIL import Image

        from mmsa.features.featurize import CPU_IMAGE_BATCH, TextFeaturizer

        def inputs():
            images = [Image.open(io.BytesIO(self.pairs[i]["image"]) if isinstance(self.pairs[i]["image"], bytes)
                                 else self.pairs[i]["image"]) for i in idx]
            out = []
            for b, cfg in self.backbones:
                text = TextFeaturizer(cfg, b.text)
                out.append((text, text.tokenize(text.clean([self.pairs[i]["text"] for i in idx])),
                            torch.stack([b.image.pixels(img)[0] for img in images])))
            return out
        with torch.no_grad():
            ready = None if from_bytes else inputs()
            start = time.perf_counter()
            for (b, _), (text, tok, pixels) in zip(self.backbones, ready or inputs()):
                b.text(tok["input_ids"], tok["attention_mask"])
                b.image.encode(pixels, torch.device("cpu"), CPU_IMAGE_BATCH)
            return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.serve", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--tracking-uri", required=True)
    p.add_argument("--data", default="../shared/mvsa")
    p.add_argument("--requests", type=int, default=60, help="single-pair requests for the latency (default 60)")
    p.add_argument("--paths", action="store_true", help="send image paths, not bytes (models logged before)")
    p.add_argument("--hostile", action="store_true", help="send the hostile requests instead, and table the answers")
    p.add_argument("--out", default=None, help="the result's name in bench/results (default serve, serve_hostile)")
    args = p.parse_args(argv)
    os.environ["MLFLOW_TRACKING_URI"] = args.tracking_uri
    if args.hostile:
        return hostile_report(args, argv)
    args.out = args.out or "serve"
    from mmsa.features.featurize import CPU_IMAGE_BATCH
    pairs = test_pairs(args.data, 32, args.paths)
    rows = []
    # The floor is timed in turn with the server, pair for pair: this CPU's speed drifts by a third
    # between minutes, and a floor timed at another moment would move the ratio by as much.
    floor = Floor(args.model, pairs)
    server = ModelServer(args.model, args.tracking_uri)
    try:
        status, answer, first = server.post(request_body(pairs[:1]))
        assert status == 200, answer
        rows.append(["first request (1 pair)", f"{first * 1000:.0f} ms", "", ""])
        lat, lat_floor, lat_bytes = [], [], []
        for i in range(args.requests):
            status, answer, s = server.post(request_body([pairs[i % len(pairs)]]))
            assert status == 200, answer
            lat.append(s)
            lat_floor.append(floor.seconds([i % len(pairs)]))
            lat_bytes.append(floor.seconds([i % len(pairs)], from_bytes=True))
        p50, p99, one = np.percentile(lat, 50), np.percentile(lat, 99), float(np.median(lat_floor))
        one_bytes = float(np.median(lat_bytes))
        print(f"single pair: p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms (floor {one * 1000:.0f} ms)", flush=True)
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
        n = len(pairs)
        status, answer, first_batch = server.post(request_body(pairs))  # the server's heap grows to a batch's
        assert status == 200, answer
        batch, batch_floor, batch_bytes = [], [], []
        for _ in range(5):
            status, answer, s = server.post(request_body(pairs))
            assert status == 200, answer
            batch.append(s)
            batch_floor.append(floor.seconds(list(range(n))))
            batch_bytes.append(floor.seconds(list(range(n)), from_bytes=True))
            print(f"{n} pairs: served {s * 1000:.0f} ms, floor {batch_floor[-1] * 1000:.0f} ms "
                  f"({batch_bytes[-1] * 1000:.0f} ms from bytes)", flush=True)
        batch_s, floor_s, bytes_s = (float(np.median(x)) for x in (batch, batch_floor, batch_bytes))
        ratios = np.array(batch_floor) / np.array(batch)
    finally:
        server.stop()
    rows += [["single pair, p50 / p99", f"{p50 * 1000:.0f} / {p99 * 1000:.0f} ms",
              f"floor {one * 1000:.0f} ms: p50 {p50 / one:.2f}x it",
              f"{one_bytes * 1000:.0f} ms: p50 {p50 / one_bytes:.2f}x it"],
             *[[f"throughput, {c} concurrent client{'s' if c > 1 else ''} (single pairs)", f"{t:.1f} pairs/s",
                f"{failed} of {sent} requests failed (120 s timeout)" if failed else "", ""]
               for c, (t, failed, sent) in throughput.items()],
             [f"one request of {n} pairs (median of 5; the first, {first_batch * 1000:.0f} ms, not counted)",
              f"{batch_s * 1000:.0f} ms, {n / batch_s:.1f} pairs/s",
              f"floor {floor_s * 1000:.0f} ms, {n / floor_s:.1f} pairs/s: {floor_s / batch_s:.2f}x its rate "
              f"(each try: {', '.join(f'{r:.2f}' for r in ratios)})",
              f"{bytes_s * 1000:.0f} ms, {n / bytes_s:.1f} pairs/s: {bytes_s / batch_s:.2f}x its rate"]]
    body = table(["what", "served", "against the floor: the forward pass",
                  "against decoding, preprocessing and the forward pass"], rows)
    body += (f"\n\nThe floor: the model's backbones' forward pass alone on the same pairs, in this process with "
             f"{floor.threads} torch threads (tokenized and preprocessed beforehand; images {CPU_IMAGE_BATCH} at "
             f"a time, as the served model runs them), timed right after each served request of the same pairs: "
             f"single pair, median of {args.requests}; {n} pairs, median of 5. The last column times decoding the "
             f"images' bytes, preprocessing and tokenizing as well (the floor as the issue first measured it). "
             f"Images sent as {'paths' if args.paths else 'bytes (base64 in JSON)'}; test pairs of {args.data}.")
    write_result(args.out, "The served model, measured like a service", body,
                 command_line("bench.serve", argv))


def hostile_report(args, argv: list[str] | None) -> None:
    import tempfile
    pair = test_pairs(args.data, 1, paths=False)[0]
    with tempfile.TemporaryDirectory() as tmp:
        setup = hostile_setup(Path(tmp), pair["image"])
        good = request_body([pair])
        server = ModelServer(args.model, args.tracking_uri, env=setup["env"])
        try:
            rows = run_hostile(server, hostile_requests(pair["image"]), good)
        finally:
            server.stop()
        outside = opened_outside(setup["open_log"], setup["root"])
    body = table(["request", "answer", "message", "time", "a good request answered after"],
                 [[r["what"], f"{r['status']}" + ("" if r["ok"] else f" (expected {r['want']})"), r["message"],
                   f"{r['seconds'] * 1000:.0f} ms", "yes" if r["alive"] else "NO"] for r in rows])
    body += (f"\n\nFiles outside the image root opened by the server (an audit hook logged every file it "
             f"opened): {', '.join(outside) if outside else 'none'}. Each request was followed by a good one "
             f"(a test pair, its image as bytes); the server ran with $MMSA_IMAGE_ROOT set to a folder holding "
             f"one image, a link out of it and a FIFO.")
    write_result(args.out or "serve_hostile", "The served model against hostile requests", body,
                 command_line("bench.serve", argv))


if __name__ == "__main__":
    main()
