"""A served model's request checks (mmsa/app/pairs.py): hostile input refused in one line, no
file outside the image root ever opened."""

import io
import os

import pandas as pd
import pytest
from PIL import Image

from mmsa.app.pairs import Limits, RequestError, pairs_from_frame


def _jpeg(size=(40, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buffer, "JPEG")
    return buffer.getvalue()


@pytest.fixture
def root(tmp_path):
    """An image root with one image, a symlink out of it, a FIFO, and a secret beside it."""
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "a.jpg").write_bytes(_jpeg())
    (tmp_path / "secret.jpg").write_bytes(_jpeg())
    (root / "escape.jpg").symlink_to(tmp_path / "secret.jpg")
    (root / "inside.jpg").symlink_to(root / "sub" / "a.jpg")
    os.mkfifo(root / "fifo.jpg")
    return root


def _one(limits=Limits(), root=None, **row):
    return pairs_from_frame(pd.DataFrame([row]), limits, root)


def test_good_pairs_are_read_with_their_status(root):
    pairs = pairs_from_frame(pd.DataFrame({"text": ["good", None, "broken", "empty"],
                                           "image": [_jpeg(), None, b"not an image", b""]}), Limits(), None)
    assert pairs.texts == ["good", "", "broken", "empty"]
    assert pairs.image_status == ["read", "none", "undecodable", "none"]
    assert pairs.images[0].size == (40, 30) and pairs.images[1] is None and pairs.images[2] is None
    under_root = _one(root=root, text="x", image_path="sub/a.jpg")
    assert under_root.image_status == ["read"]
    assert _one(root=root, text="x", image_path=str(root / "inside.jpg")).image_status == ["read"]  # a link inside


@pytest.mark.parametrize("path", ["/etc/passwd", "../secret.jpg", "sub/../../secret.jpg", "escape.jpg",
                                  "/proc/self/environ", "/dev/zero", "fifo.jpg", "missing.jpg", "sub", ""])
def test_paths_outside_the_root_or_not_regular_files_are_refused_without_opening_them(root, path, monkeypatch):
    opened = []
    real_open = os.open
    monkeypatch.setattr(os, "open", lambda p, *a, **k: opened.append(str(p)) or real_open(p, *a, **k))
    with pytest.raises(RequestError, match="row 0: image_path") as e:
        _one(root=root, text="x", image_path=path)
    assert "\n" not in str(e.value)
    assert all(p.startswith(str(root)) for p in opened)  # nothing outside the root was opened


def test_paths_are_refused_where_no_root_is_set():
    with pytest.raises(RequestError, match="MMSA_IMAGE_ROOT"):
        _one(text="x", image_path="/etc/passwd")


@pytest.mark.parametrize("frame,message", [
    (pd.DataFrame({"text": []}), "no rows"),
    (pd.DataFrame({"image": [b""]}), "missing column 'text'"),
    (pd.DataFrame({"text": ["x"], "imgae": [b""]}), "unknown column"),
    (pd.DataFrame({"text": [12]}), "row 0: text is int"),
    (pd.DataFrame({"text": ["x"], "image": ["/etc/passwd"]}), "row 0: image must be the file's bytes"),
    (pd.DataFrame({"text": ["x"], "image": [3.5]}), "row 0: image is float"),
    (pd.DataFrame({"text": ["x"], "image": [b"1"], "image_path": ["a.jpg"]}), "both image and image_path"),
    (pd.DataFrame({"text": ["x"] * 3}), "3 rows: at most 2"),
])
def test_bad_requests_are_refused_in_one_line(frame, message):
    with pytest.raises(RequestError, match=message) as e:
        pairs_from_frame(frame, Limits(max_rows=2), None)
    assert "\n" not in str(e.value)


def test_limits_on_text_image_bytes_and_pixels():
    assert _one(Limits(max_text_chars=10), text="y" * 5_000_000).texts == ["y" * 10]
    with pytest.raises(RequestError, match="row 0: image of .* bytes, over the limit"):
        _one(Limits(max_image_bytes=100), text="x", image=_jpeg())
    with pytest.raises(RequestError, match="row 0: image of 4000 x 3000 pixels, over the limit"):
        _one(Limits(max_image_pixels=1_000_000), text="x", image=_png((4000, 3000)))


def test_a_decompression_bomb_is_refused_from_its_header():
    bomb = _png((20000, 20000))  # a few hundred kB that would decode to 1.2 GB
    assert len(bomb) < 2_000_000
    with pytest.raises(RequestError, match="row 0: image .*(pixels|decompression bomb)"):
        _one(text="x", image=bomb)


def _png(size) -> bytes:
    buffer = io.BytesIO()
    Image.new("1", size).save(buffer, "PNG")
    return buffer.getvalue()
