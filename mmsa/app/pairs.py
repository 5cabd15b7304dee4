"""A served model's request, checked: the pairs it holds, within limits, each problem one line.

Columns: `text` (a string; null = no text), `image` (the image file's bytes: base64 in JSON, raw
bytes from Python; empty or null = no image; in JSON send "" for none: MLflow cannot decode a null) and `image_path` (a file under the folder that
$MMSA_IMAGE_ROOT names, for the operator who serves files already on the machine; refused when it
is unset). A server never opens a path outside that folder: no `..`, no absolute path elsewhere,
no symlink leading out, nothing but regular files (no devices, FIFOs or /proc).
"""

from __future__ import annotations

import io
import math
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from mmsa.errors import UserError

IMAGE_ROOT_ENV = "MMSA_IMAGE_ROOT"
MAX_ROWS_ENV = "MMSA_MAX_ROWS"
COLUMNS = ("text", "image", "image_path")


class RequestError(UserError):
    """A request the model refuses: the message says which row and what."""


@dataclass(frozen=True)
class Limits:
    max_rows: int = 256
    # Tweets are at most 280 characters (the course data's longest: 140); the tokenizer keeps 64
    # tokens, and the lexicon reads what is left after this cut.
    max_text_chars: int = 2000
    max_image_bytes: int = 10 * 2**20
    max_image_pixels: int = 40_000_000  # checked from the header, before anything is decoded

    @classmethod
    def from_env(cls) -> Limits:
        value = os.environ.get(MAX_ROWS_ENV)
        if value is None:
            return cls()
        if not value.isdigit() or int(value) < 1:
            raise UserError(f"${MAX_ROWS_ENV}={value!r}: not a positive whole number")
        return cls(max_rows=int(value))


def image_root_from_env() -> Path | None:
    value = os.environ.get(IMAGE_ROOT_ENV)
    if not value:
        return None
    root = Path(value).resolve()
    if not root.is_dir():
        raise UserError(f"${IMAGE_ROOT_ENV}={value}: not a folder")
    return root


@dataclass
class Pairs:
    texts: list[str]
    images: list[Image.Image | None]  # decoded, not yet converted; None: no image (a blank one is used)
    image_status: list[str]  # read | none | undecodable


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def pairs_from_frame(frame, limits: Limits, image_root: Path | None) -> Pairs:
    """The request's pairs, or a RequestError naming the first problem."""
    import pandas as pd
    if not isinstance(frame, pd.DataFrame):
        raise RequestError(f"expected a table with columns {', '.join(COLUMNS)}, got {type(frame).__name__}")
    unknown = [str(c) for c in frame.columns if c not in COLUMNS]
    if unknown:
        raise RequestError(f"unknown column(s) {', '.join(unknown)}: the columns are text, image (the image "
                           f"file's bytes, base64 in JSON) and image_path")
    if "text" not in frame.columns:
        raise RequestError("missing column 'text' (the columns are text, image and image_path)")
    if len(frame) == 0:
        raise RequestError("the request holds no rows")
    if len(frame) > limits.max_rows:
        raise RequestError(f"{len(frame)} rows: at most {limits.max_rows} per request (${MAX_ROWS_ENV})")
    texts, images, status = [], [], []
    for i, row in enumerate(frame.to_dict("records")):
        texts.append(_text(i, row["text"], limits))
        data = _image_bytes(i, row.get("image"), row.get("image_path"), limits, image_root)
        image = None if data is None else _decode(i, data, limits)
        images.append(image)
        status.append("none" if data is None else "read" if image is not None else "undecodable")
    return Pairs(texts, images, status)


def _text(i: int, value, limits: Limits) -> str:
    if _missing(value):
        return ""
    if not isinstance(value, str):
        raise RequestError(f"row {i}: text is {type(value).__name__}, not a string")
    return value[:limits.max_text_chars]


def _image_bytes(i: int, image, path, limits: Limits, root: Path | None) -> bytes | None:
    if not _missing(image) and not _missing(path):
        raise RequestError(f"row {i}: both image and image_path given; send one")
    if not _missing(image):
        if isinstance(image, str):
            raise RequestError(f"row {i}: image must be the file's bytes (base64 in JSON, with the model's "
                               f"signature), not a string; a file path goes in image_path")
        if not isinstance(image, (bytes, bytearray, memoryview)):
            raise RequestError(f"row {i}: image is {type(image).__name__}, not bytes")
        if len(image) > limits.max_image_bytes:
            raise RequestError(f"row {i}: image of {len(image)} bytes, over the limit of {limits.max_image_bytes}")
        return bytes(image) or None
    if _missing(path):
        return None
    return _read_under_root(i, path, limits, root)


def _read_under_root(i: int, path, limits: Limits, root: Path | None) -> bytes:
    if root is None:
        raise RequestError(f"row {i}: image_path refused: this model reads no files (the operator may set "
                           f"${IMAGE_ROOT_ENV} to a folder to allow paths under it); send the image's bytes")
    if not isinstance(path, str) or not path or "\0" in path:
        raise RequestError(f"row {i}: image_path must be a file name under ${IMAGE_ROOT_ENV}")
    outside = f"row {i}: image_path is not a file under ${IMAGE_ROOT_ENV}"
    # Lexically first: nothing outside the root is touched, not even to resolve it.
    candidate = Path(os.path.normpath(root / path))
    if not candidate.is_relative_to(root):
        raise RequestError(outside)
    try:
        real = candidate.resolve(strict=True)  # symlinks followed: where they lead must be inside too
    except (OSError, RuntimeError):
        raise RequestError(outside) from None
    if not real.is_relative_to(root):
        raise RequestError(outside)
    try:
        fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
    except OSError:
        raise RequestError(outside) from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):  # a folder, a FIFO, a device
            raise RequestError(outside)
        if info.st_size > limits.max_image_bytes:
            raise RequestError(f"row {i}: image of {info.st_size} bytes, over the limit of {limits.max_image_bytes}")
        with os.fdopen(os.dup(fd), "rb") as f:
            return f.read(limits.max_image_bytes + 1)
    finally:
        os.close(fd)


def _decode(i: int, data: bytes, limits: Limits) -> Image.Image | None:
    """The decoded image; None where it cannot be decoded (the pair then gets a blank image).
    Too many pixels is refused from the header, before decoding."""
    import warnings
    try:
        img = Image.open(io.BytesIO(data))
        width, height = img.size
    except Image.DecompressionBombError as e:
        raise RequestError(f"row {i}: image refused: {e}") from None
    except (OSError, ValueError, SyntaxError):
        return None
    if width * height > limits.max_image_pixels:
        raise RequestError(f"row {i}: image of {width} x {height} pixels, over the limit of "
                           f"{limits.max_image_pixels}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img.load()
    except (OSError, ValueError, Image.DecompressionBombError, SyntaxError):
        return None
    return img
