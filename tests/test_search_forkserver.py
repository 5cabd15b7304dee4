"""The fork server: trials run in forks of one warm process, and end with their connection."""

from __future__ import annotations

import os
import time

import pytest

from search import forkserver
from tests.search_helpers import ROOT

pytestmark = pytest.mark.skipif(not forkserver.available(), reason="fork server: Linux only")


TARGET = "tests.test_search_forkserver:emit_then_maybe_fail"


def emit_then_maybe_fail(emit, n: int, fail: str) -> None:  # runs in the fork
    import sys
    print(f"fork {os.getpid()} says hello", flush=True)
    for i in range(n):
        emit({"i": i, "pid": os.getpid(), "env": os.environ.get("MMSA_TEST_VALUE"),
              "preloaded": "colorsys" in sys.modules})
    if fail == "raise":
        raise ValueError("trial went wrong")
    if fail == "die":  # as if killed (out of memory): no word back
        os._exit(9)


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    srv = forkserver.ForkServer(TARGET, preload=["colorsys"])
    assert srv.wait_ready(), srv.failure
    yield srv
    srv.close()
    assert srv.process.poll() is not None and not srv.folder.exists()


def run(server, n: int, fail: str = "", on_message=None) -> list[dict]:
    got = []
    conn = forkserver.connect(server.address)
    assert conn is not None
    forkserver.run_forked(conn, (n, fail), on_message or got.append)
    return got


def test_a_fork_runs_the_target_with_the_callers_environment_and_the_servers_imports(server, monkeypatch):
    monkeypatch.setenv("MMSA_TEST_VALUE", "from the trial")
    got = run(server, 3)
    assert [m["i"] for m in got] == [0, 1, 2]
    assert {m["env"] for m in got} == {"from the trial"} and all(m["preloaded"] for m in got)
    pids = {m["pid"] for m in got}
    assert len(pids) == 1 and pids != {os.getpid(), server.process.pid}
    assert run(server, 1)[0]["pid"] not in pids  # a fresh fork per trial


def test_the_fork_writes_to_the_trials_stdout(server, capfd):
    pid = run(server, 1)[0]["pid"]
    assert f"fork {pid} says hello" in capfd.readouterr().out


def test_an_error_in_the_fork_reaches_the_trial_with_its_traceback(server):
    with pytest.raises(forkserver.ForkedTrialError) as info:
        run(server, 1, fail="raise")
    text = str(info.value)
    assert text.splitlines()[-1] == "ValueError: trial went wrong" and "emit_then_maybe_fail" in text


def test_a_fork_that_dies_fails_its_trial_with_a_message(server):
    with pytest.raises(forkserver.ForkedTrialError, match="ended without a result"):
        run(server, 2, fail="die")


def test_a_trial_stopped_between_epochs_ends_its_fork(server):
    pids = []

    def stop_after_first(message):  # what tune.report does when ASHA stops the trial
        pids.append(message["pid"])
        raise SystemExit

    with pytest.raises(SystemExit):
        run(server, 1000, on_message=stop_after_first)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and os.path.exists(f"/proc/{pids[0]}") and \
            open(f"/proc/{pids[0]}/stat").read().split()[2] != "Z":
        time.sleep(0.05)
    stat = f"/proc/{pids[0]}/stat"
    assert not os.path.exists(stat) or open(stat).read().split()[2] == "Z", "the fork outlived its trial"
    assert len(pids) == 1


def test_no_server_means_the_trial_trains_in_its_own_process(tmp_path):
    assert forkserver.connect(None) is None
    assert forkserver.connect(str(tmp_path / "absent.sock")) is None


def test_a_server_that_cannot_start_says_why_and_leaves_nothing_behind():
    srv = forkserver.ForkServer(TARGET, preload=["no_such_module_for_mmsa"])
    assert not srv.wait_ready()
    assert "No module named 'no_such_module_for_mmsa'" in srv.failure
    assert srv.process.poll() is not None and not srv.folder.exists()


def test_gpu_trials_and_clusters_do_not_fork_from_the_server(tmp_path):
    from search.driver import trials_fork
    from search.space import load_space
    spec = load_space(ROOT / "spaces" / "smoke.yaml")
    assert not trials_fork(spec, None)  # the default: plain Ray workers
    spec.fork_trials = True
    assert trials_fork(spec, None)  # opted in, CPU trials on this machine: forked
    assert not trials_fork(spec, "auto")  # a cluster: the driver's machine may run no trials
    spec.gpu = 0.5
    assert not trials_fork(spec, None)  # CUDA does not survive a fork


def test_a_server_without_its_entry_point_does_not_start():
    srv = forkserver.ForkServer("tests.test_search_forkserver:no_such_function", preload=[])
    assert not srv.wait_ready()
    assert "no_such_function" in srv.failure


def test_a_connection_cannot_choose_the_code_that_runs(server, tmp_path):
    # the old protocol named a module:function; now whatever arrives goes to the one entry point
    conn = forkserver.connect(server.address)
    marker = tmp_path / "ran"
    conn.send((dict(os.environ), "os:system", (f"touch {marker}",)))
    try:
        kind = conn.recv()[0]
    except EOFError:  # the fork could not read the request, and ended
        kind = "closed"
    conn.close()
    time.sleep(0.5)
    assert kind in ("error", "closed") and not marker.exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root, to connect as another user")
def test_the_server_forks_for_its_own_user_only(server):
    import socket
    os.chmod(server.folder, 0o755)
    os.chmod(server.address, 0o777)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # connect as user `nobody`, and say whether the server hung up
        code = 1
        try:
            os.setuid(65534)
            s = socket.socket(socket.AF_UNIX)
            s.connect(server.address)
            s.settimeout(10)
            os.write(write, b"closed" if s.recv(1) == b"" else b"answered")
            code = 0
        finally:
            os._exit(code)
    os.close(write)
    os.waitpid(pid, 0)
    assert os.read(read, 16) == b"closed"
    assert run(server, 1)[0]["i"] == 0  # its own user is still served
