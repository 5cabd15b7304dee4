"""Peak host memory of each fold of one cross-validated trial of spaces/gpu.yaml on the CPU, with
the embedded backbones standing in for the hub's (both fine-tuned end to end, as on a GPU): what
a fold leaves behind for the next shows as a later fold's peak above the first's.

The trial runs as a search runs it (search.trainable.fit_trial, no Ray); the process's peak
resident memory (VmHWM) is reset at every fold's start (/proc/self/clear_refs) and read at its end.

    python -m bench.fold_memory --data ../shared/mvsa [--pairs 120] [--folds 3] [--epochs 1]
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace

from bench.common import ROOT, command_line, reset_peak_memory, resident_memory, table, write_result

MIB = 2 ** 20


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.fold_memory", description=__doc__.splitlines()[0])
    p.add_argument("--data", default="../shared/mvsa")
    p.add_argument("--pairs", type=int, default=120, help="labeled pairs the folds are cut from (default 120)")
    p.add_argument("--folds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=1, help="each fold's epochs (default 1)")
    p.add_argument("--out", default="fold_memory", help="the result's name: bench/results/OUT.md")
    args = p.parse_args(argv)

    import torch

    from mmsa.data.dataset import load_dataset
    from mmsa.data.splits import Split, cv_splits
    from mmsa.features.rawsource import RawSource
    from search.space import apply_flags, load_space
    from search.trainable import TrialData, fit_trial
    spec = load_space(ROOT / "spaces" / "gpu.yaml")
    spec = apply_flags(replace(spec, max_epochs=args.epochs, data_dir=args.data),
                       sets={"text_encoder": "minilm", "image_encoder": "efficientnet_lite0", "max_text_len": 32,
                             "device": "cpu", "batch_size": 16, "fusion_depth": 2})[0]
    base = spec.base_config()
    dataset = load_dataset(args.data)
    examples = dataset.train[:args.pairs]
    raw = RawSource(examples, base.data)
    folds = cv_splits(Split.of(raw, examples), args.folds, seed=0)
    threads = torch.get_num_threads()
    data = TrialData(guids=raw.guids, text_dir="", image_dir="", folds=folds, base=base.to_flat(), threads=threads,
                     raw=raw, every_epoch=True)
    sampled = {"lr": 3e-4, "backbone_lr_scale": 0.1, "pooling": "mean", "class_weights": "none", "dropout": 0.1,
               "augment": 0.0, "weight_decay": 0.01}
    peaks: list[int] = []
    reset_peak_memory()

    def emit(report, state) -> None:
        if report.fold_end:
            peaks.append(resident_memory(peak=True))
            print(f"fold {report.fold}: peak RSS {peaks[-1] / MIB:.0f} MiB", flush=True)
            reset_peak_memory()

    fit_trial(emit, sampled, data)
    rows = [[k, f"{peak / MIB:.0f}", f"{peak / peaks[0]:.3f}"] for k, peak in enumerate(peaks, 1)]
    body = table(["fold", "peak RSS MiB (reset at the fold's start)", "over fold 1"], rows)
    body += (f"\n\n{args.pairs} labeled pairs of {args.data}, {args.folds} folds of {args.epochs} epoch(s), "
             f"spaces/gpu.yaml with MiniLM + EfficientNet-Lite0 fine-tuned end to end (finetune=full, batch 16, "
             f"fusion depth 2, max_text_len 32), on the CPU with {threads} threads.")
    write_result(args.out, "Peak host memory per fold of one trial", body, command_line("bench.fold_memory", argv))
    worst = max(peaks[1:], default=peaks[0]) / peaks[0]
    print(f"fold1_mib={peaks[0] / MIB:.0f} worst_later_mib={max(peaks) / MIB:.0f} worst_over_fold1={worst:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
