"""The tutorial's model-building functions, as 02_build defines them, tested through the notebook.

testbook runs the notebook's own cells in a kernel (nothing is copied out of it): the functions
are called there, and the nets they build come back as serialized NetDefs, which this process
runs with caffe2torch like any Caffe2 file.
"""
import json

import numpy as np
import pytest
import torch
from testbook import testbook

from caffe2torch.proto import caffe2_pb2
from caffe2torch.python import workspace
from tutorial import KERNEL, NOTEBOOKS, PARAMS, write_small_mnist

FORWARD = ["TensorProtosDBInput", "Cast", "Scale", "StopGradient", "Conv", "MaxPool", "Conv",
           "MaxPool", "FC", "Relu", "FC", "Softmax"]
BACKWARD = ["AveragedLossGradient", "LabelCrossEntropyGradient", "SoftmaxGradient", "FCGradient",
            "ReluGradient", "FCGradient", "MaxPoolGradient", "ConvGradient", "MaxPoolGradient",
            "ConvGradient"]
NETS = {"train": "train_model.net", "train_init": "train_model.param_init_net",
        "test": "test_model.net", "test_init": "test_model.param_init_net",
        "deploy": "deploy_model.net"}


@pytest.fixture(scope="module")
def small_mnist(tmp_path_factory):
    return write_small_mnist(tmp_path_factory.mktemp("mnist"))


@pytest.fixture(scope="module")
def build(small_mnist, tmp_path_factory):
    """02_build's kernel, run up to and including the cell that builds the three models."""
    run_dir = tmp_path_factory.mktemp("run")
    (run_dir / "workspace").mkdir()
    (run_dir / "workspace" / "data.json").write_text(json.dumps(
        {"train_db": str(small_mnist[0]), "test_db": str(small_mnist[1]), "db_type": "lmdb"}))
    path = NOTEBOOKS / "02_build.ipynb"
    with testbook(str(path), execute=False, kernel_name=KERNEL) as tb:
        sources = [cell.source for cell in tb.nb.cells]
        models = next(i for i, s in enumerate(sources) if s.startswith("arg_scope = "))
        tb.execute_cell(1)  # the parameters cell, then this test's values
        tb.inject(f"run_dir = {str(run_dir)!r}\ndevice = 'cpu'\n"
                  "train_batch_size, test_batch_size = 32, 50", pop=True)
        tb.execute_cell(list(range(2, models + 1)))
        tb.models_cell = models
        yield tb


def netdef(tb, expression):
    """The NetDef that ``expression`` (a core.Net in the kernel) holds, copied over as bytes."""
    return caffe2_pb2.NetDef.FromString(
        bytes.fromhex(tb.value(f"{expression}.Proto().SerializeToString().hex()")))


def _types(net):
    return [op.type for op in net.op]


def _args(op):
    return {a.name: (a.f if a.HasField("f") else a.i if a.HasField("i") else a.s) for a in op.arg}


def test_add_input_reads_scaled_images_and_labels(build):
    build.inject("""
        m = model_helper.ModelHelper(name="input_only")
        data, label = AddInput(m, batch_size=8, db=databases["train_db"], db_type="lmdb")
        workspace.RunNetOnce(m.param_init_net)
        workspace.RunNetOnce(m.net)
        batch = workspace.FetchBlob("data")
    """, pop=True)
    assert build.value("list(batch.shape)") == [8, 1, 28, 28]
    assert build.value("str(batch.dtype), str(workspace.FetchBlob('label').dtype)") == [
        "float32", "int32"]
    low, high = build.value("float(batch.min()), float(batch.max())")
    assert low == 0.0 and 0.9 < high < 1.0  # pixels / 256
    assert build.value("(workspace.FetchBlob('data_uint8') / 256 == batch).all().item()")


def test_lenet_predicts_ten_probabilities_per_image(build):
    build.inject("""
        import numpy as np
        m = model_helper.ModelHelper(name="lenet_only", arg_scope=arg_scope)
        out = AddLeNetModel(m, "data")
        workspace.RunNetOnce(m.param_init_net)
        workspace.FeedBlob("data", np.random.rand(3, 1, 28, 28).astype(np.float32))
        workspace.RunNetOnce(m.net)
        probabilities = workspace.FetchBlob(str(out))
    """, pop=True)
    assert build.value("list(probabilities.shape)") == [3, 10]
    sums = build.value("probabilities.sum(axis=1).tolist()")
    assert sums == pytest.approx([1, 1, 1], abs=1e-5)
    assert build.value("[str(p) for p in m.params]") == PARAMS


def test_train_net_is_the_tutorials(build, small_mnist):
    train = netdef(build, NETS["train"])
    types = _types(train)
    assert types[:12] == FORWARD
    assert types[12:15] == ["LabelCrossEntropy", "AveragedLoss", "Accuracy"]
    assert types[15] == "ConstantFill"  # loss_autogen_grad = 1
    assert [t for t in types[16:] if t.endswith("Gradient")] == BACKWARD
    tail = types[16 + len(BACKWARD):]
    assert tail == ["Iter", "LearningRate"] + ["WeightedSum"] * 8 + ["Print"] * 2 + \
        ["Summarize"] * 16
    assert list(train.op[0].output) == ["data_uint8", "label"]
    assert _args(train.op[0])["batch_size"] == 32
    init = netdef(build, NETS["train_init"])
    assert _types(init)[0] == "CreateDB" and _types(init).count("XavierFill") == 4
    assert _types(init)[-1] == "ConstantFill"  # ONE
    assert _args(init.op[0])["db"] == str(small_mnist[0]).encode()


def test_update_is_plain_sgd_with_the_parameters_cells_learning_rate(build):
    train = netdef(build, NETS["train"])
    lr = next(op for op in train.op if op.type == "LearningRate")
    assert _args(lr) == {"base_lr": pytest.approx(-0.1), "policy": b"step", "stepsize": 1,
                         "gamma": pytest.approx(0.999), "power": pytest.approx(0.75)}
    updates = [list(op.input) + list(op.output) for op in train.op if op.type == "WeightedSum"]
    assert updates == [[p, "ONE", p + "_grad", "LR", p] for p in PARAMS]
    # AddTrainingOperators reads the policy from the parameters cell
    build.inject("""
        lr_policy, gamma = "inv", 1e-4
        m = model_helper.ModelHelper(name="inv", arg_scope=arg_scope)
        AddTrainingOperators(m, AddLeNetModel(m, "data"), "label")
        lr_policy, gamma = "step", 0.999
    """, pop=True)
    lr = next(op for op in netdef(build, "m.net").op if op.type == "LearningRate")
    assert _args(lr)["policy"] == b"inv" and _args(lr)["gamma"] == pytest.approx(1e-4)


def test_test_and_deploy_models_reuse_the_parameters(build):
    assert _types(netdef(build, NETS["test_init"])) == ["CreateDB"]
    test = netdef(build, NETS["test"])
    assert _types(test) == FORWARD + ["Accuracy"] and _args(test.op[0])["batch_size"] == 50
    deploy = netdef(build, NETS["deploy"])
    assert _types(deploy) == FORWARD[4:]
    assert list(deploy.external_input) == ["data"] + PARAMS
    assert build.value("[[str(p) for p in m.params] for m in (test_model, deploy_model)]") == [
        PARAMS, PARAMS]


def test_cuda_device_option_reaches_every_op(build):
    # protos only: building needs no GPU
    build.inject("device_option = core.DeviceOption(caffe2_pb2.CUDA, 0)", pop=True)
    build.execute_cell(build.models_cell)
    try:
        nets = {name: netdef(build, expression) for name, expression in NETS.items()}
    finally:
        build.inject("device_option = None", pop=True)
        build.execute_cell(build.models_cell)
    for name in ("train", "test", "deploy"):
        for op in nets[name].op:
            if op.type != "Iter":  # brew.iter keeps the counter on the CPU
                assert op.device_option.device_type == caffe2_pb2.CUDA, (name, op.type)
    fill = next(op for op in nets["train_init"].op if op.type == "XavierFill")
    assert fill.device_option.device_type == caffe2_pb2.CUDA
    assert not netdef(build, NETS["train"]).op[0].HasField("device_option")  # CPU again


def test_the_nets_learn_and_share_their_parameters(build, tmp_path):
    nets = {name: netdef(build, expression) for name, expression in NETS.items()}
    workspace.ResetWorkspace(str(tmp_path))
    torch.manual_seed(0)
    workspace.RunNetOnce(nets["train_init"])
    before = workspace.FetchBlob("conv1_w")
    workspace.CreateNet(nets["train"], overwrite=True)
    losses = []
    for _ in range(40):
        workspace.RunNet(nets["train"].name)
        losses.append(float(workspace.FetchBlob("loss")))
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:5])
    assert not np.array_equal(before, workspace.FetchBlob("conv1_w"))
    # the bookkeeping ops: one line per iteration
    lines = (tmp_path / "loss.log").read_text().splitlines()
    assert len(lines) == 40 and lines[0].startswith("Tensor loss of type float")
    assert (tmp_path / "conv1_w_grad.summary").read_text().count("\n") == 40

    workspace.RunNetOnce(nets["test_init"])
    workspace.CreateNet(nets["test"], overwrite=True)
    workspace.RunNet(nets["test"].name)
    test_softmax = workspace.FetchBlob("softmax")
    assert test_softmax.shape == (50, 10)
    assert 0.3 < float(workspace.FetchBlob("accuracy")) <= 1.0  # 40 iterations: above chance

    workspace.FeedBlob("data", workspace.FetchBlob("data"))
    workspace.RunNetOnce(nets["deploy"])
    np.testing.assert_allclose(workspace.FetchBlob("softmax"), test_softmax, rtol=1e-5, atol=1e-6)
    workspace.ResetWorkspace()
