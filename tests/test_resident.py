"""Backbones loaded once (a served model's features) give the disk cache's features."""

import numpy as np
import torch
from PIL import Image


def test_image_tokens_in_small_chunks_are_the_cache_s_bits(subset_prepared):
    """The served model runs EfficientNet a few images at a time (the cache: 32 at a time); the
    tokens must not move by a bit, or served and cached predictions would part."""
    from mmsa.features.resident import CPU_IMAGE_CHUNK, Backbones
    data_cfg, data = subset_prepared
    examples = [ex for ex in data.dataset.all_examples if ex.has_image][:3 * CPU_IMAGE_CHUNK + 1]
    backbones = Backbones(data_cfg, torch.device("cpu"))
    images = []
    for ex in examples:
        with Image.open(ex.image_path) as img:
            img.load()
            images.append(img)
    tokens = backbones.image_tokens(backbones.pixels(images))
    cached = np.asarray(data.features.image[data.features.rows([ex.guid for ex in examples])])
    assert tokens.dtype == cached.dtype == np.float16
    assert np.array_equal(tokens[:3 * CPU_IMAGE_CHUNK], cached[:3 * CPU_IMAGE_CHUNK])
    # A lone image in its own batch may differ in the last bits (other kernels), not more.
    assert np.allclose(tokens[-1].astype(np.float32), cached[-1].astype(np.float32), atol=2e-2)


def test_keeping_freed_memory_takes_effect_here():
    """On glibc (this project's Linux images and CI) the heap settings are accepted."""
    import platform

    from mmsa.features.heap import keep_freed_memory, release_freed_memory
    if platform.libc_ver()[0] != "glibc":
        import pytest
        pytest.skip(f"the C library is {platform.libc_ver()[0] or 'unknown'}, not glibc")
    assert keep_freed_memory()
    release_freed_memory()
