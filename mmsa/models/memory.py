"""What training one model holds in memory, measured on the model's own architecture without
its weights (the pattern of Hugging Face accelerate's `estimate-memory`): the weights, the
gradients and AdamW's two moments of what trains, the weight average (EMA), and the activations
kept for the backward pass per example of a micro-batch.

Activations are measured, not guessed: one forward pass on the CPU at micro-batch 1 and 2, at the
config's text length and the backbone's image size, in the precision training uses (CUDA's fp16
and bf16 keep 2-byte activations: measured under CPU autocast to bf16, the same sizes), counting
every tensor autograd saves for the backward pass (torch.autograd.graph.saved_tensors_hooks), once
per storage, weights excluded. The difference of the two passes is the cost of one more example;
the rest (autocast's low-precision copies of the weights, ...) is fixed per step.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from mmsa.config import Config


@dataclass(frozen=True)
class TrainingMemory:
    """Bytes one model's training holds, by part (all on the training device; the best epoch's
    weights are kept in host memory: mmsa.training.fit)."""

    params: int  # parameters of the whole model
    trainable: int  # of which train
    weights: int
    gradients: int
    optimizer: int  # AdamW's two moments
    ema: int  # the weight average (train.ema > 0), buffers included
    activations_fixed: int  # per step, whatever the micro-batch
    activations_per_example: int

    def total(self, micro_batch: int) -> int:
        return (self.weights + self.gradients + self.optimizer + self.ema + self.activations_fixed
                + micro_batch * self.activations_per_example)

    def parts(self, micro_batch: int) -> str:
        gib = 2 ** 30
        return (f"weights {self.weights / gib:.2f} + gradients {self.gradients / gib:.2f} + AdamW "
                f"{self.optimizer / gib:.2f} + EMA {self.ema / gib:.2f} + activations "
                f"{(self.activations_fixed + micro_batch * self.activations_per_example) / gib:.2f} GiB "
                f"({self.activations_per_example / 2**20:.0f} MiB per example)")


def measure_training_memory(cfg: Config, half_precision: bool) -> TrainingMemory:
    """The parts of TrainingMemory for `cfg` (its features' sizes from its backbones' configs),
    activations in 2-byte precision where `half_precision` (CUDA fp16 / bf16), else 4-byte."""
    from mmsa.models.factory import create_model
    cfg = _with_sizes(cfg)
    model = create_model(cfg, pretrained=False).train()
    params = list(model.parameters())
    trained = [p for p in params if p.requires_grad]
    n_params, n_trainable = sum(p.numel() for p in params), sum(p.numel() for p in trained)
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    weights = sum(p.numel() * p.element_size() for p in params)
    grads = sum(p.numel() * p.element_size() for p in trained)
    one, two = (_saved_bytes(model, cfg, m, half_precision) for m in (1, 2))
    per_example = max(two - one, 0)
    return TrainingMemory(params=n_params, trainable=n_trainable, weights=weights + buffers, gradients=grads,
                          optimizer=2 * grads, ema=(weights + buffers) if cfg.train.ema > 0 else 0,
                          activations_fixed=max(one - per_example, 0), activations_per_example=per_example)


def _with_sizes(cfg: Config) -> Config:
    """`cfg` with the sizes its model is built with, read from the backbones' configs (no weights)."""
    from mmsa.features.encoders import text_shape
    from mmsa.features.featurize import ImageFeaturizer

    class Sizes:  # what Config.with_features reads
        text_dim = text_shape(cfg.data.text_encoder).dim
        image_dim = ImageFeaturizer(cfg.data).dim
    return cfg.with_features(Sizes)


def _inputs(model: torch.nn.Module, cfg: Config, m: int) -> tuple:
    """A micro-batch of m examples at full length: the model's own inputs (mmsa.features), random."""
    from mmsa.features.featurize import ImageFeaturizer
    from mmsa.features.lexicon import LEXICON_DIM
    length = cfg.data.max_text_len
    lexicon = torch.zeros(m, LEXICON_DIM)
    if cfg.data.finetune == "full":
        size = ImageFeaturizer(cfg.data).preprocess.size
        vocab = getattr(model.text_backbone.config, "vocab_size", 1000)
        return (torch.randint(3, vocab, (m, length)), torch.ones(m, length, dtype=torch.long),
                torch.randn(m, 3, size, size), lexicon)
    tokens = _image_tokens(cfg)
    return (torch.randn(m, length, cfg.model.text_dim), torch.ones(m, length, dtype=torch.bool),
            torch.randn(m, tokens, cfg.model.image_dim), lexicon)


def _image_tokens(cfg: Config) -> int:
    """Tokens the image backbone makes of one image (a CNN's grid, a ViT's patches)."""
    from mmsa.features.encoders import build_image_encoder
    encoder = build_image_encoder(cfg.data.image_encoder, pretrained=False)
    size = encoder.preprocess.size
    return int(encoder(torch.zeros(1, 3, size, size)).shape[1])


def _saved_bytes(model: torch.nn.Module, cfg: Config, m: int, half_precision: bool) -> int:
    """Bytes autograd keeps for the backward pass of one forward pass of m examples, each storage
    once, the weights' own storages excluded."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    inputs = _inputs(model, cfg, m)
    cast = torch.autocast("cpu", dtype=torch.bfloat16) if half_precision else contextlib.nullcontext()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), cast:
        model(*inputs).float().sum()
    return sum(storages.values())
