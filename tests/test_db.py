"""caffe2torch.db: MiniDB byte layout, the real Caffe2 minidbs, LMDB, DBReader."""
import struct
import threading
from pathlib import Path

import numpy as np
import pytest

from caffe2torch.db import DBReader, open_db
from caffe2torch.db.serialize import Caffe2TensorToNumpyArray
from caffe2torch.proto import caffe2_pb2

ARTIFACTS = Path(__file__).resolve().parents[1] / ".." / "shared" / "caffe2-artifacts"


def _records(db_type, path):
    with open_db(db_type, path, "read") as db:
        return list(db.cursor())


def _protos(value):
    return [Caffe2TensorToNumpyArray(p) for p in caffe2_pb2.TensorProtos.FromString(value).protos]


def test_minidb_byte_layout(tmp_path):
    path = tmp_path / "x.minidb"
    with open_db("minidb", path, "new") as db:
        txn = db.new_transaction()
        txn.put(b"ab", b"xyz")
        txn.put("k", b"\x00")
        txn.commit()
    assert path.read_bytes() == (b"\x02\x00\x00\x00\x03\x00\x00\x00abxyz"
                                 b"\x01\x00\x00\x00\x01\x00\x00\x00k\x00")
    assert _records("MiniDB", path) == [(b"ab", b"xyz"), (b"k", b"\x00")]


def test_minidb_write_mode_appends_and_duplicates_are_kept(tmp_path):
    path = tmp_path / "x.minidb"
    for value in (b"1", b"2"):
        with open_db("minidb", path, "write") as db:
            db.new_transaction().put(b"same", value)
    assert _records("minidb", path) == [(b"same", b"1"), (b"same", b"2")]


def test_minidb_cursor_rewinds(tmp_path):
    path = tmp_path / "x.minidb"
    with open_db("minidb", path, "new") as db:
        txn = db.new_transaction()
        for i in range(3):
            txn.put(b"%d" % i, b"v%d" % i)
    with open_db("minidb", path, "read") as db:
        cursor = db.cursor()
        cursor.next()
        cursor.next()
        assert cursor.key() == b"2" and cursor.value() == b"v2"
        cursor.next()
        assert not cursor.valid()
        cursor.seek_to_first()
        assert cursor.valid() and cursor.key() == b"0"
        cursor.close()


def test_new_minidb_error_leaves_target_untouched(tmp_path):
    path = tmp_path / "x.minidb"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with open_db("minidb", path, "new") as db:
            db.new_transaction().put(b"k", b"v")
            raise RuntimeError("boom")
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.minidb"]


@pytest.mark.parametrize("data, why", [
    (struct.pack("<ii", 2, 3) + b"abx", "ends inside a record"),
    (struct.pack("<ii", 2, 3) + b"abxyz" + b"\x01\x00", "ends inside a record header"),
    (struct.pack("<ii", 0, 3) + b"xyz", "lengths must be > 0"),
])
def test_corrupt_minidb_names_the_file(tmp_path, data, why):
    path = tmp_path / "bad.minidb"
    path.write_bytes(data)
    with pytest.raises(ValueError, match=why) as err:
        _records("minidb", path)
    assert "bad.minidb" in str(err.value)


def test_unknown_db_type_and_mode(tmp_path):
    with pytest.raises(ValueError, match="'rocksdb' is not supported.*minidb, lmdb, leveldb"):
        open_db("rocksdb", tmp_path / "x", "new")
    with pytest.raises(ValueError, match="unknown db mode 'append'"):
        open_db("minidb", tmp_path / "x", "append")
    with pytest.raises(IsADirectoryError, match="is a folder"):
        open_db("minidb", tmp_path, "new")
    with pytest.raises(FileNotFoundError, match="missing.minidb"):
        open_db("minidb", tmp_path / "missing.minidb", "read")


def test_real_iris_minidb_keeps_duplicate_keys_in_order():
    records = _records("minidb", ARTIFACTS / "iris_test.minidb")
    assert len(records) == 160  # 7840 bytes / (8 + 10 + 31)
    assert {key for key, _ in records} == {b"train_%03d"}
    features, label = _protos(records[0][1])
    assert features.dtype == np.float32 and features.shape == (4,)
    assert label.dtype == np.int32 and label.shape == ()
    np.testing.assert_allclose(features, [0.25, 0.625, 0.0847, 0.0417], atol=1e-4)
    # file order, not sorted: the second record is a different flower
    assert not np.array_equal(_protos(records[1][1])[0], features)


def test_real_hemt_eval_minidb():
    records = _records("minidb", ARTIFACTS / "hemt_eval.minidb")
    assert [key for key, _ in records] == [b"%d" % i for i in range(100)]
    for _, value in records:
        tensors = _protos(value)
        assert [(t.dtype, t.shape) for t in tensors] == [(np.float32, (1,))] * 3
    np.testing.assert_allclose(_protos(records[0][1])[0], [-0.6])


def test_real_mnist_minidb():
    records = _records("minidb", ARTIFACTS / "mnist-test-nhwc-minidb")
    assert len(records) == 1000
    assert records[0][0] == b"00000000" and records[-1][0] == b"00000999"
    image, label = _protos(records[0][1])
    assert image.dtype == np.uint8 and image.shape == (28, 28, 1)
    assert label.dtype == np.int32 and label.shape == () and label == 7
    assert image.max() == 255 and image.min() == 0


def test_lmdb_round_trip_sorted_and_readonly(tmp_path):
    path = tmp_path / "x-lmdb"
    with open_db("lmdb", path, "new") as db:
        assert not path.exists()  # built beside the target, renamed on close
        txn = db.new_transaction()
        for key in (b"b", b"a", b"c"):
            txn.put(key, key * 3)
        txn.commit()
    assert (path / "data.mdb").is_file()
    (path / "lock.mdb").unlink()  # read mode opens without a lock file (MDB_NOLOCK)
    data_before = (path / "data.mdb").read_bytes()
    assert _records("LMDB", path) == [(b"a", b"aaa"), (b"b", b"bbb"), (b"c", b"ccc")]
    assert not (path / "lock.mdb").exists()
    assert (path / "data.mdb").read_bytes() == data_before
    with open_db("lmdb", path, "new") as db:  # "new" replaces an older LMDB
        db.new_transaction().put(b"z", b"1")
    assert _records("lmdb", path) == [(b"z", b"1")]


def test_lmdb_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not an LMDB folder"):
        open_db("lmdb", tmp_path, "read")
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not an LMDB folder"):
        open_db("lmdb", tmp_path, "new")
    with pytest.raises(ValueError):
        with open_db("lmdb", tmp_path / "y", "new") as db:
            db.new_transaction().put(b"k", b"v")
            raise ValueError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]


@pytest.mark.parametrize("db_type", ["minidb", "lmdb"])
def test_dbreader_wraps_around(tmp_path, db_type):
    path = tmp_path / "x"
    with open_db(db_type, path, "new") as db:
        txn = db.new_transaction()
        for i in range(3):
            txn.put(b"%d" % i, b"v%d" % i)
    reader = DBReader(db_type, str(path))
    assert [reader.read()[0] for _ in range(7)] == [b"0", b"1", b"2", b"0", b"1", b"2", b"0"]
    reader.close()
    # batches across the end, in one call, continue where single reads would
    reader = DBReader(db_type, str(path))
    assert reader.read_many(2) == [(b"0", b"v0"), (b"1", b"v1")]
    assert [k for k, _ in reader.read_many(7)] == [b"2", b"0", b"1", b"2", b"0", b"1", b"2"]
    assert reader.read() == (b"0", b"v0")
    assert [k for k, _ in reader.read_many(2)] == [b"1", b"2"]
    assert reader.cursor.key() == b"0"  # after the last record the cursor is back at the first
    reader.close()
    sharded = DBReader(db_type, str(path), num_shards=2, shard_id=1)
    assert [k for k, _ in sharded.read_many(3)] == [b"1", b"1", b"1"]


def test_dbreader_is_thread_safe(tmp_path):
    path = tmp_path / "x"
    with open_db("minidb", path, "new") as db:
        txn = db.new_transaction()
        for i in range(100):
            txn.put(b"%03d" % i, b"v")
    reader = DBReader("minidb", str(path))
    seen = []

    def work():
        for _ in range(50):
            seen.append(reader.read()[0])

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(seen) == sorted([b"%03d" % i for i in range(100)] * 2)


def test_dbreader_on_empty_db(tmp_path):
    path = tmp_path / "empty"
    open_db("minidb", path, "new").close()
    with pytest.raises(ValueError, match="has no records"):
        DBReader("minidb", str(path)).read()


def test_lmdb_opened_twice_for_reading_in_one_process(tmp_path):
    """A training reader and a second reader (a scan, a test net) share one LMDB folder."""
    path = tmp_path / "db"
    with open_db("lmdb", path, "new") as db:
        txn = db.new_transaction()
        for i in range(3):
            txn.put(b"%08d" % i, b"v%d" % i)
    first = open_db("lmdb", path, "read")
    second = open_db("lmdb", path, "read")
    assert [k for k, _ in first.cursor()] == [b"00000000", b"00000001", b"00000002"]
    first.close()
    assert [v for _, v in second.cursor()] == [b"v0", b"v1", b"v2"]
    second.close()
    with open_db("lmdb", path, "read") as third:  # reopened after both closed
        assert sum(1 for _ in third.cursor()) == 3
