"""Two real Caffe2 nets with their real weights (../shared/caffe2-artifacts) vs plain PyTorch.

``onnx_lenet_*``: a LeNet exported PyTorch -> ONNX -> Caffe2 (Conv, Add broadcast=1, MaxPool,
Relu, Reshape, FC). ``mtcnn_pnet_*``: MTCNN's PNet translated from Caffe (Conv, PRelu in place,
MaxPool with legacy_pad=3, Softmax).
"""
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from caffe2torch.ops import registry
from caffe2torch.proto import caffe2_pb2
from caffe2torch.python import core, workspace

ARTIFACTS = Path(__file__).resolve().parents[1] / ".." / "shared" / "caffe2-artifacts"

pytestmark = pytest.mark.usefixtures("fresh_workspace")


def load_netdef(name):
    return caffe2_pb2.NetDef.FromString((ARTIFACTS / name).read_bytes())


def run_init(name):
    """Run the init net ``name``; its outputs as torch tensors (float64 for the references)."""
    init = load_netdef(name)
    workspace.RunNetOnce(init)
    return {n: torch.from_numpy(workspace.FetchBlob(n)).double() for op in init.op
            for n in op.output}


@pytest.mark.parametrize("prefix, n_ops, types", [
    ("onnx_lenet", 11, {"Conv", "Add", "MaxPool", "Relu", "Reshape", "FC"}),
    ("mtcnn_pnet", 10, {"Conv", "PRelu", "MaxPool", "Softmax"}),
])
def test_every_op_of_the_net_is_registered(prefix, n_ops, types):
    predict = load_netdef(f"{prefix}_predict_net.pb")
    assert len(predict.op) == n_ops and {op.type for op in predict.op} == types
    assert all(registry.is_registered(t) for t in types)


# -- LeNet through ONNX -------------------------------------------------------------------------

def lenet_reference(p, x):
    """The ONNX LeNet's output "26" written by hand in torch."""
    h = F.relu(F.max_pool2d(F.conv2d(x, p["2"]) + p["3"].reshape(1, -1, 1, 1), 2, 2))
    h = F.relu(F.max_pool2d(F.conv2d(h, p["4"]) + p["5"].reshape(1, -1, 1, 1), 2, 2))
    h = h.reshape(-1, 800)
    return F.linear(F.linear(h, p["6"], p["7"]), p["8"], p["9"])


@pytest.mark.parametrize("batch", [1, 3])
def test_onnx_lenet_matches_torch(batch):
    params = run_init("onnx_lenet_init_net.pb")
    assert params["6"].shape == (500, 800)
    predict = load_netdef("onnx_lenet_predict_net.pb")
    x = np.random.default_rng(batch).uniform(0, 1, (batch, 1, 28, 28)).astype(np.float32)
    workspace.FeedBlob("1", x)
    workspace.RunNetOnce(predict)
    out = workspace.FetchBlob("26")
    assert out.shape == (batch, 10) and out.dtype == np.float32
    expected = lenet_reference(params, torch.from_numpy(x).double()).numpy()
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)
    assert workspace.FetchBlob("OC2_DUMMY_0").tolist() == [batch, 50, 4, 4]  # Reshape's old_shape


def test_onnx_lenet_backpropagates_through_reshape():
    """The predict net's gradient (Reshape -> Reshape(dY, old_shape)) matches autograd."""
    params = run_init("onnx_lenet_init_net.pb")
    net = core.Net(load_netdef("onnx_lenet_predict_net.pb"))
    grads = net.AddGradientOperators({"26": "d26"})
    assert [op.type for op in net.Proto().op if op.type == "Reshape"] == ["Reshape", "Reshape"]
    rng = np.random.default_rng(7)
    x = rng.uniform(0, 1, (2, 1, 28, 28))
    d26 = rng.standard_normal((2, 10))
    for name, value in params.items():
        workspace.FeedBlob(name, value.numpy())  # float64 weights: a tight comparison
    workspace.FeedBlob("1", x)
    workspace.FeedBlob("d26", d26)
    workspace.RunNetOnce(net)
    leaves = {n: t.clone().requires_grad_() for n, t in params.items()}
    (lenet_reference(leaves, torch.from_numpy(x)) * torch.from_numpy(d26)).sum().backward()
    for name in ("2", "4", "6", "9"):
        np.testing.assert_allclose(workspace.FetchBlob(grads[name]), leaves[name].grad.numpy(),
                                   rtol=1e-9, atol=1e-11, err_msg=name)


# -- MTCNN PNet ---------------------------------------------------------------------------------

def prelu(x, slope):
    return torch.where(x > 0, x, x * slope.reshape(1, -1, 1, 1))


def pnet_reference(p, x):
    """PNet's (prob1, conv4-2) in torch; Caffe2's Softmax normalizes over C·H·W (axis 1)."""
    h = prelu(F.conv2d(x, p["conv1_w"], p["conv1_b"]), p["conv1_Slope"])
    h = F.max_pool2d(h, 2, 2, ceil_mode=True)  # legacy_pad=3: Caffe's ceil-mode sizes
    h = prelu(F.conv2d(h, p["conv2_w"], p["conv2_b"]), p["conv2_Slope"])
    h = prelu(F.conv2d(h, p["conv3_w"], p["conv3_b"]), p["conv3_Slope"])
    logits = F.conv2d(h, p["conv4-1_w"], p["conv4-1_b"])
    prob = torch.softmax(logits.reshape(logits.shape[0], -1), 1).reshape(logits.shape)
    return prob, F.conv2d(h, p["conv4-2_w"], p["conv4-2_b"])


@pytest.mark.parametrize("shape", [(1, 3, 12, 12), (2, 3, 12, 12), (1, 3, 20, 25)])
def test_mtcnn_pnet_matches_torch(shape):
    params = run_init("mtcnn_pnet_init_net.pb")
    predict = load_netdef("mtcnn_pnet_predict_net.pb")
    x = np.random.default_rng(sum(shape)).uniform(-1, 1, shape).astype(np.float32)
    workspace.FeedBlob("data", x)
    workspace.RunNetOnce(predict)
    prob, boxes = pnet_reference(params, torch.from_numpy(x).double())
    got = workspace.FetchBlob("prob1")
    assert got.shape == tuple(prob.shape)
    np.testing.assert_allclose(got, prob.numpy(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(workspace.FetchBlob("conv4-2"), boxes.numpy(), rtol=1e-4,
                               atol=1e-5)
    if shape[2:] == (12, 12):
        # A 12x12 patch gives one score pair per image: face / not face sums to 1.
        np.testing.assert_allclose(got.reshape(shape[0], 2).sum(1), 1.0, rtol=1e-6)
