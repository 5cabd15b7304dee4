"""Helpers shared by the benchmarks (run as `python -m bench.NAME`): tables, scores, result files."""

from __future__ import annotations

import os
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
# Where result files go: bench/results, or elsewhere for a trial run (the tests' tiny invocations).
RESULTS = Path(os.environ.get("MMSA_BENCH_RESULTS") or ROOT / "bench" / "results")


def machine() -> str:
    import torch
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
            f"{'CUDA ' + torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU'}")


def resident_memory(peak: bool = False) -> int:
    """This process's resident memory in bytes (Linux /proc): now, or its peak since the last
    reset_peak_memory (VmHWM)."""
    field = "VmHWM:" if peak else "VmRSS:"
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field))


def reset_peak_memory() -> None:
    """Start this process's peak resident memory (VmHWM) afresh from what it holds now."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def table(header: list[str], rows: list[list]) -> str:
    cells = [header] + [[_fmt(c) for c in r] for r in rows]
    out = ["| " + " | ".join(cells[0]) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in cells[1:]]
    return "\n".join(out)


def _fmt(c) -> str:
    if isinstance(c, float):
        return f"{c:.4f}" if abs(c) < 10 else f"{c:.1f}"
    return str(c)


PAIRED_HEADER = ["CV accuracy (mean ± std over folds)", "macro-F1", "accuracy - probe, points (± s.e.)"]


def paired_cells(accs, f1s, probe_accs) -> list[str]:
    """Cells under PAIRED_HEADER: accuracy and macro-F1 over folds, and the accuracy's paired
    difference from the probe on the same folds, in points, with its standard error."""
    d = (np.asarray(accs, dtype=float) - np.asarray(probe_accs, dtype=float)) * 100
    return [mean_std(accs), mean_std(f1s), f"{d.mean():+.2f} ± {d.std(ddof=1) / np.sqrt(len(d)):.2f}"]


def mean_std(values) -> str:
    values = np.asarray(values, dtype=float)
    return f"{values.mean():.4f} ± {values.std(ddof=1) if len(values) > 1 else 0:.4f}"


def mean_se(values) -> str:
    """Mean ± its standard error (one value: the value alone)."""
    values = np.asarray(values, dtype=float)
    if len(values) < 2:
        return f"{values.mean():.4f}"
    return f"{values.mean():.4f} ± {values.std(ddof=1) / np.sqrt(len(values)):.4f}"


def scores(labels, preds) -> dict[str, float]:
    """Accuracy and macro-F1 over the three classes: the one way the benchmarks score predictions."""
    from sklearn.metrics import accuracy_score, f1_score
    return {"acc": float(accuracy_score(labels, preds)),
            "macro_f1": float(f1_score(labels, preds, labels=[0, 1, 2], average="macro", zero_division=0))}


def command_line(module: str, argv: list[str] | None) -> str:
    """How a benchmark was run, for its result file: `python -m bench.X ARGS`."""
    args = sys.argv[1:] if argv is None else argv
    return " ".join(["python", "-m", module, *map(shlex.quote, args)])


def write_result(name: str, title: str, body: str, command: str) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.md"
    path.write_text(f"# {title}\n\nMeasured {time.strftime('%Y-%m-%d %H:%M')} on {machine()}.\n"
                    f"Command: `{command}`\n\n{body}\n")
    print(body)
    print(f"\nwritten: {path}")
    return path
