"""Peak memory of a whole search (the driver and every Ray process together) with 1 and with 2
concurrent trials, against the size of the feature cache: the cache is shared, not copied.

Memory is sampled every 0.2 s over the driver's whole process tree as PSS (proportional set size:
a page shared by k processes counts 1/k in each, so the sum is what the machine really holds)
and as RSS (a shared page counted in every process that maps it).

    python bench/memory.py --data ../shared/mvsa
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import psutil  # noqa: E402
import yaml  # noqa: E402

from bench.common import ROOT, table, write_result  # noqa: E402


def tree_memory(root: psutil.Process) -> tuple[int, int]:
    pss = rss = 0
    for proc in [root] + root.children(recursive=True):
        try:
            info = proc.memory_full_info()
            pss += info.pss
            rss += info.rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return pss, rss


def measured_search(cmd: list[str]) -> tuple[int, int, float]:
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = [0, 0]
    done = threading.Event()

    def sample():
        root = psutil.Process(proc.pid)
        while not done.is_set():
            try:
                pss, rss = tree_memory(root)
            except psutil.NoSuchProcess:
                break
            peak[0], peak[1] = max(peak[0], pss), max(peak[1], rss)
            time.sleep(0.2)
    thread = threading.Thread(target=sample, daemon=True)
    start = time.time()
    thread.start()
    out = proc.communicate()[0]
    done.set()
    thread.join()
    if proc.returncode != 0:
        sys.exit(f"search failed:\n{out[-3000:]}")
    return peak[0], peak[1], time.time() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--space", default="spaces/smoke.yaml")
    p.add_argument("--num-samples", type=int, default=4)
    p.add_argument("--budget", help="also run the space under --memory-budget BUDGET and compare its peak")
    args = p.parse_args()

    from mmsa.config import Config
    from mmsa.prepare import prepare
    cfg = Config()
    cfg.data.data_dir = args.data
    feats = prepare(cfg.data).features  # built once here, so both searches only read it
    cache = feats.nbytes
    tmp = Path(tempfile.mkdtemp(prefix="mmsa-bench-mem-"))
    rows, peaks = [], {}
    for concurrent in (1, 2):
        space = yaml.safe_load(Path(args.space).read_text())
        space["max_concurrent"] = concurrent
        path = tmp / f"c{concurrent}.yaml"
        path.write_text(yaml.safe_dump(space))
        cmd = [sys.executable, "-m", "search.run", "--space", str(path), "--data", args.data, "--num-samples",
               str(args.num_samples), "--tracking-uri", f"sqlite:///{tmp}/mlflow.db", "--storage", str(tmp / "ray")]
        pss, rss, wall = measured_search(cmd)
        peaks[concurrent] = pss
        rows.append([f"{concurrent} concurrent trial(s)", f"{pss / 2**30:.2f}", f"{rss / 2**30:.2f}", f"{wall:.0f}"])
    if args.budget:
        from search.budget import parse_size
        cmd = [sys.executable, "-m", "search.run", "--space", args.space, "--data", args.data, "--num-samples",
               str(args.num_samples), "--memory-budget", args.budget, "--tracking-uri", f"sqlite:///{tmp}/mlflow.db",
               "--storage", str(tmp / "ray")]
        pss, rss, wall = measured_search(cmd)
        verdict = "under" if pss <= parse_size(args.budget) else "OVER"
        rows.append([f"--memory-budget {args.budget} ({verdict} budget)", f"{pss / 2**30:.2f}", f"{rss / 2**30:.2f}",
                     f"{wall:.0f}"])
    extra = peaks[2] - peaks[1]
    body = (f"Feature cache: {cache / 2**30:.2f} GiB (float16, memory-mapped). Space `{args.space}`, "
            f"{args.num_samples} trials.\n\n"
            + table(["search", "peak PSS, all processes (GiB)", "peak RSS sum (GiB)", "wall (s)"], rows)
            + f"\n\nThe second concurrent trial adds {extra / 2**30:.2f} GiB of PSS = "
              f"{extra / cache:.2f} x the cache size.")
    write_result("memory", "Peak memory of a whole search", body, "python bench/memory.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
