"""Trial processes forked from one warm process instead of each importing torch on its own.

Every Ray trial process imports torch, scikit-learn and mmsa: several hundred MB of private
memory per concurrent trial before a single batch (docs/results.md). Ray starts its workers by
exec, so nothing of that is shared. Here the driver starts one server that
imports them once; each trial's Ray worker asks it for a fork, which shares those pages
copy-on-write and trains there. The Ray worker keeps only Ray and relays results.
The server only imports: it must never run a torch op (OpenMP's thread pool does not survive a
fork: a fork of a process that had already run torch code hung in a test here) nor touch CUDA
(each fork initialises it with its own trial's CUDA_VISIBLE_DEVICES).

Protocol, one Unix-socket connection per trial (multiprocessing.connection framing, pickles):
the client sends (env, args); the forked child sets the environment and calls target(emit, *args),
where target is the one `module:function` the server was started with (the trial entry point):
a connection can choose the arguments, never the code. Each emit(message) sends ("message", message) and waits until the client
answers, so the trial trains no further than Ray lets it (ASHA decides in tune.report). The child
ends with ("done", None) or ("error", traceback text), and exits as soon as the connection closes:
a trial that Ray stops or kills takes its fork with it.

Right after connecting, the client passes its stdout and stderr (SCM_RIGHTS), and the fork writes
to them. The socket lives in a fresh folder that only this user can enter, and the server checks
the peer's user id (SO_PEERCRED) before it forks.
"""

from __future__ import annotations

import gc
import importlib
import os
import queue
import selectors
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from multiprocessing.connection import Connection
from pathlib import Path

SOCKET_NAME = "trials.sock"


class ForkedTrialError(RuntimeError):
    """The forked trial raised; the message is its traceback."""


def available() -> bool:
    # fork after importing torch is what torch's own DataLoader workers do on Linux; macOS forks
    # badly once system frameworks are loaded, and Windows has no fork.
    return sys.platform.startswith("linux") and hasattr(os, "fork")


# ---- driver side ------------------------------------------------------------------------------

class ForkServer:
    """The server process, started by the search driver; `address` goes to the trials."""

    def __init__(self, target: str, preload: list[str], ready_timeout_s: float = 120.0):
        self.folder = Path(tempfile.mkdtemp(prefix="mmsa-fork-"))  # mode 0700
        self.address = str(self.folder / SOCKET_NAME)
        self.log_path = self.folder / "server.log"
        self._ready_timeout_s = ready_timeout_s
        self.failure = ""
        with open(self.log_path, "wb") as log:
            # Its own session: Ctrl-C in the terminal reaches the driver (which stops the search
            # cleanly), not the trials' forks. It ends when the driver closes its stdin, or dies.
            self.process = subprocess.Popen([sys.executable, "-m", "search.forkserver", self.address, target, *preload],
                                            stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)

    def wait_ready(self) -> bool:
        """True once the server accepts connections; False (stopped, and `failure` says why) if
        it failed to start."""
        deadline = time.monotonic() + self._ready_timeout_s
        while time.monotonic() < deadline and self.process.poll() is None:
            if os.path.exists(self.address):
                return True
            time.sleep(0.05)
        try:
            log = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            log = []
        self.failure = "\n".join(log[-5:]) or f"not ready after {self._ready_timeout_s:.0f} s"
        self.close()
        return False

    def close(self) -> None:
        if self.process.poll() is None:
            try:
                self.process.stdin.close()
                self.process.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.folder, ignore_errors=True)


# ---- trial side (the Ray worker) --------------------------------------------------------------

def connect(address: str | None) -> Connection | None:
    """A connection to the server, or None where there is none on this machine (e.g. a trial on
    another node of a cluster): the caller then trains in its own process."""
    if not address or not available():
        return None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(address)
        # The fork writes to this process's stdout and stderr (for a Ray worker: its log files,
        # which Ray forwards to the driver's terminal), as the trial did before it forked.
        socket.send_fds(sock, [b"io"], [1, 2])
    except OSError:
        sock.close()
        return None
    return Connection(sock.detach())


def run_forked(conn: Connection, args: tuple, on_message) -> None:
    """Run the server's target(emit, *args) in a fork; on_message(message) for each emit, in this thread.
    An exception in on_message (Ray stopping the trial) closes the connection, ending the fork."""
    try:
        conn.send((dict(os.environ), args))  # the environment carries Ray's GPU assignment
        while True:
            try:
                kind, payload = conn.recv()
            except EOFError:
                raise ForkedTrialError("the forked trial process ended without a result (killed, e.g. "
                                       "out of memory?)") from None
            if kind == "message":
                on_message(payload)
                conn.send(True)
            elif kind == "done":
                return
            else:
                raise ForkedTrialError(payload)
    finally:
        conn.close()


# ---- server and forked child ------------------------------------------------------------------

def _child(conn: Connection, target: str) -> None:
    env, args = conn.recv()
    os.environ.clear()
    os.environ.update(env)
    answers: queue.SimpleQueue = queue.SimpleQueue()

    def watch() -> None:  # the only reader: answers wake the trainer; a closed connection ends us
        while True:
            try:
                answers.put(conn.recv())
            except (EOFError, OSError):
                os._exit(0)

    def emit(message) -> None:
        conn.send(("message", message))
        answers.get()

    threading.Thread(target=watch, daemon=True).start()
    module, name = target.split(":")
    try:
        getattr(importlib.import_module(module), name)(emit, *args)
        conn.send(("done", None))
    except BaseException as exc:  # noqa: BLE001 - everything goes back to the trial, as text
        conn.send(("error", "".join(traceback.format_exception(exc)).strip()))


def _take_output(sock: socket.socket) -> None:
    _, fds, _, _ = socket.recv_fds(sock, 2, 2)
    sys.stdout.flush()
    sys.stderr.flush()
    for target, fd in zip((1, 2), fds):
        os.dup2(fd, target)
        os.close(fd)


def _reap() -> None:
    try:
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass
    except ChildProcessError:
        pass


def _same_user(sock: socket.socket) -> bool:
    _pid, uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    return uid == os.getuid()


def serve(address: str, target: str, preload: list[str]) -> None:
    module, _, name = target.partition(":")
    getattr(importlib.import_module(module), name)  # fails here, at start, if there is no such entry point
    for module in preload:
        importlib.import_module(module)
    # Python's cyclic GC writes into every object it scans, which would copy each page of the
    # preloaded modules into every fork; frozen objects are skipped.
    gc.collect()
    gc.freeze()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(address + ".tmp")
    listener.listen(64)
    os.rename(address + ".tmp", address)  # appears only once it accepts: the driver waits for it
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ)
    sel.register(sys.stdin, selectors.EVENT_READ)
    while True:
        for key, _ in sel.select(timeout=1.0):
            if key.fileobj is sys.stdin:
                if not os.read(sys.stdin.fileno(), 4096):  # the driver closed it, or died
                    listener.close()
                    return
                continue
            sock, _ = listener.accept()
            if not _same_user(sock):
                sock.close()
                continue
            if os.fork() == 0:
                sel.close()
                listener.close()
                code = 0
                try:
                    _take_output(sock)
                    _child(Connection(sock.detach()), target)
                except BaseException:  # noqa: BLE001
                    traceback.print_exc()
                    code = 1
                finally:
                    sys.stdout.flush()
                    sys.stderr.flush()
                    os._exit(code)
            sock.close()
        _reap()


if __name__ == "__main__":
    serve(sys.argv[1], sys.argv[2], sys.argv[3:])
