"""DB ops through the workspace: CreateDB, TensorProtosDBInput, Save, Load."""
from pathlib import Path

import numpy as np
import pytest
import torch

from caffe2torch.db import DBReader, open_db
from caffe2torch.db import serialize
from caffe2torch.proto import caffe2_pb2
from caffe2torch.python import core, workspace

ARTIFACTS = Path(__file__).resolve().parents[2] / ".." / "shared" / "caffe2-artifacts"
MNIST = str(ARTIFACTS / "mnist-test-nhwc-minidb")
FIRST_LABELS = [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]


pytestmark = pytest.mark.usefixtures("fresh_workspace")


def run(op_type, inputs, outputs, **args):
    workspace.RunOperatorOnce(core.CreateOperator(op_type, inputs, outputs, **args))


def _all_mnist_records():
    with open_db("minidb", MNIST, "read") as db:
        records = list(db.cursor())
    protos = [caffe2_pb2.TensorProtos.FromString(v).protos for _, v in records]
    images = np.stack([np.frombuffer(p[0].byte_data, np.uint8).reshape(28, 28, 1)
                       for p in protos])
    return images, np.array([p[1].int32_data[0] for p in protos], np.int32)


def test_create_db_outputs_a_reader():
    run("CreateDB", [], ["reader"], db=MNIST, db_type="minidb")
    reader = workspace.FetchBlob("reader")
    assert isinstance(reader, DBReader) and reader.read()[0] == b"00000000"


def test_create_db_defaults_to_leveldb_and_unknown_types_are_clear_errors(tmp_path):
    pytest.importorskip("plyvel")
    from caffe2torch.db import open_db
    path = str(tmp_path / "l.leveldb")
    with open_db("leveldb", path, "new") as db:
        txn = db.new_transaction()
        txn.put(b"k", b"v")
        txn.commit()
    run("CreateDB", [], ["reader"], db=path)  # no db_type: Caffe2's default, leveldb
    assert workspace.FetchBlob("reader").read() == (b"k", b"v")
    with pytest.raises(Exception, match="'rocksdb' is not supported"):
        run("CreateDB", [], ["reader"], db=MNIST, db_type="rocksdb")


def test_tensor_protos_db_input_reads_mnist_and_wraps_around():
    images, labels = _all_mnist_records()
    init = core.Net("init")
    init.CreateDB([], "dbreader", db=MNIST, db_type="minidb")
    net = core.Net("read")
    net.TensorProtosDBInput(["dbreader"], ["data", "label"], batch_size=64)
    workspace.RunNetOnce(init)
    workspace.CreateNet(net)
    workspace.RunNet(net.Proto().name)
    data, label = workspace.FetchBlob("data"), workspace.FetchBlob("label")
    assert data.dtype == np.uint8 and data.shape == (64, 28, 28, 1)
    assert label.dtype == np.int32 and label.shape == (64,)
    assert label[:10].tolist() == FIRST_LABELS
    np.testing.assert_array_equal(data, images[:64])
    # 1000 records = 15 full batches + 40; batch 16 continues from the start (the prefetch
    # thread must hand them out in exactly this order).
    for _ in range(15):
        workspace.RunNet(net.Proto().name)
    order = np.r_[960:1000, 0:24]
    np.testing.assert_array_equal(workspace.FetchBlob("label"), labels[order])
    np.testing.assert_array_equal(workspace.FetchBlob("data"), images[order])
    workspace.RunNet(net.Proto().name)
    np.testing.assert_array_equal(workspace.FetchBlob("label"), labels[24:88])


def test_tensor_protos_db_input_unbatched_and_output_count():
    run("CreateDB", [], ["r"], db=MNIST, db_type="minidb")
    run("TensorProtosDBInput", ["r"], ["image", "label"])
    assert workspace.FetchBlob("image").shape == (28, 28, 1)
    assert workspace.FetchBlob("label").shape == () and workspace.FetchBlob("label") == 7
    with pytest.raises(Exception, match="holds 2 TensorProtos but the op has 1 outputs"):
        run("TensorProtosDBInput", ["r"], ["image"], batch_size=2)


def test_tensor_protos_db_input_other_types_and_nchw(tmp_path):
    path = str(tmp_path / "x-lmdb")
    with open_db("lmdb", path, "new") as db:
        txn = db.new_transaction()
        for i in range(3):
            protos = caffe2_pb2.TensorProtos()
            protos.protos.add().CopyFrom(serialize.NumpyArrayToCaffe2Tensor(
                np.full((1, 2, 2), i, np.float32)))
            protos.protos.add().CopyFrom(serialize.NumpyArrayToCaffe2Tensor(
                np.array([i, -i], np.int64)))
            txn.put(b"%d" % i, protos.SerializeToString())
    run("CreateDB", [], ["r"], db=path, db_type="lmdb")
    run("TensorProtosDBInput", ["r"], ["x", "y"], batch_size=2)
    x, y = workspace.FetchBlob("x"), workspace.FetchBlob("y")
    assert x.dtype == np.float32 and x.shape == (2, 1, 2, 2)
    assert y.dtype == np.int64 and y.tolist() == [[0, 0], [1, -1]]

    path = str(tmp_path / "ragged.minidb")
    with open_db("minidb", path, "new") as db:  # records whose shapes differ cannot be batched
        txn = db.new_transaction()
        for i, shape in enumerate([(2,), (2,), (3,)]):
            protos = caffe2_pb2.TensorProtos()
            protos.protos.add().CopyFrom(serialize.NumpyArrayToCaffe2Tensor(np.zeros(shape)))
            txn.put(b"%d" % i, protos.SerializeToString())
    run("CreateDB", [], ["r"], db=path, db_type="minidb")
    with pytest.raises(Exception, match="'2'.*is DOUBLE \\[3\\] but in the batch's first "
                                        "record DOUBLE \\[2\\]"):
        run("TensorProtosDBInput", ["r"], ["x"], batch_size=3)


def _write_records(path, records):
    """A minidb of TensorProtos records, each a list of TensorProto."""
    with open_db("minidb", path, "new") as db:
        txn = db.new_transaction()
        for i, protos in enumerate(records):
            message = caffe2_pb2.TensorProtos()
            message.protos.extend(protos)
            txn.put(b"%d" % i, message.SerializeToString())


def test_tensor_protos_db_input_batches_mixed_encodings(tmp_path):
    """Records of one batch may store the same tensor differently (byte_data or raw_data, int32
    values or uint8 narrowed into int32_data, float16): the batch holds the same values."""
    TP = caffe2_pb2.TensorProto
    images = np.arange(3 * 4, dtype=np.uint8).reshape(3, 2, 2) * 20
    halves = np.array([[0.5, -1.0], [2.0, 0.25], [8.0, -0.125]], np.float16)
    records = []
    for i in range(3):
        image = TP(data_type=TP.BYTE, dims=[2, 2])
        if i == 1:
            image.raw_data = images[i].tobytes()
        else:
            image.byte_data = images[i].tobytes()
        label = TP(data_type=TP.INT32, dims=[], int32_data=[i * 7])
        if i == 2:
            label = TP(data_type=TP.INT32, dims=[], raw_data=np.int32(14).tobytes())
        narrow = serialize.NumpyArrayToCaffe2Tensor(np.array([i, 250], np.uint8))
        half = serialize.NumpyArrayToCaffe2Tensor(halves[i])
        records.append([image, label, narrow, half])
    path = str(tmp_path / "mixed.minidb")
    _write_records(path, records)
    run("CreateDB", [], ["r"], db=path, db_type="minidb")
    run("TensorProtosDBInput", ["r"], ["x", "y", "n", "h"], batch_size=3)
    x, y, n, h = (workspace.FetchBlob(b) for b in "xynh")
    assert x.dtype == np.uint8 and x.shape == (3, 2, 2)
    np.testing.assert_array_equal(x, images)
    assert y.dtype == np.int32 and y.tolist() == [0, 7, 14]
    assert n.dtype == np.uint8 and n.tolist() == [[0, 250], [1, 250], [2, 250]]
    assert h.dtype == np.float16 and np.array_equal(h, halves)


def test_tensor_protos_db_input_names_the_bad_record(tmp_path):
    TP = caffe2_pb2.TensorProto
    good = [TP(data_type=TP.FLOAT, dims=[2], float_data=[1, 2])]
    short = [TP(data_type=TP.FLOAT, dims=[2], float_data=[1])]
    path = str(tmp_path / "short.minidb")
    _write_records(path, [good, short])
    run("CreateDB", [], ["r"], db=path, db_type="minidb")
    with pytest.raises(Exception, match="record b'1' .*TensorProto 0 holds 1 values but its "
                                        "dims \\[2\\] need 2"):
        run("TensorProtosDBInput", ["r"], ["x"], batch_size=2)
    path = str(tmp_path / "count.minidb")
    _write_records(path, [good, good + good])
    run("CreateDB", [], ["r2"], db=path, db_type="minidb")
    with pytest.raises(Exception, match="record b'1' .*holds 2 TensorProtos, the first record "
                                        "of the batch 1"):
        run("TensorProtosDBInput", ["r2"], ["x"], batch_size=2)



def test_tensor_protos_db_input_names_a_record_that_is_no_tensor_protos(tmp_path):
    """A corrupt record fails the run whose batch holds it (the batch before reads fine, though
    the op has already read this one ahead), naming the record and the DB."""
    TP = caffe2_pb2.TensorProto
    path = str(tmp_path / "corrupt.minidb")
    with open_db("minidb", path, "new") as db:
        txn = db.new_transaction()
        for i in range(2):
            record = caffe2_pb2.TensorProtos()
            record.protos.add(data_type=TP.FLOAT, dims=[2], float_data=[i, i + 1])
            txn.put(b"%d" % i, record.SerializeToString())
        txn.put(b"2", b"\xff\xff\xff\xff not a protobuf")
        txn.put(b"3", record.SerializeToString())
    workspace.RunOperatorOnce(core.CreateOperator("CreateDB", [], ["r"], db=path,
                                                  db_type="minidb"))
    net = core.Net("corrupt")
    net.TensorProtosDBInput(["r"], ["x"], batch_size=2)
    workspace.CreateNet(net)
    workspace.RunNet(net.Proto().name)
    assert workspace.FetchBlob("x").tolist() == [[0, 1], [1, 2]]
    with pytest.raises(Exception, match=f"record b'2' of '{path}' is not a serialized "
                                        "TensorProtos"):
        workspace.RunNet(net.Proto().name)

def test_save_load_round_trip_with_chunks(monkeypatch, tmp_path):
    monkeypatch.setattr(serialize, "CHUNK_SIZE", 5)
    w = np.arange(12, dtype=np.float32).reshape(3, 4)
    b = np.array([1, 2], dtype=np.int64)
    workspace.FeedBlob("model/w", w)
    workspace.FeedBlob("model/b", b)
    workspace.FeedBlob("meta", b"hello")
    workspace.FeedBlob("model/it", np.array(7, np.int64))  # a 0-d tensor stays 0-d
    run("Save", ["meta", "model/w", "model/b", "model/it"], [], db="params.minidb",
        db_type="minidb", strip_prefix="model/")
    path = tmp_path / "params.minidb"  # relative to the workspace root
    with open_db("minidb", path, "read") as db:
        keys = [k for k, _ in db.cursor()]
    assert keys == [b"meta", b"w#%0", b"w#%1", b"w#%2", b"b#%0", b"it#%0"]
    workspace.ResetWorkspace(str(tmp_path))
    run("Load", [], ["w", "b", "meta", "it"], db=str(path), db_type="minidb", absolute_path=1)
    assert workspace.FetchBlob("it").shape == () and workspace.FetchBlob("it") == 7
    np.testing.assert_array_equal(workspace.FetchBlob("w"), w)
    np.testing.assert_array_equal(workspace.FetchBlob("b"), b)
    assert workspace.FetchBlob("b").dtype == np.int64
    assert workspace.FetchBlob("meta") == b"hello"
    assert isinstance(workspace.FetchTorch("w"), torch.Tensor)


def test_load_all_prefixes_overrides_and_sources(tmp_path):
    workspace.FeedBlob("a", np.ones(2, np.float32))
    workspace.FeedBlob("b", np.zeros(3, np.int32))
    run("Save", ["a", "b"], [], db=str(tmp_path / "d"), db_type="lmdb", absolute_path=1,
        blob_name_overrides=["x/a", "x/b"])
    workspace.ResetWorkspace()
    run("Load", [], [], db="d", db_type="lmdb", load_all=1, strip_prefix="x/", add_prefix="p_")
    assert workspace.Blobs() == ["p_a", "p_b"]
    run("Load", [], ["mine"], db="d", db_type="lmdb", source_blob_names=["x/b"])
    np.testing.assert_array_equal(workspace.FetchBlob("mine"), np.zeros(3, np.int32))


def test_load_missing_blob_and_allow_incomplete(tmp_path):
    workspace.FeedBlob("a", np.ones(2, np.float32))
    run("Save", ["a"], [], db="d", db_type="minidb")
    with pytest.raises(Exception, match="missing \\['nope'\\]"):
        run("Load", [], ["a", "nope"], db="d", db_type="minidb")
    workspace.FeedBlob("nope", np.array([5], np.int32))
    run("Load", [], ["a", "nope"], db="d", db_type="minidb", allow_incomplete=1)
    assert workspace.FetchBlob("nope").tolist() == [5]  # untouched


def test_load_from_dbreader_continues_at_its_position(tmp_path):
    # The predictor layout: a string blob first, then the parameters, read by two Loads that
    # share one DBReader.
    workspace.FeedBlob("!!META_NET_DEF", b"net bytes")
    workspace.FeedBlob("w", np.arange(4, dtype=np.float32))
    run("Save", ["!!META_NET_DEF", "w"], [], db=str(tmp_path / "model.minidb"),
        db_type="minidb", absolute_path=1)
    workspace.ResetWorkspace()
    run("CreateDB", [], ["!!PREDICTOR_DBREADER"], db=str(tmp_path / "model.minidb"),
        db_type="minidb")
    reader = workspace.FetchBlob("!!PREDICTOR_DBREADER")
    run("Load", ["!!PREDICTOR_DBREADER"], ["!!META_NET_DEF"])
    assert workspace.FetchBlob("!!META_NET_DEF") == b"net bytes"
    assert reader.cursor.key() == b"!!META_NET_DEF"  # stopped on the last needed record
    run("Load", ["!!PREDICTOR_DBREADER"], ["w"])
    np.testing.assert_array_equal(workspace.FetchBlob("w"), np.arange(4, dtype=np.float32))
    assert reader.cursor.key() == b"w#%0"
    with pytest.raises(Exception, match="missing \\['!!META_NET_DEF'\\]"):  # no rewind
        run("Load", ["!!PREDICTOR_DBREADER"], ["!!META_NET_DEF"])
    assert reader.read()[0] == b"!!META_NET_DEF"  # read() wraps from the exhausted cursor


def test_load_reports_missing_chunks(monkeypatch, tmp_path):
    monkeypatch.setattr(serialize, "CHUNK_SIZE", 2)
    records = serialize.serialize_blob("w", np.arange(5, dtype=np.float32))
    with open_db("minidb", tmp_path / "d", "new") as db:
        txn = db.new_transaction()
        for key, value in records[:2]:
            txn.put(key, value)
    with pytest.raises(Exception, match="chunks missing for blobs 'w' \\(4 of 5 values\\)"):
        run("Load", [], ["w"], db="d", db_type="minidb")


def test_save_errors(tmp_path):
    workspace.FeedBlob("a", np.ones(2, np.float32))
    with pytest.raises(Exception, match="needs argument 'db_type'"):
        run("Save", ["a"], [], db="d")
    with pytest.raises(Exception, match="blob_name_overrides has 2 names for 1"):
        run("Save", ["a"], [], db="d", db_type="minidb", blob_name_overrides=["x", "y"])
    assert not (tmp_path / "d").exists()


def test_load_places_blobs_on_the_op_device_unless_keep_device(tmp_path):
    # A late-Caffe2 record saved from GPU 0: without keep_device it loads on the op's device.
    blob = caffe2_pb2.BlobProto(name="w", type="Tensor")
    blob.tensor.CopyFrom(serialize.NumpyArrayToCaffe2Tensor(np.ones(3, np.float32), "w"))
    blob.tensor.device_detail.device_type = caffe2_pb2.CUDA
    with open_db("minidb", tmp_path / "gpu.minidb", "new") as db:
        db.new_transaction().put(b"w#%0", blob.SerializeToString())
    run("Load", [], ["w"], db="gpu.minidb", db_type="minidb")
    assert workspace.FetchTorch("w").device == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(Exception, match="saved from a GPU and keep_device=1"):
            run("Load", [], ["w"], db="gpu.minidb", db_type="minidb", keep_device=1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_db_ops_on_cuda(tmp_path):
    cuda = caffe2_pb2.DeviceOption(device_type=caffe2_pb2.CUDA, cuda_gpu_id=0)
    run("CreateDB", [], ["r"], db=MNIST, db_type="minidb")
    workspace.RunOperatorOnce(core.CreateOperator(
        "TensorProtosDBInput", ["r"], ["data", "label"], batch_size=8, device_option=cuda))
    assert workspace.FetchTorch("data").device.type == "cuda"
    assert workspace.FetchBlob("label")[:8].tolist() == FIRST_LABELS[:8]
    run("Save", ["data", "label"], [], db="x", db_type="minidb")
    workspace.RunOperatorOnce(core.CreateOperator(
        "Load", [], ["data", "label"], db="x", db_type="minidb", device_option=cuda))
    assert workspace.FetchTorch("label").device.type == "cuda"
    assert workspace.FetchBlob("label").tolist() == FIRST_LABELS[:8]


def test_tensor_protos_db_input_cuts_records_laid_out_alike(tmp_path):
    """Records laid out as the first one are cut from their bytes (ops.db._Template); labels
    of two or ten varint bytes, another layout, or a corrupt varint of the same length take
    protobuf's parse: every batch holds the values written, and the corrupt record is named."""
    from caffe2torch.ops import db as db_ops

    TP = caffe2_pb2.TensorProto
    rng = np.random.default_rng(0)
    labels = [3, 0, 127, 9, 200, 5, -1, 7, 1, 2, 4, 6]
    images = rng.integers(0, 256, (len(labels), 1, 4, 4), dtype=np.uint8)
    path = str(tmp_path / "cut-lmdb")
    with open_db("lmdb", path, "new") as db:
        txn = db.new_transaction()
        for i, (image, label) in enumerate(zip(images, labels)):
            protos = caffe2_pb2.TensorProtos()
            protos.protos.add(data_type=TP.BYTE, dims=[1, 4, 4], byte_data=image.tobytes())
            protos.protos.add(data_type=TP.INT32, dims=[], int32_data=[label])
            protos.protos.add(data_type=TP.INT64, dims=[2], int64_data=[i, 100])
            txn.put(b"%02d" % i, protos.SerializeToString())
    cache = {}
    reader = DBReader("lmdb", path)
    for start in range(0, len(labels), 4):
        x, y, z = db_ops.read_batch(reader, 4, 3, cache)
        np.testing.assert_array_equal(x, images[start:start + 4])
        assert y.dtype == np.int32 and y.tolist() == labels[start:start + 4]
        assert z.dtype == np.int64 and z.tolist() == [[i, 100] for i in range(start, start + 4)]
    template = cache["template"]
    assert template and template.dims == [(1, 4, 4), (), (2,)]
    reader = DBReader("lmdb", path)
    assert template.cut(reader.read_many(4)) is not None  # labels 3, 0, 127, 9: cut
    assert template.cut(reader.read_many(4)) is None  # 200 and -1: longer records

    # the same length as the template, but the label byte starts a longer varint
    good = caffe2_pb2.TensorProtos()
    good.protos.add(data_type=TP.BYTE, dims=[1, 4, 4], byte_data=bytes(16))
    good.protos.add(data_type=TP.INT32, dims=[], int32_data=[5])
    wire = good.SerializeToString()
    corrupt = wire[:-1] + b"\x85"  # the label is the last byte
    assert len(corrupt) == len(wire)
    path = str(tmp_path / "varint.minidb")
    with open_db("minidb", path, "new") as db:
        txn = db.new_transaction()
        txn.put(b"0", wire)
        txn.put(b"1", corrupt)
    run("CreateDB", [], ["r"], db=path, db_type="minidb")
    with pytest.raises(Exception, match=f"record b'1' of '{path}' is not a serialized"):
        run("TensorProtosDBInput", ["r"], ["x", "y"], batch_size=2)

    # the same length, other dims: protobuf's parse names the record
    other = caffe2_pb2.TensorProtos()
    other.CopyFrom(good)
    other.protos[0].dims[:] = [4, 1, 4]
    assert len(other.SerializeToString()) == len(wire)
    path = str(tmp_path / "dims.minidb")
    with open_db("minidb", path, "new") as db:
        txn = db.new_transaction()
        txn.put(b"0", wire)
        txn.put(b"1", other.SerializeToString())
    run("CreateDB", [], ["r"], db=path, db_type="minidb")
    with pytest.raises(Exception, match=r"record b'1' .*BYTE \[4, 1, 4\] but in the batch's first"):
        run("TensorProtosDBInput", ["r"], ["x", "y"], batch_size=2)
