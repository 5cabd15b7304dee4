"""Cheap ideas scored with the linear probe: richer frozen text features and unlabeled pairs.

    python bench/probe_variants.py --data ../shared/mvsa [--repeats 2] [--save-oof DIR] [--out probe_variants]

Every row is the probe (mmsa.models.probe: L2-normed pooled features, LogisticRegression(C=1)) on the
same stratified 5-fold partitions as bench/cv.py, paired against the plain probe:

- layers: the mean-pooled output of other MiniLM layers beside the last one's (each L2-normed,
  concatenated). They are computed from the `finetune: last_k` cache with k = 6 (the embedding
  output) by running the pretrained layers once.
- self-training: the probe trained on a fold labels the 358 pairs of data/ that are in neither
  list; those it is at least `tau` sure of join the fold's training part with that label, and the
  probe is trained again. One row per tau; the rows show which tau CV prefers, so the best row
  is optimistic by the choice among them. `+test` rows also pseudo-label the 1,111 test pairs
  (their features, never labels: the test labels are not given).
- `--flip`: the pooled image feature averaged with that of the horizontally mirrored image.
- `--extra-text ENCODER` (e.g. `hf:/path/to/all-mpnet-base-v2`): rows with that encoder's pooled
  text in place of MiniLM's, and beside it.
- `--extra-image ENCODER` (e.g. `efficientnet_lite2`): the same for the image backbone.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from bench.common import PAIRED_HEADER, paired_cells, table, write_result  # noqa: E402

TAUS = (0.6, 0.7, 0.8, 0.9)


def _l2(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def layer_means(data_dir: str, guids: list[str]) -> dict[int, np.ndarray]:
    """{layer: (len(guids), 384) mean-pooled hidden states} for MiniLM layers 0 (embeddings)..6."""
    import torch

    from mmsa.config import DataConfig
    from mmsa.features.encoders import build_text_encoder
    from mmsa.models.heads import _run_text_top
    from mmsa.features.prepare import prepare
    data = prepare(DataConfig(data_dir=data_dir, finetune="last_k", text_finetune_layers=6), val_fraction=0.0)
    rows = data.features.rows(guids)
    layers = build_text_encoder("minilm").top_layers(6).eval()
    out: dict[int, list] = {k: [] for k in range(7)}
    with torch.no_grad():
        for s in range(0, len(rows), 128):
            text, mask, _ = data.features.batch(rows[s:s + 128], torch.device("cpu"))
            m = mask.float()[..., None]
            hidden = text
            out[0].append(((hidden * m).sum(1) / m.sum(1).clamp(min=1)).numpy())
            for k, layer in enumerate(layers, 1):
                hidden = _run_text_top(torch.nn.ModuleList([layer]), hidden, mask)
                out[k].append(((hidden * m).sum(1) / m.sum(1).clamp(min=1)).numpy())
    return {k: np.concatenate(v) for k, v in out.items()}


def flipped_image_means(data_dir: str, guids: list[str]) -> np.ndarray:
    """(len(guids), Di) mean image tokens of the mirrored images, `efficientnet_lite0` as the cache."""
    import torch
    from torchvision import transforms as T

    from mmsa.data.dataset import load_dataset
    from mmsa.features.encoders import build_image_encoder
    from mmsa.data.images import ImageFiles
    by_guid = {ex.guid: ex for ex in load_dataset(data_dir).all_examples}
    encoder = build_image_encoder("efficientnet_lite0").eval()
    pre = encoder.preprocess
    files = ImageFiles([by_guid[g] for g in guids], T.Compose([T.RandomHorizontalFlip(1.0), pre.transform()]),
                        pre.size)
    out = []
    with torch.no_grad():
        for s, (images, _) in enumerate(torch.utils.data.DataLoader(files, batch_size=32, num_workers=2)):
            out.append(encoder(images).float().mean(1).numpy())
            if s % 20 == 0:
                print(f"  mirrored images: {32 * s} / {len(guids)}", flush=True)
    return np.concatenate(out)


def unlabeled_guids(data: Path) -> list[str]:
    listed = {line.split(",")[0] for name in ("train.txt", "test_without_label.txt")
              for line in (data / name).read_text().split()[1:]}
    return sorted(p.stem for p in (data / "data").glob("*.txt") if p.stem not in listed)


def unlabeled_features(data: Path, guids: list[str], cache_dir: str):
    """Pooled probe features of `guids` (pairs in neither list), through a course-layout folder of
    links whose test list is those pairs; the cache copies the labeled rows it already has."""
    import os

    from mmsa.config import DataConfig
    from mmsa.features.prepare import prepare
    from mmsa.models.probe import pooled_features
    first = (data / "train.txt").read_text().split()[1]  # the loader wants one labeled pair
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "data").mkdir()
        for g in [first.split(",")[0], *guids]:
            for ext in ("jpg", "txt"):
                if (data / "data" / f"{g}.{ext}").exists():
                    os.symlink((data / "data" / f"{g}.{ext}").resolve(), folder / "data" / f"{g}.{ext}")
        (folder / "train.txt").write_text(f"guid,tag\n{first}\n")
        (folder / "test_without_label.txt").write_text("guid,tag\n" + "".join(f"{g},null\n" for g in guids))
        d = prepare(DataConfig(data_dir=str(folder), cache_dir=cache_dir), val_fraction=0.0)
        return pooled_features(d.features, d.test.rows)


def fit_predict(x_train, y_train, x_val, extra=None, tau: float = 1.0):
    """LogisticRegression(C=1) on x_train; with `extra`, a second fit that adds the extra rows
    predicted with probability >= tau, labeled with that prediction. -> (val probs, rows added)."""
    from sklearn.linear_model import LogisticRegression
    model = LogisticRegression(C=1.0, max_iter=2000).fit(x_train, y_train)
    if extra is None:
        return model.predict_proba(x_val), 0
    p = model.predict_proba(extra)
    keep = p.max(1) >= tau
    model = LogisticRegression(C=1.0, max_iter=2000).fit(
        np.concatenate([x_train, extra[keep]]), np.concatenate([y_train, p[keep].argmax(1)]))
    return model.predict_proba(x_val), int(keep.sum())


def main() -> None:
    from sklearn.metrics import accuracy_score, f1_score

    from mmsa.config import DataConfig
    from mmsa.features.prepare import cv_splits, prepare
    from mmsa.models.probe import pooled_features
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="../shared/mvsa")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--save-oof", metavar="DIR", help="write each variant's out-of-fold probabilities (bench/blend.py)")
    p.add_argument("--flip", action="store_true", help="also score mirrored images averaged in")
    p.add_argument("--extra-text", metavar="ENCODER", help="also score this text encoder's pooled features")
    p.add_argument("--extra-image", metavar="ENCODER", help="also score this image encoder's pooled features")
    p.add_argument("--only", metavar="REGEX", help="score only the variants whose name matches (the probe always)")
    p.add_argument("--out", default="probe_variants")
    args = p.parse_args()
    wanted = lambda name: name == "probe" or not args.only or re.search(args.only, name)  # noqa: E731
    cfg = DataConfig(data_dir=args.data)
    data = prepare(cfg, val_fraction=0.0)
    every = np.concatenate([data.train.rows, data.test.rows])  # train then test, as layer_means
    base = pooled_features(data.features, every)  # [text L6, image]
    x_row = {int(r): i for i, r in enumerate(every)}
    x_test = base[len(data.train.rows):]
    image = base[:, data.features.text_dim:]
    variants = {"probe": (base, None, 1.0)}
    if any(wanted(f"layers {k}") for k in ("5+6", "4+6", "0+6", "mean 4..6")):
        print("pooling every MiniLM layer ...", flush=True)
        layers = layer_means(args.data, data.train.guids + data.test.guids)
        variants.update({
            "layers 5+6": (np.concatenate([_l2(layers[5]), base], 1), None, 1.0),
            "layers 4+6": (np.concatenate([_l2(layers[4]), base], 1), None, 1.0),
            "layers 0+6": (np.concatenate([_l2(layers[0]), base], 1), None, 1.0),
            "layers mean 4..6": (np.concatenate([_l2(np.mean([layers[k] for k in (4, 5, 6)], 0)), image], 1),
                                 None, 1.0)})
    if wanted("self-training"):
        unl_guids = unlabeled_guids(Path(args.data))
        print(f"{len(unl_guids)} unlabeled pairs: features ...", flush=True)
        x_unl = unlabeled_features(Path(args.data), unl_guids, cfg.cache_dir)
        for tau in TAUS:
            variants[f"self-training tau {tau}"] = (base, x_unl, tau)
        for tau in TAUS:
            variants[f"self-training tau {tau} +test"] = (base, np.concatenate([x_unl, x_test]), tau)
    if args.flip:
        flipped = flipped_image_means(args.data, data.train.guids + data.test.guids)
        both = _l2(image + _l2(flipped))  # image: the plain images' L2-normed mean tokens
        variants["image + mirrored"] = (np.concatenate([base[:, :data.features.text_dim], both], 1), None, 1.0)
    def other_pooled(**encoder) -> tuple[np.ndarray, int]:
        """Pooled [text, image] features from another backbone's cache, rows as `base`'s."""
        other = prepare(DataConfig(data_dir=args.data, **encoder), val_fraction=0.0)
        if not np.array_equal(np.asarray(other.train.guids + other.test.guids),
                              np.asarray(data.train.guids + data.test.guids)):
            sys.exit("bench/probe_variants.py: the two caches list the pairs in another order")
        return pooled_features(other.features, np.concatenate([other.train.rows, other.test.rows])), \
            other.features.text_dim

    if args.extra_text:
        pooled, text_dim = other_pooled(text_encoder=args.extra_text)
        text = pooled[:, :text_dim]
        variants["text: extra"] = (np.concatenate([text, image], 1), None, 1.0)
        variants["text: minilm + extra"] = (np.concatenate([text, base], 1), None, 1.0)
    if args.extra_image:
        pooled, text_dim = other_pooled(image_encoder=args.extra_image)
        other_image = pooled[:, text_dim:]
        variants["image: extra"] = (np.concatenate([base[:, :data.features.text_dim], other_image], 1), None, 1.0)
        variants["image: lite0 + extra"] = (np.concatenate([base, other_image], 1), None, 1.0)
    variants = {k: v for k, v in variants.items() if wanted(k)}

    results = {}
    for name, (x_all, extra, tau) in variants.items():
        accs, f1s, added = [], [], []
        for seed in range(args.repeats):
            folds = cv_splits(data.train, 5, seed)
            fold_probs = []
            for train, val in folds:
                xi = lambda s: x_all[[x_row[int(r)] for r in s.rows]]  # noqa: E731
                probs, n = fit_predict(xi(train), train.labels, xi(val), extra, tau)
                fold_probs.append(probs)
                pred = probs.argmax(1)
                accs.append(accuracy_score(val.labels, pred))
                f1s.append(f1_score(val.labels, pred, labels=[0, 1, 2], average="macro", zero_division=0))
                added.append(n)
            if args.save_oof:
                from bench.cv import save_oof
                save_oof(args.save_oof, "probe-" + name.replace(" ", "-").replace("+", "plus"), seed, folds,
                         fold_probs)
        results[name] = (np.array(accs), np.array(f1s), np.mean(added))
        print(f"{name}: {np.mean(accs):.4f} / {np.mean(f1s):.4f}", flush=True)

    ref = results["probe"][0]
    rows = []
    for name, (accs, f1s, added) in results.items():
        rows.append([name, *paired_cells(accs, f1s, ref), f"{added:.0f}" if name.startswith("self") else ""])
    body = table(["probe variant", *PAIRED_HEADER, "pseudo-labeled pairs added per fold"], rows)
    body += (f"\n\n5-fold stratified CV over train.txt, {args.repeats} repeat(s) (split seeds 0..{args.repeats - 1}); "
             f"{len(unlabeled_guids(Path(args.data)))} unlabeled pairs in data/"
             + (f"; extra text encoder: `{args.extra_text}`" if args.extra_text else "")
             + (f"; extra image encoder: `{args.extra_image}`" if args.extra_image else "") + ".")
    write_result(args.out, "Probe variants: MiniLM layers and unlabeled pairs", body,
                 "python bench/probe_variants.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
