"""Frozen-feature cache, built: run each backbone once over the dataset, keep its token features.

Each modality is cached in its own folder `<cache_dir>/<kind>-<name>-<key>/` (read by
mmsa.features.featureset.FeatureSet). The key hashes the backbone's fingerprint (name, weights,
preprocessing), the settings (text length, layer) and the data content (guids, decoded texts,
image bytes). The text folder also holds each text's lexicon scores (mmsa.features.lexicon): change any of them and a new cache is built. A folder is built under a temporary
name and renamed into place only once complete, with `meta.json` written last; a folder without
a matching `meta.json` (a killed build, a copy gone wrong) is never trusted and gets rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from tqdm.auto import tqdm

from mmsa.config import DataConfig
from mmsa.data.dataset import Dataset, Example
from mmsa.errors import DISK_FULL, DiskFullError
from mmsa.features.featureset import FeatureSet, digest
from mmsa.data.images import ImageFiles, loader_workers
from mmsa.locks import exclusive

if TYPE_CHECKING:
    import torch

FORMAT_VERSION = 1


def image_content_hash(examples: list[Example]) -> tuple[str, list[str]]:
    """(hash of every example's guid and image bytes, each example's own hash of the same)."""
    h = hashlib.blake2b(digest_size=8)
    items = []
    for ex in examples:
        data = b""
        if ex.has_image:
            try:
                data = ex.image_path.read_bytes()
            except OSError:
                pass
        h.update(ex.guid.encode() + b"\0")
        h.update(data)
        h.update(b"\0")
        items.append(digest(ex.guid, data))
    return h.hexdigest(), items


def _safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:60]


def _load_if_complete(folder: Path, key: str, n: int) -> dict[str, np.ndarray] | None:
    meta_path = folder / "meta.json"
    try:
        meta = json.loads(meta_path.read_text())
        if meta.get("key") != key or meta.get("n") != n or meta.get("format") != FORMAT_VERSION:
            return None
        arrays = {name: np.load(folder / f"{name}.npy", mmap_mode="r") for name in meta["arrays"]}
        if any(a.shape[0] != n for a in arrays.values()):
            return None
        return arrays
    except (OSError, ValueError, KeyError):
        return None


def _new_array(path: Path, dtype, shape: tuple) -> np.ndarray:
    """A writable memory-mapped .npy file with its disk blocks reserved now. Without that, a full
    disk shows only when a page is written back: SIGBUS kills the process mid-build."""
    out = np.lib.format.open_memmap(path, "w+", dtype, shape)
    try:
        with open(path, "r+b") as f:
            os.posix_fallocate(f.fileno(), 0, os.path.getsize(path))
    except OSError as e:
        if e.errno not in DISK_FULL:
            raise
        free = shutil.disk_usage(path.parent).free
        raise DiskFullError(f"{path.parent.parent}: no space left for the feature cache "
                            f"({os.path.getsize(path) / 2**20:.0f} MiB needed for {path.name}, "
                            f"{free / 2**20:.0f} MiB free)") from None
    return out


def write_folder_atomically(folder: Path, fill) -> None:
    """Run `fill(tmp_folder)` in a temporary folder beside `folder`, then rename it into place
    (replacing a stale or partial one), so no reader ever sees a partial folder."""
    tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        fill(tmp)
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _meta(tmp: Path, key: str, n: int, names: list[str], extra: dict | None) -> None:
    """A cache folder's meta.json, written last: without it no reader trusts the folder."""
    meta = {"key": key, "n": n, "format": FORMAT_VERSION, "arrays": names,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"), **(extra or {})}
    (tmp / "meta.json").write_text(json.dumps(meta))


def _finish(tmp: Path, folder: Path, key: str, n: int, names: list[str], extra: dict | None) -> None:
    """A temporary cache folder whose arrays are written: its meta.json, then renamed into place."""
    _meta(tmp, key, n, names, extra)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)


def _build_atomically(folder: Path, key: str, n: int, fill, extra: dict | None = None) -> dict[str, np.ndarray]:
    """Run `fill(tmp_folder) -> array names` in a temporary folder, then rename into place."""
    write_folder_atomically(folder, lambda tmp: _meta(tmp, key, n, fill(tmp), extra))
    arrays = _load_if_complete(folder, key, n)
    assert arrays is not None, f"{folder}: cache just written does not load"
    return arrays


def _progress(total: int, desc: str):
    return tqdm(total=total, desc=desc, unit="ex", file=sys.stderr, dynamic_ncols=True,
                mininterval=1.0)


def _get_or_build(cache_root: Path, base: str, items: list[str], prepare) -> tuple[dict, Path]:
    """Load `<base>-<key>` if complete, else build it. `items`: each example's content hash.
    `prepare()` loads the backbone and returns (model, key, fill): `model` hashes the backbone's
    fingerprint and settings, `key` that and the content. Where another complete cache of the same
    model holds every example (a subset of a dataset, another order), its rows are copied instead
    of running the backbone. Builds in one cache folder take turns (two searches on one machine,
    or a node receiving the driver's copy: search/cache_transfer.py): who waited finds the cache
    built and loads it."""
    model, key, fill = prepare()
    folder = cache_root / f"{base}-{key}"
    n = len(items)
    arrays = _load_if_complete(folder, key, n)
    if arrays is not None:
        return arrays, folder
    with exclusive(cache_root):
        arrays = _load_if_complete(folder, key, n)
        if arrays is None:
            source = _covering_cache(cache_root, base, model, items)
            if source is not None:
                print(f"features of {n} examples copied from {source[0].name}", file=sys.stderr, flush=True)
                fill = _copy_rows(*source)
            arrays = _build_atomically(folder, key, n, fill, {"model": model, "items": items})
    return arrays, folder


def _covering_cache(cache_root: Path, base: str, model: str, items: list[str]) -> tuple[Path, np.ndarray] | None:
    """A complete cache folder of the same model holding every item: (folder, row of each item)."""
    for folder in sorted(cache_root.glob(f"{base}-*")):
        try:
            meta = json.loads((folder / "meta.json").read_text())
        except (OSError, ValueError):
            continue  # incomplete, or being built
        if meta.get("model") != model or meta.get("format") != FORMAT_VERSION or "items" not in meta:
            continue
        if _load_if_complete(folder, meta.get("key"), meta.get("n")) is None:
            continue
        index = {item: row for row, item in enumerate(meta["items"])}
        if all(item in index for item in items):
            return folder, np.array([index[item] for item in items], dtype=np.int64)
    return None


def _copy_rows(source: Path, rows: np.ndarray, chunk: int = 512):
    """A `fill` that copies `rows` of every array of the `source` cache folder, in that order."""
    def fill(tmp: Path) -> list[str]:
        names = json.loads((source / "meta.json").read_text())["arrays"]
        for name in names:
            src = np.load(source / f"{name}.npy", mmap_mode="r")
            out = _new_array(tmp / f"{name}.npy", src.dtype, (len(rows), *src.shape[1:]))
            for s in range(0, len(rows), chunk):
                out[s:s + chunk] = src[rows[s:s + chunk]]
            out.flush()
        return names
    return fill


def build_text_cache(cfg: DataConfig, examples: list[Example], also_depths: tuple[int, ...] = ()) -> tuple[dict, Path]:
    """The text cache of `cfg` (the hidden states entering its top `text_depth` layers, masks,
    lexicon scores). Where it is built, the caches of `also_depths` that are missing are built in
    the same pass of the backbone (a search that trains the top layers beside frozen heads reads
    both): the same bits as apart, one pass instead of several."""
    from mmsa.features.featurize import TextFeaturizer, clean_texts
    from mmsa.features.lexicon import LEXICON_DIM, lexicon_version
    layers = cfg.text_depth
    n, L = len(examples), cfg.max_text_len
    raw = [ex.text for ex in examples]
    texts = clean_texts(cfg, raw)
    # The lexicon reads the raw text (hashtags, @mentions, capitals), so both are in the key.
    items = [digest(f"{ex.guid}\t{text}\t{ex.text}") for ex, text in zip(examples, texts)]
    content = digest(*items)
    root = Path(cfg.cache_dir)

    def prepare():
        from mmsa.features.encoders import build_text_encoder
        encoder = build_text_encoder(cfg.text_encoder)
        featurizer = TextFeaturizer(cfg, encoder)

        def where(depth: int) -> tuple[str, str, Path]:
            model = digest(encoder.fingerprint(), str(L), str(depth), lexicon_version())
            key = digest(model, content)
            return model, key, root / f"text-{_safe_name(cfg.text_encoder)}-L{L}-k{depth}-{key}"

        @_reusing_freed_memory
        def fill(tmp: Path) -> list[str]:
            device = _extraction_device()
            encoder.to(device)
            extra = {d: where(d) for d in dict.fromkeys(also_depths) if d != layers}
            extra = {d: w for d, w in extra.items() if _load_if_complete(w[2], w[1], n) is None}
            folders = {layers: tmp, **{d: w[2].with_name(f"{w[2].name}.tmp-{os.getpid()}") for d, w in extra.items()}}
            try:
                for folder in list(folders.values())[1:]:
                    shutil.rmtree(folder, ignore_errors=True)
                    folder.mkdir(parents=True)
                tokens = {d: _new_array(f / "tokens.npy", np.float16, (n, L, encoder.dim)) for d, f in folders.items()}
                masks = {d: _new_array(f / "mask.npy", np.bool_, (n, L)) for d, f in folders.items()}
                with _progress(n, f"text features ({cfg.text_encoder}, {device})") as bar:
                    for s, hidden, m in featurizer.encode_batches(texts, list(folders), device):
                        for d in folders:
                            tokens[d][s:s + len(m)] = hidden[d]
                            masks[d][s:s + len(m)] = m
                        bar.update(len(m))
                scores = featurizer.lexicon(raw)
                for d, folder in folders.items():
                    tokens[d].flush(), masks[d].flush()
                    lexicon = _new_array(folder / "lexicon.npy", np.float32, (n, LEXICON_DIM))
                    lexicon[:] = scores
                    lexicon.flush()
                for d, (model, key, final) in extra.items():  # each whole, then renamed into place
                    _finish(folders[d], final, key, n, ["tokens", "mask", "lexicon"], {"model": model, "items": items})
            except BaseException:
                for folder in list(folders.values())[1:]:
                    shutil.rmtree(folder, ignore_errors=True)
                raise
            return ["tokens", "mask", "lexicon"]
        model, key, _ = where(layers)
        return model, key, fill

    return _get_or_build(root, f"text-{_safe_name(cfg.text_encoder)}-L{L}-k{layers}", items, prepare)


def build_image_cache(cfg: DataConfig, examples: list[Example], workers: int | None = None) -> tuple[dict, Path]:
    from mmsa.features.featurize import IMAGE_BATCH, ImageFeaturizer
    n = len(examples)
    content, items = image_content_hash(examples)

    def prepare():
        import torch

        from mmsa.features.encoders import build_image_encoder
        encoder = build_image_encoder(cfg.image_encoder)
        featurizer = ImageFeaturizer(cfg, encoder)

        @_reusing_freed_memory
        def fill(tmp: Path) -> list[str]:
            device = _extraction_device()
            encoder.to(device)
            n_workers = workers if workers is not None else loader_workers(device, on_cpu=2)
            loader = torch.utils.data.DataLoader(ImageFiles(examples, featurizer.pixels_of_file, featurizer.pixels),
                                                 batch_size=IMAGE_BATCH, num_workers=n_workers,
                                                 pin_memory=device.type == "cuda")
            tokens = valid = None
            with _progress(n, f"image features ({cfg.image_encoder}, {device})") as bar:
                s = 0
                for pixels, ok in loader:
                    feats = featurizer.encode(pixels, device)
                    if tokens is None:
                        tokens = _new_array(tmp / "tokens.npy", np.float16, (n, feats.shape[1], feats.shape[2]))
                        valid = _new_array(tmp / "valid.npy", np.bool_, (n,))
                    tokens[s:s + len(feats)] = feats
                    valid[s:s + len(feats)] = ok.numpy()
                    s += len(feats)
                    bar.update(len(feats))
            tokens.flush(), valid.flush()
            return ["tokens", "valid"]
        return digest(encoder.fingerprint()), digest(encoder.fingerprint(), content), fill

    return _get_or_build(Path(cfg.cache_dir), f"image-{_safe_name(cfg.image_encoder)}", items, prepare)


def _reusing_freed_memory(fill):
    """`fill` run with freed memory kept for the next batch (mmsa.features.heap), given back after."""
    from functools import wraps

    from mmsa.features.heap import keep_freed_memory, release_freed_memory

    @wraps(fill)
    def run(tmp: Path) -> list[str]:
        keep_freed_memory()
        try:
            return fill(tmp)
        finally:
            release_freed_memory()
    return run


def _extraction_device() -> torch.device:
    """The backbones fill the cache on the GPU where there is one (CUDA_VISIBLE_DEVICES= to not)."""
    import torch
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def features_of(cfg: DataConfig, examples: list[Example], also_depths: tuple[int, ...] = ()) -> FeatureSet:
    """The cached features of `examples` (guids unique), building what is missing (and the text
    caches of `also_depths`, in the same pass: build_text_cache)."""
    Path(cfg.cache_dir).mkdir(parents=True, exist_ok=True)
    _, text_dir = build_text_cache(cfg, examples, also_depths)
    _, image_dir = build_image_cache(cfg, examples)
    return FeatureSet.open([ex.guid for ex in examples], text_dir, image_dir)


def load_features(cfg: DataConfig, dataset: Dataset, also_depths: tuple[int, ...] = ()) -> FeatureSet:
    """Load the cached features of every example of `dataset`, building what is missing."""
    examples = dataset.all_examples
    feats = features_of(cfg, examples, also_depths)
    for ex, ok in zip(examples, feats.has_image):
        if ex.has_image and not ok:
            dataset.report.unreadable_image.append(ex.guid)
    return feats
