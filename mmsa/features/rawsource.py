"""Model inputs made from the pairs batch by batch (finetune=full: the model runs its own
backbones), no cache: (input_ids, attention_mask, pixels, lexicon scores), through the same
featurizers as the cache (mmsa.features.featurize)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import numpy as np

from mmsa.config import DataConfig
from mmsa.data.dataset import Example
from mmsa.features.featureset import digest, row_index
from mmsa.data.images import ImageFiles, loader_workers

if TYPE_CHECKING:
    import torch
    from PIL import Image


class RawSource:
    """Model inputs of pairs made batch by batch, for finetune=full: the dataset's files
    (`RawSource(examples, cfg)`), or pairs already in memory (`RawSource.in_memory`, a served
    model's request).

    Cheap to build and to pickle (the search driver builds one and ships it to trials): the
    tokenizer and the image preprocessing (no backbone weights) load on first use, in the process
    that trains. `iter_batches` decodes and tokenizes in DataLoader worker processes, ahead of the
    model: on a GPU the decoding, not the backbones, bounded an epoch (bench/results/gpu_check.md)."""

    def __init__(self, examples: list[Example], cfg: DataConfig, pixel_dir: str | None = None):
        self.guids = [ex.guid for ex in examples]
        self.examples, self.cfg = list(examples), cfg
        self.pixel_dir = pixel_dir  # the examples' images decoded once (mmsa.features.pixels); None: the files
        self._images: list | None = None  # in memory: decoded images (None: no image)
        self._featurizers: tuple | None = None  # (text, image) featurizers already loaded, if any
        self._loaded: dict | None = None

    @classmethod
    def from_files(cls, examples: list[Example], cfg: DataConfig) -> RawSource:
        """Pairs of the dataset's files, their images decoded once into the pixel cache under
        `cfg.cache_dir` (built where missing: mmsa.features.pixels), which every epoch then reads."""
        from mmsa.features.pixels import build_pixel_cache
        return cls(examples, cfg, pixel_dir=str(build_pixel_cache(cfg, examples).resolve()))

    def without_pixel_cache(self) -> RawSource:
        """The same pairs, their images decoded from the files (a node that lacks the pixel cache)."""
        return type(self)(self.examples, self.cfg)

    @classmethod
    def in_memory(cls, texts: list[str], images: list[Image.Image | None], cfg: DataConfig,
                  featurizers: tuple | None = None) -> RawSource:
        """Pairs held in memory; `featurizers`: (TextFeaturizer, ImageFeaturizer) of `cfg`'s backbones
        already loaded (a served model's), else loaded on first use."""
        from pathlib import Path
        source = cls([Example(str(i), t, Path(), None, has_image=img is not None)
                      for i, (t, img) in enumerate(zip(texts, images))], cfg)
        source._images, source._featurizers = list(images), featurizers
        return source

    def __getstate__(self) -> dict:
        # the tokenizer and preprocessing load where used
        return {**self.__dict__, "_loaded": None, "_featurizers": None}

    def content_digest(self, rows: np.ndarray, labels: np.ndarray) -> str:
        """A short hash of these rows' guids, text and labels (no image bytes: nothing caches them
        here, and reading every image for a digest would cost what an epoch does)."""
        return digest(*(f"{self.guids[r]}\t{self.examples[r].text}" for r in rows),
                     np.asarray(labels, np.int64).tobytes())

    def _load(self) -> dict:
        if self._loaded is None:
            from mmsa.features.featurize import ImageFeaturizer, TextFeaturizer
            # Fast tokenizers warn (and turn their threads off) in forked DataLoader workers.
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
            text, image = self._featurizers or (TextFeaturizer(self.cfg), ImageFeaturizer(self.cfg))
            raw = [ex.text for ex in self.examples]
            if self._images is None:
                images = self._image_files(image)
            else:
                images = [image.square(img) for img in self._images]
            cleaned = text.clean(raw)
            self._loaded = {"text_dim": text.dim, "image_dim": image.dim, "image": image,
                            "lexicon": text.lexicon(raw), "pairs": _RawPairs(cleaned, images),
                            "cleaned": cleaned, "collate": _Collate(text), "loaders": {}}
        return self._loaded

    @property
    def text_dim(self) -> int:
        return self._load()["text_dim"]

    @property
    def image_dim(self) -> int:
        return self._load()["image_dim"]

    def rows(self, guids: list[str]) -> np.ndarray:
        return row_index(self.guids, guids)

    def lexicon_of(self, rows: np.ndarray) -> np.ndarray:
        return self._load()["lexicon"][rows]

    def text_lengths(self, rows: np.ndarray) -> np.ndarray:
        """Tokens of each row's text, as tokenized for the model (cut at max_text_len)."""
        loaded = self._load()
        return loaded["collate"].text(
            [loaded["pairs"].texts[int(r)] for r in rows], padding="longest")["attention_mask"].sum(1).numpy()

    def batch(self, rows: np.ndarray, device: torch.device):
        loaded = self._load()
        return self._on_device(rows, loaded["collate"]([loaded["pairs"][int(r)] for r in rows]), device, 0.0)

    def _on_device(self, rows: np.ndarray, collated: tuple, device: torch.device, augment: float) -> tuple:
        """A collated batch on `device`, its uint8 squares cropped (augmented with strength `augment`)
        and normalised there (ImageFeaturizer.normalize)."""
        import torch
        ids, mask, pixels, valid = collated
        # on CUDA in the layout of the fine-tuned CNN's weights (runtime.for_device)
        layout = torch.channels_last if device.type == "cuda" else torch.preserve_format
        pixels = self._load()["image"].normalize(pixels.to(device, non_blocking=True, memory_format=layout), valid,
                                                 augment)
        return (ids.to(device, non_blocking=True), mask.to(device, non_blocking=True), pixels,
                torch.from_numpy(self.lexicon_of(rows)).to(device))

    def iter_batches(self, row_batches: list[np.ndarray], device: torch.device, augment: float = 0.0):
        """`batch(rows)` for each of `row_batches` in order (training pairs' images augmented with
        strength `augment`, where the model runs), the images read (from the pixel cache, else
        decoded from their files) ahead by `loader_workers` processes: by default on a GPU the CPU
        share of the process less one (at most 8), none on a CPU, where the model needs the cores
        itself (workers made a 2-core machine's epochs 1.5-3x slower), none for pairs already in
        memory. The workers start once and serve every later epoch and fold."""
        loader, order = self._loader(device)
        order.batches = [[int(r) for r in rows] for rows in row_batches]
        for rows, collated in zip(row_batches, loader):
            yield self._on_device(rows, collated, device, augment)

    def _image_files(self, image):
        """The examples' images as DataLoader items, (ImageFeaturizer.square, whether read): from the
        pixel cache where there is one, else decoded from their files."""
        if self.pixel_dir is not None:
            from mmsa.features.pixels import CachedImages
            return CachedImages(self.pixel_dir)
        return ImageFiles(self.examples, image.square_file, image.square)

    def _loader(self, device: torch.device):
        """The DataLoader of batches for a device, made once, with its persistent workers, and the
        batch order it reads (set anew for every pass)."""
        import torch
        loaded = self._load()
        key = device.type
        if key not in loaded["loaders"]:
            workers = 0 if self._images is not None else (
                self.cfg.loader_workers if self.cfg.loader_workers >= 0
                else loader_workers(device, on_cpu=0, share=torch.get_num_threads()))
            order = _Batches()
            loader = torch.utils.data.DataLoader(
                loaded["pairs"], batch_sampler=order, collate_fn=loaded["collate"], num_workers=workers,
                pin_memory=device.type == "cuda", prefetch_factor=4 if workers else None,
                persistent_workers=workers > 0)
            loaded["loaders"][key] = (loader, order)
        return loaded["loaders"][key]


class _Batches:
    """A batch sampler whose batches are set before each pass: one DataLoader, with workers that
    persist, serves passes in different orders."""

    def __init__(self):
        self.batches: list[list[int]] = []

    def __iter__(self):
        return iter(list(self.batches))

    def __len__(self) -> int:
        return len(self.batches)


class _RawPairs:
    """Map-style dataset: row -> (cleaned text, its image's uint8 square, whether it was read)."""

    def __init__(self, texts: list[str], images):
        self.texts, self.images = texts, images

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, row: int):
        return self.texts[row], *self.images[row]


class _Collate:
    """A batch of (text, uint8 square, whether read) -> (input_ids, attention_mask, squares, read),
    the texts padded to the longest."""

    def __init__(self, text):
        self.text = text.tokenize  # TextFeaturizer.tokenize: picklable for worker processes

    def __call__(self, pairs: list):
        import torch
        texts, images, read = zip(*pairs)
        tok = self.text(list(texts), padding="longest")
        return tok["input_ids"], tok["attention_mask"], torch.stack(images), torch.tensor(read)
