"""Shared fixtures. Tests that need the real dataset use a small subset of ../shared/mvsa, linked
(never copied into the repository) into a temporary folder, and skip when it is absent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

MVSA = Path(os.environ.get("MMSA_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "mvsa"))


def need_mvsa() -> Path:
    if not (MVSA / "train.txt").exists():
        pytest.skip(f"real dataset not found at {MVSA} (set MMSA_DATA to its folder)")
    return MVSA


def make_subset(dest: Path, per_class: int, n_test: int) -> Path:
    """A course-layout folder holding `per_class` labeled pairs per class and `n_test` test pairs,
    whose files are symlinks into the real dataset."""
    src = need_mvsa()
    rows = [ln.split(",") for ln in (src / "train.txt").read_text().split()[1:]]
    picked, counts = [], {}
    for guid, tag in rows:
        if counts.get(tag, 0) < per_class:
            counts[tag] = counts.get(tag, 0) + 1
            picked.append((guid, tag))
    test = [ln.split(",")[0] for ln in (src / "test_without_label.txt").read_text().split()[1:]][:n_test]
    (dest / "data").mkdir(parents=True)
    for guid in [g for g, _ in picked] + test:
        for ext in ("jpg", "txt"):
            os.symlink(src / "data" / f"{guid}.{ext}", dest / "data" / f"{guid}.{ext}")
    (dest / "train.txt").write_text("guid,tag\n" + "".join(f"{g},{t}\n" for g, t in picked))
    (dest / "test_without_label.txt").write_text("guid,tag\n" + "".join(f"{g},null\n" for g in test))
    return dest


@pytest.fixture(scope="session")
def subset_dir(tmp_path_factory) -> Path:
    """90 labeled pairs (30 per class) and 20 test pairs of the real data."""
    return make_subset(tmp_path_factory.mktemp("mvsa-subset"), per_class=30, n_test=20)


@pytest.fixture(scope="session")
def subset_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("feature-cache")


@pytest.fixture(scope="session")
def subset_prepared(subset_dir, subset_cache):
    from mmsa.config import DataConfig
    from mmsa.features.prepare import prepare
    cfg = DataConfig(data_dir=str(subset_dir), cache_dir=str(subset_cache), val_fraction=0.3, max_text_len=32)
    return cfg, prepare(cfg)


def write_jpeg(path: Path, color=(200, 30, 30), size=(40, 30), mode="RGB") -> None:
    from PIL import Image
    img = Image.new("RGB", size, color)
    if mode != "RGB":
        img = img.convert(mode)
    img.save(path, format="PNG" if mode in ("RGBA", "LA", "P") else "JPEG")


def make_synthetic(dest: Path, labels: dict[str, str], test: list[str] = ()) -> Path:
    """A small synthetic dataset: a coloured image and a short text per guid."""
    (dest / "data").mkdir(parents=True, exist_ok=True)
    colors = {"positive": (250, 200, 0), "neutral": (128, 128, 128), "negative": (20, 20, 120)}
    for guid, tag in list(labels.items()) + [(g, "neutral") for g in test]:
        write_jpeg(dest / "data" / f"{guid}.jpg", colors.get(tag, (0, 0, 0)))
        (dest / "data" / f"{guid}.txt").write_text(f"a {tag} day #{guid}\n", encoding="utf-8")
    (dest / "train.txt").write_text("guid,tag\n" + "".join(f"{g},{t}\n" for g, t in labels.items()))
    (dest / "test_without_label.txt").write_text("guid,tag\n" + "".join(f"{g},null\n" for g in test))
    return dest


@pytest.fixture(scope="session")
def smoke_search(subset_dir, subset_cache, subset_prepared, tmp_path_factory):
    """One real smoke search on the subset: (tmp folder, tracking uri, parent run id, process)."""
    from tests.search_helpers import run_search, write_space
    tmp = tmp_path_factory.mktemp("search")
    space = write_space(tmp / "space.yaml", str(subset_dir), str(subset_cache), num_samples=4)
    # What the driver process had imported when it ended: written by a sitecustomize of the test's
    # (its other processes, Ray's workers among them, write nothing).
    hook = tmp / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import atexit, os, sys\n"
        "def _modules():\n"
        "    if sys.argv and sys.argv[0].endswith(os.path.join('search', 'run.py')):\n"
        f"        open({str(tmp / 'driver_modules.txt')!r}, 'w').write('\\n'.join(sorted(sys.modules)))\n"
        "atexit.register(_modules)\n")
    pythonpath = os.pathsep.join(filter(None, [str(hook), os.environ.get("PYTHONPATH")]))
    out = run_search(space, tmp, env={**os.environ, "PYTHONPATH": pythonpath})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    last = out.stdout.strip().splitlines()[-1]
    assert last.startswith("parent_run_id=")
    return tmp, f"sqlite:///{tmp}/mlruns/mlflow.db", last.split("=", 1)[1], out


@pytest.fixture(scope="session")
def registered(smoke_search, subset_dir, subset_cache, tmp_path_factory):
    """final --register on the smoke search: (tracking uri, its predictions file, final's stdout)."""
    import subprocess
    import sys

    from tests.search_helpers import ROOT
    _, uri, parent_id, _ = smoke_search
    out_file = tmp_path_factory.mktemp("final") / "pred.txt"
    out = subprocess.run([sys.executable, "-m", "mmsa.final", "--run-id", parent_id, "--tracking-uri", uri,
                          "--out", str(out_file), "--members", "ensemble:seeds=2", "--register", "mmsa-test"],
                         capture_output=True, text=True, timeout=400, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    return uri, out_file, out.stdout


@pytest.fixture
def small_disk(tmp_path):
    """A file system of 1 MiB (tmpfs), to fill up for real; skips where mounting is not allowed."""
    import subprocess
    mount = tmp_path / "small-disk"
    mount.mkdir()
    out = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)],
                         capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({out.stderr.strip() or 'mount failed'})")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


RAY_PROCESS_NAMES = ("gcs_server", "raylet")
TEST_RUN_ENV = "MMSA_TEST_RUN"  # set for each slow test: every process it starts inherits it


def _ray_processes_of(token: str) -> list:
    """Ray's processes that a test started, found by the variable they inherited (another test
    session's Ray on this machine, a user's own among them, is left alone)."""
    import psutil
    found = []
    for proc in psutil.process_iter(["name", "cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if proc.info["name"] in RAY_PROCESS_NAMES or cmdline.startswith("ray::") or "default_worker.py" in cmdline:
            try:
                if proc.environ().get(TEST_RUN_ENV) == token:
                    found.append(proc)
            except psutil.Error:
                pass
    return found


@pytest.fixture(autouse=True)
def no_ray_left_behind(request, monkeypatch):
    """A slow test leaves no Ray process of its own running: a leftover cluster holds CPUs,
    memory and ports from the next test. Processes still ending get 30 s."""
    if request.node.get_closest_marker("slow") is None:
        yield
        return
    import secrets

    import psutil
    token = secrets.token_hex(8)
    monkeypatch.setenv(TEST_RUN_ENV, token)
    yield
    _, alive = psutil.wait_procs(_ray_processes_of(token), timeout=30)
    for proc in alive:
        proc.kill()
    assert not alive, f"the test left Ray processes running (now killed): {[p.pid for p in alive]}"
