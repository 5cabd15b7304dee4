"""What a search keeps in its storage folder (Ray's state, the trials' checkpoints), sampled while
it runs: a stand-in search of spaces/gpu.yaml (the embedded backbones fine-tuned end to end, ASHA
over epochs, a checkpoint after every epoch) on a few labeled pairs, on the CPU. Its peak and
final size against (trials in flight + 1) x one checkpoint.

    python -m bench.checkpoint_storage --data ../shared/mvsa [--pairs 60] [--trials 6] [--repo DIR]

`--repo` runs another checkout's search.run (an older commit, for a before/after table).
Last line: `peak_mib=.. final_mib=.. bound_mib=.. checkpoint_mib=..`.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench.common import ROOT, command_line, table, write_result

MIB = 2 ** 20


def labeled_subset(data: Path, dest: Path, pairs: int) -> Path:
    """A course-layout folder of `pairs` labeled pairs (the classes in turn) and 4 test pairs, linked
    into `data`."""
    rows = [ln.split(",") for ln in (data / "train.txt").read_text().split()[1:]]
    by_tag: dict[str, list[str]] = {}
    for guid, tag in rows:
        by_tag.setdefault(tag, []).append(guid)
    picked = [(by_tag[t][i], t) for i in range(pairs // len(by_tag) + 1) for t in sorted(by_tag)
              if i < len(by_tag[t])][:pairs]
    test = [ln.split(",")[0] for ln in (data / "test_without_label.txt").read_text().split()[1:]][:4]
    (dest / "data").mkdir(parents=True)
    for guid in [g for g, _ in picked] + test:
        for ext in ("jpg", "txt"):
            os.symlink((data / "data" / f"{guid}.{ext}").resolve(), dest / "data" / f"{guid}.{ext}")
    (dest / "train.txt").write_text("guid,tag\n" + "".join(f"{g},{t}\n" for g, t in picked))
    (dest / "test_without_label.txt").write_text("guid,tag\n" + "".join(f"{g},null\n" for g in test))
    return dest


def scan(folder: Path) -> tuple[int, int]:
    """(bytes of every file under `folder`, bytes of its largest checkpoint file)."""
    total = largest = 0
    for base, _, files in os.walk(folder):
        for name in files:
            try:
                size = os.lstat(os.path.join(base, name)).st_size
            except OSError:
                continue
            total += size
            if name.endswith(".pt") or ".pt.tmp" in name:
                largest = max(largest, size)
    return total, largest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.checkpoint_storage", description=__doc__.splitlines()[0])
    p.add_argument("--data", default="../shared/mvsa")
    p.add_argument("--pairs", type=int, default=60)
    p.add_argument("--trials", type=int, default=6)
    p.add_argument("--concurrent", type=int, default=2)
    p.add_argument("--max-epochs", type=int, default=2,
                   help="each fold's epochs (default 2: ASHA's rungs at epochs 1 and 3 fall mid-fold, where a "
                        "checkpoint holds the model and AdamW's moments)")
    p.add_argument("--repo", default=str(ROOT), help="the checkout whose search.run runs (default: this one)")
    p.add_argument("--out", default="checkpoint_storage", help="the result's name: bench/results/OUT.md")
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="ckpt-storage-"))
    data = labeled_subset(Path(args.data), work / "data", args.pairs)
    storage = work / "ray_results"
    cmd = [sys.executable, "-m", "search.run", "--space", str(Path(args.repo) / "spaces" / "gpu.yaml"),
           "--data", str(data), "--set", "text_encoder=minilm", "--set", "image_encoder=efficientnet_lite0",
           "--set", "max_text_len=32", "--set", f"cache_dir={work / 'cache'}", "--gpus-per-trial", "0",
           "--cpus-per-trial", "1", "--max-concurrent", str(args.concurrent), "--num-samples", str(args.trials),
           "--max-epochs", str(args.max_epochs), "--storage", str(storage), "--tracking-uri", f"sqlite:///{work}/mlflow.db"]
    samples: list[tuple[float, int, int]] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            samples.append((time.time(), *scan(storage)))
            done.wait(0.1)
    sampler = threading.Thread(target=sample, daemon=True)
    began = time.time()
    sampler.start()
    out = subprocess.run(cmd, cwd=args.repo, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": args.repo})
    done.set()
    sampler.join()
    if out.returncode != 0:
        sys.exit(f"search failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    final, _ = scan(storage)
    peak = max(s[1] for s in samples)
    checkpoint = max(s[2] for s in samples)
    bound = (args.concurrent + 1) * checkpoint
    ended = {kind: len(re.findall(rf"\] {kind} \w+ after", out.stdout)) for kind in ("completed", "stopped early")}
    storage_line = next((ln for ln in out.stdout.splitlines() if ln.startswith("storage: ")), "(none printed)")
    rows = [["peak", f"{peak / MIB:.1f}", f"{peak / bound:.2f}"], ["final", f"{final / MIB:.1f}", f"{final / bound:.2f}"]]
    body = table(["storage folder", "MiB", "over (in flight + 1) x one checkpoint"], rows)
    body += (f"\n\nOne checkpoint (the largest state file seen): {checkpoint / MIB:.0f} MiB; trials in flight at "
             f"most {args.concurrent}: bound {bound / MIB:.0f} MiB. Sampled every 0.1 s over {time.time() - began:.0f} s. "
             f"{args.trials} trials: {ended['completed']} completed, {ended['stopped early']} stopped early by ASHA. "
             f"spaces/gpu.yaml with MiniLM + EfficientNet-Lite0 fine-tuned end to end (max_text_len 32), "
             f"{args.max_epochs} epochs per fold, {args.pairs} labeled pairs of {args.data}, on the CPU; search.run of {args.repo}. "
             f"The search's own line: `{storage_line}`")
    write_result(args.out, "A search's storage folder while it runs", body, command_line("bench.checkpoint_storage", argv))
    print(f"peak_mib={peak / MIB:.0f} final_mib={final / MIB:.0f} bound_mib={bound / MIB:.0f} "
          f"checkpoint_mib={checkpoint / MIB:.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
