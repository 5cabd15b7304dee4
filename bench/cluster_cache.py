"""A cluster without a shared disk: what the worker node's own feature cache costs. Runs one
search twice on a local two-node Ray cluster (head and worker node, one CPU each, separate
session folders): once where the worker node reads the driver's cache (a shared disk), once where
it starts with an empty $MMSA_CACHE_DIR and receives the driver's cache through Ray's object
store (here over loopback; a real network adds about 1 s per 120 MiB at 1 Gbit/s). Reports wall
time, trials per node, when each node finished its first fold, what landed in the worker node's
folder and its largest process's peak memory.

    python -m bench.cluster_cache --data ../shared/mvsa [--space spaces/smoke.yaml]
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


from bench.common import ROOT, command_line, table, write_result

PORT = 6393
# Ray's token authentication, as on a real cluster: every node, the search and this script share one token.
os.environ.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16)})
ENV = dict(os.environ)


def ray_cmd(*args, env=None) -> None:
    out = subprocess.run([shutil.which("ray"), *args], capture_output=True, text=True, timeout=300, env=env or ENV)
    if out.returncode != 0:
        raise SystemExit(f"ray {args[0]} failed: {out.stderr[-2000:]}")


def processes_of(*markers: str) -> set:
    """The processes whose command line names one of `markers` (a node's session folder, the
    head's port), and every process under them: Ray's workers rename themselves, so the command
    line alone does not find them."""
    import psutil
    found = set()
    for proc in psutil.process_iter(["cmdline"]):
        if any(m in " ".join(proc.info["cmdline"] or []) for m in markers):
            found.add(proc)
            try:
                found.update(proc.children(recursive=True))
            except psutil.NoSuchProcess:
                pass
    return found


def stop(*temps: str) -> None:
    import psutil
    ours = processes_of(*temps, f"127.0.0.1:{PORT}")
    for proc in ours:
        try:
            proc.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(list(ours), timeout=15)
    for proc in alive:
        proc.kill()


class PeakRss(threading.Thread):
    """The largest resident set of any one process of the node whose session folder is `marker`."""

    def __init__(self, marker: str):
        super().__init__(daemon=True)
        self.marker, self.peak, self.done = marker, 0, False

    def run(self) -> None:
        import psutil
        while not self.done:
            for proc in processes_of(self.marker):
                try:
                    self.peak = max(self.peak, proc.memory_info().rss)
                except psutil.NoSuchProcess:
                    pass
            time.sleep(0.5)


def run_once(args, node_cache: Path | None) -> dict:
    head_temp = tempfile.mkdtemp(prefix="bh-", dir="/tmp")
    worker_temp = tempfile.mkdtemp(prefix="bw-", dir="/tmp")
    work = Path(tempfile.mkdtemp(prefix="bench-cluster-"))
    worker_env = {**ENV, **({"MMSA_CACHE_DIR": str(node_cache)} if node_cache else {})}
    try:
        ray_cmd("start", "--head", f"--port={PORT}", "--node-ip-address=127.0.0.1", "--num-cpus=1",
                "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={head_temp}")
        ray_cmd("start", f"--address=127.0.0.1:{PORT}", "--node-ip-address=127.0.0.1", "--num-cpus=1",
                "--disable-usage-stats", f"--temp-dir={worker_temp}", env=worker_env)
        peak = PeakRss(worker_temp)
        peak.start()
        t0 = time.time()
        out = subprocess.run([sys.executable, "-m", "search.run", "--space", args.space, "--data", args.data,
                              "--address", f"127.0.0.1:{PORT}", "--tracking-uri", f"sqlite:///{work}/mlflow.db",
                              "--storage", str(work / "state")], capture_output=True, text=True, cwd=ROOT, env=ENV)
        wall = time.time() - t0
        peak.done = True
        if out.returncode != 0:
            raise SystemExit(f"search failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
        result = {"wall": wall, "peak_gib": peak.peak / 2**30, **trials_by_node(work, out.stdout)}
        print(f"{'own' if node_cache else 'shared'} cache: {result}", flush=True)
        if node_cache is not None:
            result["builds"] = sorted(p.name for p in node_cache.iterdir() if not p.name.startswith("."))
            result["mib"] = sum(f.stat().st_size for f in node_cache.rglob("*") if f.is_file()) / 2**20
        return result
    finally:
        stop(head_temp, worker_temp)
        for folder in (head_temp, worker_temp, work):
            shutil.rmtree(folder, ignore_errors=True)


def trials_by_node(work: Path, stdout: str) -> dict:
    from mlflow.tracking import MlflowClient

    from mmsa.app.run_tags import TAG_NODE
    from search.record import TrackingStore
    parent_id = stdout.strip().splitlines()[-1].split("=", 1)[1]
    client = MlflowClient(f"sqlite:///{work}/mlflow.db")
    parent = client.get_run(parent_id)
    runs = TrackingStore(f"sqlite:///{work}/mlflow.db", "").child_runs(parent_id, parent.info.experiment_id)
    by_node: dict[str, list] = {}
    for run in runs:
        first_fold = min((m.timestamp for m in client.get_metric_history(run.info.run_id, "best_val_acc")),
                         default=None)
        by_node.setdefault(run.data.tags.get(TAG_NODE, "?"), []).append(first_fold)
    start = parent.info.start_time
    return {"nodes": {node[:8]: (len(times), (min(t for t in times if t) - start) / 1000)
                      for node, times in by_node.items()}}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.cluster_cache", description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--space", default=str(ROOT / "spaces" / "smoke.yaml"))
    p.add_argument("--out", default="cluster_cache")
    args = p.parse_args(argv)
    shared = run_once(args, None)
    node_cache = Path(tempfile.mkdtemp(prefix="node-cache-"))
    try:
        separate = run_once(args, node_cache)
    finally:
        shutil.rmtree(node_cache, ignore_errors=True)
    rows = []
    for name, r in (("shared disk (worker node reads the driver's cache)", shared),
                    ("worker node's own empty $MMSA_CACHE_DIR: receives the driver's", separate)):
        nodes = "; ".join(f"{n}: {k} trials, first fold done at {s:.0f} s" for n, (k, s) in sorted(r["nodes"].items()))
        landed = f"{len(r['builds'])} folders, {r['mib']:.0f} MiB" if "builds" in r else "-"
        rows.append([name, f"{r['wall']:.0f}", nodes, landed, f"{r['peak_gib']:.2f}"])
    body = table(["cache", "search wall s", "trials per node (after the search's start)",
                  "in the worker node's folder", "worker node's largest process, peak RSS GiB"], rows)
    write_result(args.out, "Feature cache on a cluster without a shared disk", body,
                 command_line("bench.cluster_cache", argv))


if __name__ == "__main__":
    main()
