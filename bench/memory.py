"""Peak memory of a whole search (the driver and every Ray process together) with 1 and with 2
concurrent trials, against the size of the feature cache: the cache is shared, not copied.

Memory is sampled every 0.2 s over the driver's whole process tree as PSS (proportional set size:
a page shared by k processes counts 1/k in each, so the sum is what the machine really holds)
and as RSS (a shared page counted in every process that maps it).

    python -m bench.memory --data ../shared/mvsa
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


import psutil
import yaml

from bench.common import ROOT, command_line, table, write_result


def tree_memory(root: psutil.Process) -> tuple[int, int, list[psutil.Process]]:
    pss = rss = 0
    procs = [root] + root.children(recursive=True)
    for proc in procs:
        try:
            info = proc.memory_full_info()
            pss += info.pss
            rss += info.rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return pss, rss, procs


def breakdown(proc: psutil.Process, cache_root: str) -> dict | None:
    """One process's memory by kind: feature-cache pages (resident, and PSS: shared ones split),
    private anonymous memory (Python objects, torch, buffers), and everything else."""
    out = {"name": "", "pid": proc.pid, "ppid": 0, "cache_rss": 0, "cache_pss": 0, "anon": 0, "other_pss": 0}
    try:
        out["name"] = " ".join(proc.cmdline())[:60]
        out["ppid"] = proc.ppid()
        kind = None
        with open(f"/proc/{proc.pid}/smaps") as f:
            for line in f:
                if line[0] in "0123456789abcdef" and "-" in line.split(" ", 1)[0]:
                    parts = line.split()
                    path = parts[5] if len(parts) > 5 else ""
                    kind = "cache" if cache_root in path else ("anon" if path in ("", "[heap]") else "other")
                elif line.startswith(("Rss:", "Pss:", "Anonymous:")):
                    key, kb = line.split(":")[0], int(line.split()[1]) * 1024
                    if kind == "cache" and key != "Anonymous":
                        out["cache_rss" if key == "Rss" else "cache_pss"] += kb
                    elif kind == "anon" and key == "Pss":
                        out["anon"] += kb
                    elif kind == "other" and key == "Pss":
                        out["other_pss"] += kb
    except (OSError, psutil.NoSuchProcess, psutil.AccessDenied):
        return None
    return out


def measured_search(cmd: list[str], cache_root: str = "mmsa-features") -> tuple[int, int, float, list[dict], str]:
    """Peak PSS and RSS of the search's process tree, its wall time, the per-process breakdown at
    the PSS peak, and the memory plan it printed (with --memory-budget; else "")."""
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = [0, 0]
    at_peak: list[dict] = []
    done = threading.Event()

    def sample():
        root = psutil.Process(proc.pid)
        while not done.is_set():
            try:
                pss, rss, procs = tree_memory(root)
            except psutil.NoSuchProcess:
                break
            if pss > peak[0]:
                at_peak[:] = [b for b in (breakdown(p, cache_root) for p in procs) if b]
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
    plan = next((line for line in out.splitlines() if line.startswith("memory budget")), "")
    return peak[0], peak[1], time.time() - start, at_peak, plan


def _sum(parts: list[dict]) -> dict:
    return {k: sum(b[k] for b in parts) for k in ("cache_rss", "cache_pss", "anon", "other_pss")}


def process_groups(parts: list[dict]) -> list[tuple[str, dict]]:
    """Rows of the breakdown table: each trial's process on its own, the rest summed."""
    workers = [b for b in parts if "ImplicitFunc" in b["name"] or "train_trial" in b["name"]]
    driver = [b for b in parts if "search.run" in b["name"]]
    rest = [b for b in parts if b not in workers + driver]
    return ([("trial: Ray worker", b) for b in workers]
            + [(name, _sum(group)) for name, group in (("driver (search.run)", driver), ("Ray's own", rest)) if group])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.memory", description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--space", default="spaces/smoke.yaml")
    p.add_argument("--num-samples", type=int, default=4)
    p.add_argument("--budget", help="also run the space under --memory-budget BUDGET and compare its peak")
    p.add_argument("--out", default="memory", help="results file name: bench/results/OUT.md")
    args = p.parse_args(argv)

    from mmsa.config import Config
    from mmsa.features.prepare import prepare
    cfg = Config.from_flat({"data_dir": args.data}, source="--data")
    feats = prepare(cfg.data).features  # built once here, so both searches only read it
    cache = feats.nbytes
    tmp = Path(tempfile.mkdtemp(prefix="mmsa-bench-mem-"))
    rows, peaks, groups = [], {}, []

    def search_cmd(space: Path | str, *more: str) -> list[str]:
        return [sys.executable, "-m", "search.run", "--space", str(space), "--data", args.data, "--num-samples",
                str(args.num_samples), "--tracking-uri", f"sqlite:///{tmp}/mlflow.db", "--storage", str(tmp / "ray"),
                *more]

    for concurrent in (1, 2):
        space = yaml.safe_load(Path(args.space).read_text())
        space["max_concurrent"] = concurrent
        path = tmp / f"c{concurrent}.yaml"
        path.write_text(yaml.safe_dump(space))
        pss, rss, wall, parts, _ = measured_search(search_cmd(path))
        peaks[concurrent] = pss
        if concurrent == 2:
            groups = process_groups(parts)
        rows.append([f"{concurrent} concurrent trial(s)", f"{pss / 2**30:.2f}", f"{rss / 2**30:.2f}", f"{wall:.0f}"])
    if args.budget:
        from search.sizes import parse_size
        pss, rss, wall, _, plan = measured_search(search_cmd(args.space, "--memory-budget", args.budget))
        verdict = "under" if pss <= parse_size(args.budget, "--budget") else "OVER"
        label = f"--memory-budget {args.budget} ({verdict} budget; plan: {plan.split(': ', 1)[-1]})"
        rows.append([label, f"{pss / 2**30:.2f}", f"{rss / 2**30:.2f}", f"{wall:.0f}"])
    extra = peaks[2] - peaks[1]
    body = (f"Feature cache: {cache / 2**30:.2f} GiB (float16, memory-mapped). Space `{args.space}`, "
            f"{args.num_samples} trials.\n\n"
            + table(["search", "peak PSS, all processes (GiB)", "peak RSS sum (GiB)", "wall (s)"], rows)
            + f"\n\nThe second concurrent trial adds {extra / 2**30:.2f} GiB of PSS = {extra / cache:.2f} x the "
              "cache size (a Ray worker that imports torch itself).\n\n"
            + "Where the memory is at the 2-trial peak (PSS, GiB; a shared page counts 1/k in each of its k "
              "processes):\n\n"
            + table(["process", "feature-cache pages resident", "feature-cache pages, PSS",
                     "private anonymous (Python, torch, buffers; PSS)", "other (libraries, ...)"],
                    [[name, f"{b['cache_rss'] / 2**30:.2f}", f"{b['cache_pss'] / 2**30:.2f}",
                      f"{b['anon'] / 2**30:.2f}", f"{b['other_pss'] / 2**30:.2f}"] for name, b in groups])
            + "\n\nEach trial has the cache pages it reads resident, but together they count once (the PSS "
              "column sums to the cache's resident size): the cache is shared, not copied.")
    write_result(args.out, "Peak memory of a whole search", body, command_line("bench.memory", argv))


if __name__ == "__main__":
    main()
