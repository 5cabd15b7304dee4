"""One way from a pair to its features: a served model's features (backbones resident in memory)
are the disk cache's, bit for bit, on the same pairs."""

import io

import numpy as np
import pytest
import torch
from PIL import Image


def _request_images(examples):
    """The images as a served model decodes a request's bytes (mmsa.app.pairs)."""
    images = []
    for ex in examples:
        img = Image.open(io.BytesIO(ex.image_path.read_bytes())) if ex.has_image else None
        if img is not None:
            img.load()
        images.append(img)
    return images


@pytest.fixture(scope="module")
def served(subset_prepared):
    from mmsa.features.resident import Backbones
    data_cfg, data = subset_prepared
    return Backbones(data_cfg, torch.device("cpu"))


def _served_features(backbones, cfg, examples):
    return backbones.features([cfg], [ex.text for ex in examples], _request_images(examples))[0]


def test_served_features_equal_the_cache_bit_for_bit(subset_prepared, served):
    """A request of the pairs the cache encoded in one batch, in the same order: every array the
    models read (text tokens, mask, image tokens, image read or not, lexicon scores) is the same."""
    from mmsa.features.featurize import IMAGE_BATCH
    data_cfg, data = subset_prepared
    examples = data.dataset.all_examples[:IMAGE_BATCH]  # the cache's first text batch and first image batch
    got = _served_features(served, data_cfg, examples)
    cache = data.features
    rows = cache.rows([ex.guid for ex in examples])
    for name in ("text", "text_mask", "image", "has_image", "lexicon"):
        served_array, cached_array = getattr(got, name), np.asarray(getattr(cache, name)[rows])
        assert served_array.dtype == cached_array.dtype, name
        assert np.array_equal(served_array, cached_array), name


def test_a_pair_alone_differs_from_the_cache_by_rounding_only(subset_prepared, served):
    """A pair in a batch of its own goes through other matrix kernels than in the cache's batch of
    64 texts / 32 images: the last bits of float16 may differ, nothing more, and the masks and
    lexicon scores not at all."""
    data_cfg, data = subset_prepared
    ex = data.dataset.all_examples[5]
    got = _served_features(served, data_cfg, [ex])
    cache = data.features
    row = cache.rows([ex.guid])
    assert np.array_equal(got.text_mask, cache.text_mask[row]) and np.array_equal(got.lexicon, cache.lexicon[row])
    assert np.abs(got.text.astype(np.float32) - cache.text[row].astype(np.float32)).max() <= 2e-3
    assert np.abs(got.image.astype(np.float32) - cache.image[row].astype(np.float32)).max() <= 2e-2


def test_raw_batches_read_the_pairs_through_the_same_featurizers(subset_prepared, served):
    """finetune=full: the served request's raw inputs are those the dataset's files give."""
    import dataclasses

    from mmsa.features.rawsource import RawSource
    data_cfg, data = subset_prepared
    cfg = dataclasses.replace(data_cfg, finetune="full")
    examples = data.dataset.all_examples[:6]
    from_files = RawSource(examples, cfg).batch(np.arange(6), torch.device("cpu"))
    in_memory = _served_features(served, cfg, examples).batch(np.arange(6), torch.device("cpu"))
    for a, b in zip(from_files, in_memory):
        assert torch.equal(a, b)


def test_augmentation_reaches_training_pairs_only(subset_prepared):
    """finetune=full: the images of training batches are cropped, flipped and jittered (strength
    `augment`); validation and prediction batches are the plain preprocessing."""
    import dataclasses

    from mmsa.features.rawsource import RawSource
    data_cfg, data = subset_prepared
    examples = [ex for ex in data.dataset.train if ex.has_image][:4]
    source = RawSource(examples, dataclasses.replace(data_cfg, finetune="full"))
    rows, cpu = [np.arange(4)], torch.device("cpu")
    plain = [next(source.iter_batches(rows, cpu))[2] for _ in range(2)]
    assert torch.equal(plain[0], plain[1])
    torch.manual_seed(0)
    augmented = [next(source.iter_batches(rows, cpu, augment=0.5))[2] for _ in range(2)]
    assert augmented[0].shape == plain[0].shape
    assert not torch.equal(augmented[0], plain[0]) and not torch.equal(augmented[0], augmented[1])


def test_raw_batches_keep_their_loader_workers_from_pass_to_pass(subset_prepared):
    """One DataLoader per kind of batch, its worker processes started once for every epoch and fold."""
    import dataclasses

    from mmsa.features.rawsource import RawSource
    data_cfg, data = subset_prepared
    source = RawSource(data.dataset.train[:8], dataclasses.replace(data_cfg, finetune="full", loader_workers=1))
    cpu = torch.device("cpu")
    first = [b[0] for b in source.iter_batches([np.arange(4), np.arange(4, 8)], cpu)]
    loader, _ = source._loader(cpu)
    workers = [w.pid for w in loader._iterator._workers]
    again = [b[0] for b in source.iter_batches([np.arange(4, 8), np.arange(4)], cpu)]  # another order
    assert [w.pid for w in loader._iterator._workers] == workers and all(w.is_alive() for w in loader._iterator._workers)
    assert torch.equal(again[0], first[1]) and torch.equal(again[1], first[0])
