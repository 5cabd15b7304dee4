"""Read the course dataset layout into `Example`s, with a report of everything odd.

Layout: DIR/data/GUID.jpg, DIR/data/GUID.txt, DIR/train.txt ("guid,tag" rows) and
DIR/test_without_label.txt ("guid,null" rows).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from mmsa.errors import DataError

LABELS: tuple[str, ...] = ("positive", "neutral", "negative")
LABEL_TO_ID = {name: i for i, name in enumerate(LABELS)}

TRAIN_FILE = "train.txt"
TEST_FILE = "test_without_label.txt"
DATA_SUBDIR = "data"

# Tried in order. About a quarter of the course files are GBK/GB18030 (Chinese Windows), not UTF-8;
# cp1252 and latin-1 catch anything else, and latin-1 never fails, so no text is ever dropped.
TEXT_ENCODINGS: tuple[str, ...] = ("utf-8-sig", "gb18030", "cp1252", "latin-1")


@dataclass(frozen=True)
class Example:
    guid: str
    text: str
    image_path: Path
    label: int | None  # index into LABELS; None for test pairs
    has_text: bool = True
    has_image: bool = True


@dataclass
class DataReport:
    """Everything odd that was found while reading; printed once, logged with every run."""

    text_encodings: Counter = field(default_factory=Counter)
    missing_text: list[str] = field(default_factory=list)
    missing_image: list[str] = field(default_factory=list)
    empty_text: list[str] = field(default_factory=list)
    unreadable_image: list[str] = field(default_factory=list)
    unknown_label: list[str] = field(default_factory=list)
    duplicate_guid: list[str] = field(default_factory=list)
    skipped_train: list[str] = field(default_factory=list)
    label_file_notes: list[str] = field(default_factory=list)

    def problems(self) -> dict[str, list[str]]:
        names = ("missing_text", "missing_image", "empty_text", "unreadable_image",
                 "unknown_label", "duplicate_guid", "skipped_train")
        return {n: getattr(self, n) for n in names if getattr(self, n)}

    def summary(self) -> str:
        parts = [f"encodings {dict(self.text_encodings)}"]
        for name, guids in self.problems().items():
            shown = ", ".join(guids[:5]) + (" ..." if len(guids) > 5 else "")
            parts.append(f"{name}: {len(guids)} ({shown})")
        parts.extend(self.label_file_notes)
        return "; ".join(parts)

    def as_dict(self) -> dict:
        out: dict = {"text_encodings": dict(self.text_encodings)}
        out.update({k: list(v) for k, v in self.problems().items()})
        if self.label_file_notes:
            out["label_file_notes"] = list(self.label_file_notes)
        return out


@dataclass
class Dataset:
    root: Path
    train: list[Example]  # every usable labeled pair (train.txt)
    test: list[Example]  # every pair of test_without_label.txt, in file order
    report: DataReport

    @property
    def all_examples(self) -> list[Example]:
        return self.train + self.test


_URL = re.compile(r"(?:https?://|www\.)\S*|\bhttps?:/*\S*", re.IGNORECASE)
_MENTION = re.compile(r"@\w+")
_RETWEET = re.compile(r"^RT\s+@user:?\s*")


def normalize_tweet(text: str) -> str:
    """Tweet noise out, words in: URLs -> 'http', @mentions -> '@user', a leading 'RT @user:'
    dropped, '#word' -> 'word' (hashtags often carry the sentiment), spaces collapsed."""
    text = _URL.sub("http", text)
    text = _MENTION.sub("@user", text)
    text = _RETWEET.sub("", text)
    text = re.sub(r"#(\w)", r"\1", text)
    return " ".join(text.split())


def decode_text(raw: bytes) -> tuple[str, str]:
    """Decode bytes with the first encoding in TEXT_ENCODINGS that accepts them.

    Returns (text, encoding). Line endings are normalised and surrounding space stripped.
    """
    for enc in TEXT_ENCODINGS:
        try:
            text = raw.decode(enc)
        except UnicodeDecodeError:
            continue
        text = text.replace("\r\n", "\n").replace("\r", "\n").strip()
        return text, ("utf-8" if enc == "utf-8-sig" else enc)
    raise AssertionError("latin-1 decodes any byte string")  # pragma: no cover


def parse_label_file(path: Path, labeled: bool, report: DataReport) -> list[tuple[str, int | None]]:
    """Parse a "guid,tag" file. Blank lines, spaces, CRLF and a missing header are tolerated.

    Labeled files: an unknown tag is reported and the row skipped; a guid listed twice with the
    same tag is reported once and kept once; with a conflicting tag it is an error naming the guid.
    """
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: label file not found") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read label file ({e.strerror})") from None
    text, _ = decode_text(raw)
    rows: list[tuple[str, int | None]] = []
    seen: dict[str, int | None] = {}
    first_row = True
    for lineno, line in enumerate(text.split("\n"), start=1):
        line = line.strip()
        if not line:
            continue
        cells = [c.strip() for c in line.split(",")]
        if first_row:
            first_row = False
            if cells[0].lower() == "guid":
                continue
            report.label_file_notes.append(f"{path.name}: no 'guid,tag' header")
        if len(cells) != 2 or not cells[0]:
            raise DataError(f"{path}:{lineno}: expected 'guid,tag', got {line!r}")
        guid, tag = cells
        label: int | None = None
        if labeled:
            tag = tag.lower()
            if tag not in LABEL_TO_ID:
                report.unknown_label.append(guid)
                continue
            label = LABEL_TO_ID[tag]
        if guid in seen:
            if seen[guid] != label:
                raise DataError(
                    f"{path}:{lineno}: guid {guid} is listed twice with different tags "
                    f"({LABELS[seen[guid]]} and {LABELS[label]})")
            report.duplicate_guid.append(guid)
            continue
        seen[guid] = label
        rows.append((guid, label))
    if not rows:
        raise DataError(f"{path}: no 'guid,tag' rows")
    return rows


def _read_pair(data_dir: Path, guid: str, label: int | None, report: DataReport) -> Example:
    text_path = data_dir / f"{guid}.txt"
    image_path = data_dir / f"{guid}.jpg"
    text, has_text = "", False
    try:
        text, enc = decode_text(text_path.read_bytes())
        has_text = True
        report.text_encodings[enc] += 1
        if not text:
            report.empty_text.append(guid)
    except OSError:
        report.missing_text.append(guid)
    has_image = image_path.is_file() and image_path.stat().st_size > 0
    if not has_image:
        report.missing_image.append(guid)
    return Example(guid, text, image_path, label, has_text=has_text, has_image=has_image)


def load_dataset(root: str | Path) -> Dataset:
    """Read the course layout under `root`. Unusable training pairs are skipped and reported;
    every test pair is kept (it gets a prediction from whichever modality is present). Its pairs'
    files are named by absolute paths: what reads them may run elsewhere (a search's trials)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: dataset folder not found")
    if not (root / DATA_SUBDIR).is_dir():
        raise DataError(f"{root / DATA_SUBDIR}: missing 'data/' folder with GUID.jpg and GUID.txt pairs")
    root = root.absolute()
    data_dir = root / DATA_SUBDIR
    report = DataReport()
    train: list[Example] = []
    for guid, label in parse_label_file(root / TRAIN_FILE, labeled=True, report=report):
        ex = _read_pair(data_dir, guid, label, report)
        if ex.has_text and ex.has_image:
            train.append(ex)
        else:
            report.skipped_train.append(guid)
    test_path = root / TEST_FILE
    test = [_read_pair(data_dir, guid, None, report)
            for guid, _ in parse_label_file(test_path, labeled=False, report=report)] \
        if test_path.exists() else []
    if not train:
        raise DataError(f"{root / TRAIN_FILE}: no usable labeled pairs")
    return Dataset(root=root, train=train, test=test, report=report)
