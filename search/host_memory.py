"""`--memory-budget 12GB` (decimal: 12e9 bytes; 11.2GiB binary, search.sizes): choose how many trials run at once, and their micro-batch, so that the
whole search (driver, Ray's own processes, trials, the shared feature cache) stays under a budget.

The estimate is a sum of measured parts (bench/memory.py, this 2-core CPU, PSS):
- the driver with its Ray system processes, and what each idle trial adds (a Ray worker that
  imported torch): `Footprint` below;
- the feature cache once, whatever the number of trials (it is memory-mapped and shared);
- each trial's activations, proportional to its micro-batch and tokens.
Gradient accumulation keeps the tuned effective batch size when the micro-batch shrinks.
"""

from __future__ import annotations

from dataclasses import dataclass

from mmsa.errors import ConfigError
from search.sizes import GIB



@dataclass(frozen=True)
class Footprint:
    driver: int  # search driver (no torch) + Ray's own processes
    trial: int  # what each concurrent trial adds before its activations


# From bench/memory.py (bench/results/memory.md): the whole search's peak PSS with one and with two
# concurrent trials on the smoke space; a trial is the difference, the driver the rest minus the
# cache, each rounded up (the fusion space's trials hold more).
# Drivers re-measured once the driver no longer imported torch (Ray's TensorBoard logger had).
FOOTPRINT = Footprint(driver=int(0.80 * GIB), trial=int(0.66 * GIB))
BYTES_PER_TOKEN_DIM = 64  # activations kept for backward, per token, model dim and layer (bench/memory.py)
# A fine-tuning trial (finetune=last_k): transformers imported and the text layers' weights, gradients
# and AdamW moments; each text layer's activations as FINETUNE_LAYER head layers'. Calibrated on a
# measured search of 2-layer fine-tuning trials (bench/results/memory_finetune.md: 2.80 GiB with one
# trial, 3.85 with two, 2.51 under --memory-budget 3GB), the smallest values whose estimates stay
# above all three (2.92, 4.30, 2.60).
FINETUNE_TRIAL = int(0.30 * GIB)
FINETUNE_LAYER = 2


@dataclass
class HostFit:
    concurrent: int
    micro_batch: int  # 0: no accumulation needed
    estimate: int

    def describe(self, budget: int) -> str:
        micro = f"micro-batch {self.micro_batch}" if self.micro_batch else "full batches"
        return (f"memory budget {budget / GIB:.1f} GiB: {self.concurrent} concurrent trial(s), {micro}, "
                f"estimated peak {self.estimate / GIB:.2f} GiB")


def activation_bytes(batch: int, tokens: int, d_model: int, layers: int) -> int:
    return batch * tokens * d_model * max(layers, 1) * BYTES_PER_TOKEN_DIM


@dataclass(frozen=True)
class FineTuning:
    """What a trial that trains cached text-encoder layers (finetune=last_k) holds beyond a head."""
    layers: int  # text-encoder layers it trains, at most
    text_len: int  # tokens per text, at most
    text_dim: int


def activation_bytes_of(micro: int, tokens: int, d_model: int, layers: int, finetune: FineTuning | None) -> int:
    out = activation_bytes(micro, tokens, d_model, layers)
    if finetune is not None:  # a transformer layer's activations per token are about FINETUNE_LAYER head layers'
        out += activation_bytes(micro, finetune.text_len, finetune.text_dim, finetune.layers * FINETUNE_LAYER)
    return out


def choose(budget: int, cache_bytes: int, max_concurrent: int, batch_size: int, tokens: int,
         d_model: int, layers: int, input_dims: int, footprint: Footprint = FOOTPRINT,
         finetune: FineTuning | None = None) -> HostFit:
    """The most concurrent trials (up to max_concurrent) that fit, then the largest micro-batch."""
    fixed = footprint.driver + cache_bytes
    trial = footprint.trial + (FINETUNE_TRIAL if finetune is not None else 0)
    for concurrent in range(max_concurrent, 0, -1):
        micro = batch_size
        while micro >= 1:
            per_trial = trial + activation_bytes_of(micro, tokens, d_model, layers, finetune) + micro * input_dims * 4
            total = fixed + concurrent * per_trial
            if total <= budget:
                return HostFit(concurrent, 0 if micro == batch_size else micro, total)
            micro //= 2
    need = fixed + trial + activation_bytes_of(1, tokens, d_model, layers, finetune)
    raise ConfigError(f"--memory-budget {budget / GIB:.1f} GiB is too small: one trial alone needs about "
                      f"{need / GIB:.1f} GiB (driver, cache {cache_bytes / GIB:.2f} GiB, one trial)")


def choose_for_space(spec, budget: int, features, max_text_len: int, more_cache_bytes: int = 0) -> HostFit:
    """What fits for the most demanding trial the space can sample (largest batch, width, depth, text
    layers fine-tuned). `more_cache_bytes`: the other text caches of a space that searches fine-tuning."""
    cfg = spec.most_demanding()
    tokens = max_text_len + features.image.shape[1]
    finetune = None
    if cfg.data.finetune == "last_k":
        finetune = FineTuning(cfg.data.text_finetune_layers, max_text_len, features.text_dim)
    return choose(budget, features.nbytes + more_cache_bytes, spec.max_concurrent, cfg.train.batch_size, tokens,
                cfg.model.d_model, 1 + 4 * cfg.model.fusion_depth,
                max_text_len * features.text_dim + features.image.shape[1] * features.image_dim, finetune=finetune)
