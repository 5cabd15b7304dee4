"""Decoded images, cached: every image of a dataset decoded, resized and centre-cropped once into a
memory-mapped uint8 array, so that fine-tuning (finetune=full) reads pixels every epoch, not JPEGs.

Decoding a course image takes about 3 ms of a core (`python -m bench.loader`: 333 a second,
against 75,000 read from the cache); an epoch of a fully fine-tuned model on a GPU reads every
training image again, so with a core or two to spare for it the GPU waits on the decoder. This is the "decode once, read fast" of
FFCV and webdataset, for one backbone's input size.

Each image is stored as ImageFeaturizer.square makes it from its file: resized as the backbone's
preprocessing resizes it (short side to `resize`, the same interpolation), then the `resize` x
`resize` square around the crop that preprocessing takes. So the backbone's evaluation pixels come
out of the cache bit for bit as from the file (tests/test_pixels.py), and training's random
resized crop draws from the square, from the cache or from the file alike: a wide image's far
sides, beyond the square, are never seen by augmentation.

Kept beside the feature cache (`cache_dir`), in `pixels-r<resize>-<interpolation>-<key>/`, keyed
like it by the images' bytes; built under a temporary name and renamed into place when whole.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from mmsa.config import DataConfig
from mmsa.data.dataset import Example

if TYPE_CHECKING:
    import torch

FORMAT = "pixels-1"


def build_pixel_cache(cfg: DataConfig, examples: list[Example], workers: int | None = None) -> Path:
    """The pixel cache of `examples` for `cfg`'s image backbone: its folder, built where missing
    (decoded by `workers` DataLoader processes; default: the machine's cores)."""
    import os

    from mmsa.data.images import ImageFiles
    from mmsa.features.cache import _get_or_build, _new_array, _progress, image_content_hash
    from mmsa.features.featureset import digest
    from mmsa.features.featurize import ImageFeaturizer
    featurizer = ImageFeaturizer(cfg)
    pre = featurizer.preprocess
    n = len(examples)
    content, items = image_content_hash(examples)
    model = digest(FORMAT, str(pre.resize), str(pre.size), pre.interpolation)

    def prepare():
        import torch

        def fill(tmp: Path) -> list[str]:
            pixels = _new_array(tmp / "pixels.npy", np.uint8, (n, 3, pre.resize, pre.resize))
            valid = _new_array(tmp / "valid.npy", np.bool_, (n,))
            loader = torch.utils.data.DataLoader(
                ImageFiles(examples, featurizer.square_file, featurizer.square), batch_size=32,
                num_workers=workers if workers is not None else min(8, os.cpu_count() or 1))
            s = 0
            with _progress(n, f"decoded images ({pre.resize} px)") as bar:
                for batch, ok in loader:
                    pixels[s:s + len(batch)] = batch.numpy()
                    valid[s:s + len(batch)] = ok.numpy()
                    s += len(batch)
                    bar.update(len(batch))
            pixels.flush(), valid.flush()
            return ["pixels", "valid"]
        return model, digest(model, content), fill

    Path(cfg.cache_dir).mkdir(parents=True, exist_ok=True)
    return _get_or_build(Path(cfg.cache_dir), f"pixels-r{pre.resize}-{pre.interpolation}", items, prepare)[1]


class CachedImages:
    """Map-style dataset of a pixel cache's images for torch's DataLoader, as mmsa.data.images.ImageFiles
    gives them from the files: (ImageFeaturizer.square, whether the image was read)."""

    def __init__(self, folder: str):
        self.folder = folder
        self._arrays: tuple | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_arrays": None}  # each worker maps the files itself

    def _open(self) -> tuple[np.ndarray, np.ndarray]:
        if self._arrays is None:
            self._arrays = (np.load(Path(self.folder) / "pixels.npy", mmap_mode="r"),
                            np.load(Path(self.folder) / "valid.npy", mmap_mode="r"))
        return self._arrays

    def __len__(self) -> int:
        return len(self._open()[1])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, bool]:
        import torch
        pixels, valid = self._open()
        return torch.from_numpy(np.array(pixels[i])), bool(valid[i])
