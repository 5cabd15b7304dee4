"""Loaded by every Python process of a test's search (PYTHONPATH), Ray's trial workers among them,
where $MMSA_TEST_HOLD names a folder and the n-th trial attempt to hold ("FOLDER:N").

That attempt writes its pid to FOLDER/held and waits, before it trains, until FOLDER/release
exists: a test can then act on a trial that is certainly alive and recorded (kill it, stop the
tracking server under it), instead of polling for a moment that may pass unseen. Attempts are
counted across processes by creating FOLDER/start-K exclusively. Processes without the variable
only pay for reading it."""

import os

_HOLD = os.environ.get("MMSA_TEST_HOLD")
_TARGET = "search.trainable"


def _claim_attempt(folder: str) -> int:
    k = 1
    while True:
        try:
            os.close(os.open(os.path.join(folder, f"start-{k}"), os.O_CREAT | os.O_EXCL))
            return k
        except FileExistsError:
            k += 1


def _held(fit_trial, folder: str, nth: int):
    def fit_trial_held(*args, **kwargs):
        import time
        if _claim_attempt(folder) == nth:
            held = os.path.join(folder, "held")
            with open(held + ".tmp", "w") as f:
                f.write(str(os.getpid()))
            os.replace(held + ".tmp", held)
            deadline = time.monotonic() + 900  # never hang a test run for good
            while not os.path.exists(os.path.join(folder, "release")) and time.monotonic() < deadline:
                time.sleep(0.05)
        return fit_trial(*args, **kwargs)
    return fit_trial_held


if _HOLD:
    import importlib.abc
    import importlib.util
    import sys

    _folder, _, _nth = _HOLD.rpartition(":")

    class _WrapOnImport(importlib.abc.MetaPathFinder):
        def find_spec(self, fullname, path, target=None):
            if fullname != _TARGET:
                return None
            sys.meta_path.remove(self)
            spec = importlib.util.find_spec(fullname)
            execute = spec.loader.exec_module

            def exec_module(module):
                execute(module)
                module.fit_trial = _held(module.fit_trial, _folder, int(_nth))
            spec.loader.exec_module = exec_module
            return spec

    sys.meta_path.insert(0, _WrapOnImport())
