from pathlib import Path

import numpy as np
import pytest

import mmsa.features.encoders
import mmsa.features.cache
from mmsa.config import DataConfig
from mmsa.data.dataset import load_dataset
from mmsa.features.cache import load_features
from tests.conftest import make_synthetic


def test_subset_features_shapes_and_dtype(subset_prepared):
    cfg, prepared = subset_prepared
    f = prepared.features
    n = len(prepared.dataset.all_examples)
    assert f.text.shape == (n, cfg.max_text_len, 384) and f.text.dtype == np.float16
    assert f.image.shape == (n, 49, 1280) and f.image.dtype == np.float16
    assert isinstance(f.image, np.memmap) and f.has_image.all()
    sample = f.image[:4].astype(np.float32)
    assert np.isfinite(sample).all() and sample.std() > 0


@pytest.fixture
def tiny(tmp_path):
    root = make_synthetic(tmp_path / "ds", {"a": "positive", "b": "negative", "c": "neutral"}, test=["d"])
    return DataConfig(data_dir=str(root), cache_dir=str(tmp_path / "cache"), max_text_len=8)


def test_second_load_uses_the_cache(tiny, monkeypatch):
    first = load_features(tiny, load_dataset(tiny.data_dir))

    def refuse(*args, **kwargs):
        raise AssertionError("features were recomputed although the cache was complete")
    monkeypatch.setattr(mmsa.features.cache, "_build_atomically", refuse)
    second = load_features(tiny, load_dataset(tiny.data_dir))
    assert second.text_dir == first.text_dir and np.array_equal(second.image, first.image)


def test_killed_build_leaves_nothing_trusted(tiny, monkeypatch):
    real = mmsa.features.encoders.build_image_encoder

    def dying(name):
        enc = real(name)
        enc._features = lambda x: (_ for _ in ()).throw(KeyboardInterrupt())
        return enc
    monkeypatch.setattr(mmsa.features.encoders, "build_image_encoder", dying)
    with pytest.raises(KeyboardInterrupt):
        load_features(tiny, load_dataset(tiny.data_dir))
    cache = [p.name for p in Path(tiny.cache_dir).iterdir()]
    assert not any(".tmp-" in name for name in cache)
    assert not any(name.startswith("image-") and not name.endswith(".json") for name in cache)
    monkeypatch.setattr(mmsa.features.encoders, "build_image_encoder", real)
    assert load_features(tiny, load_dataset(tiny.data_dir)).has_image.all()


def test_a_subset_in_another_order_copies_rows_instead_of_running_the_backbones(tiny, tmp_path, monkeypatch, capsys):
    full = load_features(tiny, load_dataset(tiny.data_dir))
    # the same pairs, fewer of them and in another order (e.g. an outer fold of nested CV)
    root = make_synthetic(tmp_path / "part", {"c": "neutral", "a": "positive"}, test=["d"])
    part_cfg = DataConfig(data_dir=str(root), cache_dir=tiny.cache_dir, max_text_len=8)
    monkeypatch.setattr(mmsa.features.encoders.TextEncoder, "forward", lambda *a, **k: pytest.fail("text backbone ran"))
    monkeypatch.setattr(mmsa.features.encoders.ImageEncoder, "forward", lambda *a, **k: pytest.fail("image backbone ran"))
    part = load_features(part_cfg, load_dataset(root))
    assert part.text_dir != full.text_dir and part.guids == ["c", "a", "d"]
    for guid in part.guids:
        i, j = part.guids.index(guid), full.guids.index(guid)
        assert np.array_equal(part.text[i], full.text[j]) and np.array_equal(part.image[i], full.image[j])
        assert np.array_equal(part.text_mask[i], full.text_mask[j])
    assert capsys.readouterr().err.count("features of 3 examples copied from") == 2
    # an example whose content differs is not in the cache: the backbones must run
    (root / "data" / "a.txt").write_text("another text\n", encoding="utf-8")
    with pytest.raises(pytest.fail.Exception, match="text backbone ran"):
        load_features(part_cfg, load_dataset(root))


def test_incomplete_cache_is_rebuilt(tiny):
    first = load_features(tiny, load_dataset(tiny.data_dir))
    (first.image_dir / "meta.json").unlink()  # as if the build died before its last write
    second = load_features(tiny, load_dataset(tiny.data_dir))
    assert (second.image_dir / "meta.json").exists()
    assert np.array_equal(np.asarray(second.image), np.asarray(first.image))


def test_changed_data_gets_a_new_cache(tiny):
    first = load_features(tiny, load_dataset(tiny.data_dir))
    (Path(tiny.data_dir) / "data" / "a.txt").write_text("a completely different text")
    second = load_features(tiny, load_dataset(tiny.data_dir))
    assert second.text_dir != first.text_dir
    assert second.image_dir == first.image_dir  # images unchanged: their cache stays valid


def test_unreadable_image_is_reported_and_gets_blank_features(tiny):
    (Path(tiny.data_dir) / "data" / "d.jpg").write_bytes(b"not a jpeg at all")
    ds = load_dataset(tiny.data_dir)
    feats = load_features(tiny, ds)
    assert ds.report.unreadable_image == ["d"]
    assert not feats.has_image[feats.rows(["d"])[0]] and feats.has_image[feats.rows(["a"])[0]]


@pytest.mark.parametrize("mode", ["L", "CMYK", "P", "RGBA", "LA", "I;16"])
def test_odd_image_modes_become_rgb(mode):
    from PIL import Image

    from mmsa.data.images import to_rgb
    img = Image.new("RGB", (8, 6), (200, 10, 10)).convert(mode)
    out = to_rgb(img)
    assert out.mode == "RGB" and out.size == (8, 6)


def test_transparent_pixels_become_white():
    from PIL import Image

    from mmsa.data.images import to_rgb
    img = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert to_rgb(img).getpixel((0, 0)) == (255, 255, 255)


@pytest.mark.parametrize("content", ["truncated", "png", "text", "grayscale", "cmyk"])
def test_image_files_that_load_or_are_reported(tiny, content):
    import io

    from PIL import Image
    path = Path(tiny.data_dir) / "data" / "a.jpg"
    buf = io.BytesIO()
    if content == "truncated":
        Image.new("RGB", (64, 64), (1, 2, 3)).save(buf, "JPEG")
        path.write_bytes(buf.getvalue()[:200])
    elif content == "png":  # a PNG behind a .jpg name still loads
        Image.new("RGBA", (16, 16), (0, 255, 0, 128)).save(path, "PNG")
    elif content == "text":
        path.write_text("<html>404</html>")
    else:
        Image.new("RGB", (16, 16)).convert("L" if content == "grayscale" else "CMYK").save(path, "JPEG")
    ds = load_dataset(tiny.data_dir)
    feats = load_features(tiny, ds)
    readable = content in ("png", "grayscale", "cmyk")
    assert bool(feats.has_image[feats.rows(["a"])[0]]) == readable
    assert (ds.report.unreadable_image == ["a"]) == (not readable)
    if not readable:
        from mmsa.features.prepare import prepare
        assert "a" in prepare(tiny, val_fraction=0.0).dataset.report.skipped_train  # not usable for training


def test_raw_source_prepares_batches_ahead_in_workers_exactly_as_one_at_a_time(subset_dir):
    """finetune=full reads the files per batch; worker processes must not change a single value
    nor the order of the batches."""
    import pickle

    import torch

    from mmsa.features.rawsource import RawSource
    cfg = DataConfig(data_dir=str(subset_dir), max_text_len=16, finetune="full", loader_workers=2)
    examples = load_dataset(subset_dir).all_examples
    source = pickle.loads(pickle.dumps(RawSource(examples, cfg)))  # as shipped to a trial
    rng = np.random.default_rng(0)
    row_batches = [np.sort(rng.choice(len(examples), size=n, replace=False)) for n in (5, 3, 7, 1)]
    ahead = list(source.iter_batches(row_batches, torch.device("cpu")))
    assert len(ahead) == len(row_batches)
    for rows, got in zip(row_batches, ahead):
        want = source.batch(rows, torch.device("cpu"))
        assert got[2].shape == (len(rows), 3, 224, 224)
        for a, b in zip(got, want):
            assert torch.equal(a, b)
    assert pickle.loads(pickle.dumps(source))._loaded is None  # loaded state stays behind


@pytest.mark.skipif(not Path("/proc/locks").exists(), reason="needs Linux's /proc/locks to see waiting processes")
def test_two_processes_building_one_cache_take_turns_and_build_it_once(tiny):
    import subprocess
    import sys
    import time

    from mmsa.locks import exclusive
    from tests.search_helpers import ROOT
    code = ("import sys; from mmsa.config import DataConfig; from mmsa.features.cache import load_features; "
            "from mmsa.data.dataset import load_dataset; cfg = DataConfig(data_dir=sys.argv[1], cache_dir=sys.argv[2], "
            "max_text_len=8); load_features(cfg, load_dataset(cfg.data_dir))")
    Path(tiny.cache_dir).mkdir(parents=True)
    with exclusive(Path(tiny.cache_dir)):  # both builders arrive while the cache folder is taken
        procs = [subprocess.Popen([sys.executable, "-c", code, tiny.data_dir, tiny.cache_dir], cwd=ROOT,
                                  stderr=subprocess.PIPE, text=True) for _ in range(2)]
        deadline = time.time() + 180
        while time.time() < deadline and Path("/proc/locks").read_text().count("->") < 2:
            time.sleep(0.2)
        assert Path("/proc/locks").read_text().count("->") >= 2, "the builders never waited for the lock"
    errs = [p.communicate(timeout=300)[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), errs
    assert sum("text features (" in e for e in errs) == 1 and sum("image features (" in e for e in errs) == 1


def test_the_text_caches_of_other_depths_built_in_one_pass_equal_those_built_apart(tiny, tmp_path, monkeypatch):
    import json
    from dataclasses import replace

    from mmsa.features.prepare import at_text_depth, prepare
    real, calls = mmsa.features.encoders.TextEncoder.forward, []

    def counted(self, *args, **kwargs):
        calls.append(1)
        return real(self, *args, **kwargs)
    monkeypatch.setattr(mmsa.features.encoders.TextEncoder, "forward", counted)
    together = prepare(tiny, 0.0, also_depths=(2, 1))
    passes_together = len(calls)
    apart_cfg = replace(tiny, cache_dir=str(tmp_path / "apart"))
    calls.clear()
    apart = {d: prepare(at_text_depth(apart_cfg, d), 0.0).features.text_dir for d in (0, 1, 2)}
    assert passes_together > 0 and len(calls) == 3 * passes_together  # one pass of the text backbone, not three
    folders = {0: together.features.text_dir, **{d: Path(p) for d, p in together.text_dirs.items()}}
    assert sorted(folders) == [0, 1, 2] and len(set(folders.values())) == 3
    for d, folder in folders.items():
        assert folder.name == apart[d].name  # the same key: a later search or final finds it
        for name in ("tokens", "mask", "lexicon"):
            a, b = np.load(folder / f"{name}.npy"), np.load(apart[d] / f"{name}.npy")
            assert a.dtype == b.dtype and a.tobytes() == b.tobytes(), (d, name)
        meta, meta_apart = (json.loads((f / "meta.json").read_text()) for f in (folder, apart[d]))
        assert {k: v for k, v in meta.items() if k != "created"} == {k: v for k, v in meta_apart.items() if k != "created"}
    assert not [p for p in Path(tiny.cache_dir).iterdir() if ".tmp-" in p.name]
    calls.clear()  # all there: found, not built again
    again = prepare(tiny, 0.0, also_depths=(1, 2))
    assert calls == [] and again.text_dirs == together.text_dirs
