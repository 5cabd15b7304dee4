"""Seconds per epoch of a fine-tuning trial: one fold's training part (4/5 of train.txt), the
text layers that train run over the cached hidden states entering them.

    python -m bench.finetune_speed --data ../shared/mvsa [--layers 2 6] [--epochs 1] [--out finetune_speed]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


from bench.common import command_line, table, write_result


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.finetune_speed", description=__doc__.splitlines()[0])
    p.add_argument("--data", default="../shared/mvsa")
    p.add_argument("--layers", type=int, nargs="+", default=[2, 6])
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--threads", type=int, default=1, help="torch threads (a trial has 1 CPU in the default space)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", default="finetune_speed")
    args = p.parse_args(argv)
    import numpy as np
    import torch

    from mmsa.config import Config, parse_overrides
    from mmsa.features.prepare import prepare
    from mmsa.data.splits import cv_splits
    from mmsa.training.fit import fit
    rows = []
    for layers in args.layers:
        cfg = Config.from_flat({"data_dir": args.data, "finetune": "last_k", "text_finetune_layers": layers,
                                "head": "mlp", "pooling": "mean", "max_epochs": 3, "stop_epoch": args.epochs,
                                "num_threads": args.threads, **parse_overrides(args.overrides)})
        t0 = time.time()
        data = prepare(cfg.data, val_fraction=0.0)
        ready = time.time() - t0
        train, val = cv_splits(data.train, 5, 0)[0]
        torch.manual_seed(0)
        result = fit(cfg, data.features, train, val)
        seconds = [h["epoch_seconds"] for h in result.history]
        lengths = data.features.text_mask[np.sort(train.rows)].sum(1)
        rows.append([layers, len(train), f"{np.mean(lengths):.1f} / {int(lengths.max())}",
                     f"{np.mean(seconds):.1f}", f"{result.history[-1]['val_acc']:.4f}", f"{ready:.0f}"])
        print(rows[-1], flush=True)
    body = table(["text layers trained", "training pairs", "tokens per text, mean / max", "s per epoch",
                  f"val_acc after {args.epochs} epoch(s) (fold 1)", "features ready (s)"], rows)
    write_result(args.out, "Seconds per epoch of a fine-tuning trial", body,
                 command_line("bench.finetune_speed", argv))


if __name__ == "__main__":
    main()
