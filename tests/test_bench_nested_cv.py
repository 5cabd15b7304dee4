"""bench/nested_cv.py: the outer folds it hands to the pipeline, and how it scores predictions."""

from bench.nested_cv import final_flags, outer_folders, score
from mmsa.data.dataset import LABELS, load_dataset


def test_outer_folds_hold_out_every_pair_once_as_test_pairs(subset_dir, tmp_path):
    labels = {ex.guid: ex.label for ex in load_dataset(subset_dir).train}
    folders = outer_folders(subset_dir, tmp_path, k=3, seed=0)
    held = [guid for _, truth in folders for guid in truth]
    assert sorted(held) == sorted(labels)  # each labeled pair is held out exactly once
    for folder, truth in folders:
        ds = load_dataset(folder)  # a course layout the pipeline reads as it is
        assert [ex.guid for ex in ds.test] == list(truth) and all(ex.label is None for ex in ds.test)
        assert not {ex.guid for ex in ds.train} & set(truth)
        assert {ex.guid for ex in ds.train} | set(truth) == set(labels)
        assert all(truth[g] == labels[g] for g in truth) and all(ex.label == labels[ex.guid] for ex in ds.train)
        assert not any(p.is_file() and not p.is_symlink() for p in (folder / "data").iterdir())  # links, no copies
    # made once: a second call finds the folders and gives the same folds
    assert [list(t) for _, t in outer_folders(subset_dir, tmp_path, k=3, seed=0)] == [list(t) for _, t in folders]


def test_predictions_are_scored_against_the_held_out_labels(tmp_path):
    truth = {"a": 0, "b": 1, "c": 2, "d": 0}
    pred = tmp_path / "p.txt"
    pred.write_text("guid,tag\n" + "".join(f"{g},{LABELS[t]}\n" for g, t in
                                          [("a", 0), ("b", 1), ("c", 0), ("d", 0)]))
    s = score(pred, truth)
    assert s["acc"] == 0.75 and round(s["macro_f1"], 4) == round((0.8 + 1.0 + 0.0) / 3, 4)


def test_a_final_variant_is_its_members_flag():
    assert final_flags("ensemble") == ["--members", "ensemble"]
    assert final_flags("best+probe+finetune") == ["--members", "best,probe,finetune"]
    assert final_flags("ensemble:seeds=1+probe") == ["--members", "ensemble:seeds=1,probe"]
