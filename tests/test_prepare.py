import json
import subprocess
import sys

import pytest

from mmsa.config import DataConfig
from mmsa.errors import DataError
from mmsa.features.prepare import in_child, prepare_in_subprocess


def test_prepare_in_a_child_gives_the_same_splits_and_keeps_torch_out(subset_prepared):
    data_cfg, p = subset_prepared
    code = (
        "import json, sys\n"
        "from mmsa.config import DataConfig\n"
        "from mmsa.features.prepare import prepare_in_subprocess\n"
        f"d = prepare_in_subprocess(DataConfig(**{data_cfg.__dict__!r}))\n"
        "print(json.dumps({'train': d.train.guids, 'val': d.val.guids, 'rows': d.val.rows.tolist(),"
        " 'text_dir': str(d.features.text_dir), 'shape': list(d.features.image.shape),"
        " 'torch': 'torch' in sys.modules}))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["torch"] is False  # the parent only memory-maps the cache
    assert got["train"] == p.train.guids and got["val"] == p.val.guids and got["rows"] == p.val.rows.tolist()
    assert got["text_dir"] == str(p.features.text_dir) and got["shape"] == list(p.features.image.shape)


def test_errors_in_the_child_reach_the_caller(tmp_path):
    with pytest.raises(DataError, match="absent"):
        prepare_in_subprocess(DataConfig(data_dir=str(tmp_path / "absent"), cache_dir=str(tmp_path / "c")))


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
