"""Run real searches in subprocesses on the real-data subset, for the search and final tests."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def write_space(path: Path, data_dir: str, cache_dir: str, num_samples: int = 3, max_epochs: int = 2,
                max_concurrent: int = 2, cv_folds: int = 3, **extra) -> Path:
    space = {
        "data_dir": data_dir, "metric": "val_acc", "num_samples": num_samples,
        "max_concurrent": max_concurrent, "resources": {"cpu": 1}, "seed": 0, "cv_folds": cv_folds,
        "scheduler": {"type": "asha", "max_epochs": max_epochs, "grace_period": 1, "reduction_factor": 2},
        "searcher": {"type": "tpe", "n_startup_trials": 2},
        "fixed": {"cache_dir": cache_dir, "max_text_len": 32, "val_fraction": 0.3, "d_model": 32, "heads": 2,
                  "batch_size": 16},
        "params": {"lr": {"type": "loguniform", "low": 1e-4, "high": 3e-3},
                   "pooling": {"type": "choice", "values": ["mean", "attention"]}},
    }
    space.update(extra)
    path.write_text(yaml.safe_dump(space))
    return path


def search_cmd(space: Path, tmp: Path, *more: str) -> list[str]:
    return [sys.executable, "-m", "search.run", "--space", str(space), "--tracking-uri",
            f"sqlite:///{tmp}/mlruns/mlflow.db", "--storage", str(tmp / "ray_results"), *more]


def run_search(space: Path, tmp: Path, *more: str, timeout: int = 400, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(search_cmd(space, tmp, *more), capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT, env=env)


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """`mlflow server` on 127.0.0.1 over a sqlite store in `folder`; stop() and start() again keep
    the store and the port, as a restarted tracking server would."""

    def __init__(self, folder: Path):
        self.folder, self.port = folder, free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.process = None

    def start(self, timeout: float = 120) -> None:
        import time
        import urllib.request
        self.process = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--backend-store-uri", f"sqlite:///{self.folder}/mlflow.db", "--artifacts-destination",
             str(self.folder / "artifacts"), "--workers", "1"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                urllib.request.urlopen(f"{self.uri}/health", timeout=2)
                return
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"mlflow server on {self.uri} did not start")

    def stop(self) -> None:
        import os
        import signal
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=60)
        self.process = None


class TrialHold:
    """Holds the `nth` trial attempt of a search, alive and before it trains, until release()
    (tests/trial_hooks/sitecustomize.py): a test acts on a running trial without racing it."""

    def __init__(self, folder: Path, nth: int = 1):
        self.folder, self.nth = folder, nth
        folder.mkdir(parents=True, exist_ok=True)

    def env(self, base: dict | None = None) -> dict:
        import os
        base = dict(os.environ if base is None else base)
        path = [str(ROOT / "tests" / "trial_hooks"), base.get("PYTHONPATH")]
        return {**base, "PYTHONPATH": os.pathsep.join(filter(None, path)),
                "MMSA_TEST_HOLD": f"{self.folder}:{self.nth}"}

    def wait_held(self, proc: subprocess.Popen, timeout: float = 300) -> int:
        """The held trial's pid, once it holds; fails at once if the search ends first."""
        import time
        held = self.folder / "held"
        deadline = time.monotonic() + timeout
        while not held.exists():
            if proc.poll() is not None:
                raise AssertionError("the search ended before its trial was held:\n"
                                     + (proc.communicate()[0] or "")[-3000:])
            if time.monotonic() > deadline:
                proc.kill()
                raise AssertionError(f"no trial held within {timeout} s:\n" + (proc.communicate()[0] or "")[-3000:])
            time.sleep(0.05)
        return int(held.read_text())

    def release(self) -> None:
        (self.folder / "release").touch()


def wait_until(condition, timeout: float, what: str, proc: subprocess.Popen | None = None, every: float = 0.2):
    """Poll `condition()` until it returns something true (returned), failing with `what` on time-out,
    or at once where `proc` ended meanwhile. For states that last (a held trial, a saved record),
    never for moments that may pass between two polls."""
    import time
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the search ended before {what}:\n" + (proc.communicate()[0] or "")[-3000:])
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(every)


def fault_env(kind: str, folder: Path, n: int, base: dict | None = None) -> dict:
    """The environment of a search whose trials meet a fault (tests/trial_hooks/sitecustomize.py)."""
    import os
    folder.mkdir(parents=True, exist_ok=True)
    base = dict(os.environ if base is None else base)
    path = [str(ROOT / "tests" / "trial_hooks"), base.get("PYTHONPATH")]
    return {**base, "PYTHONPATH": os.pathsep.join(filter(None, path)), "MMSA_TEST_FAULT": f"{kind}:{folder}:{n}"}


def child_runs(client, experiment_id: str, parent_id: str, kind: str = "trial") -> list:
    """The runs of `kind` under a search's parent run, read straight from MLflow."""
    from mmsa.app.run_tags import TAG_KIND, TAG_PARENT
    return client.search_runs([experiment_id], filter_string=f"tags.`{TAG_PARENT}` = '{parent_id}' "
                                                             f"and tags.`{TAG_KIND}` = '{kind}'", max_results=5000)
