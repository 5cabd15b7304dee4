"""What keeping freed memory buys (mmsa.features.heap): the image backbone over a batch, and a
feature cache built from scratch, with glibc's default thresholds and with freed memory kept.

    python bench/heap.py [--data ../shared/mvsa] [--cache] [--out heap]

Each variant runs in a process of its own (the thresholds are process-wide): EfficientNet-Lite0
over 64 random images in chunks of 32, 8, 4 and 1, on the main thread and on a thread of its own
that also built the backbone (as a served model runs it), timed (median of 3) with the page
faults counted (getrusage). With --cache, also the text and image caches of the whole dataset
built into an empty folder, timed, and the two variants' arrays compared bit for bit.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import ROOT, table, write_result  # noqa: E402

CHUNKS = (32, 8, 4, 1)


def _child(kept: bool, where: str, cache: str | None, data: str) -> dict:
    import mmsa.features.heap as heap
    if not kept:
        heap.keep_freed_memory = lambda: False  # what every caller reaches it through
    if cache:
        return _build_cache(cache, data)

    def measure() -> dict:
        import resource

        import numpy as np
        import torch

        from mmsa.features.encoders import build_image_encoder
        heap.keep_freed_memory()
        encoder = build_image_encoder("efficientnet_lite0").eval()
        x = torch.randn(64, 3, 224, 224, generator=torch.Generator().manual_seed(0))
        out = {}
        with torch.no_grad():
            for chunk in CHUNKS:
                def run():
                    for s in range(0, len(x), chunk):
                        encoder(x[s:s + chunk])
                run()
                seconds, faults = [], resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                for _ in range(3):
                    start = time.perf_counter()
                    run()
                    seconds.append(time.perf_counter() - start)
                faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / 3
                out[chunk] = {"seconds": float(np.median(seconds)), "faults": faults}
        return out
    if where == "main":
        return measure()
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(measure).result()


def _build_cache(folder: str, data: str) -> dict:
    import resource
    from dataclasses import replace

    from mmsa.config import Config
    from mmsa.data.dataset import load_dataset
    from mmsa.features.cache import load_features
    cfg = replace(Config().data, data_dir=data, cache_dir=folder)
    dataset = load_dataset(data)
    start = time.perf_counter()
    load_features(cfg, dataset)
    return {"seconds": time.perf_counter() - start, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def run_child(*args: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="../shared/mvsa")
    p.add_argument("--cache", action="store_true", help="also build the whole dataset's cache both ways")
    p.add_argument("--out", default="heap")
    p.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        kept, where, cache, data = args.child
        print(json.dumps(_child(kept == "kept", where, None if cache == "-" else cache, data)))
        return
    rows = []
    for where in ("main", "thread"):
        for kept in ("default", "kept"):
            result = run_child(kept, where, "-", args.data)
            rows.append([f"{where} thread" if where == "main" else "a thread of its own",
                         "glibc's default" if kept == "default" else "freed memory kept",
                         *[f"{result[str(c)]['seconds'] * 1000:.0f} ms, {result[str(c)]['faults']:,.0f} faults"
                           for c in CHUNKS]])
            print(rows[-1], flush=True)
    body = table(["where", "heap", *[f"chunks of {c}" for c in CHUNKS]], rows)
    body += ("\n\nEfficientNet-Lite0 over 64 random 224 x 224 images, 2 torch threads, median of 3 passes; "
             "faults: minor page faults per pass (getrusage).")
    if args.cache:
        with tempfile.TemporaryDirectory(prefix="heap-cache-") as tmp:
            built = {}
            for kept in ("default", "kept"):
                built[kept] = run_child(kept, "main", str(Path(tmp) / kept), args.data)
                print(kept, built[kept], flush=True)
            pairs = [(a, Path(tmp) / "kept" / a.relative_to(Path(tmp) / "default"))
                     for a in sorted((Path(tmp) / "default").glob("*/*.npy"))]
            same = all(b.exists() and a.read_bytes() == b.read_bytes() for a, b in pairs)
        body += "\n\n" + table(["heap", "the whole dataset's cache built from scratch", "peak RSS"],
                               [["glibc's default" if k == "default" else "freed memory kept",
                                 f"{v['seconds']:.1f} s", f"{v['peak_rss_mb']:,.0f} MB"] for k, v in built.items()])
        body += (f"\n\nThe two caches' {len(pairs)} arrays: {'the same bits' if same else 'DIFFERENT'}. "
                 f"Data: {args.data}.")
    write_result(args.out, "Freed memory kept for the next batch (mmsa.features.heap)", body,
                 "python bench/heap.py " + " ".join(a for a in sys.argv[1:]))


if __name__ == "__main__":
    main()
