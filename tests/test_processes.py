"""mmsa/processes.py: work in a child process of its own, started again once where it died."""

import pytest

from mmsa.processes import in_child


def _die_the_first_time(marker: str) -> str:
    import os
    from pathlib import Path
    if not Path(marker).exists():
        Path(marker).touch()
        os._exit(9)  # as a process killed mid-work: no answer, no exception
    return "answer"


def _always_die(marker: str) -> str:
    import os
    os._exit(9)


def test_a_preparing_child_that_dies_is_started_once_more(tmp_path, capsys):
    assert in_child(_die_the_first_time, str(tmp_path / "died")) == "answer"
    assert "starting it again" in capsys.readouterr().err


def test_a_preparing_child_that_keeps_dying_is_one_clear_error(tmp_path):
    with pytest.raises(RuntimeError, match="died without an answer, 2 times"):
        in_child(_always_die, str(tmp_path / "x"))


def test_a_preparing_child_that_cannot_start_is_started_once_more(monkeypatch, capsys):
    # What a test run saw: multiprocessing's resource tracker died as it started, so creating the
    # pool's lock failed with a broken pipe before any child existed.
    import concurrent.futures
    real, calls = concurrent.futures.ProcessPoolExecutor, []

    def flaky_pool(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise BrokenPipeError(32, "Broken pipe")
        return real(*args, **kwargs)

    monkeypatch.setattr(concurrent.futures, "ProcessPoolExecutor", flaky_pool)
    assert in_child(len, "four") == 4 and len(calls) == 2
    assert "could not be started ([Errno 32] Broken pipe); starting it again" in capsys.readouterr().err
