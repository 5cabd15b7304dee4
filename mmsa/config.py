"""Run configuration: three dataclasses, addressed by users as one flat set of keys.

`--set lr=3e-4`, a search space's `fusion_depth:` and a logged MLflow param all use the same
flat key; `Config.from_flat` routes each key to the section that owns it.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field, fields
from typing import Any

from mmsa.errors import ConfigError

POOLINGS = ("mean", "first", "last", "attention")
COMBINES = ("sum", "concat", "gate")
MODALITIES = ("both", "text", "image")
CLASS_WEIGHTS = ("none", "balanced", "sqrt")
MONITORS = ("val_acc", "val_macro_f1")
FINETUNES = ("none", "last_k", "full")
HEADS = ("fusion", "mlp", "linear")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
# The backbones mmsa.features.encoders registers (it checks that its registry matches): named here so that
# validating a config never imports torch (the search driver validates every space file).
TEXT_ENCODER_NAMES = ("minilm",)
IMAGE_ENCODER_NAMES = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2", "resnet18", "resnet34",
                       "resnet50")
# Names of backbones outside the registry: a Hugging Face model (any), a timm model (images).
ENCODER_PREFIXES = {"text": ("hf:",), "image": ("hf:", "timm:")}
CACHE_DIR_ENV = "MMSA_CACHE_DIR"  # a machine's (a Ray node's) own feature-cache folder
# Where the feature cache lives unless a config says otherwise: $MMSA_CACHE_DIR, else under the
# user's cache folder, as Hugging Face and torch keep theirs; shared by every checkout and job.
DEFAULT_CACHE_DIR = os.environ.get(CACHE_DIR_ENV) or os.path.join(
    os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "mmsa-features")


@dataclass(frozen=True)
class DataConfig:
    data_dir: str = "../shared/mvsa"
    val_fraction: float = 0.2
    split_seed: int = 0
    text_encoder: str = "minilm"
    image_encoder: str = "efficientnet_lite0"
    max_text_len: int = 64
    text_clean: bool = True  # URLs, @mentions, 'RT', '#' normalised before tokenizing
    # none: train the head on cached frozen features. last_k: also train the top
    # `text_finetune_layers` text-encoder layers (the cache holds what enters them). full: run and
    # train both backbones per batch, no cache (for GPU machines).
    finetune: str = "none"
    text_finetune_layers: int = 2
    cache_dir: str = DEFAULT_CACHE_DIR
    # finetune=full: processes decoding images and tokenizing ahead of the model.
    # -1: on a GPU, the trial's CPU share less one (at most 8); none on a CPU (the model needs the cores).
    loader_workers: int = -1

    @property
    def text_depth(self) -> int:
        """Top text-encoder layers that train with the head: text_finetune_layers with
        finetune=last_k (the cache holds what enters them), else 0 (the cache holds the last layer's
        output; finetune=full runs the whole backbone)."""
        return self.text_finetune_layers if self.finetune == "last_k" else 0

    def feature_key(self) -> tuple:
        """Configs with equal keys read the same features (one cache, one served computation)."""
        return (self.text_encoder, self.image_encoder, self.max_text_len, self.text_clean, self.finetune,
                self.text_depth)


@dataclass(frozen=True)
class ModelConfig:
    # fusion: the cross-/self-attention design over tokens. mlp, linear: pooled text and image
    # features, each scaled to unit RMS, concatenated, then a hidden layer of d_model, or none.
    head: str = "fusion"
    # Defaults: the region the earlier single-split fusion searches kept finding; cross-validation
    # gave no evidence to move them, except class_weights (docs/results.md, Honest reading).
    d_model: int = 64
    heads: int = 4
    fusion_depth: int = 0
    pooling: str = "attention"
    combine: str = "sum"
    modalities: str = "both"
    dropout: float = 0.12
    image_grid: int = 0  # average a square grid of image tokens down to k x k; 0: keep all
    # Read the texts' lexicon scores (mmsa.features.lexicon) beside the tokens: one more route of
    # the fusion head, four more inputs of a pooled head or the probe.
    lexicon: bool = True
    token_dropout: float = 0.1  # training only: share of text/image tokens hidden per example
    text_lr_scale: float = 0.5  # learning-rate factor for fine-tuned text-encoder layers (last_k)
    # finetune=full: learning-rate factor for both pretrained backbones, against the new head's lr.
    backbone_lr_scale: float = 0.1
    # Set from the data config and the feature cache, not by users.
    text_backbone: str = "minilm"
    text_layers: int = 0  # top text-encoder layers trained with the head (data.text_finetune_layers)
    text_dim: int = 384
    image_dim: int = 1280
    num_classes: int = 3


@dataclass(frozen=True)
class TrainConfig:
    lr: float = 3.4e-4
    weight_decay: float = 0.04
    batch_size: int = 32
    micro_batch: int = 0  # 0: the whole batch at once; else gradient accumulation
    max_epochs: int = 6  # length of the learning-rate schedule
    stop_epoch: int = 0  # stop after this epoch (within the schedule); 0: at max_epochs
    warmup_frac: float = 0.1
    # none | balanced | sqrt. none: weighting cost accuracy in cross-validation (docs/results.md, Honest reading).
    class_weights: str = "none"
    label_smoothing: float = 0.0
    # Decay of an exponential moving average of the weights (per optimizer step), evaluated and kept;
    # 0: off.
    ema: float = 0.9
    patience: int = 3  # epochs without improvement of `monitor` before stopping; 0: never
    monitor: str = "val_acc"
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    # CUDA mixed precision: auto (bf16 where native, else fp16 with a gradient scaler) | bf16 | fp16 | fp32
    precision: str = "auto"
    num_threads: int = 0  # torch intra-op threads; 0: leave torch's default
    grad_clip: float = 0.0  # the gradients' global norm clipped to this before each step; 0: not clipped
    # finetune=full: image augmentation of the training pairs (random resized crop, horizontal
    # flip, colour jitter), its strength in [0, 1]; 0: none. Validation and prediction never augment.
    augment: float = 0.0
    # finetune=full: recompute the backbones' activations in the backward pass instead of keeping
    # them (less GPU memory for about a third more compute)
    grad_checkpointing: bool = False


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    SECTIONS = ("data", "model", "train")

    @classmethod
    def known_keys(cls) -> dict[str, tuple[str, type]]:
        """Flat key -> (section name, field type)."""
        out: dict[str, tuple[str, type]] = {}
        for section, klass in (("data", DataConfig), ("model", ModelConfig), ("train", TrainConfig)):
            for f in fields(klass):
                assert f.name not in out, f"config key '{f.name}' is defined twice"
                out[f.name] = (section, type(f.default))
        return out

    @classmethod
    def from_flat(cls, values: dict[str, Any], source: str = "config") -> Config:
        return cls().updated(values, source)

    @classmethod
    def from_stored(cls, values: dict[str, Any], source: str = "config") -> Config:
        """A config that an earlier version stored (a run's best_config.yaml, a checkpoint):
        keys it has retired are dropped."""
        # Models stored before the lexicon scores existed did not read them.
        return cls.from_flat({"lexicon": False, **{k: v for k, v in values.items() if k not in RETIRED_KEYS}},
                             source)

    def updated(self, values: dict[str, Any], source: str = "config") -> Config:
        """A new config: this one with `values` (flat keys) over it, checked; a one-line ConfigError
        naming `source` otherwise. Configs are never changed once built."""
        known = self.known_keys()
        changes: dict[str, dict[str, Any]] = {section: {} for section in self.SECTIONS}
        for key, value in values.items():
            if key in RETIRED_KEYS:
                raise ConfigError(f"{source}: key '{key}' was {RETIRED_KEYS[key]}")
            if key not in known:
                raise ConfigError(f"{source}: unknown key '{key}' (known: {', '.join(sorted(known))})")
            section, typ = known[key]
            changes[section][key] = coerce(value, typ, f"{source}: key '{key}'")
        cfg = dataclasses.replace(self, **{section: dataclasses.replace(getattr(self, section), **c)
                                           for section, c in changes.items() if c})
        cfg.validate(source)
        return cfg

    def with_features(self, features) -> Config:
        """A copy whose model sizes follow from the features it will read (cached or raw): what
        every model of this config is built with (mmsa.models.factory.create_model)."""
        return dataclasses.replace(self, model=dataclasses.replace(
            self.model, text_dim=features.text_dim, image_dim=features.image_dim,
            text_backbone=self.data.text_encoder, text_layers=self.data.text_depth))

    def with_train(self, **changes) -> Config:
        """A copy with these training settings changed (e.g. seed, stop_epoch)."""
        return dataclasses.replace(self, train=dataclasses.replace(self.train, **changes))

    def to_flat(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for section in self.SECTIONS:
            out.update(dataclasses.asdict(getattr(self, section)))
        return out

    def validate(self, source: str = "config") -> None:
        m, t, d = self.model, self.train, self.data
        checks = [
            ("head", m.head in HEADS, f"one of {HEADS}"),
            ("pooling", m.pooling in POOLINGS, f"one of {POOLINGS}"),
            ("combine", m.combine in COMBINES, f"one of {COMBINES}"),
            ("modalities", m.modalities in MODALITIES, f"one of {MODALITIES}"),
            ("class_weights", t.class_weights in CLASS_WEIGHTS, f"one of {CLASS_WEIGHTS}"),
            ("monitor", t.monitor in MONITORS, f"one of {MONITORS}"),
            ("device", t.device in ("auto", "cpu", "cuda"), "auto, cpu or cuda"),
            ("precision", t.precision in PRECISIONS, f"one of {PRECISIONS}"),
            ("d_model", m.d_model > 0 and m.heads > 0 and m.d_model % m.heads == 0,
             f"a positive multiple of heads ({m.heads})"),
            ("fusion_depth", m.fusion_depth >= 0, ">= 0"),
            ("dropout", 0 <= m.dropout < 1, "in [0, 1)"),
            ("image_grid", m.image_grid >= 0, ">= 0"),
            ("text_lr_scale", m.text_lr_scale > 0, "> 0"),
            ("backbone_lr_scale", m.backbone_lr_scale > 0, "> 0"),
            ("token_dropout", 0 <= m.token_dropout < 1, "in [0, 1)"),
            ("lr", t.lr > 0, "> 0"),
            ("weight_decay", t.weight_decay >= 0, ">= 0"),
            ("batch_size", t.batch_size > 0, "> 0"),
            ("micro_batch", t.micro_batch >= 0, ">= 0"),
            ("max_epochs", t.max_epochs > 0, "> 0"),
            ("stop_epoch", 0 <= t.stop_epoch <= t.max_epochs, "in [0, max_epochs]"),
            ("warmup_frac", 0 <= t.warmup_frac < 1, "in [0, 1)"),
            ("ema", 0 <= t.ema < 1, "in [0, 1)"),
            ("label_smoothing", 0 <= t.label_smoothing < 1, "in [0, 1)"),
            ("patience", t.patience >= 0, ">= 0"),
            ("val_fraction", 0 <= d.val_fraction < 1, "in [0, 1)"),
            ("max_text_len", d.max_text_len >= 4, ">= 4"),
            ("finetune", d.finetune in FINETUNES, f"one of {FINETUNES}"),
            ("text_finetune_layers", d.text_finetune_layers >= 1, ">= 1"),
            ("loader_workers", d.loader_workers >= -1, ">= 0, or -1 for automatic"),
            ("augment", 0 <= t.augment <= 1, "in [0, 1]"),
            ("grad_clip", t.grad_clip >= 0, ">= 0 (0: not clipped)"),
        ]
        for kind, registry in (("text", TEXT_ENCODER_NAMES), ("image", IMAGE_ENCODER_NAMES)):
            name, prefixes = getattr(d, f"{kind}_encoder"), ENCODER_PREFIXES[kind]
            checks.append((f"{kind}_encoder", name.startswith(prefixes) or name in registry,
                           f"one of {tuple(registry)} or {' or '.join(p + '<name>' for p in prefixes)}"))
        for key, ok, expected in checks:
            if not ok:
                value = self.to_flat()[key]
                raise ConfigError(f"{source}: key '{key}' = {value!r}, expected {expected}")


# Model sizes that follow from the data config and the feature cache (Config.with_features sets
# them; checkpoints carry them): refused where users give values, which would be overwritten.
DERIVED_KEYS = ("text_backbone", "text_layers", "text_dim", "image_dim", "num_classes")


# Keys of earlier versions: refused where users give them, dropped from stored configs.
RETIRED_KEYS = {"ensemble": "removed: a final model's seeds are members of it (mmsa.final --members ensemble:seeds=K)"}


def refuse_derived(values: dict[str, Any], source: str) -> dict[str, Any]:
    for key in values:
        if key in DERIVED_KEYS:
            raise ConfigError(f"{source}: key '{key}' follows from the data and the feature cache; "
                              f"it cannot be set")
    return values


def coerce(value: Any, typ: type, where: str) -> Any:
    """Convert a YAML/CLI value to the field's type, or raise a one-line ConfigError."""
    try:
        if typ is bool:
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError
            return bool(value)
        if typ is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            if isinstance(value, str):
                return int(float(value)) if float(value).is_integer() else int(value)
            return int(value)
        if typ is float:
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: {value!r} is not a valid {typ.__name__}") from None


def parse_overrides(pairs: list[str], source: str = "--set") -> dict[str, str]:
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{source}: expected key=value, got {pair!r}")
        out[key.strip()] = value.strip()
    return out
