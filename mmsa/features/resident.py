"""Features of raw pairs computed in memory by backbones loaded once: what a served model uses.

The disk cache (mmsa.features.cache) suits datasets read again and again; a service sees each
pair once and must not pay for loading backbones or writing files per request. `Backbones`
holds one text and one image backbone, loaded at start, and computes in one pass of each what
every member reading them needs: the same inputs a model reads from the cache (float16 tokens
of its text layer, masks, lexicon scores), or, for finetune=full models, the raw inputs they
run their own backbones on.
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

CHUNK = 32  # pairs per forward pass: bounds the activations a large request holds
# Images per forward pass on a CPU: EfficientNet's activations for 4 images stay far below the
# 64 MB heap that a thread other than the main one allocates from, so they are reused from batch
# to batch (mmsa.features.heap); for 32 at once they are page-faulted in afresh each time.
CPU_IMAGE_CHUNK = 4


@dataclass
class InMemoryInputs:
    """Model inputs of every row already in memory (finetune=full: ids, mask, pixels, lexicon)."""

    tensors: tuple[torch.Tensor, ...]

    def text_lengths(self, rows: np.ndarray) -> np.ndarray:
        return self.tensors[1][rows].sum(1).numpy()

    def iter_batches(self, row_batches: list[np.ndarray], device: torch.device):
        for rows in row_batches:
            yield tuple(t[torch.as_tensor(rows)].to(device) for t in self.tensors)


def backbone_key(cfg: DataConfig) -> tuple[str, str]:
    """Members with equal keys share one Backbones."""
    return cfg.text_encoder, cfg.image_encoder


class Backbones:
    """A text and an image backbone, in eval mode on `device`, loaded once."""

    def __init__(self, cfg: DataConfig, device: torch.device):
        from mmsa.features.encoders import build_image_encoder, build_text_encoder
        from mmsa.features.heap import keep_freed_memory
        keep_freed_memory()
        self.device = device
        self.text = build_text_encoder(cfg.text_encoder).to(device).eval()
        self.image = build_image_encoder(cfg.image_encoder).to(device).eval()
        self.transform = self.image.preprocess.transform()

    def pixels(self, images: list[Image.Image | None]) -> torch.Tensor:
        """Preprocessed images, a blank one where there is none (as the cache has)."""
        size = self.image.preprocess.size
        return torch.stack([self.transform(to_rgb(img)) if img is not None else torch.zeros(3, size, size)
                            for img in images])

    @torch.no_grad()
    def features(self, cfgs: list[DataConfig], texts: list[str], images: list[Image.Image | None]) -> list:
        """For each config, the features of these pairs: a FeatureSet in memory, or InMemoryInputs
        for finetune=full. One image pass, and one text pass per (text length, cleaning)."""
        from mmsa.models.ensemble import feature_key
        n = len(texts)
        lexicon = lexicon_scores(texts)
        pixels = self.pixels(images)
        has_image = np.array([img is not None for img in images])
        image = self.image_tokens(pixels) if any(cfg.finetune != "full" for cfg in cfgs) else None
        def depth(cfg: DataConfig) -> int:
            return cfg.text_finetune_layers if cfg.finetune == "last_k" else 0
        wanted: dict[tuple, set[int]] = {}  # (max_len, clean) -> the layers some member reads
        for cfg in cfgs:
            if cfg.finetune != "full":
                wanted.setdefault((cfg.max_text_len, cfg.text_clean), set()).add(depth(cfg))
        texts_by = {}  # (max_len, clean) -> ({layer: tokens}, mask)
        out = {}
        for cfg in cfgs:
            key = feature_key(cfg)
            if key in out:
                continue
            clean = [normalize_tweet(t) if cfg.text_clean else t for t in texts]
            if cfg.finetune == "full":
                tok = self.text.tokenizer(clean, padding="longest", truncation=True, max_length=cfg.max_text_len,
                                          return_tensors="pt")
                out[key] = InMemoryInputs((tok["input_ids"], tok["attention_mask"], pixels, torch.from_numpy(lexicon)))
                continue
            sig = (cfg.max_text_len, cfg.text_clean)
            if sig not in texts_by:
                texts_by[sig] = self._text_layers(clean, cfg.max_text_len, wanted[sig])
            layers, mask = texts_by[sig]
            out[key] = FeatureSet(guids=[str(i) for i in range(n)], text=layers[depth(cfg)], text_mask=mask, image=image,
                                  has_image=has_image, lexicon=lexicon, text_dir=None, image_dir=None)
        return [out[feature_key(cfg)] for cfg in cfgs]

    @torch.no_grad()
    def image_tokens(self, pixels: torch.Tensor) -> np.ndarray:
        """(n, T, D) float16 image tokens of preprocessed images."""
        chunk = CPU_IMAGE_CHUNK if self.device.type == "cpu" else CHUNK
        return np.concatenate([self.image(pixels[s:s + chunk].to(self.device)).float().cpu().numpy()
                               for s in range(0, len(pixels), chunk)]).astype(np.float16)

    def _text_layers(self, texts: list[str], max_len: int, depths: set[int]):
        """({k: (n, max_len, D) float16 hidden states entering the top k layers}, mask), from one
        pass. Shaped like the cache's arrays; each chunk runs padded to its longest text only (the
        attention mask hides padding, so real tokens come out as the cache has them, to rounding)."""
        n = len(texts)
        hidden = {k: np.zeros((n, max_len, self.text.dim), dtype=np.float16) for k in depths}
        mask = np.zeros((n, max_len), dtype=bool)
        for s in range(0, n, CHUNK):
            tok = self.text.tokenizer(texts[s:s + CHUNK], padding="longest", truncation=True, max_length=max_len,
                                      return_tensors="pt")
            states = self.text.model(input_ids=tok["input_ids"].to(self.device),
                                     attention_mask=tok["attention_mask"].to(self.device),
                                     output_hidden_states=True).hidden_states
            width = states[0].shape[1]
            for k in depths:
                hidden[k][s:s + CHUNK, :width] = states[-1 - k].float().cpu().numpy().astype(np.float16)
            mask[s:s + CHUNK, :width] = tok["attention_mask"].numpy().astype(bool)
        return hidden, mask
