"""mmsa/features/pixels.py: images decoded once; from the cache, a backbone's evaluation pixels are
those of the files bit for bit, and fine-tuning's batches the same."""

import numpy as np
import pytest
import torch
from PIL import Image

from mmsa.config import DataConfig
from mmsa.data.dataset import Example, load_dataset
from mmsa.features.featurize import ImageFeaturizer
from mmsa.features.featurize import square_box
from mmsa.features.pixels import CachedImages, build_pixel_cache


def _examples(folder, sizes) -> list[Example]:
    """Images of many shapes and modes (odd sides, wide, tall, smaller than the resize, RGBA,
    grey, palette), one unreadable file and one pair without an image."""
    rng = np.random.default_rng(0)
    out = []
    for i, (w, h, mode) in enumerate(sizes):
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        img = Image.fromarray(pixels).convert(mode)
        path = folder / f"{i}.{'png' if mode in ('RGBA', 'P', 'LA') else 'jpg'}"
        img.save(path)
        out.append(Example(str(i), "t", path, 0))
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    out.append(Example("broken", "t", folder / "broken.jpg", 0))
    out.append(Example("none", "t", folder / "none.jpg", 0, has_image=False))
    return out


SIZES = [(301, 257, "RGB"), (600, 200, "RGB"), (199, 611, "RGB"), (120, 90, "RGB"), (257, 257, "L"),
         (333, 280, "RGBA"), (280, 333, "P"), (224, 224, "RGB")]


@pytest.mark.parametrize("encoder", ["efficientnet_lite0", "timm:convnext_tiny"])
def test_cached_pixels_are_the_files_pixels_bit_for_bit(tmp_path, encoder):
    """The backbone's input from the cache, from the file, and by torchvision's own Resize,
    CenterCrop, ToTensor and Normalize (what the feature cache was built with) are the same bits."""
    from mmsa.data.images import to_rgb
    examples = _examples(tmp_path, SIZES)
    cfg = DataConfig(image_encoder=encoder, cache_dir=str(tmp_path / "cache"))
    featurizer = ImageFeaturizer(cfg)
    reference = featurizer.preprocess.transform()
    folder = build_pixel_cache(cfg, examples, workers=0)
    cached = CachedImages(str(folder))
    assert len(cached) == len(examples)
    squares, read = zip(*(cached[i] for i in range(len(examples))))
    pre = featurizer.preprocess
    assert all(c.dtype == torch.uint8 and c.shape == (3, pre.resize, pre.resize) for c in squares)
    assert read[-2:] == (False, False)
    batch = featurizer.normalize(torch.stack(squares), torch.tensor(read))
    for i, ex in enumerate(examples[:-2]):
        with Image.open(ex.image_path) as img:
            want = reference(to_rgb(img))
        assert torch.equal(batch[i], want), ex.guid
        assert torch.equal(featurizer.pixels_of_file(ex.image_path)[0], want)
        assert torch.equal(featurizer.square_file(ex.image_path)[0], squares[i])
    assert not batch[-2:].any()  # blanks: mean-coloured, zeros once normalised


@pytest.mark.parametrize("resize,size", [(249, 224), (256, 224), (236, 224), (225, 224)])
def test_the_square_holds_the_centre_crop_whatever_the_rounding(resize, size):
    """torchvision's CenterCrop rounds half offsets to even; the square is placed so that its own
    centre crop lands on the image's, for odd differences too."""
    for width, height in ((301, 249), (600, 249), (249, 611), (249, 249), (400, 250)):
        short = min(width, height)
        scaled = (round(width * resize / short), round(height * resize / short))
        left, top, right, bottom = square_box(*scaled, resize, size)
        assert right - left == bottom - top == resize and 0 <= left <= scaled[0] - resize
        inner = int(round((resize - size) / 2.0))
        assert (left + inner, top + inner) == (int(round((scaled[0] - size) / 2.0)), int(round((scaled[1] - size) / 2.0)))
    assert square_box(300, 256, 256, 224) == (22, 0, 278, 256)


def test_training_crops_are_random_per_image_and_replayed_by_the_random_state():
    featurizer = ImageFeaturizer(DataConfig())
    squares = torch.randint(0, 256, (6, 3, 256, 256), dtype=torch.uint8)
    valid = torch.tensor([True] * 5 + [False])
    torch.manual_seed(0)
    a = featurizer.normalize(squares, valid, augment=0.5)
    torch.manual_seed(0)
    b = featurizer.normalize(squares, valid, augment=0.5)
    c = featurizer.normalize(squares, valid, augment=0.5)
    assert a.shape == (6, 3, 224, 224) and torch.equal(a, b) and not torch.equal(a, c)
    assert not a[-1].any() and a[:5].abs().sum((1, 2, 3)).min() > 0
    plain = featurizer.normalize(squares, valid)
    assert not torch.equal(a[:5], plain[:5])  # augmented differs from the centre crop


def test_finetuning_batches_from_the_cache_equal_those_from_the_files(subset_dir, tmp_path):
    from mmsa.features.rawsource import RawSource
    cfg = DataConfig(data_dir=str(subset_dir), max_text_len=16, finetune="full", loader_workers=0,
                     cache_dir=str(tmp_path / "cache"))
    examples = load_dataset(subset_dir).all_examples[:24]
    files, cached = RawSource(examples, cfg), RawSource.from_files(examples, cfg)
    assert cached.pixel_dir is not None and files.pixel_dir is None
    rows = [np.arange(0, 10), np.arange(10, 24)]
    for a, b in zip(files.iter_batches(rows, torch.device("cpu")), cached.iter_batches(rows, torch.device("cpu"))):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    # augmented too: the same squares, the same draws of the same random state
    for augment in (0.5,):
        torch.manual_seed(1)
        a = next(files.iter_batches(rows, torch.device("cpu"), augment=augment))[2]
        torch.manual_seed(1)
        b = next(cached.iter_batches(rows, torch.device("cpu"), augment=augment))[2]
        assert a.shape == (10, 3, 224, 224) and torch.equal(a, b)


def test_the_cache_is_built_once_and_keyed_by_the_images(tmp_path):
    examples = _examples(tmp_path, SIZES[:3])
    cfg = DataConfig(cache_dir=str(tmp_path / "cache"))
    first = build_pixel_cache(cfg, examples, workers=0)
    stamp = (first / "pixels.npy").stat().st_mtime_ns
    assert build_pixel_cache(cfg, examples, workers=0) == first and (first / "pixels.npy").stat().st_mtime_ns == stamp
    Image.new("RGB", (50, 60), (1, 2, 3)).save(examples[0].image_path)  # an image changes: another cache
    assert build_pixel_cache(cfg, examples, workers=0) != first
