"""Features of raw pairs computed in memory by backbones loaded once: what a served model uses.

The disk cache (mmsa.features.cache) suits datasets read again and again; a service sees each
pair once and must not pay for loading backbones or writing files per request. `Backbones`
holds the text and image backbones of one feature config, loaded at start; calling it on
texts and decoded images gives the same inputs a model reads from the cache (float16 tokens,
masks, lexicon scores), or, for finetune=full models, the raw inputs they run their own
backbones on.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from mmsa.config import DataConfig
from mmsa.data.dataset import normalize_tweet
from mmsa.data.images import to_rgb
from mmsa.features.featureset import FeatureSet
from mmsa.features.lexicon import lexicon_scores

CHUNK = 32  # pairs per backbone forward pass: bounds the activations a large request holds


@dataclass
class InMemoryInputs:
    """Model inputs of every row already in memory (finetune=full: ids, mask, pixels, lexicon)."""

    tensors: tuple[torch.Tensor, ...]

    def text_lengths(self, rows: np.ndarray) -> np.ndarray:
        return self.tensors[1][rows].sum(1).numpy()

    def iter_batches(self, row_batches: list[np.ndarray], device: torch.device):
        for rows in row_batches:
            yield tuple(t[torch.as_tensor(rows)].to(device) for t in self.tensors)


class Backbones:
    """The backbones one feature config reads, in eval mode on `device`, loaded once."""

    def __init__(self, cfg: DataConfig, device: torch.device):
        from mmsa.features.encoders import build_image_encoder, build_text_encoder
        self.cfg, self.device = cfg, device
        self.text = build_text_encoder(cfg.text_encoder).to(device).eval()
        self.image = build_image_encoder(cfg.image_encoder).to(device).eval()
        self.transform = self.image.preprocess.transform()
        self.layers = cfg.text_finetune_layers if cfg.finetune == "last_k" else 0

    def _texts(self, texts: list[str]) -> list[str]:
        return [normalize_tweet(t) if self.cfg.text_clean else t for t in texts]

    def _pixels(self, images: list[Image.Image | None]) -> tuple[torch.Tensor, np.ndarray]:
        """Preprocessed images, a blank one where there is none (as the cache has)."""
        size = self.image.preprocess.size
        pixels = [self.transform(to_rgb(img)) if img is not None else torch.zeros(3, size, size) for img in images]
        return torch.stack(pixels), np.array([img is not None for img in images])

    @torch.no_grad()
    def __call__(self, texts: list[str], images: list[Image.Image | None]):
        """Features of these pairs: a FeatureSet in memory, or InMemoryInputs for finetune=full."""
        n, max_len = len(texts), self.cfg.max_text_len
        lexicon = lexicon_scores(texts)
        if self.cfg.finetune == "full":
            tok = self.text.tokenizer(self._texts(texts), padding="longest", truncation=True, max_length=max_len,
                                      return_tensors="pt")
            pixels, _ = self._pixels(images)
            return InMemoryInputs((tok["input_ids"], tok["attention_mask"], pixels, torch.from_numpy(lexicon)))
        # Arrays shaped like the cache's; each chunk runs padded to its longest text only (the
        # attention mask hides padding, so real tokens come out as the cache has them, to rounding).
        text = np.zeros((n, max_len, self.text.dim), dtype=np.float16)
        mask = np.zeros((n, max_len), dtype=bool)
        image, has_image = None, np.zeros(n, dtype=bool)
        clean = self._texts(texts)
        for s in range(0, n, CHUNK):
            tok = self.text.tokenizer(clean[s:s + CHUNK], padding="longest", truncation=True, max_length=max_len,
                                      return_tensors="pt")
            hidden, m = self.text(tok["input_ids"].to(self.device), tok["attention_mask"].to(self.device), self.layers)
            text[s:s + CHUNK, :hidden.shape[1]] = hidden.float().cpu().numpy().astype(np.float16)
            mask[s:s + CHUNK, :hidden.shape[1]] = m.cpu().numpy()
            pixels, has_image[s:s + CHUNK] = self._pixels(images[s:s + CHUNK])
            tokens = self.image(pixels.to(self.device)).float().cpu().numpy().astype(np.float16)
            if image is None:
                image = np.zeros((n, *tokens.shape[1:]), dtype=np.float16)
            image[s:s + CHUNK] = tokens
        return FeatureSet(guids=[str(i) for i in range(n)], text=text, text_mask=mask, image=image,
                          has_image=has_image, lexicon=lexicon, text_dir=None, image_dir=None)
