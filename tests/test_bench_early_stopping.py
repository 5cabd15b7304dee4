"""bench/early_stopping.py's replay must decide as Ray's ASHA does."""

from types import SimpleNamespace

import numpy as np
import pytest
from ray.tune.schedulers import TrialScheduler
from ray.tune.schedulers.async_hyperband import _Bracket

from bench.early_stopping import pairs_summary, replay_asha


def ray_asha(curves, grace, rf, max_t):
    """(epochs trained, best score seen) when each curve's trial runs in turn under Ray's own
    ASHA bracket."""
    bracket = _Bracket(min_t=grace, max_t=max_t, reduction_factor=rf, s=0)
    total, best = 0, float("-inf")
    for i, curve in enumerate(curves):
        trial = SimpleNamespace(trial_id=f"t{i}")
        for epoch in range(1, len(curve) + 1):
            total += 1
            best = max(best, curve[epoch - 1])
            if epoch >= max_t:
                break
            if bracket.on_result(trial, epoch, max(curve[:epoch])) == TrialScheduler.STOP:
                break
    return total, best


@pytest.mark.parametrize("rf", [2, 3, 4, 5, 10])
def test_the_replay_trains_the_epochs_rays_asha_would(rf):
    rng = np.random.default_rng(rf)
    # learning curves of uneven length (some trials stop on their own patience), scores with ties
    curves = [list(np.round(rng.uniform(0.4, 0.75) + np.cumsum(rng.normal(0, 0.02, rng.integers(1, 7))), 2))
              for _ in range(40)]
    expected = ray_asha(curves, 1, rf, 6)
    assert replay_asha(curves, 1, rf, 6) == expected
    assert expected[0] < sum(len(c) for c in curves)  # the scheduler did stop some trials


def _pair(asha_epochs, fifo_epochs, asha_best, fifo_best):
    return {"asha": dict(epochs=asha_epochs, trial_s=50.0, wall=60.0, best=asha_best, f1=0.6),
            "fifo": dict(epochs=fifo_epochs, trial_s=100.0, wall=120.0, best=fifo_best, f1=0.6)}


def test_the_target_is_judged_on_the_mean_epoch_ratio_and_the_worst_accuracy_gap():
    # 0.41 and 0.35: mean 0.38, within the 40 % target although one seed is above it
    summary = pairs_summary({0: _pair(41, 100, 0.74, 0.74), 1: _pair(35, 100, 0.74, 0.745)})
    assert "mean of 2 |  | 0.38 (range 0.35-0.41)" in summary
    assert summary.endswith(": met.")
    assert not pairs_summary({0: _pair(45, 100, 0.74, 0.74), 1: _pair(37, 100, 0.74, 0.74)}).endswith(": met.")
    # one seed losing more than 1 point of accuracy fails the target, whatever the epochs
    assert pairs_summary({0: _pair(30, 100, 0.72, 0.735), 1: _pair(30, 100, 0.74, 0.74)}).endswith(": not met.")
