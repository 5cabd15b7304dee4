"""Full fine-tuning (finetune=full): both backbones run on every batch and train with the head.

No feature cache: `RawSource` reads and preprocesses the files of each batch, and `FullFusion`
is backbones + FusionModel. Meant for GPU machines (AMP is on under CUDA, see mmsa.train); on a
CPU it works, slowly.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from mmsa.config import Config
from mmsa.data import Example, normalize_tweet
from mmsa.model import FusionModel


class RawSource:
    """Per-batch model inputs read from the dataset files: (input_ids, attention_mask, pixels)."""

    def __init__(self, examples: list[Example], cfg: Config):
        from mmsa.encoders import build_image_encoder, build_text_encoder
        from mmsa.features import _ImageFiles
        self.guids = [ex.guid for ex in examples]
        self.cfg = cfg.data
        text_enc, image_enc = build_text_encoder(cfg.data.text_encoder), build_image_encoder(cfg.data.image_encoder)
        self.tokenizer, self.text_dim, self.image_dim = text_enc.tokenizer, text_enc.dim, image_enc.dim
        self.texts = [normalize_tweet(ex.text) if cfg.data.text_clean else ex.text for ex in examples]
        self.images = _ImageFiles(examples, image_enc.preprocess.transform(), image_enc.preprocess.size)

    def rows(self, guids: list[str]) -> np.ndarray:
        from mmsa.features import row_index
        return row_index(self.guids, guids)

    def batch(self, rows: np.ndarray, device: torch.device):
        tok = self.tokenizer([self.texts[r] for r in rows], padding="longest", truncation=True,
                             max_length=self.cfg.max_text_len, return_tensors="pt")
        pixels = torch.stack([self.images[int(r)][0] for r in rows])  # a blank image where unreadable
        return tok["input_ids"].to(device), tok["attention_mask"].to(device), pixels.to(device)


class FullFusion(nn.Module):
    """Text backbone + image backbone + FusionModel head, trained end to end."""

    def __init__(self, cfg: Config):
        super().__init__()
        from mmsa.encoders import build_image_encoder, build_text_encoder
        text_enc, image_enc = build_text_encoder(cfg.data.text_encoder), build_image_encoder(cfg.data.image_encoder)
        self.text_backbone = text_enc.model
        self.image_backbone = image_enc.backbone
        self._image_features = image_enc._features
        self.head = FusionModel(cfg.model)
        self.cfg = cfg.model

    def forward(self, input_ids, attention_mask, pixels):
        text = self.text_backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        image = self._image_features(pixels)
        if image.dim() == 4:
            image = image.flatten(2).transpose(1, 2)
        return self.head(text, attention_mask.bool(), image)
