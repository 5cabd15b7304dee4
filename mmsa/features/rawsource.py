"""Model inputs read from the dataset files batch by batch (finetune=full): no cache."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import numpy as np

from mmsa.config import DataConfig
from mmsa.data.dataset import Example, normalize_tweet
from mmsa.features.featureset import digest, row_index
from mmsa.data.images import ImageFiles, loader_workers

if TYPE_CHECKING:
    import torch


class RawSource:
    """Model inputs read from the dataset files batch by batch, for finetune=full:
    (input_ids, attention_mask, pixels, lexicon scores). No cache.

    Cheap to build and to pickle (the search driver builds one and ships it to trials): the
    tokenizer and the image preprocessing are loaded on first use, in the process that trains.
    `iter_batches` decodes and tokenizes in DataLoader worker processes, ahead of the model:
    on a GPU the decoding, not the backbones, bounded an epoch (bench/results/gpu_check.md)."""

    def __init__(self, examples: list[Example], cfg: DataConfig):
        self.guids = [ex.guid for ex in examples]
        self.examples, self.cfg = list(examples), cfg
        self._loaded: dict | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_loaded": None}  # the tokenizer and encoders load where used

    def content_digest(self, rows: np.ndarray, labels: np.ndarray) -> str:
        """A short hash of these rows' guids, text and labels (no image bytes: nothing caches them
        here, and reading every image for a digest would cost what an epoch does)."""
        return digest(*(f"{self.guids[r]}\t{self.examples[r].text}" for r in rows),
                     np.asarray(labels, np.int64).tobytes())

    def _load(self) -> dict:
        if self._loaded is None:
            from mmsa.features.encoders import build_image_encoder, build_text_encoder
            from mmsa.features.lexicon import lexicon_scores
            # Fast tokenizers warn (and turn their threads off) in forked DataLoader workers.
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
            text_enc, image_enc = build_text_encoder(self.cfg.text_encoder), build_image_encoder(self.cfg.image_encoder)
            pre = image_enc.preprocess
            texts = [normalize_tweet(ex.text) if self.cfg.text_clean else ex.text for ex in self.examples]
            self._loaded = {"text_dim": text_enc.dim, "image_dim": image_enc.dim,
                            "lexicon": lexicon_scores([ex.text for ex in self.examples]),
                            "pairs": _RawPairs(texts, ImageFiles(self.examples, pre.transform(), pre.size)),
                            "collate": _Collate(text_enc.tokenizer, self.cfg.max_text_len)}
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

    def batch(self, rows: np.ndarray, device: torch.device):
        import torch
        loaded = self._load()
        inputs = loaded["collate"]([loaded["pairs"][int(r)] for r in rows])
        return (*(t.to(device) for t in inputs), torch.from_numpy(self.lexicon_of(rows)).to(device))

    def iter_batches(self, row_batches: list[np.ndarray], device: torch.device):
        """`batch(rows)` for each of `row_batches` in order, prepared ahead by `loader_workers`
        processes. By default none on a CPU: the model needs the cores itself there (workers made
        a 2-core machine's epochs 1.5-3x slower, bench/gpu_check.py --device cpu)."""
        import torch
        loaded = self._load()
        workers = self.cfg.loader_workers if self.cfg.loader_workers >= 0 else loader_workers(device, on_cpu=0)
        loader = torch.utils.data.DataLoader(
            loaded["pairs"], batch_sampler=[[int(r) for r in rows] for rows in row_batches],
            collate_fn=loaded["collate"], num_workers=workers, pin_memory=device.type == "cuda",
            prefetch_factor=4 if workers else None)
        for rows, inputs in zip(row_batches, loader):
            yield (*(t.to(device, non_blocking=True) for t in inputs), torch.from_numpy(self.lexicon_of(rows)).to(device))


class _RawPairs:
    """Map-style dataset: row -> (text, preprocessed image; a blank one where unreadable)."""

    def __init__(self, texts: list[str], images: ImageFiles):
        self.texts, self.images = texts, images

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, row: int):
        return self.texts[row], self.images[row][0]


class _Collate:
    """A batch of (text, image) -> (input_ids, attention_mask, pixels), padded to the longest text."""

    def __init__(self, tokenizer, max_len: int):
        self.tokenizer, self.max_len = tokenizer, max_len

    def __call__(self, pairs: list):
        import torch
        texts, images = zip(*pairs)
        tok = self.tokenizer(list(texts), padding="longest", truncation=True, max_length=self.max_len,
                             return_tensors="pt")
        return tok["input_ids"], tok["attention_mask"], torch.stack(images)
