"""Helpers shared by the benchmark scripts: tables, result files, running searches."""

from __future__ import annotations

import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def machine() -> str:
    import os

    import torch
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
            f"{'CUDA ' + torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU'}")


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


def write_result(name: str, title: str, body: str, command: str) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.md"
    path.write_text(f"# {title}\n\nMeasured {time.strftime('%Y-%m-%d %H:%M')} on {machine()}.\n"
                    f"Command: `{command}`\n\n{body}\n")
    print(body)
    print(f"\nwritten: {path}")
    return path


def run_search(space: Path, tracking_uri: str, storage: Path, *more: str) -> tuple[str, float, str]:
    """Run `search.run` as a user would; returns (parent run id, wall seconds, output)."""
    start = time.time()
    out = subprocess.run([sys.executable, "-m", "search.run", "--space", str(space), "--tracking-uri", tracking_uri,
                          "--storage", str(storage), *more], capture_output=True, text=True, cwd=ROOT)
    wall = time.time() - start
    if out.returncode != 0:
        sys.exit(f"search failed ({out.returncode}):\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    return out.stdout.strip().splitlines()[-1].split("=", 1)[1], wall, out.stdout
