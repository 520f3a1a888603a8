"""Caffe2 behaviours real code relies on: FC on an empty batch, 1-D pooling, SoftmaxWithLoss
``axis``, the legacy ``broadcast=1`` forms, Load name collisions, and a net holding both
CreateDB and TensorProtosDBInput."""
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from caffe2torch.db import open_db
from caffe2torch.db.serialize import NumpyArrayToCaffe2Tensor
from caffe2torch.proto import caffe2_pb2
from caffe2torch.python import core, workspace

from .helpers import DEVICES, check_op, rand

pytestmark = pytest.mark.usefixtures("fresh_workspace")


@pytest.mark.parametrize("device", DEVICES)
def test_fc_on_an_empty_batch(device):
    grads = check_op("FC", {"X": rand(0, 3), "W": rand(2, 3, seed=1), "b": rand(2, seed=2)},
                     ["Y"], {}, lambda x, w, b: x @ w.T + b, device=device)
    assert set(grads) >= {"X", "W", "b"}


@pytest.mark.parametrize("op_type, torch_fn", [
    ("MaxPool", lambda x: F.max_pool1d(x, 2, 2)),
    ("AveragePool", lambda x: F.avg_pool1d(x, 2, 2)),
])
@pytest.mark.parametrize("args", [dict(kernel=2, stride=2), dict(kernels=[2], strides=[2])])
def test_1d_pooling(op_type, torch_fn, args):
    check_op(op_type, {"X": rand(2, 3, 8)}, ["Y"], args, torch_fn)


def test_1d_pooling_with_pads_and_nhwc():
    x = rand(1, 7, 2)  # N, L, C
    check_op("MaxPool", {"X": x}, ["Y"], dict(kernel=3, stride=2, pad=1, order="NHWC"),
             lambda t: F.max_pool1d(t.permute(0, 2, 1), 3, 2, 1).permute(0, 2, 1))
    check_op("AveragePool", {"X": rand(1, 2, 7)}, ["Y"], dict(kernel=3, stride=1, pad=1),
             lambda t: F.avg_pool1d(t, 3, 1, 1, count_include_pad=False))


@pytest.mark.parametrize("axis, shape, label_shape", [(2, (2, 3, 4), (2, 3)),
                                                       (1, (2, 3, 4), (2,)),
                                                       (-1, (3, 5), (3,))])
def test_softmax_with_loss_axis(axis, shape, label_shape):
    x = rand(*shape)
    n = int(np.prod(shape[:axis if axis > 0 else len(shape) + axis]))
    d = x.size // n
    label = np.random.default_rng(0).integers(0, d, label_shape).astype(np.int32)

    def ref(x, label):
        rows = x.reshape(n, d)
        return torch.softmax(rows, 1).reshape(x.shape), F.cross_entropy(
            rows, label.reshape(-1).long())
    check_op("SoftmaxWithLoss", {"X": x, "label": label}, ["P", "loss"], {"axis": axis}, ref,
             grad_outputs=["loss"], no_grad_inputs=("label",))


@pytest.mark.parametrize("op_type, fn", [("Add", torch.add), ("Sub", torch.sub),
                                         ("Mul", torch.mul)])
@pytest.mark.parametrize("b_shape, args, view", [
    ((4, 5), {}, (1, 1, 4, 5)),                          # B matches A's last dims
    ((3,), dict(axis=1), (1, 3, 1, 1)),                  # B placed at axis
    ((3, 4), dict(axis=1), (1, 3, 4, 1)),
    ((3,), dict(axis_str="C", order="NCHW"), (1, 3, 1, 1)),   # axis named by order
    ((5,), dict(axis_str="W", order="NCHW"), (1, 1, 1, 5)),
    ((1,), {}, ()),                                      # a one-element B is a scalar
    ((), {}, ()),
    ((3, 1), dict(axis=1), (1, 3, 1, 1)),                # trailing 1s of B
    ((2, 3, 4, 5), {}, (2, 3, 4, 5)),                    # same shape
])
def test_legacy_broadcast_forms(op_type, fn, b_shape, args, view):
    a, b = rand(2, 3, 4, 5), rand(*b_shape, seed=1) if b_shape else np.array(0.7)
    check_op(op_type, {"A": a, "B": b}, ["C"], {"broadcast": 1, **args},
             lambda a, b: fn(a, b.reshape(view)))


def test_legacy_broadcast_mismatch_is_an_error():
    workspace.FeedBlob("A", rand(2, 3))
    workspace.FeedBlob("B", rand(4))
    with pytest.raises(RuntimeError, match="does not match"):
        workspace.RunOperatorOnce(core.CreateOperator("Add", ["A", "B"], ["C"], broadcast=1))
    with pytest.raises(ValueError, match="axis_str"):
        workspace.RunOperatorOnce(core.CreateOperator("Add", ["A", "B"], ["C"], broadcast=1,
                                                      axis_str="Q"))


def test_load_with_colliding_names_raises(tmp_path):
    path = str(tmp_path / "c.minidb")
    workspace.FeedBlob("a", np.ones(2, np.float32))
    workspace.FeedBlob("pre_a", np.zeros(2, np.float32))
    workspace.RunOperatorOnce(core.CreateOperator("Save", ["a", "pre_a"], [], db=path,
                                                  db_type="minidb", absolute_path=1))
    workspace.ResetWorkspace()
    with pytest.raises(Exception, match="both load into 'a'"):
        workspace.RunOperatorOnce(core.CreateOperator(
            "Load", [], [], db=path, db_type="minidb", absolute_path=1, load_all=1,
            strip_prefix="pre_"))
    with pytest.raises(Exception, match="duplicate source blob names"):
        workspace.RunOperatorOnce(core.CreateOperator(
            "Load", [], ["x", "y"], db=path, db_type="minidb", absolute_path=1,
            source_blob_names=["a", "a"]))
    with pytest.raises(Exception, match="duplicate blob names"):
        workspace.FeedBlob("a", np.ones(2, np.float32))
        workspace.FeedBlob("b", np.ones(2, np.float32))
        workspace.RunOperatorOnce(core.CreateOperator(
            "Save", ["a", "b"], [], db=str(tmp_path / "d.minidb"), db_type="minidb",
            absolute_path=1, blob_name_overrides=["z", "z"]))


def _labels_db(path, n=6):
    with open_db("minidb", path, "new") as db:
        txn = db.new_transaction()
        for i in range(n):
            protos = caffe2_pb2.TensorProtos()
            protos.protos.extend([NumpyArrayToCaffe2Tensor(np.array(i, np.int32))])
            txn.put(f"{i:08d}", protos.SerializeToString())
        txn.commit()


def test_create_db_and_reader_in_one_net_as_the_dataset_tutorial(tmp_path):
    """Caffe2 re-opens the DBReader blob each run; the reader hands out the batch it had
    prefetched, so the second run gives the second batch (create_your_own_dataset shows it),
    and later runs start over from the re-opened reader."""
    path = str(tmp_path / "labels.minidb")
    _labels_db(path)
    net = core.Net("example_reader")
    reader = net.CreateDB([], "dbreader", db=path, db_type="minidb")
    net.TensorProtosDBInput([reader], ["Y"], batch_size=2)
    workspace.CreateNet(net)
    batches = []
    for _ in range(4):
        workspace.RunNet(net.Proto().name)
        batches.append(workspace.FetchBlob("Y").tolist())
    assert batches == [[0, 1], [2, 3], [0, 1], [0, 1]]
    assert os.path.exists(path)
