"""One way from a pair to its model inputs, used by the feature cache (mmsa.features.cache), a
served model (mmsa.features.resident) and the raw batches of finetune=full
(mmsa.features.rawsource) alike.

- `TextFeaturizer`: clean the tweet (URLs, @mentions, 'RT', '#'), score its raw text with the
  lexicon (mmsa.features.lexicon), tokenize (padded to `max_text_len`), and with a backbone encode
  it: the hidden states entering the top k layers (k = 0: the last layer's output), float16.
- `ImageFeaturizer`: decode (any PIL mode to RGB; a blank image where there is none), preprocess
  with the backbone's own transform, and with a backbone encode: its token grid, float16.

A backbone's output for a row depends, in its last bits, on the shape of the batch the row is in
(the CPU's matrix kernels sum in another order for other shapes: a text alone and the same text
among 63 others differ by up to 5e-4, measured). So both encoders cut their input into the same
fixed batches wherever they run: the same pairs in the same order give the cache's bits exactly;
a request of other pairs beside them differs from the cache by that rounding only
(tests/test_featurize.py measures both).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator

import numpy as np
import torch
from PIL import Image

from mmsa.config import DataConfig
from mmsa.data.dataset import normalize_tweet
from mmsa.data.images import to_rgb
from mmsa.features.lexicon import lexicon_scores

TEXT_BATCH = 64  # texts per forward pass
IMAGE_BATCH = 32  # images per forward pass
# On a CPU a served model encodes images 4 at a time: EfficientNet's activations for 4 images stay
# far below the 64 MB heap that a thread other than the main one allocates from, so they are
# reused from batch to batch (mmsa.features.heap); for 32 at once they are page-faulted in afresh
# each time. Batches of 4 and of 32 give the same bits (tests/test_featurize.py).
CPU_IMAGE_BATCH = 4


def clean_texts(cfg: DataConfig, texts: list[str]) -> list[str]:
    """What the tokenizer reads: tweets normalised (mmsa.data.dataset.normalize_tweet) where
    `text_clean` is on, else as they are."""
    return [normalize_tweet(t) for t in texts] if cfg.text_clean else list(texts)


class TextFeaturizer:
    """The text side of a data config: cleaning, lexicon scores, tokens; hidden states with a
    backbone (`encoder`, a mmsa.features.encoders.TextEncoder). Without one it loads the
    tokenizer only (what finetune=full batches need: their model runs its own backbone)."""

    def __init__(self, cfg: DataConfig, encoder=None):
        from mmsa.features.encoders import load_tokenizer
        self.cfg, self.encoder = cfg, encoder
        self.tokenizer = encoder.tokenizer if encoder is not None else load_tokenizer(cfg.text_encoder)

    @property
    def dim(self) -> int:
        """The backbone's width (from its config where no backbone is loaded)."""
        from mmsa.features.encoders import text_shape
        return self.encoder.dim if self.encoder is not None else text_shape(self.cfg.text_encoder).dim

    def clean(self, texts: list[str]) -> list[str]:
        return clean_texts(self.cfg, texts)

    @staticmethod
    def lexicon(texts: list[str]) -> np.ndarray:
        """(n, LEXICON_DIM) float32 scores of the raw texts (hashtags, @mentions and capitals kept)."""
        return lexicon_scores(texts)

    def tokenize(self, cleaned: list[str], padding: str = "max_length") -> dict[str, torch.Tensor]:
        """input_ids and attention_mask, cut at max_text_len; padded to it, or to the longest text."""
        return self.tokenizer(cleaned, padding=padding, truncation=True, max_length=self.cfg.max_text_len,
                              return_tensors="pt")

    @torch.no_grad()
    def encode_batches(self, cleaned: list[str], depths: Iterable[int], device: torch.device
                       ) -> Iterator[tuple[int, dict[int, np.ndarray], np.ndarray]]:
        """(first row, {k: (b, max_text_len, D) float16 hidden states entering the top k layers},
        (b, max_text_len) bool mask) for each TEXT_BATCH of `cleaned`."""
        depths = sorted(set(depths))
        for s in range(0, len(cleaned), TEXT_BATCH):
            tok = self.tokenize(cleaned[s:s + TEXT_BATCH])
            out = self.encoder(tok["input_ids"].to(device), tok["attention_mask"].to(device), depths)
            hidden = {k: h.float().cpu().numpy().astype(np.float16) for k, h in out.items()}
            yield s, hidden, tok["attention_mask"].numpy().astype(bool)

    def encode(self, cleaned: list[str], depths: Iterable[int], device: torch.device
               ) -> tuple[dict[int, np.ndarray], np.ndarray]:
        """All of `encode_batches`, joined: ({k: (n, max_text_len, D) float16}, (n, max_text_len) mask)."""
        parts = list(self.encode_batches(cleaned, depths, device))
        if not parts:
            return {k: np.zeros((0, self.cfg.max_text_len, self.encoder.dim), np.float16) for k in depths}, \
                np.zeros((0, self.cfg.max_text_len), bool)
        return ({k: np.concatenate([hidden[k] for _, hidden, _ in parts]) for k in parts[0][1]},
                np.concatenate([mask for _, _, mask in parts]))


class ImageFeaturizer:
    """The image side of a data config: decoded and preprocessed pixels; tokens with a backbone
    (`encoder`, a mmsa.features.encoders.ImageEncoder). Without one it builds the backbone's
    architecture only, for its preprocessing and width (no weights read)."""

    def __init__(self, cfg: DataConfig, encoder=None):
        from mmsa.features.encoders import build_image_encoder
        self.cfg, self.encoder = cfg, encoder
        if encoder is None:
            with torch.device("meta"):  # the architecture only: no memory for weights that are never used
                described = build_image_encoder(cfg.image_encoder, pretrained=False)
        else:
            described = encoder
        self.preprocess, self.dim = described.preprocess, described.dim
        self._transform = self.preprocess.transform()
        self._augmentations: dict = {}  # strength -> its training transform

    def pixels(self, image: Image.Image | None) -> tuple[torch.Tensor, bool]:
        """(3, size, size) preprocessed pixels, and whether there was an image: a blank
        (mean-coloured after normalising: zeros) one where there is none."""
        if image is None:
            return torch.zeros(3, self.preprocess.size, self.preprocess.size), False
        return self._transform(to_rgb(image)), True

    def pixels_of_file(self, path, augment: float = 0.0) -> tuple[torch.Tensor, bool]:
        """`pixels` of an image file (augmented with strength `augment`, for training pairs); a blank
        one where it cannot be read or decoded."""
        try:
            with Image.open(path) as img:
                if augment > 0:
                    return self._augmented(augment)(to_rgb(img)), True
                return self.pixels(img)
        except (OSError, ValueError, Image.DecompressionBombError):
            return self.pixels(None)

    def augmenting(self, strength: float):
        """`pixels_of_file` for training pairs: augmented with this strength (a picklable callable,
        for DataLoader worker processes)."""
        return functools.partial(self.pixels_of_file, augment=strength)

    def _augmented(self, strength: float):
        """torchvision's transforms v2 of the backbone's own preprocessing, for training pairs: a random
        resized crop (down to 1 - 0.65 x strength of the image), a horizontal flip and colour
        jitter (0.4 x strength), then the backbone's normalisation."""
        if strength not in self._augmentations:
            from torchvision.transforms import InterpolationMode, v2
            pre = self.preprocess
            self._augmentations[strength] = v2.Compose([
                v2.RandomResizedCrop(pre.size, scale=(1 - 0.65 * strength, 1.0), antialias=True,
                                     interpolation=InterpolationMode(pre.interpolation)),
                v2.RandomHorizontalFlip(0.5),
                v2.ColorJitter(brightness=0.4 * strength, contrast=0.4 * strength, saturation=0.4 * strength),
                v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(pre.mean, pre.std)])
        return self._augmentations[strength]

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor, device: torch.device, batch: int = IMAGE_BATCH) -> np.ndarray:
        """(n, T, D) float16 tokens of preprocessed images, `batch` at a time."""
        return np.concatenate([self.encoder(pixels[s:s + batch].to(device, non_blocking=True)).float().cpu().numpy()
                               .astype(np.float16) for s in range(0, len(pixels), batch)])
