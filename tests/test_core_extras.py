"""core beyond building nets: GradientRegistry, GradientSlice, Python ops (Net.Python,
CreatePythonOperator), AppendNet, Net(None), NextBlob naming, CreateOperator with None, get_ssa,
InferBlobDevices, device_option_equal, engine preferences."""
import numpy as np
import pytest

from caffe2torch.ops import registry
from caffe2torch.proto import caffe2_pb2
from caffe2torch.python import core, workspace


@pytest.fixture(autouse=True)
def _fresh(fresh_workspace):
    yield


def test_python_op_forward_as_in_the_python_op_tutorial():
    def f(inputs, outputs):
        outputs[0].feed(2 * inputs[0].data)

    net = core.Net("python_op_tutorial")
    net.Python(f)(["x"], ["y"])
    workspace.FeedBlob("x", np.array([3.0], np.float32))
    workspace.RunNetOnce(net)
    np.testing.assert_array_equal(workspace.FetchBlob("y"), [6.0])


def test_python_op_reshape_and_workspace_access():
    def f_reshape(inputs, outputs):
        outputs[0].reshape(inputs[0].shape)
        outputs[0].data[...] = 2 * inputs[0].data

    def f_ws(inputs, outputs, ws):
        outputs[0].feed(ws.blobs["x"].fetch() + 1)

    op = core.CreatePythonOperator(f_reshape, ["x"], ["y"])
    workspace.FeedBlob("x", np.arange(6, dtype=np.float32).reshape(2, 3))
    workspace.RunOperatorOnce(op)
    np.testing.assert_array_equal(workspace.FetchBlob("y"), 2 * np.arange(6).reshape(2, 3))
    workspace.RunOperatorOnce(core.CreatePythonOperator(f_ws, [], ["z"], pass_workspace=True))
    np.testing.assert_array_equal(workspace.FetchBlob("z"), np.arange(6).reshape(2, 3) + 1)


def test_python_op_gradient_through_add_gradient_operators():
    def f(inputs, outputs):
        outputs[0].feed(inputs[0].data ** 2)

    def grad_f(inputs, outputs):
        x, _y, dy = inputs
        outputs[0].feed(2 * x.data * dy.data)

    net = core.Net("python_grad")
    y = net.Python(f, grad_f)(["x"], ["y"])
    loss = net.AveragedLoss(y, "loss")
    grad_map = net.AddGradientOperators([loss])
    assert "PythonGradient" in [op.type for op in net.Proto().op]
    x = np.array([1.0, -2.0, 3.0], np.float32)
    workspace.FeedBlob("x", x)
    workspace.RunNetOnce(net)
    np.testing.assert_allclose(workspace.FetchBlob(grad_map["x"]), 2 * x / 3, rtol=1e-6)


def test_python_op_without_grad_f_says_so():
    net = core.Net("python_no_grad")
    y = net.Python(lambda i, o: o[0].feed(i[0].data))(["x"], ["y"])
    net.AddGradientOperators({str(y): "dy"})
    workspace.FeedBlob("x", np.ones(2, np.float32))
    workspace.FeedBlob("dy", np.ones(2, np.float32))
    with pytest.raises(RuntimeError, match="no gradient function"):
        workspace.RunNetOnce(net)


def test_gradient_registry_register_and_get():
    original = registry.get_schema("Sigmoid").gradient
    try:
        @core.GradientRegistry.RegisterGradient("Sigmoid")
        def sigmoid_grad_as_scale(op, g_output):
            return [core.CreateOperator("Scale", [g_output[0]], [op.input[0] + "_grad"],
                                        scale=3.0)], [op.input[0] + "_grad"]

        op = core.CreateOperator("Sigmoid", ["x"], ["y"])
        grad_ops, g_input = core.GradientRegistry.GetGradientForOp(op, ["y_grad"])
        assert [g.type for g in grad_ops] == ["Scale"] and g_input == ["x_grad"]
        net = core.Net("registered_grad")
        net.Sigmoid("x", "y")
        net.AddGradientOperators({"y": "dy"})
        workspace.FeedBlob("x", np.zeros(2, np.float32))
        workspace.FeedBlob("dy", np.ones(2, np.float32))
        workspace.RunNetOnce(net)
        np.testing.assert_array_equal(workspace.FetchBlob("x_grad"), [3.0, 3.0])
    finally:
        registry.register_gradient("Sigmoid", original)


def test_gradient_registry_backward_pass():
    ops = [core.CreateOperator("Relu", ["x"], ["y"]),
           core.CreateOperator("AveragedLoss", ["y"], ["loss"])]
    grad_ops, grads = core.GradientRegistry.GetBackwardPass(ops, {"loss": None})
    assert grad_ops[0].type == "ConstantFill" and grads["x"] == "x_grad"
    nograd_ops, g = core.GradientRegistry.GetGradientForOp(
        core.CreateOperator("StopGradient", ["a"], ["b"]), ["b_grad"])
    assert nograd_ops == [] and g == [None]
    gs = core.GradientSlice(indices="i", values="v")
    assert gs.indices == "i" and gs.values == "v"


def test_append_net_and_get_blob_ref():
    a, b = core.Net("append_a"), core.Net("append_b")
    a.Relu("x", "y")
    b.Scale("y", "z", scale=2.0)
    b.AddExternalOutput("z")
    a.AppendNet(b, device_option=core.DeviceOption(caffe2_pb2.CPU))
    assert [op.type for op in a.Proto().op] == ["Relu", "Scale"]
    assert list(a.Proto().external_input) == ["x"] and list(a.Proto().external_output) == ["z"]
    assert a.Proto().op[1].HasField("device_option") and not b.Proto().op[0].HasField(
        "device_option")
    assert str(a.GetBlobRef("z")) == "z" and a.UsesBlob("y")
    with pytest.raises(KeyError):
        a.GetBlobRef("nope")
    a.PopulateProtoWithFileName()


def test_net_none_and_next_blob_names():
    first, second = core.Net(None), core.Net(None)  # Caffe2: named "", then "_1", "_2", ...
    assert first.Name() != second.Name()
    assert all(n == "" or (n.startswith("_") and n[1:].isdigit())
               for n in (first.Name(), second.Name()))
    n = core.Net("next_blob")
    assert str(n.NextBlob("w")) == "w"
    assert str(n.NextBlob("w")) == "w_auto_0"
    n.Relu("x", "h")
    assert str(n.NextBlob("h")) == "h_auto_0"
    with core.NameScope("s"):
        assert str(n.NextScopedBlob("w")) == "s/w"
    assert str(n.NextBlob()) == "unnamed"


def test_create_operator_rejects_none_arguments():
    with pytest.raises(ValueError, match="'axis' is None"):
        core.CreateOperator("Softmax", ["x"], ["y"], axis=None)


def test_get_ssa_versions_in_place_blobs():
    net = core.Net("ssa")
    net.Relu("x", "x")
    net.Scale("x", "y")
    ssa, versions = core.get_ssa(net)
    assert ssa == [([("x", 0)], [("x", 1)]), ([("x", 1)], [("y", 1)])]
    assert versions == {"x": 1, "y": 1}


def test_infer_blob_devices_and_device_option_equal():
    net = core.Net("devices")
    gpu = core.DeviceOption(caffe2_pb2.CUDA, 1)
    with core.DeviceScope(gpu):
        net.Relu("x", "y")
    net.Relu("y", "z")
    devices = core.InferBlobDevices(net)
    assert devices["y"].device_type == caffe2_pb2.CUDA and devices["z"].device_type == 0
    assert core.device_option_equal(devices["y"], gpu)
    assert not core.device_option_equal(gpu, core.DeviceOption(caffe2_pb2.CUDA, 0))
    assert core.device_option_equal(core.DeviceOption(caffe2_pb2.CPU, 3), caffe2_pb2.DeviceOption())
    seeded = core.DeviceOption(caffe2_pb2.CUDA, 1, random_seed=5)
    assert core.device_option_equal(gpu, seeded)
    assert not core.device_option_equal(gpu, seeded, ignore_random_seed=False)


def test_engine_preferences_are_recorded():
    core.SetEnginePref({"Conv": {caffe2_pb2.CUDA: ["CUDNN"]}}, {caffe2_pb2.CUDA: ["CUDNN"]})
    core.SetOpEnginePref("FC", {caffe2_pb2.CPU: ["MKL"]})
    prefs = core.GetEnginePref()
    assert prefs["per_op"]["Conv"] == {caffe2_pb2.CUDA: ["CUDNN"]}
    assert prefs["per_op"]["FC"] == {caffe2_pb2.CPU: ["MKL"]}
    assert prefs["global"] == {caffe2_pb2.CUDA: ["CUDNN"]}


def test_net_const_blobs():
    net = core.Net("consts")
    a = net.Const(1.5)
    b = net.Const([1, 2, 3], "ints")
    c = net.Const(True, "flag")
    d = net.Const(np.arange(4, dtype=np.int32).reshape(2, 2), "i32")
    workspace.RunNetOnce(net)
    assert workspace.FetchBlob(a) == 1.5 and workspace.FetchBlob(a).dtype == np.float32
    assert workspace.FetchBlob(b).tolist() == [1, 2, 3] and workspace.FetchBlob(b).dtype == np.int64
    assert workspace.FetchBlob(c) == True  # noqa: E712 (a 0-d bool array)
    assert workspace.FetchBlob(d).dtype == np.int32 and workspace.FetchBlob(d).shape == (2, 2)
