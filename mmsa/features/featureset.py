"""The feature cache, read: memory-mapped token features of a dataset's pairs, batch by batch.

`Features` is what training reads from: the cache (`FeatureSet`, built by mmsa.features.cache) or, for
finetune=full, the pairs themselves (mmsa.features.rawsource.RawSource). The cache's float16
`.npy` arrays are opened memory-mapped, so concurrent trials share one copy through the page
cache. torch is imported only where batches are made, so a process that just opens the cache
(the search driver) does not pay for torch's memory.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

if TYPE_CHECKING:
    import torch


class Features(Protocol):
    """What training, prediction and the search read pairs through."""

    guids: list[str]

    @property
    def text_dim(self) -> int: ...

    @property
    def image_dim(self) -> int: ...

    def lexicon_of(self, rows: np.ndarray) -> np.ndarray: ...

    def text_lengths(self, rows: np.ndarray) -> np.ndarray: ...

    def rows(self, guids: list[str]) -> np.ndarray: ...

    def batch(self, rows: np.ndarray, device: torch.device) -> tuple: ...

    def iter_batches(self, row_batches: list[np.ndarray], device: torch.device, augment: float = 0.0): ...

    def content_digest(self, rows: np.ndarray, labels: np.ndarray) -> str: ...


@dataclass
class FeatureSet:
    """Token features for every example of a dataset (train then test, dataset order)."""

    guids: list[str]
    text: np.ndarray  # (N, L, Dt) float16
    text_mask: np.ndarray  # (N, L) bool
    image: np.ndarray  # (N, T, Di) float16
    has_image: np.ndarray  # (N,) bool: the image decoded; False -> features of a blank image
    lexicon: np.ndarray  # (N, LEXICON_DIM) float32: mmsa.features.lexicon's scores of the raw text
    text_dir: Path
    image_dir: Path

    @classmethod
    def open(cls, guids: list[str], text_dir: str | Path, image_dir: str | Path) -> FeatureSet:
        """Memory-map two complete cache folders (e.g. inside a trial process)."""
        text_dir, image_dir = Path(text_dir), Path(image_dir)
        text = {n: np.load(text_dir / f"{n}.npy", mmap_mode="r") for n in ("tokens", "mask", "lexicon")}
        image = {n: np.load(image_dir / f"{n}.npy", mmap_mode="r") for n in ("tokens", "valid")}
        return cls(guids=list(guids), text=text["tokens"], text_mask=text["mask"], image=image["tokens"],
                   has_image=image["valid"], lexicon=text["lexicon"], text_dir=text_dir, image_dir=image_dir)

    @property
    def text_dim(self) -> int:
        return int(self.text.shape[-1])

    @property
    def image_dim(self) -> int:
        return int(self.image.shape[-1])

    def rows(self, guids: list[str]) -> np.ndarray:
        return row_index(self.guids, guids)

    def lexicon_of(self, rows: np.ndarray) -> np.ndarray:
        return np.asarray(self.lexicon[rows], dtype=np.float32)

    def text_lengths(self, rows: np.ndarray) -> np.ndarray:
        """Tokens of each row's text (its padding excluded)."""
        return self.text_mask[rows].sum(1)

    def batch(self, rows: np.ndarray, device: torch.device):
        """Model inputs for these rows (sorted by the caller for locality), float32 on `device`."""
        import torch
        mask = self.text_mask[rows]
        length = max(int(mask.sum(1).max()), 1)  # texts are right-padded: drop all-pad columns

        def t(a: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(a)).to(device, non_blocking=True)
        return (t(self.text[rows, :length]).float(), t(mask[:, :length]), t(self.image[rows]).float(),
                t(self.lexicon_of(rows)))

    def iter_batches(self, row_batches: list[np.ndarray], device: torch.device, augment: float = 0.0):
        """`batch(rows)` for each of `row_batches`, in order (cached features are fixed: `augment`
        applies to finetune=full's images only)."""
        for rows in row_batches:
            yield self.batch(rows, device)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.text, self.text_mask, self.image, self.has_image, self.lexicon))

    def content_digest(self, rows: np.ndarray, labels: np.ndarray) -> str:
        """A short hash of these rows' content, from the hashes the caches keep of every pair's
        text and image bytes, and of their labels: the same pairs give the same digest."""
        items = [json.loads((d / "meta.json").read_text()).get("items") or self.guids
                 for d in (self.text_dir, self.image_dir)]
        return digest(*(f"{items[0][r]}:{items[1][r]}" for r in rows), np.asarray(labels, np.int64).tobytes())


def row_index(all_guids: list[str], guids: list[str]) -> np.ndarray:
    """Positions of `guids` within `all_guids`."""
    index = {g: i for i, g in enumerate(all_guids)}
    return np.array([index[g] for g in guids], dtype=np.int64)


def digest(*parts: str | bytes) -> str:
    h = hashlib.blake2b(digest_size=8)
    for p in parts:
        h.update(p.encode("utf-8", "surrogatepass") if isinstance(p, str) else p)
        h.update(b"\0")
    return h.hexdigest()
