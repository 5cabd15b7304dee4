from types import SimpleNamespace

from search.tracking import MAX_TAG_CHARS, trial_error_text


def test_a_long_trial_error_keeps_the_exception_line_first(tmp_path):
    frames = "".join(f'  File "/x/module{i}.py", line {i}, in f{i}\n    call({i})\n' for i in range(400))
    path = tmp_path / "error.txt"
    path.write_text("Traceback (most recent call last):\n" + frames + "TrainingError: loss became nan at epoch 2\n")
    text = trial_error_text(SimpleNamespace(error_file=str(path)))
    assert len(text) <= MAX_TAG_CHARS
    assert text.splitlines()[0] == "TrainingError: loss became nan at epoch 2"
    assert text.endswith("call(399)")  # the innermost frames are kept
