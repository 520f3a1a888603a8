"""The fork provisioner: kernels named by a kernelspec are forked from a fork server, behave like
new ones, and anything odd falls back to a normal launch.

Kernels here come from a kernelspec in a temporary JUPYTER_PATH naming ``caffe2torch-fork`` with
a light preload, so each test takes a second or two.
"""
import importlib.metadata
import json
import os
import signal
import sys
import time
from pathlib import Path

import nbformat
import pytest
from jupyter_client import KernelManager

from pipeline import kernelfork

KERNEL = Path(kernelfork.__file__).with_name("kernel")  # make kernel installs it

MARK = ("import sys, types\n"
        "sys.modules['c2t_preloaded'] = types.ModuleType('c2t_preloaded')")


def ensure_entry_point(folder, monkeypatch):
    """Register the provisioner's entry point when the project is not installed (a checkout on
    PYTHONPATH): a minimal .dist-info, as the installed package's would be."""
    group = "jupyter_client.kernel_provisioners"
    if importlib.metadata.entry_points(group=group, name=kernelfork.NAME):
        return
    dist = folder / "caffe2torch_pipeline_checkout-0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: caffe2torch-pipeline-checkout\n"
                                   "Version: 0\n")
    (dist / "entry_points.txt").write_text(
        f"[{group}]\n{kernelfork.NAME} = pipeline.kernelfork:ForkProvisioner\n")
    monkeypatch.syspath_prepend(str(folder))


def fork_kernelspec(tmp_path, monkeypatch, name, preload=None):
    """Install the project's kernelspec as ``name`` into a temporary JUPYTER_PATH, with another
    ``preload`` if given, as `make kernel` does (``jupyter kernelspec install``)."""
    from jupyter_client.kernelspec import KernelSpecManager
    ensure_entry_point(tmp_path / "site", monkeypatch)
    spec = json.loads((KERNEL / "kernel.json").read_text())
    if preload is not None:
        spec["metadata"]["kernel_provisioner"]["config"]["preload"] = preload
    source = tmp_path / "source" / name
    source.mkdir(parents=True)
    (source / "kernel.json").write_text(json.dumps(spec))
    prefix = tmp_path / "prefix"
    KernelSpecManager().install_kernel_spec(str(source), name, prefix=str(prefix))
    monkeypatch.setenv("JUPYTER_PATH", str(prefix / "share" / "jupyter"))
    return prefix / "share" / "jupyter" / "kernels" / name


@pytest.fixture
def spec(tmp_path, monkeypatch):
    fork_kernelspec(tmp_path, monkeypatch, "c2t-fork-test", MARK)
    yield "c2t-fork-test"
    kernelfork.close_all()


def _start(name, cwd, **env):
    km = KernelManager(kernel_name=name)
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


def test_the_kernelspec_names_the_provisioner(tmp_path, monkeypatch):
    fork_kernelspec(tmp_path, monkeypatch, "c2t-spec-test")
    km = KernelManager(kernel_name="c2t-spec-test")
    assert km.kernel_spec.metadata["kernel_provisioner"]["provisioner_name"] == "caffe2torch-fork"
    # jupyter_client runs "python" as the Python it runs in: the venv's, for Jupyter and run_all
    assert km.format_kernel_cmd()[0] == sys.executable
    split = kernelfork.launcher_command(km.format_kernel_cmd())
    assert split[0] == [sys.executable, "-Xfrozen_modules=off"]


def test_a_forked_kernel_runs_where_and_as_a_new_one_would(spec, tmp_path, monkeypatch):
    monkeypatch.setenv("C2T_FORK_TEST", "hello")
    warmed = kernelfork.warm(KernelManager(kernel_name=spec).kernel_spec)
    km, kc = _start(spec, tmp_path)
    try:
        assert isinstance(km.provisioner, kernelfork.ForkProvisioner)
        process = km.provisioner.process
        server = process._server
        assert server is warmed and warmed.ready == {"ready": True, "error": None}
        pid = process.wait_started(30)
        assert process.forked is True and kernelfork.last_launch() == "forked"
        out, reply = _run(kc, "import os, sys, subprocess, signal\n"
                          "print(os.getcwd(), os.environ['C2T_FORK_TEST'], "
                          "'c2t_preloaded' in sys.modules, os.getppid(), "
                          "os.getpgid(0) == os.getpid(), os.getpid())\n"
                          "print(subprocess.run(['sh', '-c', 'sleep 0.2; exit 3']).returncode, "
                          "signal.getsignal(signal.SIGCHLD) == signal.SIG_DFL)")
        assert reply["status"] == "ok", reply
        first, second = out.splitlines()
        cwd, env, preloaded, ppid, leader, pid = first.split()
        assert cwd == str(tmp_path) and env == "hello"
        assert preloaded == "True"  # the server's imports are there: it was forked
        assert int(ppid) == server.process.pid and leader == "True"
        assert int(pid) == process.wait_started()
        assert second == "3 True"  # its children are its own: SIGCHLD is back to the default
        km2, kc2 = _start(spec, tmp_path)  # the same server again
        assert km2.provisioner.process._server is server
        kc2.stop_channels()
        km2.shutdown_kernel(now=True)
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
    assert not km.is_alive() and _gone(process.wait_started())
    assert process.poll() == -signal.SIGKILL  # the exit status the server reported


def test_another_environment_gets_another_server(spec, tmp_path):
    """The imports ran under the server's environment (OMP_NUM_THREADS, ...): a kernel whose
    environment differs gets a server of its own; per-kernel JPY_* variables do not count."""
    km1, kc1 = _start(spec, tmp_path, JPY_SESSION_NAME="a")
    km2, kc2 = _start(spec, tmp_path, JPY_SESSION_NAME="b")
    km3, kc3 = _start(spec, tmp_path, OMP_NUM_THREADS="1")
    try:
        servers = [km.provisioner.process._server for km in (km1, km2, km3)]
        assert servers[0] is servers[1] and servers[2] is not servers[0]
        assert _run(kc3, "import os; print(os.environ['OMP_NUM_THREADS'])")[0].strip() == "1"
    finally:
        for km, kc in ((km1, kc1), (km2, kc2), (km3, kc3)):
            kc.stop_channels()
            km.shutdown_kernel(now=True)


def test_interrupting_a_forked_kernel(spec, tmp_path):
    km, kc = _start(spec, tmp_path)
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
        assert reply["content"]["ename"] == "KeyboardInterrupt"
        for _ in range(20):  # requests queued right after an error are aborted (stop_on_error)
            reply = kc.execute_interactive("answer = 6 * 7", user_expressions={"a": "answer"},
                                           timeout=60)["content"]
            if reply["status"] != "aborted":
                break
            time.sleep(0.2)
        assert reply["user_expressions"]["a"]["data"]["text/plain"] == "42"
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


def test_kernels_do_not_outlive_the_server(spec, tmp_path):
    km, kc = _start(spec, tmp_path)
    pid = km.provisioner.process.wait_started(30)
    kc.stop_channels()
    kernelfork.close_all()  # the process that started them went away without shutting down
    assert _gone(pid, within=15)  # ipykernel notices its parent is gone
    km.cleanup_resources()


@pytest.mark.parametrize("preload, why", [
    ("import c2t_no_such_module", "its preload failed: ModuleNotFoundError"),
    ("import threading, time\n"
     "threading.Thread(target=time.sleep, args=(60,), daemon=True).start()",
     "1 Python thread(s) running; forking is unsafe"),
])
def test_a_kernel_that_cannot_be_forked_is_launched_normally(tmp_path, monkeypatch, preload, why,
                                                            capsys):
    fork_kernelspec(tmp_path, monkeypatch, "c2t-nofork-test", preload)
    try:
        km, kc = _start("c2t-nofork-test", tmp_path)
        try:
            process = km.provisioner.process
            process.wait_started(30)
            assert process.forked is False and why in process.why_not_forked
            assert kernelfork.last_launch() == "new process" and why in capsys.readouterr().err
            out, reply = _run(kc, "import sys; print('c2t_preloaded' in sys.modules)")
            assert out.strip() == "False" and reply["status"] == "ok"
        finally:
            kc.stop_channels()
            km.shutdown_kernel(now=True)
        assert process.poll() is not None
    finally:
        kernelfork.close_all()


def test_a_dead_server_is_replaced_and_fork_0_means_normal_launches(spec, tmp_path,
                                                                    monkeypatch):
    server = kernelfork.warm(KernelManager(kernel_name=spec).kernel_spec)
    server.process.kill()
    server.process.wait()
    deadline = time.monotonic() + 10
    while not server.closed and time.monotonic() < deadline:
        time.sleep(0.05)
    launched = []
    orphan = server.request([], {}, str(tmp_path), lambda: launched.append(1) or None)
    assert orphan.forked is False and "not running" in orphan.why_not_forked and launched
    km, kc = _start(spec, tmp_path)
    try:
        process = km.provisioner.process
        assert process.wait_started(30) and process.forked is True
        assert process._server is not server  # a new server took the dead one's place
        assert _run(kc, "print(1 + 1)")[0].strip() == "2"
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
    monkeypatch.setenv(kernelfork.DISABLE, "0")
    assert kernelfork.warm(KernelManager(kernel_name=spec).kernel_spec) is None
    km, kc = _start(spec, tmp_path)
    try:
        assert not isinstance(km.provisioner.process, kernelfork.ForkedKernel)
        assert kernelfork.last_launch() == "new process"
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


def test_papermill_gets_forked_kernels_from_the_kernelspec(spec, tmp_path):
    import papermill
    nb = nbformat.v4.new_notebook(metadata={"kernelspec": {"name": spec, "language": "python",
                                                           "display_name": spec}})
    nb.cells = [nbformat.v4.new_code_cell("x = 1", metadata={"tags": ["parameters"]}),
                nbformat.v4.new_code_cell("import sys; print('c2t_preloaded' in sys.modules, x)")]
    nbformat.write(nb, str(tmp_path / "in.ipynb"))
    papermill.execute_notebook(str(tmp_path / "in.ipynb"), str(tmp_path / "out.ipynb"),
                               parameters={"x": 5}, progress_bar=False)
    assert kernelfork.last_launch() == "forked"
    out = nbformat.read(str(tmp_path / "out.ipynb"), as_version=4)
    assert out.cells[-1].outputs[0]["text"] == "True 5\n"


def test_launcher_command():
    split = kernelfork.launcher_command
    assert split(["/py", "-m", "ipykernel_launcher", "-f", "{connection_file}"]) == (
        ["/py"], ["-f", "{connection_file}"])
    assert split(["/py", "-Xfrozen_modules=off", "-m", "ipykernel_launcher", "-f", "c.json"]) == (
        ["/py", "-Xfrozen_modules=off"], ["-f", "c.json"])
    assert split(["/py", "-m", "ipykernel", "-f", "c.json"]) is None  # another entry point
    assert split(["/py", "script.py", "-m", "ipykernel_launcher"]) is None
    assert split(["R", "--slave", "-e", "IRkernel::main()"]) is None
