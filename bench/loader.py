"""Images per second on one core, as a DataLoader worker makes them for finetune=full: from the
JPEG files (decode, resize, cut the square; ImageFeaturizer.square) against from the pixel cache
(read the square; mmsa.features.pixels), collated as uint8 batches. Cropping (random resized crop
and flip for training pairs, the centre crop otherwise), colour jitter and normalisation run on
each batch where the model runs (ImageFeaturizer.normalize): on a GPU they cost the loader
nothing; their cost per image on one CPU core is the table's last rows.

One process, one torch thread, no workers: the rate of one core. A loader with W workers feeds
about W times that; a GPU that trains N images a second needs about N / rate workers.

    python -m bench.loader --data ../shared/mvsa [--images 800] [--augment 0.3]

Last line: `jpeg_per_s=.. cache_per_s=.. speedup=..`.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time

from bench.common import command_line, table, write_result


def rate(dataset, n: int, batch: int = 32, repeats: int = 2) -> float:
    """Items per second of `dataset[0:n]`, collated in batches, the best of `repeats` passes (the
    first pass warms the page cache for both sources alike)."""
    import torch
    best = 0.0
    for _ in range(repeats):
        began = time.perf_counter()
        for s in range(0, n, batch):
            torch.stack([dataset[i][0] for i in range(s, min(n, s + batch))])
        best = max(best, n / (time.perf_counter() - began))
    return best


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.loader", description=__doc__.splitlines()[0])
    p.add_argument("--data", default="../shared/mvsa")
    p.add_argument("--images", type=int, default=800, help="images per pass (default 800)")
    p.add_argument("--augment", type=float, default=0.3, help="augmentation strength (default 0.3)")
    p.add_argument("--image-encoder", default="efficientnet_lite0",
                   help="whose preprocessing (size, resize, normalisation); timm:convnext_tiny is gpu.yaml's")
    p.add_argument("--cache-dir", help="where the pixel cache is built (default: a temporary folder)")
    p.add_argument("--epoch-pairs", type=int, default=48,
                   help="labeled pairs of the stand-in epoch trained from the files and from the cache (default 48)")
    p.add_argument("--out", default="loader", help="the result's name: bench/results/OUT.md")
    args = p.parse_args(argv)

    import torch

    from mmsa.config import DataConfig
    from mmsa.data.dataset import load_dataset
    from mmsa.data.images import ImageFiles
    from mmsa.features.featurize import ImageFeaturizer
    from mmsa.features.pixels import CachedImages, build_pixel_cache
    torch.set_num_threads(1)
    examples = [ex for ex in load_dataset(args.data).all_examples if ex.has_image][:args.images]
    cfg = DataConfig(data_dir=args.data, image_encoder=args.image_encoder,
                     cache_dir=args.cache_dir or tempfile.mkdtemp(prefix="pixel-cache-"))
    featurizer = ImageFeaturizer(cfg)
    began = time.perf_counter()
    folder = str(build_pixel_cache(cfg, examples, workers=0))
    build_s = time.perf_counter() - began
    n = len(examples)
    files, cache = ImageFiles(examples, featurizer.square_file, featurizer.square), CachedImages(folder)
    jpeg, cached = rate(files, n), rate(cache, n)
    rows = [["loader worker: an image to a uint8 square, collated", f"{jpeg:.0f}", f"{cached:.0f}",
             f"{cached / jpeg:.1f}x"]]
    squares = torch.stack([cache[i][0] for i in range(min(n, 64))])
    valid = torch.ones(len(squares), dtype=torch.bool)
    for kind, augment in (("training", args.augment), ("validation", 0.0)):
        began, passes = time.perf_counter(), 5
        for _ in range(passes):
            featurizer.normalize(squares, valid, augment)
        per_s = passes * len(squares) / (time.perf_counter() - began)
        rows.append([f"where the model runs, {kind}: crop{', flip, jitter' if augment else ''}, normalise "
                     f"(a batch of {len(squares)}, here on the CPU)", "-", f"{per_s:.0f}", "-"])
    figures = {"jpeg": jpeg, "cache": cached}
    same, seconds = one_epoch_both_ways(args, examples)
    pre = featurizer.preprocess
    body = table(["step", "JPEG files: images/s on one core", "pixel cache: images/s on one core", "speedup"], rows)
    body += (f"\n\n{n} images of {args.data}, {args.image_encoder}'s preprocessing (resize {pre.resize}, crop "
             f"{pre.size}), augmentation strength {args.augment}, collated in batches of 32; one process, one torch "
             f"thread, the best of two passes. Building the cache (decoding each image once, one process): {build_s:.1f} s, "
             f"{n / build_s:.0f} images/s.")
    body += (f"\n\nOne epoch of spaces/gpu.yaml's stand-in (MiniLM + EfficientNet-Lite0 fine-tuned end to end, "
             f"augment 0, {args.epoch_pairs} labeled pairs, 3 of 4 trained, 1 of 4 validated, on the CPU): from the "
             f"files {seconds[0]:.1f} s, from the pixel cache {seconds[1]:.1f} s; validation probabilities "
             f"{'identical, bit for bit' if same else 'DIFFERENT'}.")
    write_result(args.out, "Feeding fine-tuning: JPEG files against the pixel cache", body,
                 command_line("bench.loader", argv))
    print(f"jpeg_per_s={figures['jpeg']:.1f} cache_per_s={figures['cache']:.1f} "
          f"speedup={figures['cache'] / figures['jpeg']:.1f}")
    return 0


def one_epoch_both_ways(args, examples) -> tuple[bool, tuple[float, float]]:
    """One epoch of the fine-tuning stand-in from the files and from the pixel cache, augmentation
    off: (whether the validation probabilities are the same bits, (seconds, seconds))."""
    import numpy as np

    from mmsa.config import Config
    from mmsa.data.dataset import load_dataset
    from mmsa.data.splits import Split
    from mmsa.features.rawsource import RawSource
    from mmsa.training.fit import fit
    labeled = load_dataset(args.data).train[:args.epoch_pairs]
    cfg = Config.from_flat({"finetune": "full", "text_encoder": "minilm", "image_encoder": "efficientnet_lite0",
                            "max_text_len": 32, "batch_size": 16, "max_epochs": 1, "augment": 0.0, "device": "cpu",
                            "d_model": 64, "heads": 4, "cache_dir": args.cache_dir or tempfile.mkdtemp()})
    probs, seconds = [], []
    for source in (RawSource(labeled, cfg.data), RawSource.from_files(labeled, cfg.data)):
        split = Split.of(source, labeled)
        cut = len(labeled) * 3 // 4
        train, val = split.take(np.arange(cut)), split.take(np.arange(cut, len(labeled)))
        began = time.perf_counter()
        result = fit(cfg, source, train, val, keep_probs=True)
        seconds.append(time.perf_counter() - began)
        probs.append(result.history[-1]["probs"])
    return bool(np.array_equal(probs[0], probs[1])), (seconds[0], seconds[1])


if __name__ == "__main__":
    sys.exit(main())
