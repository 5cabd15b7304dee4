"""Cross-validated accuracy of configs against the linear probe on the same folds.

    python -m bench.cv --data ../shared/mvsa [--folds 5] [--repeats 2] [--workers 2]
        [--config NAME:key=value,key=value ...] [--out cv]

Each config (`default:` is the defaults; `mlp:head=mlp,lr=1e-3` sets keys) is scored as a search
trial is (mmsa.training.crossval: every fold trains the whole schedule, one epoch chosen on the mean over
folds), on `--repeats` K-fold partitions (split seeds 0, 1, ...); the probe runs on the same folds.
Differences against the probe are paired: the same folds for both.
"""

from __future__ import annotations

import argparse
import sys
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np

from bench.common import PAIRED_HEADER, command_line, paired_cells, table, write_result


def _job(args):
    name, overrides, data_dir, k, seed = args
    import torch
    torch.set_num_threads(1)
    from mmsa.config import Config, parse_overrides
    from mmsa.training.crossval import cross_validate
    from mmsa.features.prepare import prepare
    from mmsa.data.splits import cv_splits
    # whole schedules, as the search's trials train them (mmsa.training.crossval)
    cfg = Config.from_flat({"patience": 0, **parse_overrides(overrides), "data_dir": data_dir, "split_seed": seed},
                           source=f"--config {name}")
    data = prepare(cfg.data, val_fraction=0.0)
    start = time.time()
    summary = cross_validate(cfg, data.features, cv_splits(data.train, k, seed))
    return name, seed, summary, time.time() - start


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.cv", description=__doc__.splitlines()[0])
    p.add_argument("--data", default="../shared/mvsa")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--config", action="append", default=[], metavar="NAME:KEY=VALUE,...")
    p.add_argument("--out", default="cv", help="the result's name: bench/results/OUT.md")
    args = p.parse_args(argv)
    configs = [(c.partition(":")[0], [kv for kv in c.partition(":")[2].split(",") if kv]) for c in args.config or ["default:"]]

    from mmsa.config import DataConfig
    from mmsa.features.prepare import prepare
    from mmsa.data.splits import cv_splits
    from mmsa.models.probe import probe_cv
    data = prepare(DataConfig(data_dir=args.data), val_fraction=0.0)  # builds the cache once, here
    splits = {seed: cv_splits(data.train, args.folds, seed) for seed in range(args.repeats)}
    probe = {seed: probe_cv(data.features, splits[seed]) for seed in range(args.repeats)}
    jobs = [(name, overrides, args.data, args.folds, seed) for name, overrides in configs
            for seed in range(args.repeats)]
    results: dict[str, list] = {name: [] for name, _ in configs}
    with ProcessPoolExecutor(args.workers) as pool:
        for name, seed, summary, seconds in pool.map(_job, jobs):
            results[name].append((seed, summary, seconds))
            print(f"{name} seed {seed}: cv acc {summary['val_acc']:.4f} macro-F1 {summary['val_macro_f1']:.4f} "
                  f"(probe {probe[seed]['probe_val_acc']:.4f}) epoch {summary['best_epoch']}, {seconds:.0f}s",
                  flush=True)

    probe_acc = [a for s in range(args.repeats) for a in probe[s]["probe_fold_val_acc"]]
    probe_f1 = [a for s in range(args.repeats) for a in probe[s]["probe_fold_val_macro_f1"]]
    rows = [["linear probe", *paired_cells(probe_acc, probe_f1, probe_acc), "", ""]]
    for name, overrides in configs:
        runs = sorted(results[name], key=lambda r: r[0])
        # per fold at the config's chosen epoch: the same folds as the probe's, so paired
        accs = [a for _, s, _ in runs for a in s["fold_accs"]]
        f1s = [a for _, s, _ in runs for a in s["fold_macro_f1s"]]
        rows.append([f"{name} ({','.join(overrides) or 'defaults'})", *paired_cells(accs, f1s, probe_acc),
                     ",".join(str(s["best_epoch"]) for _, s, _ in runs), f"{np.mean([t for *_, t in runs]):.0f}"])
    body = table(["config", *PAIRED_HEADER, "chosen epoch per repeat", "seconds per CV"], rows)
    body += (f"\n\n{args.folds}-fold stratified CV over train.txt, {args.repeats} repeat(s) (split seeds "
             f"0..{args.repeats - 1}); the std is over all {args.folds * args.repeats} folds.")
    write_result(args.out, "Cross-validated accuracy against the linear probe", body, command_line("bench.cv", argv))


if __name__ == "__main__":
    main()
