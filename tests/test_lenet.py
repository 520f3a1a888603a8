"""mnist_tutorial.lenet: the tutorial's nets, op by op, and what they compute on real MNIST."""

import numpy as np
import pytest
import torch

from caffe2torch.binaries.make_mnist_db import write_mnist_db
from caffe2torch.proto import caffe2_pb2
from caffe2torch.python import core, workspace
from mnist_tutorial import lenet
from mnist_tutorial.data import _package_pickle, db_path, load_mnist_pickle

PARAMS = ["conv1_w", "conv1_b", "conv2_w", "conv2_b", "fc3_w", "fc3_b", "pred_w", "pred_b"]
FORWARD = ["TensorProtosDBInput", "Cast", "Scale", "StopGradient", "Conv", "MaxPool", "Conv",
           "MaxPool", "FC", "Relu", "FC", "Softmax"]
BACKWARD = ["AveragedLossGradient", "LabelCrossEntropyGradient", "SoftmaxGradient", "FCGradient",
            "ReluGradient", "FCGradient", "MaxPoolGradient", "ConvGradient", "MaxPoolGradient",
            "ConvGradient"]


def write_small_mnist(data_dir, train=640, test=500):
    """Real MNIST images, the first ``train``/``test`` of each split, as the tutorial's LMDBs."""
    arrays = load_mnist_pickle(_package_pickle()[0])
    for split, n in (("train", train), ("test", test)):
        images, labels = arrays[split]
        write_mnist_db(images[:n], labels[:n], str(db_path(data_dir, split)), "lmdb",
                       channel_first=True)
    return db_path(data_dir, "train"), db_path(data_dir, "test")


@pytest.fixture(scope="module")
def small_mnist(tmp_path_factory):
    return write_small_mnist(tmp_path_factory.mktemp("mnist"))


@pytest.fixture
def models(small_mnist):
    return lenet.build_models(*small_mnist)


def _types(net):
    return [op.type for op in net.Proto().op]


def test_train_net_is_the_tutorials(models, small_mnist):
    train = models[0]
    types = _types(train.net)
    assert types[:12] == FORWARD
    assert types[12:15] == ["LabelCrossEntropy", "AveragedLoss", "Accuracy"]
    assert types[15] == "ConstantFill"  # loss_autogen_grad = 1
    assert [t for t in types[16:] if t.endswith("Gradient")] == BACKWARD
    tail = types[16 + len(BACKWARD):]
    assert tail == ["Iter", "LearningRate"] + ["WeightedSum"] * 8 + ["Print"] * 2 + ["Summarize"] * 16
    assert [str(p) for p in train.params] == PARAMS
    db_input = train.net.Proto().op[0]
    assert list(db_input.output) == ["data_uint8", "label"]
    assert {a.name: a.i for a in db_input.arg}["batch_size"] == 64
    init_types = _types(train.param_init_net)
    assert init_types[0] == "CreateDB" and init_types.count("XavierFill") == 4
    assert init_types[-1] == "ConstantFill"  # ONE
    create_db = train.param_init_net.Proto().op[0]
    assert {a.name: a.s for a in create_db.arg}["db"] == str(small_mnist[0]).encode()


def test_update_is_plain_sgd_with_the_tutorials_learning_rate(models):
    net = models[0].net.Proto()
    lr = next(op for op in net.op if op.type == "LearningRate")
    args = {a.name: (a.f if a.HasField("f") else a.i if a.HasField("i") else a.s) for a in lr.arg}
    assert args == {"base_lr": pytest.approx(-0.1), "policy": b"step", "stepsize": 1,
                    "gamma": pytest.approx(0.999)}
    updates = [list(op.input) + list(op.output) for op in net.op if op.type == "WeightedSum"]
    assert updates == [[p, "ONE", p + "_grad", "LR", p] for p in PARAMS]


def test_learning_rate_policies():
    assert lenet.lr_arguments("fixed", -0.5) == {"base_lr": -0.5, "policy": "fixed"}
    assert lenet.lr_arguments("inv", -0.1, gamma=1e-4, power=0.75) == {
        "base_lr": -0.1, "policy": "inv", "gamma": 1e-4, "power": 0.75}
    with pytest.raises(ValueError, match="multistep"):
        lenet.lr_arguments("multistep", -0.1)


def test_test_and_deploy_models_reuse_the_parameters(models):
    _, test, deploy = models
    assert _types(test.param_init_net) == ["CreateDB"]
    assert _types(test.net) == FORWARD + ["Accuracy"]
    assert {a.name: a.i for a in test.net.Proto().op[0].arg}["batch_size"] == 100
    assert _types(deploy.param_init_net) == []
    assert _types(deploy.net) == FORWARD[4:]
    assert list(deploy.net.Proto().external_input) == ["data"] + PARAMS
    assert [str(p) for p in test.params] == [str(p) for p in deploy.params] == PARAMS


def test_cuda_device_option_reaches_every_op(small_mnist):
    # Protos only: building needs no GPU
    train, test, deploy = lenet.build_models(
        *small_mnist, device_option=core.DeviceOption(caffe2_pb2.CUDA, 0))
    for net in (train.net, test.net, deploy.net):
        for op in net.Proto().op:
            if op.type not in ("Iter",):  # brew.iter keeps the counter on the CPU
                assert op.device_option.device_type == caffe2_pb2.CUDA, op.type
    conv = next(op for op in train.param_init_net.Proto().op if op.type == "XavierFill")
    assert conv.device_option.device_type == caffe2_pb2.CUDA


def test_training_learns_and_test_and_deploy_share_its_parameters(small_mnist, tmp_path):
    workspace.ResetWorkspace(str(tmp_path))
    train, test, deploy = lenet.build_models(*small_mnist, train_batch_size=32, test_batch_size=50)
    torch.manual_seed(0)
    workspace.RunNetOnce(train.param_init_net)
    before = workspace.FetchBlob("conv1_w")
    workspace.CreateNet(train.net, overwrite=True)
    losses = []
    for _ in range(40):
        workspace.RunNet(train.net)
        losses.append(float(workspace.FetchBlob("loss")))
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:5])
    assert not np.array_equal(before, workspace.FetchBlob("conv1_w"))
    lines = (tmp_path / "loss.log").read_text().splitlines()
    assert len(lines) == 40 and lines[0].startswith("Tensor loss of type float")
    assert (tmp_path / "conv1_w_grad.summary").read_text().count("\n") == 40

    workspace.RunNetOnce(test.param_init_net)
    workspace.CreateNet(test.net, overwrite=True)
    workspace.RunNet(test.net)
    test_softmax = workspace.FetchBlob("softmax")
    assert test_softmax.shape == (50, 10)
    assert 0.3 < float(workspace.FetchBlob("accuracy")) <= 1.0  # 40 iterations: well above chance

    workspace.FeedBlob("data", workspace.FetchBlob("data"))
    workspace.RunNetOnce(deploy.net)
    np.testing.assert_allclose(workspace.FetchBlob("softmax"), test_softmax, rtol=1e-5, atol=1e-6)
