"""mmsa.training.oof: one format for out-of-fold predictions, sorted by row, in a file or as text."""

import numpy as np
import pytest

from mmsa.data.splits import Split
from mmsa.training import oof


def _split(rows, labels):
    return Split(guids=[str(r) for r in rows], rows=np.array(rows), labels=np.array(labels))


def test_fold_predictions_become_one_array_sorted_by_row(tmp_path):
    folds = [(_split([0, 3], [0, 1]), _split([4, 1], [2, 0])), (_split([4, 1], [2, 0]), _split([3, 0], [1, 0]))]
    probs = [np.array([[0.1, 0.2, 0.7], [0.8, 0.1, 0.1]]), np.array([[0.2, 0.7, 0.1], [0.6, 0.3, 0.1]])]
    arrays = oof.oof_arrays(folds, probs)
    assert arrays["rows"].tolist() == [0, 1, 3, 4]
    assert arrays["labels"].tolist() == [0, 0, 1, 2] and arrays["fold"].tolist() == [1, 0, 1, 0]
    assert np.allclose(arrays["probs"], [[0.6, 0.3, 0.1], [0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.1, 0.2, 0.7]])
    for back in (oof.from_text(oof.to_text(arrays)), oof.from_bytes(oof.to_bytes(arrays))):
        assert all(np.array_equal(back[k], arrays[k]) for k in oof.KEYS)
    oof.save(tmp_path / "x.npz", arrays)
    assert oof.same_rows(oof.load(tmp_path / "x.npz"), arrays)
    (tmp_path / "bad.npz").write_bytes(b"not a file")
    with pytest.raises(ValueError, match="bad.npz: not an out-of-fold predictions file"):
        oof.load(tmp_path / "bad.npz")
