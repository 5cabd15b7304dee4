"""FusionModel: cross-attention + self-attention fusion of text and image tokens -> logits.

The seed report's design, generalised: project both token sets to d_model; image
self-attention; per fusion layer, text->image and image->text cross-attention, each followed
by self-attention (separate modules per route and per layer); pool each route; combine the
routes with the pooled text feature (and, with `lexicon`, the texts' projected lexicon scores:
mmsa.features.lexicon); classify. `fusion_depth=0` is late fusion of the pooled
projected tokens. `modalities` restricts the model to one side for ablations. `head=mlp|linear`
(PooledHead) is the simpler family: pooled features of each side, no attention between them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mmsa.config import ModelConfig
from mmsa.features.lexicon import LEXICON_DIM

# The four lexicon scores (within [-1, 1]) sit beside 1,664 unit-RMS features: scaled up, Adam's
# small steps can give them the weight the probe finds for them (bench/results/lexicon_heads.md).
LEXICON_GAIN = 16.0


def _self_attention(cfg: ModelConfig) -> nn.TransformerEncoderLayer:
    return nn.TransformerEncoderLayer(cfg.d_model, cfg.heads, dim_feedforward=2 * cfg.d_model,
                                      dropout=cfg.dropout, activation="gelu", batch_first=True,
                                      norm_first=True)


class CrossAttention(nn.Module):
    """Queries from one modality attend to the other's tokens (pre-norm, residual)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm_q, self.norm_kv = nn.LayerNorm(cfg.d_model), nn.LayerNorm(cfg.d_model)
        self.attn = nn.MultiheadAttention(cfg.d_model, cfg.heads, dropout=cfg.dropout, batch_first=True)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, q, kv, kv_pad):
        kv = self.norm_kv(kv)
        out, _ = self.attn(self.norm_q(q), kv, kv, key_padding_mask=kv_pad, need_weights=False)
        return q + self.drop(out)


class Route(nn.Module):
    """One fusion layer of one direction: cross-attention, then self-attention of the queries."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cross, self.self_attn = CrossAttention(cfg), _self_attention(cfg)

    def forward(self, q, q_pad, kv, kv_pad):
        return self.self_attn(self.cross(q, kv, kv_pad), src_key_padding_mask=q_pad)


class Pool(nn.Module):
    """(B, T, D) tokens + (B, T) padding mask (True = pad) -> (B, D). D: d_model unless given."""

    def __init__(self, cfg: ModelConfig, dim: int | None = None):
        super().__init__()
        self.kind = cfg.pooling
        dim = dim or cfg.d_model
        if self.kind == "attention":
            # No biases: softmax ignores a shift, so a bias here would never get a gradient.
            self.score = nn.Sequential(nn.LayerNorm(dim, bias=False), nn.Linear(dim, 1, bias=False))

    def forward(self, x, pad):
        valid = (~pad).float()
        if self.kind == "mean":
            return (x * valid.unsqueeze(-1)).sum(1) / valid.sum(1, keepdim=True).clamp(min=1)
        if self.kind == "first":
            return x[:, 0]
        if self.kind == "last":
            positions = torch.arange(x.shape[1], device=x.device, dtype=x.dtype)
            last = (valid * (positions + 1)).argmax(1)  # the last real token
            return x[torch.arange(x.shape[0], device=x.device), last]
        scores = self.score(x).squeeze(-1).masked_fill(pad, float("-inf"))
        return (scores.softmax(-1).unsqueeze(-1) * x).sum(1)


class Combine(nn.Module):
    """Merge K pooled (B, D) features: sum | concat (+ linear) | gate (softmax weights)."""

    def __init__(self, cfg: ModelConfig, k: int):
        super().__init__()
        self.kind = cfg.combine if k > 1 else "sum"  # one feature: nothing to combine
        if self.kind == "concat":
            self.proj = nn.Linear(k * cfg.d_model, cfg.d_model)
        elif self.kind == "gate":
            self.gate = nn.Linear(k * cfg.d_model, k)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        if self.kind == "sum":
            return torch.stack(feats).sum(0)
        cat = torch.cat(feats, -1)
        if self.kind == "concat":
            return self.proj(cat)
        weights = self.gate(cat).softmax(-1)  # (B, K)
        return (torch.stack(feats, 1) * weights.unsqueeze(-1)).sum(1)


class Head(nn.Module):
    """A model on cached features; with finetune=last_k it holds the top text layers (`text_top`)."""

    def pretrained_parameters(self) -> tuple[list[nn.Parameter], float]:
        """(pretrained weights being fine-tuned, their learning-rate factor against the head's lr)."""
        top = getattr(self, "text_top", None)
        return (list(top.parameters()), self.cfg.text_lr_scale) if top is not None else ([], 1.0)


class FusionModel(Head):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.use_text = cfg.modalities in ("both", "text")
        self.use_image = cfg.modalities in ("both", "image")
        fused = cfg.modalities == "both" and cfg.fusion_depth > 0
        if self.use_text and cfg.text_layers > 0:
            self.text_top = _text_top(cfg)
        if self.use_text:
            self.text_proj = nn.Sequential(nn.Linear(cfg.text_dim, d), nn.LayerNorm(d), nn.Dropout(cfg.dropout))
        if self.use_image:
            self.image_proj = nn.Sequential(nn.Linear(cfg.image_dim, d), nn.LayerNorm(d), nn.Dropout(cfg.dropout))
            self.image_self = _self_attention(cfg)
        depth = cfg.fusion_depth
        if fused:
            self.text_to_image = nn.ModuleList(Route(cfg) for _ in range(depth))
            self.image_to_text = nn.ModuleList(Route(cfg) for _ in range(depth))
        elif cfg.modalities == "text":
            self.text_self = nn.ModuleList(_self_attention(cfg) for _ in range(depth))
        elif cfg.modalities == "image":
            self.image_more = nn.ModuleList(_self_attention(cfg) for _ in range(max(depth - 1, 0)))
        self.fused = fused
        if self.use_text:
            self.pool_text = Pool(cfg)
        if self.use_image and not fused:
            self.pool_image = Pool(cfg)
        if fused:
            self.pool_t2i, self.pool_i2t = Pool(cfg), Pool(cfg)
        if cfg.lexicon:
            self.lexicon_proj = nn.Sequential(nn.Linear(LEXICON_DIM, d), nn.LayerNorm(d), nn.Dropout(cfg.dropout))
        n_routes = (3 if fused else (2 if cfg.modalities == "both" else 1)) + int(cfg.lexicon)
        self.combine = Combine(cfg, n_routes)
        self.head = nn.Sequential(nn.LayerNorm(d), nn.Dropout(cfg.dropout), nn.Linear(d, d), nn.GELU(),
                                  nn.Dropout(cfg.dropout), nn.Linear(d, cfg.num_classes))

    def forward(self, text, text_mask, image, lexicon) -> torch.Tensor:
        """text (B, L, Dt), text_mask (B, L) True = real token, image (B, T, Di), lexicon (B, 4)
        -> logits (B, C)."""
        text, text_pad, image, image_pad = _prepare_tokens(self, text, text_mask, image)
        feats: list[torch.Tensor] = []
        if self.use_text:
            t = self.text_proj(text)
            for layer in getattr(self, "text_self", []):
                t = layer(t, src_key_padding_mask=text_pad)
            feats.append(self.pool_text(t, text_pad))
        if self.use_image:
            v = self.image_self(self.image_proj(image), src_key_padding_mask=image_pad)
            for layer in getattr(self, "image_more", []):
                v = layer(v, src_key_padding_mask=image_pad)
            if not self.fused:
                feats.append(self.pool_image(v, image_pad))
        if self.fused:
            t2i, i2t = t, v
            for to_image, to_text in zip(self.text_to_image, self.image_to_text):
                t2i, i2t = to_image(t2i, text_pad, i2t, image_pad), to_text(i2t, image_pad, t2i, text_pad)
            feats += [self.pool_t2i(t2i, text_pad), self.pool_i2t(i2t, image_pad)]
        if self.cfg.lexicon:
            feats.append(self.lexicon_proj(lexicon))
        return self.head(self.combine(feats))


class PooledHead(Head):
    """head=mlp | linear: pool each modality's tokens (the same `pooling` options), scale each
    pooled vector to unit RMS (the linear probe's L2 normalisation, times sqrt(dim)), concatenate
    (with the lexicon scores times LEXICON_GAIN), classify: one hidden layer of d_model (mlp) or
    none (linear)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.use_text = cfg.modalities in ("both", "text")
        self.use_image = cfg.modalities in ("both", "image")
        width = 0
        if self.use_text:
            if cfg.text_layers > 0:
                self.text_top = _text_top(cfg)
            self.pool_text, width = Pool(cfg, cfg.text_dim), width + cfg.text_dim
        if self.use_image:
            self.pool_image, width = Pool(cfg, cfg.image_dim), width + cfg.image_dim
        width += LEXICON_DIM if cfg.lexicon else 0
        if cfg.head == "linear":
            self.classify = nn.Sequential(nn.Dropout(cfg.dropout), nn.Linear(width, cfg.num_classes))
        else:
            self.classify = nn.Sequential(nn.Dropout(cfg.dropout), nn.Linear(width, cfg.d_model), nn.GELU(),
                                          nn.Dropout(cfg.dropout), nn.Linear(cfg.d_model, cfg.num_classes))

    def forward(self, text, text_mask, image, lexicon) -> torch.Tensor:
        text, text_pad, image, image_pad = _prepare_tokens(self, text, text_mask, image)
        feats = []
        if self.use_text:
            feats.append(_unit_rms(self.pool_text(text, text_pad)))
        if self.use_image:
            feats.append(_unit_rms(self.pool_image(image, image_pad)))
        if self.cfg.lexicon:
            feats.append(lexicon * LEXICON_GAIN)
        return self.classify(torch.cat(feats, -1))


def _unit_rms(x: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True).clamp(min=1e-12))


def _text_top(cfg: ModelConfig) -> nn.ModuleList:
    """The top `text_layers` text-encoder layers (finetune=last_k), initialised from the pretrained
    backbone; the cache holds what enters them."""
    from mmsa.features.encoders import build_text_encoder
    return build_text_encoder(cfg.text_backbone).top_layers(cfg.text_layers)


def _prepare_tokens(model: nn.Module, text, text_mask, image):
    """What every head does first: run the fine-tuned text layers (last_k), average the image grid
    (image_grid), hide a `token_dropout` share of tokens while training.
    -> (text, text_pad, image, image_pad); pad masks are True where a token is absent."""
    cfg = model.cfg
    if hasattr(model, "text_top"):
        text = _run_text_top(model.text_top, text, text_mask)
    text_pad = ~text_mask.bool()
    image = _pool_grid(image, cfg.image_grid)
    image_pad = torch.zeros(image.shape[:2], dtype=torch.bool, device=image.device)
    if model.training and cfg.token_dropout > 0:
        text_pad = _drop_tokens(text_pad, cfg.token_dropout)
        image_pad = _drop_tokens(image_pad, cfg.token_dropout)
    return text, text_pad, image, image_pad


def _drop_tokens(pad: torch.Tensor, share: float) -> torch.Tensor:
    """Hide a random `share` of the real tokens (never the first one)."""
    drop = torch.rand(pad.shape, device=pad.device) < share
    drop[:, 0] = False
    return pad | drop


def with_image_grid(inputs: tuple, k: int) -> tuple:
    """A head's inputs (text, text_mask, image, lexicon) with the image grid already averaged to
    k x k. A head of `image_grid` k reads them exactly as it reads the raw inputs, since it leaves
    an averaged grid as it is; so heads of one grid can share the average."""
    text, text_mask, image, *rest = inputs
    return (text, text_mask, _pool_grid(image, k), *rest)


def _pool_grid(image: torch.Tensor, k: int) -> torch.Tensor:
    """Average a square grid of image tokens (e.g. a CNN's 7x7) down to k x k; k <= 0: keep all."""
    side = math.isqrt(image.shape[1])
    if k <= 0 or k >= side or side * side != image.shape[1]:
        return image
    grid = image.transpose(1, 2).reshape(image.shape[0], image.shape[2], side, side)
    return F.adaptive_avg_pool2d(grid, k).flatten(2).transpose(1, 2)


def _run_text_top(layers: nn.ModuleList, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # An additive (B, 1, 1, L) mask works with both the eager and the sdpa attention of HF.
    additive = (~mask.bool())[:, None, None, :].to(hidden.dtype) * torch.finfo(hidden.dtype).min
    for layer in layers:
        out = layer(hidden, attention_mask=additive)
        hidden = out[0] if isinstance(out, tuple) else out
    return hidden
