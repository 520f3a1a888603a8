"""run_all.py with real kernels under what a cluster does to it (issue 11): SIGTERM, as an
ordinary process and as a container's PID 1; a TMPDIR too long for Unix sockets."""
# ruff: noqa: F811 (fixtures imported from test_pipeline are test arguments of the same name)
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_pipeline import env, small_data  # noqa: F401 (fixtures: the kernelspec, two LMDBs)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def hanging_mirror():
    """A URL whose server accepts connections and never answers: a download cell that blocks."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    yield server, f"http://127.0.0.1:{server.getsockname()[1]}/?token=s3cr3t"
    server.close()


def _can_unshare():
    if shutil.which("unshare") is None:
        return False
    return subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"],
                          capture_output=True).returncode == 0


def _pid1(process):
    """The pid (outside the namespace) of unshare's child: run_all.py as PID 1."""
    for _ in range(200):
        children = Path(f"/proc/{process.pid}/task/{process.pid}/children")
        if children.exists() and children.read_text().split():
            return int(children.read_text().split()[0])
        time.sleep(0.05)
    raise AssertionError("unshare started no child")


@pytest.mark.parametrize("as_pid1", [False, True], ids=["process", "pid1"])
def test_sigterm_stops_the_kernel_and_records_the_run_interrupted(as_pid1, env, hanging_mirror,
                                                                  tmp_path):
    if as_pid1 and not _can_unshare():
        pytest.skip("unshare --pid is not available here")
    server, url = hanging_mirror
    outputs = tmp_path / "out"
    command = [sys.executable, "run_all.py", "--only", "download", "-p", "data_source=idx",
               "-p", f"data_url={url}", "-p", f"data_dir={tmp_path / 'data'}", "--run-id", "t",
               "--outputs", str(outputs)]
    if as_pid1:
        command = ["unshare", "--pid", "--fork", "--mount-proc", *command]
    tag = f"{os.getpid()}-{as_pid1}"
    mark = f"SIGTERM_TEST_RUN={tag}"
    process = subprocess.Popen(command, cwd=REPO, env={**env, "SIGTERM_TEST_RUN": tag},
                               stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        # the download cell is running once the kernel connects to the mirror
        assert select.select([server], [], [], 300)[0], "the download cell never started"
        target = _pid1(process) if as_pid1 else process.pid
        os.kill(target, signal.SIGTERM)
        t0 = time.monotonic()
        out, err = process.communicate(timeout=30)  # Kubernetes' grace period
        assert time.monotonic() - t0 < 30
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
    assert process.returncode == 143, err[-2000:]
    assert "step download interrupted (SIGTERM)" in err
    run = json.loads((outputs / "t/run.json").read_text())
    assert run["status"] == "interrupted" and run["steps"][0]["status"] == "interrupted"
    line = json.loads((outputs / "runs.jsonl").read_text().splitlines()[-1])
    assert line["run_id"] == "t" and line["status"] == "interrupted"
    assert '<td class="interrupted">interrupted</td>' in (outputs / "index.html").read_text()
    assert _left(mark) == []  # the kernel (and its fork server) stopped
    # the URL's token is in no file of the run (notebook and HTML included) nor in the log
    assert [p for p in outputs.rglob("*") if p.is_file() and b"s3cr3t" in p.read_bytes()] == []
    assert "s3cr3t" not in out + err


def _left(mark, wait=5.0):
    """Pids of processes whose environment holds ``mark`` (kernels inherit it), after ``wait``."""
    deadline = time.monotonic() + wait
    while True:
        found = []
        for proc in Path("/proc").glob("[0-9]*"):
            try:
                if mark.encode() in (proc / "environ").read_bytes():
                    found.append(int(proc.name))
            except OSError:
                continue
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


def test_a_long_tmpdir_does_not_break_kernel_start(env, small_data, tmp_path):
    """A ~90-character TMPDIR would put a kernel's Unix socket past the 107-byte limit: kernels
    talk TCP on 127.0.0.1 and the fork server a socketpair, so nothing is named under TMPDIR."""
    tmpdir = tmp_path / ("t" * (90 - len(str(tmp_path)) - 1))
    tmpdir.mkdir()
    assert len(str(tmpdir)) == 90
    outputs = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "run_all.py", "--only", "download", "-p", "data_source=existing",
         "-p", f"data_dir={small_data}", "--run-id", "t", "--outputs", str(outputs)],
        cwd=REPO, env={**env, "TMPDIR": str(tmpdir)}, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    run = json.loads((outputs / "t/run.json").read_text())
    assert run["status"] == "succeeded" and run["steps"][0]["kernel"] != "new process"


BROKEN_KERNELS = {
    "missing executable": (["/nonexistent/python", "{connection_file}"], "No such file"),
    "exits at once": ([sys.executable, "-c", "raise SystemExit(3)", "{connection_file}"],
                      "Kernel died"),
    "never answers": ([sys.executable, "-c", "import time; time.sleep(600)", "{connection_file}"],
                      "didn't respond in 3 seconds"),
}


@pytest.mark.parametrize("case", BROKEN_KERNELS)
def test_a_kernel_that_cannot_start_exits_1_with_its_cause(case, env, tmp_path):
    argv, cause = BROKEN_KERNELS[case]
    spec = tmp_path / "jupyter" / "kernels" / "caffe2torch"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": "broken",
                                                  "language": "python"}))
    outputs, tag = tmp_path / "out", f"{os.getpid()}-{case}"
    result = subprocess.run(
        [sys.executable, "run_all.py", "--only", "download", "-p", "start_timeout=3",
         "--run-id", "t", "--outputs", str(outputs)], cwd=REPO, capture_output=True, text=True,
        env={**env, "JUPYTER_PATH": str(tmp_path / "jupyter"), "SIGTERM_TEST_RUN": tag},
        timeout=120)
    assert result.returncode == 1, result.stderr[-2000:]
    assert "step download failed:" in result.stderr and cause in result.stderr
    run = json.loads((outputs / "t/run.json").read_text())
    assert run["status"] == "failed" and run["steps"][0]["status"] == "failed"
    assert _left(f"SIGTERM_TEST_RUN={tag}") == []  # no kernel left behind


def test_a_full_disk_in_a_real_run_exits_1_leaving_complete_files(env, small_data, tmpfs):
    """Outputs on a 128 KiB tmpfs: the notebook (~7 KB) fits, its HTML (~270 KB) does not."""
    volume = tmpfs("size=128k", "tiny")
    result = subprocess.run(
        [sys.executable, "run_all.py", "--only", "download", "-p", "data_source=existing",
         "-p", f"data_dir={small_data}", "--run-id", "t", "--outputs", str(volume)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr[-2000:]
    html = volume / "t" / "01_download.html"
    assert f"no space left on {html}" in result.stderr and "Traceback" not in result.stderr
    assert not html.exists() and list(volume.rglob("*tmp*")) == []
    json.loads((volume / "t" / "01_download.ipynb").read_text())  # complete
    run = json.loads((volume / "t/run.json").read_text())
    assert run["status"] == "failed" and run["steps"][0]["html"] is None
