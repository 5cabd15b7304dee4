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
    """Map-style dataset of preprocessed images for torch's DataLoader."""

    def __init__(self, examples: list[Example], transform, size: int):
        self.examples, self.transform, self.size = examples, transform, size

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int):
        ex = self.examples[i]
        if ex.has_image:
            try:
                with Image.open(ex.image_path) as img:
                    return self.transform(to_rgb(img)), True
            except (OSError, ValueError, Image.DecompressionBombError):
                pass
        # A blank (mean-coloured) image: the features then say "no picture".
        import torch
        return torch.zeros(3, self.size, self.size), False


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB; transparent parts become white rather than black."""
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        background = Image.new("RGB", img.size, (255, 255, 255))
        background.paste(img, mask=img.getchannel("A"))
        return background
    return img.convert("RGB")


def loader_workers(device: torch.device, on_cpu: int) -> int:
    """Processes decoding images ahead of the model: up to 8 on a GPU, where decoding bounds the
    speed; `on_cpu` on a CPU, where the model needs the cores itself."""
    return min(8 if device.type == "cuda" else on_cpu, os.cpu_count() or 1)
