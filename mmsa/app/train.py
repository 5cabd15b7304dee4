"""`python -m mmsa.train --data DIR [--set key=value ...]`: one training run with the defaults, for
debugging and ablations; prints per-epoch metrics; last line `metrics=<one-line JSON>`."""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time

from mmsa.app.commands import config_from_args, quiet_libraries
from mmsa.errors import ConfigError
from mmsa.features.featureset import FeatureSet
from mmsa.features.prepare import prepare
from mmsa.training.fit import fit, format_epoch


def main(argv: list[str] | None = None) -> int:
    quiet_libraries()
    p = argparse.ArgumentParser(prog="python -m mmsa.train", description="One training run on cached features.")
    p.add_argument("--data", help="dataset folder (default: data_dir of the config)")
    p.add_argument("--config", help="YAML file of flat config keys")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set modalities=text (repeatable)")
    args = p.parse_args(argv)
    cfg = config_from_args(args.data, args.overrides, args.config)
    t0 = time.perf_counter()
    data = prepare(cfg.data)
    if cfg.train.batch_size > len(data.train):
        raise ConfigError(f"--set: key 'batch_size' = {cfg.train.batch_size} is larger than the "
                          f"{len(data.train)} training examples")
    print(f"data: {len(data.train)} train, {len(data.val) if data.val else 0} val, {len(data.test)} test; "
          f"{data.dataset.report.summary()}", file=sys.stderr)
    if isinstance(data.features, FeatureSet):
        print(f"features ready in {time.perf_counter() - t0:.1f}s "
              f"(text {data.features.text.shape}, image {data.features.image.shape})", file=sys.stderr)
    else:
        print("finetune=full: no feature cache; batches are read from the files", file=sys.stderr)
    result = fit(cfg, data.features, data.train, data.val, on_epoch=lambda e, m: print(format_epoch(e, m), flush=True),
                 progress=cfg.data.finetune == "full")
    metrics = {k: v for k, v in result.metrics.items() if k != "epoch"}
    metrics["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    metrics["total_seconds"] = round(time.perf_counter() - t0, 1)
    print("metrics=" + json.dumps(metrics, separators=(",", ":")))
    return 0

