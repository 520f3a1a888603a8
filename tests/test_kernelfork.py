"""The kernel fork server: forked kernels behave like new ones, and anything odd falls back.

Kernels here are ipykernel's own ``python3`` kernelspec (``python -m ipykernel_launcher -f ...``)
with a light stage, so each test takes a second or two.
"""
import os
import signal
import sys
import time
import uuid

import pytest
from jupyter_client import KernelManager

from mnist_tutorial import kernelfork

MARK = ("import ipykernel.kernelapp, sys, types; "
        "sys.modules['c2t_preloaded'] = types.ModuleType('c2t_preloaded')")


def _server(*stages):
    return kernelfork.ForkServer([sys.executable], [list(s) for s in stages])


@pytest.fixture
def server():
    srv = _server(("base", MARK, False))
    yield srv
    srv.close()


def _start(server, stage, cwd, **env):
    km = KernelManager(kernel_name="python3", transport="ipc",
                       ip=str(cwd / f"k-{uuid.uuid4().hex[:6]}"))
    km.kernel_id = str(uuid.uuid4())
    provisioner = kernelfork.provisioner_class()(kernel_id=km.kernel_id,
                                                 kernel_spec=km.kernel_spec, parent=km)
    provisioner.server, provisioner.stage = server, stage
    km.provisioner = provisioner
    km.start_kernel(cwd=str(cwd), env={**os.environ, **env})
    kc = km.client()
    kc.start_channels()
    kc.wait_for_ready(timeout=60)
    return km, kc


def _run(kc, code, timeout=60):
    """stdout of ``code`` and the reply's content."""
    out = []

    def hook(msg):
        if msg["msg_type"] == "stream":
            out.append(msg["content"]["text"])
    reply = kc.execute_interactive(code, timeout=timeout, output_hook=hook)
    return "".join(out), reply["content"]


def _gone(pid, within=10.0):
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


def test_a_forked_kernel_runs_where_and_as_a_new_one_would(server, tmp_path):
    km, kc = _start(server, "base", tmp_path, C2T_FORK_TEST="hello")
    try:
        process = km.provisioner.process
        assert process.forked is True and process.pid != server.process.pid
        out, reply = _run(kc, "import os, sys, subprocess\n"
                          "print(os.getcwd(), os.environ['C2T_FORK_TEST'], "
                          "'c2t_preloaded' in sys.modules, os.getppid(), "
                          "os.getpgid(0) == os.getpid(), os.getpid())\n"
                          "import signal\n"
                          "print(subprocess.run(['sh', '-c', 'sleep 0.2; exit 3']).returncode, "
                          "signal.getsignal(signal.SIGCHLD) == signal.SIG_DFL)")
        assert reply["status"] == "ok", reply
        first, second = out.splitlines()
        cwd, env, preloaded, ppid, leader, pid = first.split()
        assert cwd == str(tmp_path) and env == "hello"
        assert preloaded == "True"  # the server's imports are there: it was forked
        assert int(ppid) == server.process.pid and leader == "True"
        assert int(pid) == process.pid
        assert second == "3 True"  # its children are its own: SIGCHLD is back to the default
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
    assert not km.is_alive() and _gone(process.pid)
    assert process.poll() == -signal.SIGKILL  # the exit status the server reported


def test_interrupting_a_forked_kernel(server, tmp_path):
    km, kc = _start(server, "base", tmp_path)
    try:
        msg_id = kc.execute("import time; print('sleeping', flush=True); time.sleep(60)")
        while True:  # interrupt once the cell runs (a kernel ignores SIGINT between cells)
            msg = kc.get_iopub_msg(timeout=30)
            if msg["msg_type"] == "stream" and "sleeping" in msg["content"]["text"]:
                break
        km.interrupt_kernel()
        reply = kc.get_shell_msg(timeout=20)
        while reply["parent_header"]["msg_id"] != msg_id:  # a late kernel_info reply
            reply = kc.get_shell_msg(timeout=20)
        assert reply["content"]["status"] == "error"
        assert reply["content"]["ename"] == "KeyboardInterrupt"
        # still alive and usable (asked through user_expressions: right after an interrupt,
        # ipykernel may file a print under the interrupted request)
        for _ in range(20):  # requests queued right after an error are aborted (stop_on_error)
            reply = kc.execute_interactive("answer = 6 * 7", user_expressions={"a": "answer"},
                                           timeout=60)["content"]
            if reply["status"] != "aborted":
                break
            time.sleep(0.2)
        assert reply["status"] == "ok"
        assert reply["user_expressions"]["a"]["data"]["text/plain"] == "42"
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


def test_kernels_do_not_outlive_the_server(tmp_path):
    srv = _server(("base", MARK, False))
    km, kc = _start(srv, "base", tmp_path)
    pid = km.provisioner.process.pid
    kc.stop_channels()
    srv.close()  # the runner went away without shutting the kernel down
    assert srv.process.returncode == 0
    assert _gone(pid, within=15)  # ipykernel notices its parent is gone
    km.cleanup_resources()


@pytest.mark.parametrize("code, why", [
    ("import c2t_no_such_module", "stage base failed: ModuleNotFoundError"),
    ("import threading, time\n"
     "threading.Thread(target=time.sleep, args=(60,), daemon=True).start()",
     "1 Python thread(s) running; forking is unsafe"),
])
def test_a_kernel_that_cannot_be_forked_is_launched_normally(tmp_path, code, why):
    srv = _server(("base", code, False))
    try:
        km, kc = _start(srv, "base", tmp_path)
        try:
            process = km.provisioner.process
            assert process.forked is False and why in process.why_not_forked
            out, reply = _run(kc, "import sys; print('c2t_preloaded' in sys.modules)")
            assert out.strip() == "False" and reply["status"] == "ok"
        finally:
            kc.stop_channels()
            km.shutdown_kernel(now=True)
        assert process.poll() is not None
    finally:
        srv.close()


def test_a_dead_server_means_normal_launches(tmp_path):
    srv = _server(("base", MARK, False))
    srv.process.kill()
    srv.process.wait()
    try:
        km, kc = _start(srv, "base", tmp_path)
        try:
            assert km.provisioner.process.forked is False
            assert "fork server" in km.provisioner.process.why_not_forked
            assert _run(kc, "print(1 + 1)")[0].strip() == "2"
        finally:
            kc.stop_channels()
            km.shutdown_kernel(now=True)
    finally:
        srv.close()


def test_a_held_stage_forks_its_kernel_before_the_next_stage_loads(tmp_path):
    marker = tmp_path / "second-stage-loaded"
    srv = _server(("first", MARK, True),
                  ("second", f"open({str(marker)!r}, 'w').close()", False))
    try:
        deadline = time.monotonic() + 30
        while "first" not in srv.stages and time.monotonic() < deadline:
            time.sleep(0.05)
        assert srv.stages["first"]["ok"] is True
        time.sleep(1.0)
        assert not marker.exists()  # held: waiting for a kernel of the first stage
        km, kc = _start(srv, "first", tmp_path)
        deadline = time.monotonic() + 30
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert marker.exists()
        kc.stop_channels()
        km.shutdown_kernel(now=True)
    finally:
        srv.close()


def test_launcher_command():
    split = kernelfork.launcher_command
    assert split(["/py", "-m", "ipykernel_launcher", "-f", "{connection_file}"]) == (
        ["/py"], ["-f", "{connection_file}"])
    assert split(["/py", "-Xfrozen_modules=off", "-m", "ipykernel_launcher", "-f", "c.json"]) == (
        ["/py", "-Xfrozen_modules=off"], ["-f", "c.json"])
    assert split(["/py", "-m", "ipykernel", "-f", "c.json"]) is None  # another entry point
    assert split(["/py", "script.py", "-m", "ipykernel_launcher"]) is None
    assert split(["R", "--slave", "-e", "IRkernel::main()"]) is None
