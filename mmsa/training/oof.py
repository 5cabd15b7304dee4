"""Out-of-fold predictions: every labeled pair's class probabilities from the model of the fold
that held it out. One format for the search's trials, the probe and bench/cv.py: arrays `rows`
(feature rows), `labels`, `fold` (index of the fold that scored the row) and `probs`
(rows, classes), saved as an .npz file, or carried as text inside a Ray Tune result.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np

from mmsa.data.splits import Split

KEYS = ("rows", "labels", "fold", "probs")


def oof_arrays(folds: list[tuple[Split, Split]], fold_probs: list[np.ndarray]) -> dict[str, np.ndarray]:
    """The arrays of `fold_probs` (one per fold, in the order of its `val.rows`), sorted by row."""
    rows = np.concatenate([val.rows for _, val in folds])
    order = np.argsort(rows, kind="stable")
    return {"rows": rows[order].astype(np.int64),
            "labels": np.concatenate([val.labels for _, val in folds])[order].astype(np.int64),
            "fold": np.concatenate([np.full(len(val), k) for k, (_, val) in enumerate(folds)])[order].astype(np.int64),
            "probs": np.concatenate(fold_probs)[order].astype(np.float32)}


def to_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **{k: arrays[k] for k in KEYS})
    return buffer.getvalue()


def from_bytes(data: bytes, where: str = "out-of-fold predictions") -> dict[str, np.ndarray]:
    try:
        with np.load(io.BytesIO(data)) as f:
            out = {k: f[k] for k in KEYS}
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"{where}: not an out-of-fold predictions file ({e})") from None
    if not (len(out["rows"]) == len(out["labels"]) == len(out["fold"]) == len(out["probs"])):
        raise ValueError(f"{where}: arrays of different lengths")
    return out


def to_text(arrays: dict[str, np.ndarray]) -> str:
    """For a Ray Tune result: plain text travels and is logged as it is."""
    return base64.b64encode(to_bytes(arrays)).decode("ascii")


def from_text(text: str) -> dict[str, np.ndarray]:
    return from_bytes(base64.b64decode(text))


def save(path: str | Path, arrays: dict[str, np.ndarray]) -> None:
    from mmsa.data.files import write_atomically
    write_atomically(Path(path), to_bytes(arrays))


def load(path: str | Path) -> dict[str, np.ndarray]:
    return from_bytes(Path(path).read_bytes(), str(path))


def same_rows(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return np.array_equal(a["rows"], b["rows"]) and np.array_equal(a["labels"], b["labels"])
