"""Full fine-tuning (finetune=full): both backbones run on every batch and train with the head.

No feature cache: `mmsa.features.rawsource.RawSource` reads and preprocesses the files of each batch, and
`FullFusion` is backbones + FusionModel. Meant for GPU machines (AMP is on under CUDA, see
mmsa.models.runtime); on a CPU it works, slowly.
"""

from __future__ import annotations

from torch import nn

from mmsa.config import Config


class FullFusion(nn.Module):
    """Text backbone + image backbone + a head (mmsa.models.factory.create_model builds it), trained end to end."""

    def __init__(self, cfg: Config, head: nn.Module):
        super().__init__()
        from mmsa.features.encoders import build_image_encoder, build_text_encoder
        text_enc, image_enc = build_text_encoder(cfg.data.text_encoder), build_image_encoder(cfg.data.image_encoder)
        self.text_backbone = text_enc.model
        self.image_backbone = image_enc.backbone
        self._image_features = image_enc._features
        self.head = head
        self.cfg = cfg.model

    def pretrained_parameters(self) -> tuple[list[nn.Parameter], float]:
        """Both backbones train, at backbone_lr_scale times the head's lr."""
        return [*self.text_backbone.parameters(), *self.image_backbone.parameters()], self.cfg.backbone_lr_scale

    def forward(self, input_ids, attention_mask, pixels, lexicon):
        text = self.text_backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        image = self._image_features(pixels)
        if image.dim() == 4:
            image = image.flatten(2).transpose(1, 2)
        return self.head(text, attention_mask.bool(), image, lexicon)
