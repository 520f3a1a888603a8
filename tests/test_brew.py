"""brew helpers, Caffe2's brew_test style: build -> RunNetOnce(init) -> RunNetOnce(net) -> FetchBlob.

The exact op arguments matter: they show up in users' .pbtxt dumps next to real Caffe2 ones.
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from caffe2torch.proto import caffe2_pb2
from caffe2torch.python import brew, core, model_helper, utils, workspace
from caffe2torch.python.model_helper import ModelHelper

RNG = np.random.default_rng(1234)


pytestmark = pytest.mark.usefixtures("fresh_workspace")


def args_of(op):
    """The op's arguments as (name, value) in proto order."""
    return [(a.name, utils.ArgumentValue(a)) for a in op.arg]


def run(model, **feeds):
    for name, value in feeds.items():
        workspace.FeedBlob(name, value)
    workspace.RunNetOnce(model.param_init_net)
    workspace.RunNetOnce(model.net)


def randn(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


# -- conv -------------------------------------------------------------------------------------
def test_conv_ops_args_and_result():
    model = ModelHelper(name="brew_conv")
    out = brew.conv(model, "data", "conv1", dim_in=3, dim_out=4, kernel=3)
    assert str(out) == "conv1"
    w_fill, b_fill = model.param_init_net.Proto().op
    assert (w_fill.type, list(w_fill.output), args_of(w_fill)) == \
        ("XavierFill", ["conv1_w"], [("shape", [4, 3, 3, 3])])
    # Caffe2 passes the default ("ConstantFill", {}): the op's own default value 0.0 (float).
    assert (b_fill.type, list(b_fill.output), args_of(b_fill)) == \
        ("ConstantFill", ["conv1_b"], [("shape", [4])])
    (conv,) = model.net.Proto().op
    assert conv.type == "Conv" and list(conv.input) == ["data", "conv1_w", "conv1_b"]
    assert conv.engine == "CUDNN"
    assert args_of(conv) == [("kernel", 3), ("order", "NCHW"), ("exhaustive_search", 0)]

    x = randn(2, 3, 8, 8)
    run(model, data=x)
    w, b = workspace.FetchBlob("conv1_w"), workspace.FetchBlob("conv1_b")
    assert w.dtype == np.float32 and np.abs(w).max() <= np.sqrt(3 / 27)
    assert b.dtype == np.float32 and not b.any()
    expected = F.conv2d(torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(b)).numpy()
    np.testing.assert_allclose(workspace.FetchBlob("conv1"), expected, rtol=1e-4, atol=1e-5)


def test_conv_explicit_kwargs_stride_pad_and_no_cudnn():
    model = ModelHelper(name="brew_conv2", arg_scope={"use_cudnn": False})
    brew.conv(model, "data", "c", dim_in=1, dim_out=2, kernel=3, stride=2, pad=1)
    (conv,) = model.net.Proto().op
    assert conv.engine == ""
    # Caffe2's helper passes kernel= and order= before the remaining kwargs.
    assert args_of(conv) == [("kernel", 3), ("order", "NCHW"), ("stride", 2), ("pad", 1)]
    x = randn(1, 1, 7, 7)
    run(model, data=x)
    w = workspace.FetchBlob("c_w")
    expected = F.conv2d(torch.from_numpy(x), torch.from_numpy(w), stride=2, padding=1).numpy()
    np.testing.assert_allclose(workspace.FetchBlob("c"), expected, rtol=1e-4, atol=1e-5)


def test_conv_nhwc_weight_shape():
    model = ModelHelper(name="brew_conv_nhwc", arg_scope={"order": "NHWC"})
    brew.conv(model, "data", "c", dim_in=3, dim_out=5, kernel=2)
    assert args_of(model.param_init_net.Proto().op[0]) == [("shape", [5, 2, 2, 3])]
    assert ("order", "NHWC") in args_of(model.net.Proto().op[0])


def test_weight_and_bias_init_tuples_are_honoured():
    model = ModelHelper(name="brew_init_tuples")
    brew.conv(model, "data", "c", dim_in=1, dim_out=2, kernel=1,
              weight_init=("ConstantFill", {"value": 0.5}),
              bias_init=("ConstantFill", {"value": 0.25}))
    brew.fc(model, "c", "f", dim_in=2, dim_out=3, weight_init=("GivenTensorFill",
            {"values": np.arange(6, dtype=np.float32)}), bias_init=("ConstantFill", {"value": 1.0}))
    fills = model.param_init_net.Proto().op
    assert [(op.type, args_of(op)) for op in fills[:2]] == [
        ("ConstantFill", [("shape", [2, 1, 1, 1]), ("value", 0.5)]),
        ("ConstantFill", [("shape", [2]), ("value", 0.25)])]
    run(model, data=np.ones((1, 1, 1, 1), np.float32))
    np.testing.assert_array_equal(workspace.FetchBlob("c"), np.full((1, 2, 1, 1), 0.75, np.float32))
    np.testing.assert_array_equal(workspace.FetchBlob("f_w"), np.arange(6).reshape(3, 2))
    np.testing.assert_allclose(workspace.FetchBlob("f"), [[0.75 * 1 + 1, 0.75 * 5 + 1,
                                                          0.75 * 9 + 1]])


def test_weight_initializer_class():
    model = ModelHelper(name="brew_initializer_cls")
    brew.fc(model, "x", "f", dim_in=2, dim_out=2,
            WeightInitializer=model_helper.Initializer, weight_init=("ConstantFill", {"value": 3.0}))
    run(model, x=np.ones((1, 2), np.float32))
    np.testing.assert_array_equal(workspace.FetchBlob("f"), [[6.0, 6.0]])


def test_init_params_false_adds_no_fill_but_keeps_params():
    train = ModelHelper(name="brew_train_shared")
    brew.conv(train, "data", "conv1", dim_in=1, dim_out=2, kernel=3)
    brew.fc(train, "conv1", "fc", dim_in=2 * 3 * 3, dim_out=4)
    test = ModelHelper(name="brew_test_shared", init_params=False)
    brew.conv(test, "data", "conv1", dim_in=1, dim_out=2, kernel=3)
    brew.fc(test, "conv1", "fc", dim_in=2 * 3 * 3, dim_out=4)
    assert test.param_init_net.Proto().op == []
    assert [str(p) for p in test.params] == ["conv1_w", "conv1_b", "fc_w", "fc_b"]
    assert [str(p) for p in test.weights] == ["conv1_w", "fc_w"]
    # The test net runs on the weights the train model's init net created.
    x = randn(2, 1, 5, 5)
    run(train, data=x)
    expected = workspace.FetchBlob("fc")
    workspace.FeedBlob("fc", np.zeros_like(expected))
    workspace.RunNetOnce(test.net)
    np.testing.assert_allclose(workspace.FetchBlob("fc"), expected)


def test_no_bias_conv():
    model = ModelHelper(name="brew_no_bias")
    brew.conv(model, "data", "c", dim_in=1, dim_out=1, kernel=1, no_bias=True)
    assert [str(p) for p in model.params] == ["c_w"]
    (conv,) = model.net.Proto().op
    assert list(conv.input) == ["data", "c_w"] and "no_bias" not in dict(args_of(conv))


# -- fc ---------------------------------------------------------------------------------------
def test_fc_args_and_result():
    model = ModelHelper(name="brew_fc")
    out = brew.fc(model, "x", "fc", dim_in=6, dim_out=3)
    w_fill, b_fill = model.param_init_net.Proto().op
    assert (w_fill.type, args_of(w_fill)) == ("XavierFill", [("shape", [3, 6])])
    assert (b_fill.type, args_of(b_fill)) == ("ConstantFill", [("shape", [3])])
    (fc,) = model.net.Proto().op
    assert str(out) == "fc" and list(fc.input) == ["x", "fc_w", "fc_b"]
    assert fc.engine == ""
    assert args_of(fc) == [("order", "NCHW"), ("use_cudnn", 1), ("cudnn_exhaustive_search", 0)]
    x = randn(4, 2, 3)  # FC flattens from axis 1
    run(model, x=x)
    w, b = workspace.FetchBlob("fc_w"), workspace.FetchBlob("fc_b")
    assert np.abs(w).max() <= np.sqrt(3 / 6) and not b.any()
    np.testing.assert_allclose(workspace.FetchBlob("fc"), x.reshape(4, 6) @ w.T + b, rtol=1e-5,
                               atol=1e-6)


# -- pooling, activations, dropout -------------------------------------------------------------
def test_max_pool_relu_softmax_args():
    model = ModelHelper(name="brew_pool")
    pool = brew.max_pool(model, "x", "pool", kernel=2, stride=2)
    relu = brew.relu(model, pool, "relu")
    soft = brew.softmax(model, "flat", "softmax")
    mp, re, sm = model.net.Proto().op
    assert mp.type == "MaxPool" and mp.engine == "CUDNN"
    assert args_of(mp) == [("order", "NCHW"), ("cudnn_exhaustive_search", 0), ("kernel", 2),
                           ("stride", 2)]
    assert re.type == "Relu" and re.engine == "CUDNN"
    assert args_of(re) == [("order", "NCHW"), ("cudnn_exhaustive_search", 0)]
    assert sm.type == "Softmax" and sm.engine == "CUDNN"
    assert args_of(sm) == [("order", "NCHW"), ("cudnn_exhaustive_search", 0)]
    assert (str(pool), str(relu), str(soft)) == ("pool", "relu", "softmax")

    x, flat = randn(2, 3, 6, 6), randn(4, 5)
    run(model, x=x, flat=flat)
    expected = F.max_pool2d(torch.from_numpy(x), 2, 2).clamp(min=0).numpy()
    np.testing.assert_allclose(workspace.FetchBlob("relu"), expected)
    np.testing.assert_allclose(workspace.FetchBlob("softmax"),
                               torch.softmax(torch.from_numpy(flat), 1).numpy(), rtol=1e-5)


def test_average_pool():
    model = ModelHelper(name="brew_avg")
    brew.average_pool(model, "x", "avg", kernel=3, stride=2)
    (op,) = model.net.Proto().op
    assert op.type == "AveragePool" and op.engine == "CUDNN"
    assert args_of(op)[:2] == [("order", "NCHW"), ("cudnn_exhaustive_search", 0)]
    x = randn(1, 2, 5, 5)
    run(model, x=x)
    expected = F.avg_pool2d(torch.from_numpy(x), 3, 2).numpy()
    np.testing.assert_allclose(workspace.FetchBlob("avg"), expected, rtol=1e-5, atol=1e-6)


def test_softmax_without_output_name():
    model = ModelHelper(name="brew_softmax_auto")
    out = brew.softmax(model, "x")
    assert str(out) == "brew_softmax_auto/Softmax"


def test_dropout_outputs_mask_and_needs_is_test():
    model = ModelHelper(name="brew_dropout")
    with pytest.raises(ValueError, match="is_test"):
        brew.dropout(model, "x", "d")
    out = brew.dropout(model, "x", "d", ratio=0.5, is_test=1)
    (op,) = model.net.Proto().op
    assert str(out) == "d" and list(op.output) == ["d", "_d_mask"]
    assert op.engine == "CUDNN"
    x = randn(3, 4)
    run(model, x=x)
    np.testing.assert_array_equal(workspace.FetchBlob("d"), x)


# -- training helpers --------------------------------------------------------------------------
def test_iter_on_cpu_and_counting():
    model = ModelHelper(name="brew_iter")
    with core.DeviceScope(core.DeviceOption(caffe2_pb2.CUDA, 0)):
        it = brew.iter(model, "iter")
    (fill,) = model.param_init_net.Proto().op
    assert (fill.type, list(fill.input), list(fill.output)) == ("ConstantFill", [], ["iter"])
    assert fill.device_option.device_type == caffe2_pb2.CPU  # forced to CPU inside a GPU scope
    assert fill.device_option.HasField("cuda_gpu_id")
    fill_args = dict(args_of(fill))
    # Caffe2's helper also forwards the model's arg scope to both ops, as real dumps show.
    assert list(fill_args) == ["shape", "value", "dtype", "order", "use_cudnn",
                               "cudnn_exhaustive_search"]
    assert fill_args["shape"] == [1] and fill_args["value"] == 0
    assert fill_args["dtype"] == caffe2_pb2.TensorProto.INT64
    (iter_op,) = model.net.Proto().op
    assert (iter_op.type, list(iter_op.input), list(iter_op.output)) == ("Iter", ["iter"], ["iter"])
    assert str(it) == "iter"

    cpu_model = ModelHelper(name="brew_iter_cpu")
    brew.iter(cpu_model, "iter")
    workspace.RunNetOnce(cpu_model.param_init_net)
    assert workspace.FetchBlob("iter").dtype == np.int64
    workspace.CreateNet(cpu_model.net)
    workspace.RunNet(cpu_model.net, 3)
    assert workspace.FetchBlob("iter").tolist() == [3]


def test_accuracy_drops_kwargs_on_cpu():
    model = ModelHelper(name="brew_accuracy")
    out = brew.accuracy(model, ["pred", "label"], "accuracy", top_k=3)
    (op,) = model.net.Proto().op
    assert op.type == "Accuracy" and list(op.input) == ["pred", "label"]
    assert list(op.arg) == [] and op.engine == ""
    assert str(out) == "accuracy"
    pred = np.array([[0.1, 0.7, 0.2], [0.5, 0.3, 0.2], [0.2, 0.3, 0.5], [0.4, 0.35, 0.25]],
                    np.float32)
    run(model, pred=pred, label=np.array([1, 1, 2, 2], np.int32))
    acc = workspace.FetchBlob("accuracy")
    assert acc.shape == () and acc == pytest.approx(0.5)  # top_k=3 would have given 1.0


# -- kwargs merging ----------------------------------------------------------------------------
def test_arg_scope_precedence_model_then_scope_then_explicit():
    model = ModelHelper(name="brew_scope", arg_scope={"use_cudnn": False})
    brew.max_pool(model, "x", "p0", kernel=2)
    with brew.arg_scope([brew.max_pool], use_cudnn=True, stride=2):
        brew.max_pool(model, "x", "p1", kernel=2)
        brew.max_pool(model, "x", "p2", kernel=2, use_cudnn=False, stride=1)
        with brew.arg_scope(brew.max_pool, kernel=3):
            brew.max_pool(model, "x", "p3")
        brew.relu(model, "x", "r")  # the scope is for max_pool only
    brew.max_pool(model, "x", "p4", kernel=2)
    ops = model.net.Proto().op
    assert [op.engine for op in ops] == ["", "CUDNN", "", "CUDNN", "", ""]
    assert dict(args_of(ops[1]))["stride"] == 2
    assert dict(args_of(ops[2]))["stride"] == 1
    assert dict(args_of(ops[3]))["kernel"] == 3 and dict(args_of(ops[3]))["stride"] == 2
    assert "stride" not in dict(args_of(ops[5]))


def test_arg_scope_rejects_non_helpers():
    with pytest.raises(TypeError, match="brew helper"):
        with brew.arg_scope(["conv"], order="NHWC"):
            pass


def test_first_argument_must_be_the_model():
    with pytest.raises(TypeError, match="first argument must be the model"):
        brew.relu("x", "y")
    model = ModelHelper(name="brew_model_kwarg")
    assert str(brew.relu(model=model, blob_in="x", blob_out="y")) == "y"


def test_register_and_has_helper():
    def my_brew_test_helper(model, blob_in, blob_out, order="NCHW", **kwargs):
        """Relu that records the kwargs it got."""
        my_brew_test_helper.seen = dict(kwargs, order=order)
        return model.net.Relu(blob_in, blob_out)

    assert brew.has_helper("fc") and brew.has_helper(brew.conv) and brew.has_helper("arg_scope")
    assert not brew.has_helper(my_brew_test_helper)
    brew.Register(my_brew_test_helper)
    assert brew.has_helper("my_brew_test_helper")
    model = ModelHelper(name="brew_register", arg_scope={"order": "NHWC"})
    out = brew.my_brew_test_helper(model, "x", "y", extra=1)
    assert str(out) == "y"
    assert my_brew_test_helper.seen == {"use_cudnn": True, "cudnn_exhaustive_search": False,
                                        "extra": 1, "order": "NHWC"}
    with pytest.raises(AttributeError, match="already exists"):
        brew.Register(my_brew_test_helper)
    with pytest.raises(AttributeError, match="not_a_helper not registered"):
        brew.not_a_helper  # noqa: B018


# -- a whole LeNet, as the tutorial builds it ----------------------------------------------------
def add_lenet(model, data):
    conv1 = brew.conv(model, data, "conv1", dim_in=1, dim_out=20, kernel=5)
    pool1 = brew.max_pool(model, conv1, "pool1", kernel=2, stride=2)
    conv2 = brew.conv(model, pool1, "conv2", dim_in=20, dim_out=50, kernel=5)
    pool2 = brew.max_pool(model, conv2, "pool2", kernel=2, stride=2)
    fc3 = brew.fc(model, pool2, "fc3", dim_in=50 * 4 * 4, dim_out=500)
    relu3 = brew.relu(model, fc3, "relu3")
    pred = brew.fc(model, relu3, "pred", dim_in=500, dim_out=10)
    return brew.softmax(model, pred, "softmax")


def test_lenet_forward_backward():
    model = ModelHelper(name="brew_lenet", arg_scope={"order": "NCHW"})
    softmax = add_lenet(model, "data")
    xent = model.LabelCrossEntropy([softmax, "label"], "xent")
    loss = model.AveragedLoss(xent, "loss")
    brew.accuracy(model, [softmax, "label"], "accuracy")
    model.AddGradientOperators([loss])
    assert [str(p) for p in model.params] == ["conv1_w", "conv1_b", "conv2_w", "conv2_b",
                                              "fc3_w", "fc3_b", "pred_w", "pred_b"]
    assert {str(p): str(g) for p, g in model.param_to_grad.items()} == {
        str(p): str(p) + "_grad" for p in model.params}
    forward = [op.type for op in model.net.Proto().op][:11]
    assert forward == ["Conv", "MaxPool", "Conv", "MaxPool", "FC", "Relu", "FC", "Softmax",
                       "LabelCrossEntropy", "AveragedLoss", "Accuracy"]

    x = RNG.random((8, 1, 28, 28), dtype=np.float32)
    run(model, data=x, label=np.arange(8, dtype=np.int32) % 10)
    assert workspace.FetchBlob("softmax").shape == (8, 10)
    np.testing.assert_allclose(workspace.FetchBlob("softmax").sum(1), 1, rtol=1e-5)
    assert workspace.FetchBlob("loss").shape == ()
    for p in model.params:
        assert workspace.FetchBlob(str(p) + "_grad").shape == workspace.FetchBlob(str(p)).shape
