import pytest

from mmsa.errors import ConfigError
from search.host_memory import choose
from search.sizes import GIB, parse_size


def test_sizes_are_decimal_in_gb_and_binary_in_gib():
    assert parse_size("12GB", "x") == 12 * 10 ** 9 and parse_size("3.5GiB", "x") == int(3.5 * GIB)
    assert parse_size("512M", "x") == 512 * 10 ** 6 and parse_size("512MiB", "x") == 512 * 2 ** 20
    assert parse_size("4096", "x") == 4096  # no unit: bytes
    with pytest.raises(ConfigError, match="--memory-budget: 'lots' is not a size"):
        parse_size("lots", "--memory-budget")


def _plan(budget_gib, concurrent=2, batch=64):
    return choose(int(budget_gib * GIB), cache_bytes=int(0.75 * GIB), max_concurrent=concurrent, batch_size=batch,
                tokens=113, d_model=128, layers=9, input_dims=64 * 384 + 49 * 1280)


def test_more_memory_more_concurrency_and_whole_batches():
    big, small = _plan(12), _plan(3.5)
    assert big.concurrent == 2 and big.micro_batch == 0 and big.estimate <= 12 * GIB
    assert small.concurrent >= 1 and small.estimate <= 3.5 * GIB
    assert small.concurrent < 2 or 0 < small.micro_batch < 64  # something had to give


def test_tight_budget_shrinks_the_micro_batch_before_failing():
    loose = _plan(3.4, concurrent=1, batch=256)
    assert loose.concurrent == 1 and 0 < loose.micro_batch < 256 and loose.estimate <= 3.4 * GIB
    with pytest.raises(ConfigError, match="too small"):
        _plan(2.0)


def test_a_space_that_searches_fine_tuning_plans_for_a_fine_tuning_trial(tmp_path):
    import numpy as np

    from search.host_memory import FINETUNE_TRIAL, choose_for_space
    from search.space import load_space

    class Cache:  # what the planner reads of a feature cache
        nbytes, text_dim, image_dim = int(0.75 * GIB), 384, 1280
        image = np.zeros((1, 49, 1280))
    heads = tmp_path / "heads.yaml"
    heads.write_text("max_concurrent: 2\nparams:\n  batch_size: {type: choice, values: [16, 32]}\n")
    tuned = tmp_path / "tuned.yaml"
    tuned.write_text(heads.read_text() + "  finetune: {type: choice, values: [none, last_k]}\n"
                     "  text_finetune_layers: {type: choice, values: [2, 6]}\n")
    a = choose_for_space(load_space(heads), 16 * GIB, Cache(), 64)
    b = choose_for_space(load_space(tuned), 16 * GIB, Cache(), 64, more_cache_bytes=GIB)
    assert a.concurrent == b.concurrent == 2 and a.micro_batch == b.micro_batch == 0
    # two trials, each with transformers and 6 layers' activations, and the other text caches
    assert b.estimate - a.estimate > GIB + 2 * FINETUNE_TRIAL
    tight = choose_for_space(load_space(tuned), b.estimate - GIB // 8, Cache(), 64, GIB)
    assert tight.concurrent < 2 or tight.micro_batch > 0
