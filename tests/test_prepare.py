import json
import subprocess
import sys

import pytest

from mmsa.config import DataConfig
from mmsa.errors import DataError
from mmsa.features.prepare import prepare_in_subprocess


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
