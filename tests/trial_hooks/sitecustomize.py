"""Loaded by every Python process of a test's search (PYTHONPATH), Ray's trial workers among them.
Processes without the variables below only pay for reading them.

$MMSA_TEST_HOLD ("FOLDER:N"): the n-th trial attempt writes its pid to FOLDER/held and waits, before
it trains, until FOLDER/release exists: a test can then act on a trial that is certainly alive and
recorded (kill it, stop the tracking server under it), instead of polling for a moment that may
pass unseen. Attempts are counted across processes by creating FOLDER/start-K exclusively.

$MMSA_TEST_FAULT ("KIND:FOLDER:N"): a fault, once per claim file in FOLDER (claims are counted
across processes by creating files exclusively):
- kill-after-epoch: the trial process kills itself (SIGKILL, as the out-of-memory killer does)
  right after the report of its N-th epoch, checkpoint included, has reached Ray;
- oom: the first N trainings of a second epoch raise CUDA's out-of-memory error, as a GPU too
  small for the micro-batch does.
"""

import os

_HOLD = os.environ.get("MMSA_TEST_HOLD")
_FAULT = os.environ.get("MMSA_TEST_FAULT")


def _claim(folder: str, name: str) -> bool:
    try:
        os.close(os.open(os.path.join(folder, name), os.O_CREAT | os.O_EXCL))
        return True
    except FileExistsError:
        return False


def _held(module, folder: str, nth: int) -> None:
    fit_trial = module.fit_trial

    def fit_trial_held(*args, **kwargs):
        import time
        k = 1
        while not _claim(folder, f"start-{k}"):
            k += 1
        if k == nth:
            held = os.path.join(folder, "held")
            with open(held + ".tmp", "w") as f:
                f.write(str(os.getpid()))
            os.replace(held + ".tmp", held)
            deadline = time.monotonic() + 900  # never hang a test run for good
            while not os.path.exists(os.path.join(folder, "release")) and time.monotonic() < deadline:
                time.sleep(0.05)
        return fit_trial(*args, **kwargs)
    module.fit_trial = fit_trial_held


def _kill_after_epoch(module, folder: str, n: int) -> None:
    fit_trial = module.fit_trial

    def fit_trial_killed(emit, *args, **kwargs):
        def emit_then_die(report, state):
            emit(report, state)
            if report.epochs_done == n and _claim(folder, "killed"):
                import signal
                os.kill(os.getpid(), signal.SIGKILL)
        return fit_trial(emit_then_die, *args, **kwargs)
    module.fit_trial = fit_trial_killed


def _out_of_memory(module, folder: str, n: int) -> None:
    train_epoch = module._train_epoch

    def train_epoch_oom(member, train, epoch):
        if epoch == 2 and any(_claim(folder, f"oom-{k}") for k in range(1, n + 1)):
            import torch
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected by a test)")
        return train_epoch(member, train, epoch)
    module._train_epoch = train_epoch_oom


def _wrap_on_import(target: str, wrap, *args) -> None:
    """`wrap(module, *args)` once `target` is imported, before anything uses it."""
    import importlib.abc
    import importlib.util
    import sys

    class WrapOnImport(importlib.abc.MetaPathFinder):
        def find_spec(self, fullname, path, target_=None):
            if fullname != target:
                return None
            sys.meta_path.remove(self)
            spec = importlib.util.find_spec(fullname)
            execute = spec.loader.exec_module

            def exec_module(module):
                execute(module)
                wrap(module, *args)
            spec.loader.exec_module = exec_module
            return spec

    sys.meta_path.insert(0, WrapOnImport())


if _HOLD:
    _folder, _, _nth = _HOLD.rpartition(":")
    _wrap_on_import("search.trainable", _held, _folder, int(_nth))
if _FAULT:
    _kind, _folder, _n = _FAULT.split(":")
    _target, _wrap = {"kill-after-epoch": ("search.trainable", _kill_after_epoch),
                      "oom": ("mmsa.training.fit", _out_of_memory)}[_kind]
    _wrap_on_import(_target, _wrap, _folder, int(_n))
