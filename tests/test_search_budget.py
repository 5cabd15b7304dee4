import pytest

from mmsa.errors import ConfigError
from search.budget import GIB, parse_size, plan


def test_parse_size():
    assert parse_size("12GB") == 12 * GIB and parse_size("3.5GiB") == int(3.5 * GIB)
    assert parse_size("512M") == 512 * 2 ** 20
    with pytest.raises(ConfigError, match="not a size"):
        parse_size("lots")


def _plan(budget_gib, concurrent=2, batch=64):
    return plan(int(budget_gib * GIB), cache_bytes=int(0.75 * GIB), max_concurrent=concurrent, batch_size=batch,
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
