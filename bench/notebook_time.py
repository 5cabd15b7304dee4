"""notebooks/colab.ipynb in its local mode (the smoke space on --data, its own feature cache built
in a fresh work folder, the search interrupted once and resumed, then final), each cell's wall
seconds: what a Colab user waits for, step by step.

    python -m bench.notebook_time --data ../shared/mvsa [--repo DIR]

`--repo` runs another checkout's notebook (an older commit, for a before/after table). Last line:
`total_s=.. search_s=.. resume_s=.. final_s=..`.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

from bench.common import ROOT, command_line, table, write_result

def _seconds(cell) -> float | None:
    timing = cell.metadata.get("execution", {})
    began, ended = timing.get("iopub.execute_input"), timing.get("shell.execute_reply")
    if not (began and ended):
        return None
    return (datetime.fromisoformat(ended.replace("Z", "+00:00"))
            - datetime.fromisoformat(began.replace("Z", "+00:00"))).total_seconds()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.notebook_time", description=__doc__.splitlines()[0])
    p.add_argument("--data", default="../shared/mvsa")
    p.add_argument("--repo", default=str(ROOT), help="the checkout whose notebook runs (default: this one)")
    p.add_argument("--out", default="notebook_time", help="the result's name: bench/results/OUT.md")
    args = p.parse_args(argv)
    import nbclient
    import nbformat
    repo = Path(args.repo).resolve()
    work = Path(tempfile.mkdtemp(prefix="notebook-time-"))
    os.environ.update(MMSA_NOTEBOOK_LOCAL="1", MMSA_WORKDIR=str(work), MMSA_DATA=str(Path(args.data).resolve()),
                      PYTHONPATH=str(repo))
    nb = nbformat.read(repo / "notebooks" / "colab.ipynb", as_version=4)
    began = time.time()
    nbclient.NotebookClient(nb, timeout=3600, kernel_name="python3", record_timing=True,
                            resources={"metadata": {"path": str(repo / "notebooks")}}).execute()
    total = time.time() - began
    cells = [(i, c) for i, c in enumerate(nb.cells) if c.cell_type == "code"]
    rows, seconds = [], {}
    for i, cell in cells:
        s = _seconds(cell)
        seconds[i] = s or 0.0
        rows.append([i, cell.source.splitlines()[0][:70], f"{s:.1f}" if s is not None else "-"])
    text = "\n".join(o.get("text", "") for _, c in cells for o in c.get("outputs", []))
    ready = next((ln for ln in text.splitlines() if "features ready in" in ln), "")
    body = table(["cell", "what", "seconds"], rows)
    body += (f"\n\nIn all {total:.0f} s, notebook of {repo}, data {args.data}, work folder {work}. "
             f"The first search's own line: `{ready.strip()[:200]}`.")
    write_result(args.out, "The Colab notebook, cell by cell (local mode)", body, command_line("bench.notebook_time", argv))
    print(f"total_s={total:.0f} search_s={seconds.get(5, 0):.0f} resume_s={seconds.get(6, 0):.0f} "
          f"final_s={seconds.get(8, 0):.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
