"""What the feature cache buys: seconds per training epoch on the cache versus running the frozen
backbones per batch (same run, same config), the cache build time, a search's trials/minute, and
what a trial's report to Ray costs (`--reports`: the same trials reporting after every epoch, then
only at their folds' ends).

    python -m bench.search_cost --data ../shared/mvsa [--run-id SEARCH_PARENT] [--build] [--reports]
"""

from __future__ import annotations

import argparse
import math
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import command_line, table, write_result
from mmsa.config import Config
from mmsa.features.encoders import build_image_encoder, build_text_encoder
from mmsa.features.featurize import ImageFeaturizer, TextFeaturizer
from mmsa.features.prepare import prepare
from mmsa.models.factory import create_model
from mmsa.training.fit import fit


def per_batch_backbone_seconds(cfg: Config, data, batches: int) -> float:
    """One training step where the frozen backbones make the batch's features (decode and
    preprocess its images, clean, tokenize and score its texts, both forwards: the cache's own
    featurizers) before the head's forward/backward: mean seconds per step."""
    device = torch.device("cpu")
    text = TextFeaturizer(cfg.data, build_text_encoder(cfg.data.text_encoder))
    image = ImageFeaturizer(cfg.data, build_image_encoder(cfg.data.image_encoder))
    examples = {ex.guid: ex for ex in data.dataset.train}
    model = create_model(cfg.with_features(data.features))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr)
    bs = cfg.train.batch_size
    times = []
    for b in range(batches + 1):  # the first step warms up and is not counted
        guids = data.train.guids[b * bs:(b + 1) * bs]
        start = time.perf_counter()
        exs = [examples[g] for g in guids]
        pixels = torch.stack([image.pixels_of_file(ex.image_path)[0] for ex in exs])
        raw = [ex.text for ex in exs]
        hidden, mask = text.encode(text.clean(raw), [0], device)
        logits = model(torch.from_numpy(hidden[0]).float(), torch.from_numpy(mask),
                       torch.from_numpy(image.encode(pixels, device)).float(), torch.from_numpy(text.lexicon(raw)))
        loss = torch.nn.functional.cross_entropy(logits, torch.as_tensor(data.train.labels[b * bs:(b + 1) * bs]))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if b:
            times.append(time.perf_counter() - start)
    return float(np.mean(times))


REPORT_SPACE = """\
metric: val_acc
num_samples: {trials}
max_concurrent: 1
resources: {{cpu: 1, gpu: 0}}
seed: 0
cv_folds: 2
scheduler: {{type: fifo, max_epochs: {epochs}, rungs: {rungs}}}
searcher: {{type: random}}
fixed: {{head: mlp, d_model: 32, batch_size: 32, lr: 1.0e-3}}
params:
  dropout: {{type: uniform, low: 0.0, high: 0.5}}
"""


def report_seconds(data: str, trials: int = 3, epochs: int = 15) -> list[list[str]]:
    """Seconds a report costs a trial: the same short trials (2 folds of `epochs` cheap epochs,
    one at a time, each fold well under the 30 s after which fold-rung trials report mid-fold)
    searched with rungs: epochs (a report after every epoch) and rungs: folds (one per fold);
    the difference in their mean wall time over the difference in reports."""
    import subprocess
    import sys

    from mlflow.tracking import MlflowClient
    wall = {}
    with tempfile.TemporaryDirectory(prefix="mmsa-report-cost-") as tmp:
        uri = f"sqlite:///{tmp}/mlflow.db"
        for rungs in ("epochs", "folds"):
            space = Path(tmp) / f"{rungs}.yaml"
            space.write_text(REPORT_SPACE.format(trials=trials, epochs=epochs, rungs=rungs))
            out = subprocess.run([sys.executable, "-m", "search.run", "--space", str(space), "--data", data,
                                  "--tracking-uri", uri, "--storage", f"{tmp}/ray"],
                                 capture_output=True, text=True)
            if out.returncode:
                raise SystemExit(f"bench.search_cost: the {rungs} search failed:\n{out.stderr[-3000:]}")
            parent = out.stdout.strip().splitlines()[-1].split("=", 1)[1]
            client = MlflowClient(uri)
            runs = client.search_runs([client.get_run(parent).info.experiment_id],
                                      f"tags.mlflow.parentRunId = '{parent}'")
            wall[rungs] = [(r.info.end_time - r.info.start_time) / 1000 for r in runs]
    reports = {"epochs": 2 * epochs, "folds": 2}
    cost = (np.mean(wall["epochs"]) - np.mean(wall["folds"])) / (reports["epochs"] - reports["folds"])
    return [[f"trial wall, rungs: {r} ({reports[r]} reports; {len(wall[r])} trials, 2 folds x {epochs} epochs, "
             f"head mlp)", f"{np.mean(wall[r]):.1f} s (each: {', '.join(f'{w:.1f}' for w in wall[r])})"]
            for r in ("epochs", "folds")] + [["one report (the difference over the extra reports)", f"{cost:.2f} s"]]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.search_cost", description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--batches", type=int, default=8, help="backbone-per-batch steps to time")
    p.add_argument("--build", action="store_true", help="also time a cache build from scratch (about 3 min)")
    p.add_argument("--run-id", help="a finished search's parent run, for trials per minute")
    p.add_argument("--tracking-uri", default="sqlite:///mlruns/mlflow.db")
    p.add_argument("--reports", action="store_true", help="also time a trial's report to Ray (two small searches, "
                                                          "about 4 min)")
    p.add_argument("--out", default="search_cost", help="the result's name: bench/results/OUT.md")
    args = p.parse_args(argv)

    cfg = Config.from_flat({"data_dir": args.data}, source="--data")
    rows = []
    if args.build:
        tmp = Path(tempfile.mkdtemp(prefix="mmsa-cache-"))
        try:
            build_cfg = Config.from_flat({"data_dir": args.data, "cache_dir": str(tmp)}, source="--data")
            start = time.perf_counter()
            prepare(build_cfg.data)
            rows.append(["cache build from scratch (both backbones, all pairs)", f"{time.perf_counter() - start:.0f} s"])
            size = sum(f.stat().st_size for f in tmp.rglob("*.npy"))
            rows.append(["cache size on disk", f"{size / 2**20:.0f} MiB"])
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    data = prepare(cfg.data)
    steps = math.ceil(len(data.train) / cfg.train.batch_size)
    cfg = cfg.with_train(max_epochs=1)
    cached = fit(cfg, data.features, data.train, data.val).metrics["epoch_seconds"]
    per_step = per_batch_backbone_seconds(cfg, data, args.batches)
    uncached = per_step * steps
    rows += [["epoch on the cache (default config, incl. validation)", f"{cached:.1f} s"],
             [f"epoch running the backbones per batch ({args.batches} steps timed x {steps} steps)", f"{uncached:.0f} s"],
             ["speed-up of the cache", f"{uncached / cached:.0f}x"]]
    if args.run_id:
        from mlflow.tracking import MlflowClient
        client = MlflowClient(args.tracking_uri)
        run = client.get_run(args.run_id)
        n = int(run.data.metrics.get("n_trials", 0))
        minutes = (run.info.end_time - run.info.start_time) / 60000
        rows.append([f"real search {args.run_id[:8]}: {n} trials in {minutes:.1f} min", f"{n / minutes:.1f} trials/min"])
    if args.reports:
        rows += report_seconds(args.data)
    body = table(["measure", "value"], rows)
    write_result(args.out, "Search cost: the feature cache", body, command_line("bench.search_cost", argv))


if __name__ == "__main__":
    main()
