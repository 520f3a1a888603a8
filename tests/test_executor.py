"""The executor: blob handling, errors, devices, and outputs deferred until fetched."""
import numpy as np
import pytest
import torch

from caffe2torch.python import core, workspace
from caffe2torch.python.executor import OperatorError


pytestmark = pytest.mark.usefixtures("fresh_workspace")


def _conv_train_net():
    """Conv → loss, its gradient, and an in-place SGD step on W (like the tutorial's conv1)."""
    net = core.Net("conv_sgd")
    net.Conv(["data", "w", "b"], "y", kernel=3)
    net.AveragedLoss("y", "loss")
    net.AddGradientOperators(["loss"])
    net.WeightedSum(["w", "ONE", "w_grad", "LR"], "w")
    return net


def _feed(rng):
    workspace.FeedBlob("data", rng.standard_normal((2, 1, 6, 6)).astype(np.float32))
    workspace.FeedBlob("w", rng.standard_normal((3, 1, 3, 3)).astype(np.float32))
    workspace.FeedBlob("b", np.zeros(3, np.float32))
    workspace.FeedBlob("ONE", np.ones(1, np.float32))
    workspace.FeedBlob("LR", np.full(1, -0.5, np.float32))


def test_unread_conv_input_gradient_is_computed_when_fetched():
    rng = np.random.default_rng(0)
    _feed(rng)
    x, w = workspace.FetchBlob("data"), workspace.FetchBlob("w")
    net = _conv_train_net()
    workspace.RunNetOnce(net)
    # data_grad was written (Caffe2 computes it) with the weights *before* the in-place update
    xt = torch.tensor(x, requires_grad=True)
    loss = torch.nn.functional.conv2d(xt, torch.tensor(w), torch.zeros(3)).mean()
    loss.backward()
    assert "data_grad" in workspace.Blobs()
    np.testing.assert_allclose(workspace.FetchBlob("data_grad"), xt.grad.numpy(), rtol=1e-5, atol=1e-6)
    assert not np.allclose(workspace.FetchBlob("w"), w)  # the SGD step did happen


def test_deferred_blob_read_by_another_net():
    rng = np.random.default_rng(1)
    _feed(rng)
    workspace.RunNetOnce(_conv_train_net())
    reader = core.Net("reader")
    reader.Scale("data_grad", "twice", scale=2.0)
    workspace.RunNetOnce(reader)
    np.testing.assert_allclose(workspace.FetchBlob("twice"), 2 * workspace.FetchBlob("data_grad"))


def test_deferred_blob_refuses_inputs_changed_in_place():
    rng = np.random.default_rng(2)
    _feed(rng)
    workspace.RunNetOnce(_conv_train_net())
    workspace.FetchTorch("y_grad").mul_(0)  # someone edits the upstream gradient in place
    with pytest.raises(RuntimeError, match="modified in place"):
        workspace.FetchBlob("data_grad")


def test_error_names_net_op_and_unset_blob():
    net = core.Net("broken")
    net.Relu("x", "y")
    workspace.CreateNet(net, input_blobs=["x"])
    with pytest.raises(OperatorError, match=r"op #0 Relu .*'x' has no value yet"):
        workspace.RunNet(net)


def test_missing_input_is_refused_at_create_net():
    net = core.Net("needs_init")
    net.Relu("never_fed", "y")
    with pytest.raises(RuntimeError, match="never_fed.*run the init net first or FeedBlob it"):
        workspace.CreateNet(net)


def test_cuda_request_without_gpu_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the CUDA path is covered by bench/gpu_check.sh")
    from caffe2torch.proto import caffe2_pb2
    op = core.CreateOperator("ConstantFill", [], ["z"], shape=[1], value=1.0,
                             device_option=core.DeviceOption(caffe2_pb2.CUDA, 0))
    with pytest.raises(RuntimeError, match="sees no GPU"):
        workspace.RunOperatorOnce(op)
