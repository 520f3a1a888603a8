"""A cut-off LMDB is refused with one clear line instead of killing the process with SIGBUS.

Each read runs in a child process: before the size check, touching a page past the end of the
file killed the reader (and with it a test run or a notebook kernel) with SIGBUS.
"""
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from caffe2torch.db import open_db
from caffe2torch.db.serialize import NumpyArrayToCaffe2Tensor
from caffe2torch.proto import caffe2_pb2

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _build(path, n=400):
    """An LMDB of ``n`` make_mnist_db-style records (a [1,28,28] uint8 image and a label)."""
    rng = np.random.default_rng(0)
    with open_db("lmdb", path, "new") as db:
        txn = db.new_transaction()
        for i in range(n):
            protos = caffe2_pb2.TensorProtos()
            protos.protos.add().CopyFrom(NumpyArrayToCaffe2Tensor(
                rng.integers(0, 255, (1, 28, 28), dtype=np.uint8)))
            protos.protos.add().CopyFrom(NumpyArrayToCaffe2Tensor(np.array(i % 10, np.int32)))
            txn.put(f"{i:08d}", protos.SerializeToString())
        txn.commit()


def _cut(path, fraction=2 / 3):
    data = os.path.join(path, "data.mdb")
    size = os.path.getsize(data)
    with open(data, "r+b") as f:
        f.truncate(int(size * fraction) // 4096 * 4096)
    return data


def _run(code):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, env=env, timeout=120)


@pytest.fixture
def damaged(tmp_path):
    path = str(tmp_path / "train-lmdb")
    _build(path)
    return path, _cut(path)


def test_reading_a_cut_off_lmdb_raises_one_line_naming_the_file(damaged):
    path, data = damaged
    r = _run(f"""
        from caffe2torch.db import open_db
        try:
            with open_db("lmdb", {path!r}, "read") as db:
                print(sum(1 for _ in db.cursor()))
        except ValueError as e:
            print("REFUSED", e)
        """)
    assert r.returncode == 0, f"reader died (rc {r.returncode}): {r.stderr[-500:]}"
    assert r.stdout.startswith("REFUSED"), r.stdout
    assert data in r.stdout and "damaged" in r.stdout and "\n" not in r.stdout.strip()


def test_opening_a_cut_off_lmdb_for_writing_is_refused_too(damaged):
    path, data = damaged
    r = _run(f"""
        from caffe2torch.db import open_db
        try:
            open_db("lmdb", {path!r}, "write")
        except ValueError as e:
            print("REFUSED", e)
        """)
    assert r.returncode == 0, f"writer died (rc {r.returncode}): {r.stderr[-500:]}"
    assert r.stdout.startswith("REFUSED") and data in r.stdout


def test_the_training_reader_refuses_it_with_the_same_message(damaged):
    path, data = damaged
    r = _run(f"""
        from caffe2torch.python import core, workspace
        net = core.Net("read")
        reader = net.CreateDB([], "reader", db={path!r}, db_type="lmdb")
        net.TensorProtosDBInput([reader], ["data", "label"], batch_size=64)
        try:
            workspace.RunNetOnce(net)
        except Exception as e:
            print("REFUSED", type(e).__name__, e)
        """)
    assert r.returncode == 0, f"training reader died (rc {r.returncode}): {r.stderr[-500:]}"
    assert r.stdout.startswith("REFUSED") and data in r.stdout and "damaged" in r.stdout


def test_an_intact_lmdb_still_reads(tmp_path):
    path = str(tmp_path / "ok-lmdb")
    _build(path, n=50)
    with open_db("lmdb", path, "read") as db:
        assert sum(1 for _ in db.cursor()) == 50


def test_the_data_step_rebuilds_a_cut_off_database_and_existing_names_it(tmp_path):
    """prepare_mnist: the check of an existing database never crashes; a rebuild replaces it."""
    r = _run(f"""
        import sys
        sys.path.insert(0, {os.path.join(ROOT, "tests")!r})
        from pathlib import Path
        import test_data as t
        from mnist_tutorial.data import DataError, db_path, prepare_mnist, verify_mnist
        from test_db_damage import _cut
        folder = Path({str(tmp_path)!r}) / "idx"
        folder.mkdir()
        files = t.idx_files()
        for name, body in files.items():
            (folder / name).write_bytes(body)
        data_dir = Path({str(tmp_path)!r}) / "data"
        fast = dict(t.FAST, md5s=t.md5s_of(files))
        prepare_mnist(data_dir, "idx", url=str(folder), **fast)
        damaged = _cut(str(db_path(data_dir, "train")))
        try:
            verify_mnist(data_dir, expected_counts=t.COUNTS)  # what data_source=existing runs
        except DataError as e:
            print("EXISTING", e)
        prepare_mnist(data_dir, "idx", url=str(folder), **fast)
        verify_mnist(data_dir, expected_counts=t.COUNTS)
        print("REBUILT", damaged)
        """)
    assert r.returncode == 0, f"data step died (rc {r.returncode}): {r.stderr[-800:]}"
    existing, rebuilt = r.stdout.strip().splitlines()
    assert existing.startswith("EXISTING") and "damaged" in existing
    assert rebuilt.startswith("REBUILT") and rebuilt.split()[1] in existing
