from collections import Counter

import pytest

from mmsa.data.dataset import LABELS, DataReport, decode_text, load_dataset, parse_label_file
from mmsa.data.folds import split_train_val
from mmsa.errors import DataError
from tests.conftest import make_synthetic, need_mvsa


def test_decode_real_non_utf8_files():
    data = need_mvsa() / "data"
    # Real files that are GBK-encoded: \xa1\xad is the GBK ellipsis, \xa1\xb0 a left quote.
    checked = 0
    for path in sorted(data.glob("*.txt"))[:400]:
        raw = path.read_bytes()
        try:
            raw.decode("utf-8")
            continue
        except UnicodeDecodeError:
            pass
        text, enc = decode_text(raw)
        assert enc == "gb18030", path
        assert text and "\ufffd" not in text
        if b"\xa1\xad" in raw:
            assert "\u2026" in text  # the ellipsis survives as an ellipsis, not mojibake
        checked += 1
    assert checked >= 20


def test_decode_variants():
    assert decode_text("caf\u00e9 \U0001F600".encode("utf-8")) == ("caf\u00e9 \U0001F600", "utf-8")
    assert decode_text(b"\xef\xbb\xbfhello") == ("hello", "utf-8")  # BOM dropped
    assert decode_text(b"one\r\ntwo\rthree\n") == ("one\ntwo\nthree", "utf-8")
    assert decode_text(b"") == ("", "utf-8")
    text, enc = decode_text(b"\xff\xfe\xfd")  # invalid everywhere but latin-1: kept, not dropped
    assert enc in ("cp1252", "latin-1") and len(text) == 3


def test_parse_label_file_tolerates_format_noise(tmp_path):
    path = tmp_path / "train.txt"
    path.write_bytes(b"guid,tag\r\n\r\n 1 , positive \r\n2,NEGATIVE\n\n3,neutral\n3,neutral\n4,happy\n")
    report = DataReport()
    rows = parse_label_file(path, labeled=True, report=report)
    assert rows == [("1", 0), ("2", 2), ("3", 1)]
    assert report.duplicate_guid == ["3"] and report.unknown_label == ["4"]


def test_parse_label_file_without_header(tmp_path):
    path = tmp_path / "train.txt"
    path.write_text("7,positive\n8,negative\n")
    report = DataReport()
    assert parse_label_file(path, labeled=True, report=report) == [("7", 0), ("8", 2)]
    assert any("header" in note for note in report.label_file_notes)


def test_conflicting_duplicate_is_an_error_naming_the_guid(tmp_path):
    path = tmp_path / "train.txt"
    path.write_text("guid,tag\n5,positive\n5,negative\n")
    with pytest.raises(DataError, match="guid 5"):
        parse_label_file(path, labeled=True, report=DataReport())


def test_load_dataset_reports_missing_and_empty(tmp_path):
    root = make_synthetic(tmp_path / "ds", {str(i): LABELS[i % 3] for i in range(9)}, test=["t1", "t2"])
    (root / "data" / "1.jpg").unlink()
    (root / "data" / "2.txt").unlink()
    (root / "data" / "3.txt").write_bytes(b"  \n")
    (root / "data" / "t1.jpg").write_bytes(b"")
    ds = load_dataset(root)
    assert {ex.guid for ex in ds.train} == {"0", "3", "4", "5", "6", "7", "8"}
    assert sorted(ds.report.skipped_train) == ["1", "2"]
    assert ds.report.missing_image == ["1", "t1"] and ds.report.missing_text == ["2"]
    assert ds.report.empty_text == ["3"]
    assert [ex.guid for ex in ds.test] == ["t1", "t2"]  # test pairs are always kept, in file order
    assert not ds.test[0].has_image and ds.test[1].has_image


def test_load_dataset_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_dataset(tmp_path / "nope")
    (tmp_path / "x").mkdir()
    with pytest.raises(DataError, match="data/"):
        load_dataset(tmp_path / "x")


def test_split_is_seeded_and_stratified():
    ds = load_dataset(need_mvsa())
    a_train, a_val = split_train_val(ds.train, 0.2, seed=0)
    b_train, b_val = split_train_val(ds.train, 0.2, seed=0)
    c_train, c_val = split_train_val(ds.train, 0.2, seed=1)
    assert [e.guid for e in a_val] == [e.guid for e in b_val]
    assert [e.guid for e in a_val] != [e.guid for e in c_val]
    assert not {e.guid for e in a_train} & {e.guid for e in a_val}
    total, val = Counter(e.label for e in ds.train), Counter(e.label for e in a_val)
    for label in total:
        assert abs(val[label] / len(a_val) - total[label] / len(ds.train)) < 0.01


def test_real_dataset_counts():
    ds = load_dataset(need_mvsa())
    assert len(ds.train) == 3400 and len(ds.test) == 1111
    assert Counter(LABELS[e.label] for e in ds.train) == {"positive": 2030, "neutral": 356, "negative": 1014}
    assert ds.report.text_encodings["gb18030"] > 500


# ---------------------------------------------------------------- property-based

from hypothesis import given, settings
from hypothesis import strategies as st


@given(st.binary(max_size=200))
def test_decode_never_fails_and_never_drops_text(raw):
    text, enc = decode_text(raw)
    assert isinstance(text, str) and enc in ("utf-8", "gb18030", "cp1252", "latin-1")
    if raw.strip(b" \t\r\n\x0b\x0c\x1c\x1d\x1e\x1f\x85\xa0"):
        assert text  # something non-blank never decodes to nothing


@given(st.text(max_size=100))
def test_utf8_text_round_trips(text):
    decoded, enc = decode_text(text.encode("utf-8"))
    assert enc == "utf-8"
    assert decoded == text.lstrip("\ufeff").replace("\r\n", "\n").replace("\r", "\n").strip()


_guid = st.text(alphabet="0123456789abcdef", min_size=1, max_size=6)
_tag = st.sampled_from(["positive", "neutral", "negative", "Positive", " NEGATIVE "])


@settings(max_examples=60)
@given(rows=st.dictionaries(_guid, _tag, min_size=1, max_size=15), header=st.booleans(),
       newline=st.sampled_from(["\n", "\r\n"]), blank_every=st.integers(2, 5), pad=st.sampled_from(["", " ", "  "]))
def test_label_file_parsing_property(tmp_path_factory, rows, header, newline, blank_every, pad):
    lines = ["guid,tag"] if header else []
    for i, (guid, tag) in enumerate(rows.items()):
        lines.append(f"{pad}{guid}{pad},{tag}")
        if i % blank_every == 0:
            lines.append(pad)
    path = tmp_path_factory.mktemp("labels") / "train.txt"
    path.write_bytes(newline.join(lines).encode())
    report = DataReport()
    parsed = parse_label_file(path, labeled=True, report=report)
    assert parsed == [(g, LABELS.index(t.strip().lower())) for g, t in rows.items()]
    assert bool(report.label_file_notes) == (not header)
