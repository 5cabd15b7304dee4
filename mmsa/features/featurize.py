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

import math
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
        self._stats: dict = {}  # device -> (mean, std) of the normalisation

    # Images travel as uint8 squares: resized as the preprocessing resizes them (short side to
    # `resize`) and cut to the `resize` x `resize` square around the crop it takes (a quarter of
    # float32's bytes from a DataLoader worker to the device; what the pixel cache stores). Where
    # the model runs, a batch at a time, `normalize` crops them (training: a random resized crop,
    # flip and colour jitter, drawn from torch's generator in that process, so a checkpoint's
    # random state replays them) and normalises: FFCV's and DALI's split of the work.

    def square(self, image: Image.Image | None) -> tuple[torch.Tensor, bool]:
        """(3, resize, resize) uint8 pixels of an image, and whether there was one (a blank where not)."""
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms import functional as F
        pre = self.preprocess
        if image is None:
            return torch.zeros(3, pre.resize, pre.resize, dtype=torch.uint8), False
        resized = F.resize(to_rgb(image), pre.resize, interpolation=InterpolationMode(pre.interpolation))
        square = resized.crop(square_box(*resized.size, pre.resize, pre.size))
        return F.pil_to_tensor(square), True

    def square_file(self, path) -> tuple[torch.Tensor, bool]:
        """`square` of an image file; a blank where it cannot be read or decoded."""
        try:
            with Image.open(path) as img:
                return self.square(img)
        except (OSError, ValueError, Image.DecompressionBombError):
            return self.square(None)

    def normalize(self, squares: torch.Tensor, valid: torch.Tensor, augment: float = 0.0) -> torch.Tensor:
        """A batch of `square`s (B, 3, resize, resize) -> the backbone's input (B, 3, size, size) on
        the batch's device: the preprocessing's centre crop, scaled to [0, 1] as torchvision's
        ToTensor scales and normalised with the backbone's mean and std; for training pairs
        (`augment` > 0) a random resized crop (down to 1 - 0.65 x augment of the square), a
        horizontal flip and colour jitter (0.4 x augment) instead of the centre crop. Images that
        were not read (`valid` False) are all zeros (mean-coloured)."""
        size = self.preprocess.size
        if augment > 0:
            x = _jitter(_random_resized_crops(squares.float().div(255), size, 1 - 0.65 * augment), 0.4 * augment)
        else:
            from torchvision.transforms import functional as F
            x = F.center_crop(squares, size).float().div(255)
        if x.device not in self._stats:
            self._stats[x.device] = tuple(torch.as_tensor(v, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
                                          for v in (self.preprocess.mean, self.preprocess.std))
        mean, std = self._stats[x.device]
        return x.sub_(mean).div_(std) * valid.to(x.device).view(-1, 1, 1, 1)

    def pixels(self, image: Image.Image | None) -> tuple[torch.Tensor, bool]:
        """(3, size, size) float pixels as the backbone reads them, and whether there was an image:
        bit for bit torchvision's Resize, CenterCrop, ToTensor and Normalize."""
        square, ok = self.square(image)
        return self.normalize(square[None], torch.tensor([ok]))[0], ok

    def pixels_of_file(self, path) -> tuple[torch.Tensor, bool]:
        """`pixels` of an image file; a blank one where it cannot be read or decoded."""
        square, ok = self.square_file(path)
        return self.normalize(square[None], torch.tensor([ok]))[0], ok

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor, device: torch.device, batch: int = IMAGE_BATCH) -> np.ndarray:
        """(n, T, D) float16 tokens of preprocessed images, `batch` at a time."""
        return np.concatenate([self.encoder(pixels[s:s + batch].to(device, non_blocking=True)).float().cpu().numpy()
                               .astype(np.float16) for s in range(0, len(pixels), batch)])


def square_box(width: int, height: int, resize: int, size: int) -> tuple[int, int, int, int]:
    """The `resize`-sided square (left, top, right, bottom) of an image whose short side is `resize`,
    placed so that the centre `size` crop of the square is the centre `size` crop of the image
    (torchvision's CenterCrop offsets, int(round(...)), on both)."""
    def start(extent: int) -> int:
        inner = int(round((resize - size) / 2.0))
        return min(max(int(round((extent - size) / 2.0)) - inner, 0), extent - resize)
    left, top = start(width), start(height)
    return left, top, left + resize, top + resize


def _random_resized_crops(x: torch.Tensor, size: int, min_scale: float) -> torch.Tensor:
    """torchvision's RandomResizedCrop (area min_scale..1 of the square, aspect 3/4..4/3) and a
    horizontal flip with probability 1/2, each image of the batch its own, by bilinear sampling
    (torchvision.ops.roi_align, 2 x 2 samples per output pixel); boxes drawn from torch's CPU generator."""
    from torchvision.ops import roi_align
    n, side = len(x), x.shape[-1]
    area = torch.empty(n).uniform_(min_scale, 1.0) * side * side
    ratio = torch.exp(torch.empty(n).uniform_(math.log(3 / 4), math.log(4 / 3)))
    w = torch.sqrt(area * ratio).clamp_(max=side)
    h = torch.sqrt(area / ratio).clamp_(max=side)
    left, top = torch.rand(n) * (side - w), torch.rand(n) * (side - h)
    flip = torch.rand(n) < 0.5
    boxes = torch.stack([torch.arange(n, dtype=torch.float32), left, top, left + w, top + h], 1)
    out = roi_align(x, boxes.to(x.device), output_size=size, spatial_scale=1.0, sampling_ratio=2, aligned=True)
    return torch.where(flip.to(x.device).view(-1, 1, 1, 1), out.flip(-1), out)


def _jitter(x: torch.Tensor, magnitude: float) -> torch.Tensor:
    """torchvision's ColorJitter (brightness, contrast, saturation, in that order), each image of the
    batch its own factors in [1 - magnitude, 1 + magnitude], drawn from torch's CPU generator; on
    images scaled to [0, 1]."""
    factors = torch.empty(len(x), 3).uniform_(1 - magnitude, 1 + magnitude).to(x.device).view(len(x), 3, 1, 1, 1)
    brightness, contrast, saturation = factors.unbind(1)
    x = (x * brightness).clamp_(0, 1)
    weights = torch.tensor([0.299, 0.587, 0.114], device=x.device).view(1, 3, 1, 1)
    mean = (x * weights).sum(1, keepdim=True).mean(dim=(2, 3), keepdim=True)
    x = (contrast * x + (1 - contrast) * mean).clamp_(0, 1)
    gray = (x * weights).sum(1, keepdim=True)
    return (saturation * x + (1 - saturation) * gray).clamp_(0, 1)
