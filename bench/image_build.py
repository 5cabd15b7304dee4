"""The image feature cache's build against its floor: the CPU time of decoding each image and of the
backbone's forward pass on it, spread over every core, side by side with a real build from
scratch of the same images.

    floor = (CPU seconds decoding N images + CPU seconds of the forward passes on them) / cores

both measured in this process alone (decoding with one torch thread, the forward with all, freed
memory kept for the next batch as a build keeps it: mmsa.features.heap); a build can do no better
than keep every core busy on exactly that work.

    python -m bench.image_build --data ../shared/mvsa [--images 640]

Last line: `build_per_s=.. floor_per_s=.. over_floor=..`.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

from bench.common import command_line, table, write_result


def cpu_seconds(work) -> tuple[float, float]:
    """(CPU seconds of this process, wall seconds) that `work()` took."""
    cpu, wall = time.process_time(), time.perf_counter()
    work()
    return time.process_time() - cpu, time.perf_counter() - wall


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.image_build", description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--images", type=int, default=640, help="images of the dataset to build from (default 640)")
    p.add_argument("--out", default="image_build", help="the result's name: bench/results/OUT.md")
    args = p.parse_args(argv)
    import torch

    from mmsa.config import Config
    from mmsa.data.dataset import load_dataset
    from mmsa.data.images import ImageFiles
    from mmsa.features.cache import build_image_cache
    from mmsa.features.encoders import build_image_encoder
    from mmsa.features.featurize import ImageFeaturizer
    from mmsa.features.heap import keep_freed_memory, release_freed_memory
    cores = os.cpu_count() or 1
    cfg = Config.from_flat({"data_dir": args.data}, source="--data").data
    examples = [ex for ex in load_dataset(args.data).all_examples if ex.has_image][:args.images]
    n = len(examples)
    featurizer = ImageFeaturizer(cfg, build_image_encoder(cfg.image_encoder))
    files = ImageFiles(examples, featurizer.pixels_of_file, featurizer.pixels)
    for i in range(min(n, 32)):  # the files into the page cache, as a build's second pass finds them
        files[i]
    torch.set_num_threads(1)
    decoded = []
    dec_cpu, dec_wall = cpu_seconds(lambda: decoded.extend(files[i][0] for i in range(n)))
    pixels = torch.stack(decoded)
    torch.set_num_threads(cores)
    keep_freed_memory()
    featurizer.encode(pixels[:32], torch.device("cpu"))  # warm-up
    fwd_cpu, fwd_wall = cpu_seconds(lambda: featurizer.encode(pixels, torch.device("cpu")))
    release_freed_memory()
    floor = (dec_cpu + fwd_cpu) / cores
    with tempfile.TemporaryDirectory(prefix="mmsa-image-build-") as tmp:
        build_cfg = Config.from_flat({"data_dir": args.data, "cache_dir": tmp}, source="--data").data
        start = time.perf_counter()
        build_image_cache(build_cfg, examples)
        build = time.perf_counter() - start
    rows = [["decode (one thread)", f"{dec_cpu:.1f}", f"{dec_wall:.1f}", f"{n / dec_wall:.0f}"],
            [f"forward ({cores} threads)", f"{fwd_cpu:.1f}", f"{fwd_wall:.1f}", f"{n / fwd_wall:.0f}"],
            [f"floor: CPU seconds of both over {cores} cores", "", f"{floor:.1f}", f"{n / floor:.0f}"],
            ["build from scratch (mmsa.features.cache)", "", f"{build:.1f}", f"{n / build:.0f}"]]
    body = table(["part", "CPU s", "wall s", "images/s"], rows)
    body += (f"\n\n{n} images of {args.data}, {cfg.image_encoder}; the build is {build / floor:.2f}x its floor "
             f"(its wall over the floor's).")
    write_result(args.out, "The image feature cache's build against its floor", body,
                 command_line("bench.image_build", argv))
    print(f"build_per_s={n / build:.1f} floor_per_s={n / floor:.1f} over_floor={build / floor:.2f}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
