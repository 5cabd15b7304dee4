"""bench/blend.py: out-of-fold predictions are aligned by row, and decision rules never see the scored fold."""

import numpy as np

from bench.blend import aligned, best_factors, blend_rule


def _save(folder, name, rows, labels, fold, probs):
    np.savez(folder / f"{name}-r0.npz", rows=rows, labels=labels, fold=fold, probs=probs)


def test_members_are_aligned_to_the_probe_s_rows(tmp_path):
    rows = np.array([5, 3, 9, 1])
    labels, fold = np.array([0, 1, 2, 0]), np.array([0, 0, 1, 1])
    probe = np.eye(3)[labels].astype(np.float32)
    _save(tmp_path, "probe", rows, labels, fold, probe)
    order = np.array([2, 0, 3, 1])  # another member wrote the same rows in another order
    _save(tmp_path, "other", rows[order], labels[order], fold[order], probe[order] * 0.5 + 0.1)
    y, f, probs = aligned(tmp_path, ["probe", "other"], 0)
    assert (y == labels).all() and (f == fold).all()
    assert np.allclose(probs[1], probe * 0.5 + 0.1)


def test_a_prior_correction_is_chosen_on_the_other_folds_only():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 300)
    fold = np.repeat([0, 1, 2], 100)
    probs = np.full((1, 300, 3), 0.2)
    probs[0, np.arange(300), labels] = 0.3
    probs[0, :, 0] += 0.15  # positive over-predicted: a neutral/negative factor fixes it...
    probs[0, 200:, 0] -= 0.15  # ...except on fold 2, where nothing needs fixing
    w = best_factors(probs[0, :200], labels[:200], 0, neutral=1, negative=2)
    assert w[1] > 1 and w[2] > 1
    pred = blend_rule("prior", probs, labels, fold, 2)  # the factors of folds 0-1, applied to fold 2
    assert (pred == (probs[0, 200:] * w).argmax(1)).all()
    assert (blend_rule("mean", probs, labels, fold, 2) == probs[0, 200:].argmax(1)).all()
