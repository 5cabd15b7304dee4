"""The one model factory, as timm has `create_model`: every model of this project is built here
from its config, which is read and never changed."""

from __future__ import annotations

import torch
from torch import nn

from mmsa.config import Config, ModelConfig
from mmsa.features.lexicon import LEXICON_DIM
from mmsa.models.heads import LEXICON_GAIN, FusionModel, Head, PooledHead


def create_model(cfg: Config, pretrained: bool = True) -> nn.Module:
    """The one model factory (training, final, the predictor, the memory planner): the configured
    `head` on cached features, or with finetune=full both backbones and the head (`pretrained=False`:
    backbones with random weights, for sizing a model). The config is read, never changed; its
    feature sizes come from `Config.with_features`."""
    if cfg.data.finetune == "full":
        from mmsa.models.finetune import FullFusion, backbones
        return FullFusion(cfg, *backbones(cfg, pretrained), create_head(cfg.model))
    return create_head(cfg.model)


def create_head(cfg: ModelConfig) -> Head:
    return FusionModel(cfg) if cfg.head == "fusion" else PooledHead(cfg)


def probe_head(cfg: Config, coef, intercept) -> PooledHead:
    """The linear probe (mmsa.models.probe) as a model of `probe_config(cfg)`: mean pooling, each
    modality scaled to unit RMS (= its L2 norm times sqrt(dim)), one linear layer whose weights
    are the probe's divided by sqrt(dim), so that it computes the probe's logits (the lexicon
    scores, where the config reads them, enter times LEXICON_GAIN: fit_probe's weights are for
    the raw scores)."""
    head = create_model(cfg)
    cfg = cfg.model
    scale = torch.cat([torch.full((cfg.text_dim,), cfg.text_dim ** -0.5),
                       torch.full((cfg.image_dim,), cfg.image_dim ** -0.5),
                       torch.full((LEXICON_DIM if cfg.lexicon else 0,), 1 / LEXICON_GAIN)])
    linear = head.classify[-1]
    with torch.no_grad():
        linear.weight.copy_(torch.as_tensor(coef, dtype=torch.float32) * scale)
        linear.bias.copy_(torch.as_tensor(intercept, dtype=torch.float32))
    return head.eval()
