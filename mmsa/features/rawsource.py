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

    def __init__(self, examples: list[Example], cfg: DataConfig):
        self.guids = [ex.guid for ex in examples]
        self.examples, self.cfg = list(examples), cfg
        self._images: list | None = None  # in memory: decoded images (None: no image)
        self._featurizers: tuple | None = None  # (text, image) featurizers already loaded, if any
        self._loaded: dict | None = None

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
                images = ImageFiles(self.examples, image.pixels_of_file, image.pixels)
            else:
                images = [image.pixels(img) for img in self._images]
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
        import torch
        loaded = self._load()
        inputs = loaded["collate"]([loaded["pairs"][int(r)] for r in rows])
        return (*(t.to(device) for t in inputs), torch.from_numpy(self.lexicon_of(rows)).to(device))

    def iter_batches(self, row_batches: list[np.ndarray], device: torch.device, augment: float = 0.0):
        """`batch(rows)` for each of `row_batches` in order (training pairs' images augmented with
        strength `augment`), the files decoded ahead by `loader_workers` processes: by default on a
        GPU the CPU share of the process less one (at most 8), none on a CPU, where the model needs
        the cores itself (workers made a 2-core machine's epochs 1.5-3x slower), none for pairs
        already in memory. The workers start once and serve every later epoch and fold."""
        import torch
        loader, order = self._loader(device, augment)
        order.batches = [[int(r) for r in rows] for rows in row_batches]
        for rows, inputs in zip(row_batches, loader):
            yield (*(t.to(device, non_blocking=True) for t in inputs), torch.from_numpy(self.lexicon_of(rows)).to(device))

    def _loader(self, device: torch.device, augment: float):
        """The DataLoader of this kind of batch (augmented or not, for a device), made once, with
        its persistent workers, and the batch order it reads (set anew for every pass)."""
        import torch
        loaded = self._load()
        key = (device.type, augment)
        if key not in loaded["loaders"]:
            workers = 0 if self._images is not None else (
                self.cfg.loader_workers if self.cfg.loader_workers >= 0
                else loader_workers(device, on_cpu=0, share=torch.get_num_threads()))
            pairs = loaded["pairs"]
            if augment > 0:
                image = loaded["image"]
                pairs = _RawPairs(loaded["cleaned"], ImageFiles(self.examples, image.augmenting(augment), image.pixels))
            order = _Batches()
            loader = torch.utils.data.DataLoader(
                pairs, batch_sampler=order, collate_fn=loaded["collate"], num_workers=workers,
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
    """Map-style dataset: row -> (cleaned text, preprocessed image; a blank one where unreadable)."""

    def __init__(self, texts: list[str], images):
        self.texts, self.images = texts, images

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, row: int):
        return self.texts[row], self.images[row][0]


class _Collate:
    """A batch of (text, image) -> (input_ids, attention_mask, pixels), padded to the longest text."""

    def __init__(self, text):
        self.text = text.tokenize  # TextFeaturizer.tokenize: picklable for worker processes

    def __call__(self, pairs: list):
        import torch
        texts, images = zip(*pairs)
        tok = self.text(list(texts), padding="longest")
        return tok["input_ids"], tok["attention_mask"], torch.stack(images)
