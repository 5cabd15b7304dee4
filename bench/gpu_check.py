"""GPU check of full fine-tuning (finetune=full): epoch times, peak GPU memory, validation scores.

    python bench/gpu_check.py --data ../shared/mvsa [--epochs 4] [--out bench/results/gpu_check.md]

`python -m mmsa.train --set finetune=full --set device=cuda` runs on the seeded split:
  1. alone on the GPU (backbone_lr_scale 0.1), batches made in the training process
     (loader_workers 0), then the same with the default loader workers (the A/B of the workers);
  2. two at once sharing the GPU, as two trials of a search with `resources: {gpu: 0.5}` do
     (backbone_lr_scale 0.03 and 0.3, so the pair also says which way the backbones' rate should go);
  3. alone with fp16 autocast (and its gradient scaler), then with bf16 (`precision`).
GPU memory is read two ways: torch's peak allocated and reserved bytes in each run (what the
tensors need; what the caching allocator held), and nvidia-smi's memory.used of the whole card
sampled every 0.5 s (that adds each process's CUDA context), minus what was used before the run.
Needs only the mmsa dependencies (no Ray, no MLflow); `bench/gpu_check.sh` also runs a search.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EPOCH = re.compile(r"epoch\s+(\d+)\s+loss ([\d.]+)\s+val_acc ([\d.]+)\s+val_macro_f1 ([\d.]+)\s+([\d.]+)s"
                   r"(?:\s+gpu peak (\d+) MiB \(reserved (\d+)\))?")


class GpuMemorySampler:
    """Peak of nvidia-smi's memory.used (MiB, the whole card) while running; None without nvidia-smi."""

    def __init__(self, interval: float = 0.5):
        self.interval, self.peak, self._stop = interval, None, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def used_mib() -> int | None:
        if shutil.which("nvidia-smi") is None:
            return None
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=10).stdout
            return int(out.split()[0])
        except (subprocess.SubprocessError, ValueError, IndexError, OSError):
            return None

    def _run(self) -> None:
        while not self._stop.is_set():
            used = self.used_mib()
            if used is not None:
                self.peak = used if self.peak is None else max(self.peak, used)
            self._stop.wait(self.interval)

    def __enter__(self) -> GpuMemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def train_command(data: str, device: str, epochs: int, overrides: dict) -> list[str]:
    sets = {"finetune": "full", "device": device, "max_epochs": epochs, "patience": 0, **overrides}
    cmd = [sys.executable, "-m", "mmsa.train", "--data", data]
    for key, value in sets.items():
        cmd += ["--set", f"{key}={value}"]
    return cmd


def run_all(name_to_cmd: dict[str, list[str]], timeout: float) -> dict[str, dict]:
    """Start every command at once; echo their lines as they come; parse epochs and final metrics."""
    procs = {name: subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for name, cmd in name_to_cmd.items()}
    results = {name: {"epochs": [], "metrics": None, "tail": []} for name in procs}

    def pump(name: str) -> None:
        for line in procs[name].stdout:
            line = line.rstrip()
            res = results[name]
            res["tail"] = (res["tail"] + [line])[-15:]
            if "\r" in line or "it/s" in line:
                continue  # progress bars
            print(f"[{name}] {line}", flush=True)
            m = EPOCH.search(line)
            if m:
                res["epochs"].append({"epoch": int(m[1]), "loss": float(m[2]), "val_acc": float(m[3]),
                                      "val_macro_f1": float(m[4]), "seconds": float(m[5]),
                                      "gpu_peak_mb": float(m[6]) if m[6] else None,
                                      "gpu_reserved_mb": float(m[7]) if m[7] else None})
            elif line.startswith("metrics="):
                res["metrics"] = json.loads(line.split("=", 1)[1])

    threads = [threading.Thread(target=pump, args=(name,), daemon=True) for name in procs]
    for t in threads:
        t.start()
    deadline = time.time() + timeout
    for name, proc in procs.items():
        try:
            proc.wait(timeout=max(1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            proc.kill()
            print(f"[{name}] killed after {timeout:.0f} s", flush=True)
    for t in threads:
        t.join(timeout=10)
    for name, proc in procs.items():
        results[name]["returncode"] = proc.returncode
    return results


def table(phase: str, results: dict[str, dict], configs: dict[str, dict], wall: float, gpu_used: int | None) -> str:
    lines = [f"### {phase}: wall {wall:.0f} s"
             + (f", nvidia-smi peak memory.used above idle: {gpu_used} MiB" if gpu_used is not None else ""), "",
             "| run | settings | seconds per epoch | val_acc per epoch | best val_acc / macro-F1 (epoch) "
             "| torch peak allocated / reserved MiB |", "|---|---|---|---|---|---|"]
    for name, res in results.items():
        settings = ", ".join(f"{k}={v}" for k, v in configs[name].items())
        m = res["metrics"]
        if res["returncode"] != 0 or m is None:
            lines.append(f"| {name} | {settings} | FAILED (exit {res['returncode']}) | | | |")
            continue
        secs = " / ".join(f"{e['seconds']:.1f}" for e in res["epochs"])
        accs = " / ".join(f"{e['val_acc']:.4f}" for e in res["epochs"])
        peaks = [max((e[k] or 0) for e in res["epochs"]) for k in ("gpu_peak_mb", "gpu_reserved_mb")]
        mem = f"{peaks[0]:.0f} / {peaks[1]:.0f}" if peaks[0] else "n/a (no GPU)"
        lines.append(f"| {name} | {settings} | {secs} | {accs} | {m['val_acc']:.4f} / {m['val_macro_f1']:.4f} "
                     f"({m['best_epoch']}) | {mem} |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="../shared/mvsa")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--device", default="cuda", help="cuda (default); cpu only to try the script itself")
    p.add_argument("--timeout", type=float, default=400, help="seconds allowed to each phase")
    p.add_argument("--out", help="also write the tables to this markdown file")
    p.add_argument("--phases", nargs="+", choices=("in-process", "alone", "shared", "fp16", "bf16"),
                   default=["in-process", "alone", "shared", "fp16", "bf16"], help="which runs (default: all)")
    args = p.parse_args()
    if args.device == "cuda":
        import torch
        if not torch.cuda.is_available():
            print("gpu_check: no CUDA device visible to torch", file=sys.stderr)
            return 2
        print(f"GPU: {torch.cuda.get_device_name(0)}; torch {torch.__version__}", flush=True)
    base = {"lr": 3e-4, "batch_size": 32}
    phases = {
        "in-process": ("alone, batches made in the training process", {
            "full-0.1-w0": {**base, "backbone_lr_scale": 0.1, "seed": 0, "loader_workers": 0}}),
        "alone": ("alone", {"full-0.1": {**base, "backbone_lr_scale": 0.1, "seed": 0}}),
        "shared": ("two sharing the GPU", {"full-0.03": {**base, "backbone_lr_scale": 0.03, "seed": 1},
                                           "full-0.3": {**base, "backbone_lr_scale": 0.3, "seed": 2}}),
        # precision=auto picks bf16 where the card has it natively; these force each one
        "fp16": ("alone, fp16 autocast with a gradient scaler", {
            "full-fp16": {**base, "backbone_lr_scale": 0.1, "seed": 0, "precision": "fp16"}}),
        "bf16": ("alone, bf16 autocast", {
            "full-bf16": {**base, "backbone_lr_scale": 0.1, "seed": 0, "precision": "bf16"}}),
    }
    report = [f"GPU check, `python bench/gpu_check.py --data {args.data} --epochs {args.epochs} "
              f"--phases {' '.join(args.phases)}`, "
              f"{time.strftime('%Y-%m-%d')}", ""]
    for phase, configs in (phases[key] for key in args.phases):
        idle = GpuMemorySampler.used_mib()
        start = time.time()
        with GpuMemorySampler() as sampler:
            # Each run gets its share of the cores, as a search's trials do (resources.cpu): two
            # processes each using every core ran 5x slower on a 2-core CPU.
            threads = max(1, (os.cpu_count() or 1) // len(configs))
            results = run_all({n: train_command(args.data, args.device, args.epochs, {**c, "num_threads": threads})
                               for n, c in configs.items()}, args.timeout)
        above = sampler.peak - idle if sampler.peak is not None and idle is not None else None
        part = [table(phase, results, configs, time.time() - start, above), ""]
        for name, res in results.items():
            if res["returncode"] != 0:
                part += [f"{name} output tail:", "```", *res["tail"], "```", ""]
        print("\n" + "\n".join(part), flush=True)
        report += part
    text = "\n".join(report)
    print("\n" + text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
