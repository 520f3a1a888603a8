"""leveldb as a third DB type (plyvel): the DB interface, make_mnist_db --db leveldb (also
Caffe2's default) and reading it back with CreateDB + TensorProtosDBInput."""
import numpy as np
import pytest

from caffe2torch.binaries import make_mnist_db
from caffe2torch.db import open_db
from caffe2torch.python import model_helper, workspace
from mnist_idx import load_mnist_test, write_idx

pytest.importorskip("plyvel")


def test_leveldb_new_write_read_and_key_order(tmp_path):
    path = tmp_path / "t.leveldb"
    with open_db("leveldb", path, "new") as db:
        txn = db.new_transaction()
        for key in (b"b", b"a", b"c"):
            txn.put(key, key * 2)
        txn.commit()
    with open_db("LevelDB", path, "write") as db:
        txn = db.new_transaction()
        txn.put("d", b"dd")
        # no commit: close commits, as Caffe2's transaction destructor does
    with open_db("leveldb", path, "read") as db:
        assert list(db.cursor()) == [(b"a", b"aa"), (b"b", b"bb"), (b"c", b"cc"), (b"d", b"dd")]
        with open_db("leveldb", path, "read") as again:  # two readers of one folder
            cursor = again.cursor()
            cursor.next()
            assert cursor.key() == b"b"
            cursor.seek_to_first()
            assert cursor.key() == b"a"


def test_leveldb_new_replaces_and_abort_leaves_nothing(tmp_path):
    path = tmp_path / "r.leveldb"
    with open_db("leveldb", path, "new") as db:
        db.new_transaction().put(b"old", b"1")
    with pytest.raises(RuntimeError):
        with open_db("leveldb", path, "new") as db:
            db.new_transaction().put(b"half", b"1")
            raise RuntimeError("interrupted")
    with open_db("leveldb", path, "read") as db:
        assert [k for k, _ in db.cursor()] == [b"old"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.leveldb"]
    with pytest.raises(FileNotFoundError, match="not a LevelDB folder"):
        open_db("leveldb", tmp_path / "missing", "read")


def test_make_mnist_db_leveldb_is_read_by_the_tutorials_input(tmp_path, fresh_workspace):
    images, labels = load_mnist_test()
    image_file, label_file = tmp_path / "images", tmp_path / "labels"
    write_idx(image_file, images[:10], 2051)
    write_idx(label_file, labels[:10], 2049)
    out = tmp_path / "mnist-test-nchw-leveldb"
    argv = ["--image_file", str(image_file), "--label_file", str(label_file),
            "--output_file", str(out), "--channel_first"]  # --db defaults to leveldb
    assert make_mnist_db.main(argv) == 0
    model = model_helper.ModelHelper(name="leveldb_input")
    data, label = model.TensorProtosDBInput([], ["data", "label"], batch_size=4, db=str(out),
                                            db_type="leveldb")
    workspace.RunNetOnce(model.param_init_net)
    workspace.RunNetOnce(model.net)
    np.testing.assert_array_equal(workspace.FetchBlob("label"), labels[:4])
    np.testing.assert_array_equal(workspace.FetchBlob("data")[:, 0], images[:4])
