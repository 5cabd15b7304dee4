"""Work done in a child process of its own."""

from __future__ import annotations

import sys


def in_child(fn, *args, attempts: int = 2):
    """fn(*args) in a fresh (spawned) child process (what a process that must not hold torch, the
    search driver, asks of torch). A child that dies without an answer (killed
    by a signal, a crash in native code), or that cannot be started because multiprocessing's own
    helper process (its resource tracker) died as it started, is tried once more, a second later,
    before giving up. Test runs saw both, with no trace of why, while a two-node Ray cluster ran
    beside them. Errors that fn raises reach the caller as they are."""
    import multiprocessing
    import time
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool
    for attempt in range(1, attempts + 1):
        pool = None
        try:
            pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
            future = pool.submit(fn, *args)
        except OSError as e:  # e.g. BrokenPipeError from the resource tracker
            failure = f"could not be started ({e})"
        else:
            try:
                return future.result()
            except BrokenProcessPool:
                failure = "died without an answer"
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
        if attempt == attempts:
            raise RuntimeError(f"{fn.__name__}: the child process {failure}, {attempts} times "
                               "(killed, or out of memory?)")
        print(f"{fn.__name__}: the child process {failure}; starting it again", file=sys.stderr, flush=True)
        time.sleep(1)
