"""Images from the dataset's files: decoded to RGB, preprocessed for a backbone, a blank one
where a file cannot be read; and how many processes decode them ahead of the model."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from PIL import Image

from mmsa.data.dataset import Example

if TYPE_CHECKING:
    import torch


class ImageFiles:
    """Map-style dataset of the examples' preprocessed images for torch's DataLoader:
    (pixels, whether the image was read). `of_file(path)` and `blank(None)` are an image
    featurizer's (mmsa.features.featurize.ImageFeaturizer): the one way images become pixels."""

    def __init__(self, examples: list[Example], of_file, blank):
        self.examples, self.of_file, self.blank = examples, of_file, blank

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int):
        ex = self.examples[i]
        return self.of_file(ex.image_path) if ex.has_image else self.blank(None)


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB; transparent parts become white rather than black."""
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        background = Image.new("RGB", img.size, (255, 255, 255))
        background.paste(img, mask=img.getchannel("A"))
        return background
    return img.convert("RGB")


def loader_workers(device: torch.device, on_cpu: int, share: int | None = None) -> int:
    """Processes decoding images ahead of the model: on a GPU, where decoding bounds the speed, the
    cores the process may use (`share`, e.g. a trial's resources.cpu; default all) less the one
    feeding the GPU, at least 1 and at most 8; `on_cpu` on a CPU, where the model needs the cores."""
    cores = os.cpu_count() or 1
    if device.type != "cuda":
        return min(on_cpu, cores)
    return max(1, min(8, (share or cores) - 1))
