"""Model files are untrusted data: running their nets never writes outside the workspace root
and never allocates what a forged size asks for (caffe2torch.limits)."""
import os

import numpy as np
import pytest

from caffe2torch import limits
from caffe2torch.db import open_db
from caffe2torch.proto import caffe2_pb2
from caffe2torch.python import core, workspace
from caffe2torch.python.predictor import predictor_exporter as pe


@pytest.fixture
def root(tmp_path):
    """A workspace rooted in tmp_path/root; tmp_path itself is 'outside'."""
    folder = tmp_path / "root"
    workspace.ResetWorkspace(str(folder))
    yield folder
    workspace.ResetWorkspace()


def _save_net(db, **args):
    net = core.Net("writer")
    net.ConstantFill([], "x", shape=[2], value=1.0)
    net.Save(["x"], [], db=db, db_type="minidb", **args)
    return net


@pytest.mark.parametrize("absolute", [True, False])
def test_save_outside_the_root_is_refused_and_writes_nothing(root, tmp_path, absolute):
    outside = tmp_path / "escaped.minidb"
    db = str(outside) if absolute else "../escaped.minidb"
    with pytest.raises(RuntimeError, match="outside the workspace root") as info:
        workspace.RunNetOnce(_save_net(db, absolute_path=int(absolute)))
    assert "Save" in str(info.value) and "allow_writes_under" in str(info.value)
    assert not outside.exists() and os.listdir(tmp_path) == ["root"]


def test_save_inside_the_root_and_in_an_allowed_folder_works(root, tmp_path):
    workspace.RunNetOnce(_save_net("params.minidb"))
    assert (root / "params.minidb").is_file()
    allowed = tmp_path / "models"
    allowed.mkdir()
    with limits.allow_writes_under(allowed):
        workspace.RunNetOnce(_save_net(str(allowed / "m.minidb"), absolute_path=1))
    assert (allowed / "m.minidb").is_file()
    with pytest.raises(RuntimeError, match="outside the workspace root"):  # the with-block ended
        workspace.RunNetOnce(_save_net(str(allowed / "n.minidb"), absolute_path=1))


def test_print_to_file_cannot_escape_through_the_blob_name(root, tmp_path):
    net = core.Net("printer")
    net.ConstantFill([], "../../x", shape=[1], value=1.0)
    net.Print(["../../x"], [], to_file=1)
    with pytest.raises(ValueError, match="Print .*outside the workspace root"):  # at CreateNet
        workspace.RunNetOnce(net)
    assert not (tmp_path.parent / "x.log").exists() and not (tmp_path / "x.log").exists()


def _zeros_predictor(path, n):
    """A tiny predictor whose init net fills ``n`` zeros (the predict net is one Relu)."""
    init = core.Net("init")
    init.ConstantFill([], "zeros", shape=[n], value=0.0)
    predict = core.Net("predict")
    predict.Relu(["data"], ["out"])
    meta = pe.PredictorExportMeta(predict, [], ["data"], ["out"], shapes={"data": [2], "out": [2]},
                                  extra_init_net=init)
    pe.save_to_db("minidb", str(path), meta)


def test_a_predictor_that_fills_500_million_zeros_is_refused_naming_file_op_and_blob(root):
    path = root / "evil.minidb"
    _zeros_predictor(path, 500_000_000)
    assert os.path.getsize(path) < 1000  # a few hundred bytes that asked for 2 GB
    workspace.ResetWorkspace(str(root))
    with pytest.raises(RuntimeError) as info:
        pe.prepare_prediction_net(str(path), "minidb")
    message = str(info.value)
    assert str(path) in message and "ConstantFill" in message and "'zeros'" in message
    assert "1.9 GiB" in message and "CAFFE2TORCH_MAX_BLOB_BYTES" in message


def test_the_limit_is_configurable(root):
    old = limits.set_max_blob_bytes(400)
    try:
        net = core.Net("fills")
        net.ConstantFill([], "ok", shape=[100], value=0.0)  # 400 bytes: at the limit
        workspace.RunNetOnce(net)
        net = core.Net("fills2")
        net.ConstantFill([], "big", shape=[101], value=0.0)
        with pytest.raises(RuntimeError, match="404 bytes, over .* limit of 400 bytes"):
            workspace.RunNetOnce(net)
        net = core.Net("fills3")
        net.GaussianFill([], "g", shape=[10, 11])
        with pytest.raises(RuntimeError, match=r"GaussianFill \(output 'g'\)"):
            workspace.RunNetOnce(net)
    finally:
        limits.set_max_blob_bytes(old)
    assert workspace.FetchBlob("ok").shape == (100,)


@pytest.mark.parametrize("dims", [[1_000_000, 1_000_000], [-1, 4]])
def test_forged_tensor_dims_name_the_file_and_the_blob(root, dims):
    path = str(root / "forged.minidb")
    blob = caffe2_pb2.BlobProto(type="Tensor")
    blob.tensor.data_type = caffe2_pb2.TensorProto.FLOAT
    blob.tensor.dims.extend(dims)
    with open_db("minidb", path, "new") as db:
        txn = db.new_transaction()
        txn.put("w", blob.SerializeToString())
        txn.commit()
    net = core.Net("loader")
    net.Load([], ["w"], db=path, db_type="minidb", absolute_path=1)
    with pytest.raises(RuntimeError) as info:
        workspace.RunNetOnce(net)
    message = str(info.value)
    assert "blob 'w'" in message and path in message and str(dims) in message


def test_a_normal_predictor_still_round_trips(root):
    predict = core.Net("predict")
    predict.Relu(["data"], ["out"])
    path = root / "ok.minidb"
    meta = pe.PredictorExportMeta(predict, [], ["data"], ["out"], shapes={"data": [2], "out": [2]})
    pe.save_to_db("minidb", str(path), meta)
    workspace.ResetWorkspace(str(root))
    net = pe.prepare_prediction_net(str(path), "minidb")
    workspace.FeedBlob("data", np.array([-1.0, 2.0], np.float32))
    workspace.RunNet(net)
    assert workspace.FetchBlob("out").tolist() == [0.0, 2.0]
