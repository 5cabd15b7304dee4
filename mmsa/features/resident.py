"""Features of raw pairs computed in memory by backbones loaded once: what a served model uses.

The disk cache (mmsa.features.cache) suits datasets read again and again; a service sees each
pair once and must not pay for loading backbones or writing files per request. `Backbones`
holds one text and one image backbone, loaded at start, and computes through the cache's own
featurizers (mmsa.features.featurize), in one pass of each, what every member reading them needs:
the inputs a model reads from the cache (float16 tokens of its text layer, masks, lexicon
scores), or, for finetune=full models, the raw inputs they run their own backbones on.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from mmsa.config import DataConfig
from mmsa.features.featureset import FeatureSet
from mmsa.features.featurize import CPU_IMAGE_BATCH, IMAGE_BATCH, ImageFeaturizer, TextFeaturizer
from mmsa.features.rawsource import RawSource


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
        self.image = ImageFeaturizer(cfg, build_image_encoder(cfg.image_encoder).to(device).eval())

    @torch.no_grad()
    def features(self, cfgs: list[DataConfig], texts: list[str], images: list[Image.Image | None]) -> list:
        """For each config, the features of these pairs: a FeatureSet in memory, or a RawSource for
        finetune=full. One image pass, and one text pass per (text length, cleaning)."""
        n = len(texts)
        lexicon = TextFeaturizer.lexicon(texts)
        cached = [cfg for cfg in cfgs if cfg.finetune != "full"]
        image = has_image = None
        if cached:
            pixels, read = zip(*map(self.image.pixels, images)) if images else ((), ())
            batch = CPU_IMAGE_BATCH if self.device.type == "cpu" else IMAGE_BATCH
            image = self.image.encode(torch.stack(pixels), self.device, batch)
            has_image = np.array(read, dtype=bool)
        by_text: dict[tuple, list[DataConfig]] = {}  # (max_len, clean) -> the configs reading that pass
        for cfg in cached:
            by_text.setdefault((cfg.max_text_len, cfg.text_clean), []).append(cfg)
        out = {}
        for group in by_text.values():
            featurizer = TextFeaturizer(group[0], self.text)
            layers, mask = featurizer.encode(featurizer.clean(texts), {cfg.text_depth for cfg in group}, self.device)
            for cfg in group:
                out[cfg.feature_key()] = FeatureSet(guids=[str(i) for i in range(n)], text=layers[cfg.text_depth],
                                                    text_mask=mask, image=image, has_image=has_image, lexicon=lexicon,
                                                    text_dir=None, image_dir=None)
        for cfg in cfgs:
            if cfg.finetune == "full":
                featurizers = (TextFeaturizer(cfg, self.text), self.image)
                out[cfg.feature_key()] = RawSource.in_memory(texts, images, cfg, featurizers)
        return [out[cfg.feature_key()] for cfg in cfgs]
