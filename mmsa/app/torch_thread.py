"""The one thread a served model runs all its torch work on, batching the requests that wait for it.

One thread, because each thread that runs torch's OpenMP kernels keeps a team of OpenMP threads
of its own, and two teams on a small CPU slow each other down (docs/results.md, the served model).
Batching, because the server calls `predict` from a pool of threads: requests that arrive while
the thread is busy would otherwise each pay a forward pass of their own, one after another.
Whatever is queued when the thread is free runs as one batch, up to `max_rows` rows (a larger
request runs alone); no request waits for others to arrive.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any


class TorchThread:
    """`call(fn, *args)` runs fn alone on the thread; `batch(item, rows)` queues a request, and
    `run_batch(items)` (a list of results, one per item, in order) runs on the queued ones
    together. If a batch of several fails, each of its requests runs again alone, so that only
    the one at fault gets the error."""

    def __init__(self, run_batch: Callable[[list], list], max_rows: int, name: str = "mmsa-torch"):
        self.run_batch, self.max_rows = run_batch, max_rows
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._loop, name=name, daemon=True).start()

    def call(self, fn: Callable, *args) -> Any:
        return self._submit((fn, args, 0))

    def batch(self, item, rows: int) -> Any:
        return self._submit((None, item, rows))

    def _submit(self, job: tuple) -> Any:
        done: Future = Future()
        self._jobs.put((*job, done))
        return done.result()

    def _loop(self) -> None:
        held = None  # a job taken from the queue that did not fit the last batch
        while True:
            job, held = held or self._jobs.get(), None
            fn, arg, rows, done = job
            if fn is not None:
                _settle(done, fn, *arg)
                continue
            batch = [job]
            while rows < self.max_rows:
                try:
                    nxt = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if nxt[0] is not None or rows + nxt[2] > self.max_rows:
                    held = nxt
                    break
                batch.append(nxt)
                rows += nxt[2]
            self._run(batch)

    def _run(self, batch: list[tuple]) -> None:
        try:
            results = list(self.run_batch([job[1] for job in batch]))
            if len(results) != len(batch):
                raise RuntimeError(f"run_batch gave {len(results)} results for {len(batch)} requests")
        except BaseException as e:  # noqa: BLE001 - handed to the callers, never lost
            if len(batch) == 1:
                batch[0][3].set_exception(e)
            else:
                for job in batch:
                    self._run([job])
            return
        for job, result in zip(batch, results):
            job[3].set_result(result)


def _settle(done: Future, fn: Callable, *args) -> None:
    try:
        done.set_result(fn(*args))
    except BaseException as e:  # noqa: BLE001 - handed to the caller
        done.set_exception(e)
