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


def _feed_x_w_b():
    """x [2, 3] (negative and positive values), FC weights w [4, 3] of ones, bias b of 0.5."""
    x = np.arange(6, dtype=np.float32).reshape(2, 3) - 2
    workspace.FeedBlob("x", x)
    workspace.FeedBlob("w", np.ones((4, 3), np.float32))
    workspace.FeedBlob("b", np.full(4, 0.5, np.float32))
    return x


def test_ops_of_every_arity_read_and_write_their_blobs():
    # no input (a fill), one input, the same blob twice, three inputs, two outputs, no output
    x = _feed_x_w_b()
    net = core.Net("arities")
    net.ConstantFill([], "c", shape=[2, 3], value=2.0)
    net.Relu("x", "r")
    net.Mul(["x", "x"], "sq")
    net.FC(["x", "w", "b"], "fc")
    net.Split("x", ["s0", "s1"], axis=1, split=[1, 2])
    net.Print("r", [])
    net.Add(["c", "sq"], "out")
    workspace.RunNetOnce(net)
    np.testing.assert_array_equal(workspace.FetchBlob("r"), np.maximum(x, 0))
    np.testing.assert_array_equal(workspace.FetchBlob("sq"), x * x)
    np.testing.assert_allclose(workspace.FetchBlob("fc"), x @ np.ones((3, 4)) + 0.5)
    np.testing.assert_array_equal(workspace.FetchBlob("s0"), x[:, :1])
    np.testing.assert_array_equal(workspace.FetchBlob("s1"), x[:, 1:])
    np.testing.assert_array_equal(workspace.FetchBlob("out"), 2 + x * x)


def test_constant_fill_like_an_input_takes_its_shape_dtype_from_the_args():
    workspace.FeedBlob("x", np.zeros((3, 2), np.int32))
    net = core.Net("fills")
    net.ConstantFill("x", "ones", value=1.0)
    net.ConstantFill("x", "sevens", value=7, dtype=core.DataType.INT32)
    net.ConstantFill("x", "wide", value=1.0, extra_shape=[4])
    workspace.RunNetOnce(net)
    ones, sevens = workspace.FetchBlob("ones"), workspace.FetchBlob("sevens")
    assert ones.dtype == np.float32 and ones.shape == (3, 2) and (ones == 1).all()
    assert sevens.dtype == np.int32 and (sevens == 7).all()
    assert workspace.FetchBlob("wide").shape == (3, 2, 4)


def test_outside_blobs_are_checked_once_per_run_and_deferred_ones_resolved():
    rng = np.random.default_rng(4)
    _feed(rng)
    reader = core.Net("reader_twice")
    reader.Scale("data_grad", "twice", scale=2.0)
    reader.Scale("data_grad", "thrice", scale=3.0)
    workspace.FeedBlob("data_grad", np.ones((2, 1, 6, 6), np.float32))
    workspace.CreateNet(reader)
    prepared = workspace.C().nets[reader.Name()]
    assert prepared._external_ready()  # a plain CPU tensor: the ops need not check it
    workspace.RunNet(reader.Name())
    np.testing.assert_array_equal(workspace.FetchBlob("thrice"), np.full((2, 1, 6, 6), 3.0))
    workspace.RunNetOnce(_conv_train_net())  # data_grad becomes a Deferred blob
    assert not prepared._external_ready()
    workspace.RunNet(reader.Name())  # the ops resolve it
    np.testing.assert_allclose(workspace.FetchBlob("twice"), 2 * workspace.FetchBlob("data_grad"))
    np.testing.assert_allclose(workspace.FetchBlob("thrice"), 3 * workspace.FetchBlob("data_grad"))


def test_straight_line_run_of_every_arity_and_internal_checks():
    """A net without side effects runs as one generated function: ops of every arity, a
    CPU-only op's output read by a later op (the loop checks it there), same results."""
    x = _feed_x_w_b()
    net = core.Net("straight")
    net.ConstantFill([], "c", shape=[2, 3], value=2.0)
    net.ConstantFill("x", "ones", value=1.0)  # CPU-only inputs: its output is checked
    net.Relu("x", "r")
    net.Mul(["x", "x"], "sq")
    net.FC(["x", "w", "b"], "fc")
    net.Split("x", ["s0", "s1"], axis=1, split=[1, 2])
    net.Add(["c", "sq"], "out")
    net.Sub(["out", "ones"], "out_minus_1")
    workspace.CreateNet(net)
    prepared = workspace.C().nets[net.Name()]
    for _ in range(2):  # the second run is the straight-line function's first
        workspace.RunNet(net.Name())
    assert prepared._straight
    np.testing.assert_array_equal(workspace.FetchBlob("r"), np.maximum(x, 0))
    np.testing.assert_allclose(workspace.FetchBlob("fc"), x @ np.ones((3, 4)) + 0.5)
    np.testing.assert_array_equal(workspace.FetchBlob("s0"), x[:, :1])
    np.testing.assert_array_equal(workspace.FetchBlob("s1"), x[:, 1:])
    np.testing.assert_array_equal(workspace.FetchBlob("out_minus_1"), 1 + x * x)


@pytest.mark.parametrize("bad_op, message", [
    (2, r"net 'straight_fail\w*': op #2 MatMul \(\['a', 'bad'\] -> \['m'\]\) failed: ValueError: "
        r"operator MatMul: A \(2, 3\)"),
    (3, r"net 'straight_fail\w*': op #3 Split \(\['a'\] -> \['p', 'q'\]\) failed: RuntimeError: "
        r"split_with_sizes"),
])
def test_straight_line_run_names_the_failing_op(bad_op, message):
    """Errors from the generated function name the op that failed, as the loop's do."""
    workspace.FeedBlob("a", np.ones((2, 3), np.float32))
    workspace.FeedBlob("ok", np.ones((3, 2), np.float32))
    workspace.FeedBlob("bad", np.ones((4, 2), np.float32))
    net = core.Net("straight_fail")
    net.Relu("a", "r")
    net.MatMul(["a", "ok"], "good")
    net.MatMul(["a", "bad" if bad_op == 2 else "ok"], "m")
    net.Split("a", ["p", "q"], axis=1, split=[1, 1] if bad_op == 3 else [1, 2])
    net.Relu("r", "rr")
    workspace.CreateNet(net)
    with pytest.raises(OperatorError, match=message):
        workspace.RunNet(net.Name(), 2)
    assert workspace.C().nets[net.Name()]._straight
