"""A full disk, for real (a 1 MiB tmpfs): one line naming the path, exit 2, nothing partial
trusted later, an earlier file left as it was."""

import subprocess
import sys

import pytest

from mmsa.errors import DiskFullError
from mmsa.data.files import write_predictions
from tests.search_helpers import ROOT


def test_a_feature_cache_that_does_not_fit_is_refused_with_one_line(subset_dir, small_disk):
    out = subprocess.run([sys.executable, "-m", "mmsa.train", "--data", str(subset_dir),
                          "--set", f"cache_dir={small_disk / 'cache'}", "--set", "max_text_len=32"],
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 2, out.stderr[-2000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {small_disk / 'cache'}: no space left for the feature cache"), last
    assert "Traceback" not in out.stderr
    assert list((small_disk / "cache").iterdir()) == []  # no partial cache to be trusted later


def test_predictions_that_do_not_fit_leave_the_earlier_file_intact(small_disk):
    path = small_disk / "predictions.txt"
    write_predictions(path, ["1", "2"], ["positive", "negative"])
    before = path.read_bytes()
    (small_disk / "filler").write_bytes(b"x" * (1024 * 1024 - 64 * 1024))
    with pytest.raises(DiskFullError, match=f"{path}: no space left on the device.*earlier file is unchanged"):
        write_predictions(path, [str(i) for i in range(20000)], ["neutral"] * 20000)
    assert path.read_bytes() == before
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler", "predictions.txt"]  # no temporary left


def test_a_search_whose_cache_does_not_fit_stops_before_ray_with_one_line(subset_dir, small_disk, tmp_path):
    from tests.search_helpers import search_cmd, write_space
    space = write_space(tmp_path / "space.yaml", str(subset_dir), str(small_disk / "cache"))
    out = subprocess.run(search_cmd(space, tmp_path), capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.strip().splitlines()[-1].startswith(f"error: {small_disk / 'cache'}: no space left")
    assert "Traceback" not in out.stderr and not (tmp_path / "ray_results").exists()
