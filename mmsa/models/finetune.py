"""Full fine-tuning (finetune=full): both backbones run on every batch and train with the head.

No feature cache: `mmsa.features.rawsource.RawSource` makes each batch's inputs from the pairs, and
`FullFusion` is backbones + the configured head, built by mmsa.models.factory from `backbones`.
Meant for GPU machines (mixed precision under
CUDA, see mmsa.models.runtime); on a CPU it works, slowly.
"""

from __future__ import annotations

import copy
import functools

from torch import nn

from mmsa.config import Config


@functools.lru_cache(maxsize=1)
def _pretrained(text: str, image: str) -> tuple:
    """The two pretrained backbones, loaded once per process: each model of a trial (one per fold)
    starts from a copy of them instead of reading the weights again. Built without drawing from
    torch's random state (timm initialises a model before loading its weights): a fold's new
    layers start the same whether or not an earlier fold loaded the backbones (a trial resumed at
    a fold's start trains that fold as the uninterrupted run did)."""
    import torch

    from mmsa.features.encoders import build_image_encoder, build_text_encoder
    with torch.random.fork_rng(devices=[]):
        return build_text_encoder(text), build_image_encoder(image)


def backbones(cfg: Config, pretrained: bool = True) -> tuple:
    """(the text backbone, the image encoder) of a new model of `cfg`: copies of the pretrained
    ones (loaded once per process), or (`pretrained=False`) the architectures alone, random
    weights, nothing read or downloaded (sizing a model)."""
    if pretrained:
        text_enc, image_enc = _pretrained(cfg.data.text_encoder, cfg.data.image_encoder)
        return copy.deepcopy(text_enc.model), copy.deepcopy(image_enc)
    from mmsa.features.encoders import build_image_encoder, build_text_encoder
    return (build_text_encoder(cfg.data.text_encoder, pretrained=False).model,
            build_image_encoder(cfg.data.image_encoder, pretrained=False))


class FullFusion(nn.Module):
    """Text backbone + image backbone + a head, trained end to end. Takes the encoders it is given
    (mmsa.models.factory.create_model passes `backbones`): it reads no weights itself."""

    def __init__(self, cfg: Config, text_backbone: nn.Module, image_enc, head: nn.Module):
        super().__init__()
        self.text_backbone = text_backbone
        self.image_backbone = image_enc.backbone
        self._image_features = image_enc._features
        self.head = head
        self.cfg = cfg.model
        if cfg.train.grad_checkpointing:
            _checkpoint_activations(self.text_backbone)
            _checkpoint_activations(self.image_backbone)

    def pretrained_parameters(self) -> tuple[list[nn.Parameter], float]:
        """Both backbones train, at backbone_lr_scale times the head's lr."""
        return [*self.text_backbone.parameters(), *self.image_backbone.parameters()], self.cfg.backbone_lr_scale

    def forward(self, input_ids, attention_mask, pixels, lexicon):
        text = self.text_backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        image = self._image_features(pixels)
        if image.dim() == 4:
            image = image.flatten(2).transpose(1, 2)
        return self.head(text, attention_mask.bool(), image, lexicon)


def _checkpoint_activations(backbone: nn.Module) -> None:
    """Recompute a backbone's activations in the backward pass (transformers' and timm's own
    switches); a backbone that has neither keeps them."""
    backbone = getattr(backbone, "model", backbone)  # a transformers vision model inside its wrapper
    if hasattr(backbone, "activation_checkpointing_enable"):  # transformers 5
        backbone.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    elif hasattr(backbone, "gradient_checkpointing_enable"):  # transformers 4
        backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    elif hasattr(backbone, "set_grad_checkpointing"):  # timm
        backbone.set_grad_checkpointing(True)
