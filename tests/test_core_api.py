"""The Caffe2 Python API surface a tutorial user touches: imports, nets, scopes, the workspace."""
import importlib
import logging
import os

import numpy as np
import pytest

from caffe2torch.proto import caffe2_pb2
from caffe2torch.python import core, scope, utils, workspace


pytestmark = pytest.mark.usefixtures("fresh_workspace")


@pytest.mark.parametrize("module", [
    "caffe2torch.python.core", "caffe2torch.python.workspace", "caffe2torch.python.model_helper",
    "caffe2torch.python.brew", "caffe2torch.python.scope", "caffe2torch.python.net_drawer",
    "caffe2torch.python.visualize", "caffe2torch.python.utils",
    "caffe2torch.python.predictor.predictor_exporter", "caffe2torch.proto.caffe2_pb2",
    "caffe2torch.proto.metanet_pb2", "caffe2torch.proto.predictor_consts_pb2",
])
def test_tutorial_imports(module):
    importlib.import_module(module)


def test_tutorial_from_imports():
    from caffe2torch.proto import caffe2_pb2 as pb  # noqa: F401
    from caffe2torch.python import (brew, core, model_helper, net_drawer, utils,  # noqa: F401
                                    visualize, workspace)
    from caffe2torch.python.predictor import predictor_exporter  # noqa: F401
    assert callable(brew.fc) and callable(model_helper.ModelHelper)


def test_net_names_are_made_unique():
    first = core.Net("mnist_deploy_api_test")
    second = core.Net("mnist_deploy_api_test")
    third = core.Net("mnist_deploy_api_test")
    assert first.Name() == "mnist_deploy_api_test"
    assert second.Name() == "mnist_deploy_api_test_1"
    assert third.Name() == "mnist_deploy_api_test_2"
    assert str(second) == second.Proto().name


def test_auto_named_outputs():
    net = core.Net("autonames")
    a = net.Relu(["x"])
    b = net.Relu(["x"])
    assert str(a) == "autonames/Relu" and str(b) == "autonames/Relu_2"
    assert isinstance(a, core.BlobReference)
    assert [list(op.output) for op in net.Proto().op] == [[str(a)], [str(b)]]
    assert list(net.Proto().external_input) == ["x"]


def test_blob_reference_calls_ops_on_its_net():
    net = core.Net("chain")
    x = net.AddExternalInput("x")
    y = x.Relu([], "y")
    assert str(y) == "y"
    assert [(op.type, list(op.input), list(op.output)) for op in net.Proto().op] == \
        [("Relu", ["x"], ["y"])]


def test_net_wraps_an_existing_netdef():
    proto = caffe2_pb2.NetDef(name="wrapped_api_test")
    proto.op.add(type="Relu", input=["x"], output=["y"])
    proto.external_input.append("x")
    net = core.Net(proto)
    net.Relu(["y"], "z")
    assert [op.type for op in net.Proto().op] == ["Relu", "Relu"]
    assert len(proto.op) == 1, "wrapping copies the NetDef"
    assert net.BlobIsDefined("y") and net.BlobIsDefined("x")
    workspace.FeedBlob("x", np.array([-1.0, 2.0], np.float32))
    workspace.RunNetOnce(net)
    np.testing.assert_array_equal(workspace.FetchBlob("z"), [0.0, 2.0])


def test_unregistered_op_raises_attribute_error_naming_it():
    net = core.Net("bad_op")
    with pytest.raises(AttributeError, match="NoSuchOperator"):
        net.NoSuchOperator(["x"], "y")
    with pytest.raises(AttributeError, match="Relux.*Did you mean.*Relu"):
        net.Relux(["x"], "y")


def test_global_init_accepts_caffe2_flags():
    logger = logging.getLogger("caffe2torch")
    old_level = logger.level
    try:
        assert core.GlobalInit(["caffe2", "--caffe2_log_level=0"])
        assert core.GetFlag("caffe2_log_level") == "0"
        assert logger.level == logging.INFO
        with pytest.raises(ValueError, match="not a flag"):
            core.GlobalInit(["caffe2", "caffe2_log_level=0"])
        core.GlobalInit(["caffe2", "--caffe2_log_level=1"])
        assert logger.level == logging.WARNING
    finally:
        logger.setLevel(old_level)


def test_name_scope_prefixes_created_blobs():
    net = core.Net("scoped")
    with core.NameScope("conv1"):
        y = net.Relu(["x"], "y")
        with core.NameScope("inner"):
            z = net.Relu([y], "z")
    assert str(y) == "conv1/y" and str(z) == "conv1/inner/z"
    assert list(net.Proto().op[0].input) == ["conv1/x"]
    assert scope.CurrentNameScope() == ""
    assert z.GetNameScope() == "conv1/inner/" and z.GetUnscopedName() == "z"


def test_device_scope_sets_op_device_option():
    net = core.Net("devices")
    gpu = core.DeviceOption(caffe2_pb2.CUDA, 1)
    with core.DeviceScope(gpu):
        net.Relu(["x"], "y")
        with core.DeviceScope(core.DeviceOption(caffe2_pb2.CPU)):
            net.Relu(["y"], "z")
    net.Relu(["z"], "w")
    ops = net.Proto().op
    assert ops[0].device_option.device_type == caffe2_pb2.CUDA
    assert ops[0].device_option.cuda_gpu_id == 1
    assert ops[1].HasField("device_option") and ops[1].device_option.device_type == caffe2_pb2.CPU
    assert not ops[2].HasField("device_option")
    assert scope.CurrentDeviceScope() is None


def test_create_operator_arguments_in_call_order():
    op = core.CreateOperator("Relu", ["x"], ["y"], engine="CUDNN", order="NCHW", a=1, f=0.5,
                             ints=[1, 2], s=b"raw")
    assert op.engine == "CUDNN"
    assert utils.ArgsToDict(op.arg) == {"order": "NCHW", "a": 1, "f": 0.5, "ints": [1, 2],
                                        "s": "raw"}
    assert [a.name for a in op.arg] == ["order", "a", "f", "ints", "s"]


def test_create_net_overwrite_rules():
    net = core.Net("overwrite_api_test")
    net.Relu(["x"], "y")
    workspace.FeedBlob("x", np.array([1.0], np.float32))
    workspace.CreateNet(net)
    with pytest.raises(RuntimeError, match="already exists.*overwrite=True"):
        workspace.CreateNet(net)
    assert workspace.CreateNet(net, overwrite=True)
    assert net.Name() in workspace.Nets()


def test_create_net_needs_its_inputs():
    net = core.Net("missing_input_api_test")
    net.Relu(["not_fed"], "y")
    with pytest.raises(RuntimeError, match="not_fed"):
        workspace.CreateNet(net)


def test_run_net_num_iter_and_unknown_net():
    net = core.Net("iterate_api_test")
    net.Relu(["x"], "x")
    workspace.FeedBlob("x", np.array([-2.0, 3.0], np.float32))
    workspace.CreateNet(net)
    assert workspace.RunNet(net.Name(), num_iter=3)
    assert workspace.RunNet(net, 2)
    np.testing.assert_array_equal(workspace.FetchBlob("x"), [0.0, 3.0])
    with pytest.raises(KeyError, match="CreateNet"):
        workspace.RunNet("never_created")


def test_reset_workspace_creates_root_folder(tmp_path):
    root = tmp_path / "new" / "root"
    workspace.FeedBlob("x", np.zeros(2, np.float32))
    assert workspace.ResetWorkspace(str(root))
    assert root.is_dir() and workspace.RootFolder() == str(root)
    assert workspace.Blobs() == [] and not workspace.HasBlob("x")


def test_feed_fetch_blobs():
    workspace.FeedBlob("f", np.arange(6, dtype=np.float32).reshape(2, 3))
    workspace.FeedBlob("i", np.array([1, 2], np.int32))
    workspace.FeedBlob("s", b"bytes")
    assert workspace.Blobs() == ["f", "i", "s"]
    assert workspace.HasBlob("f") and not workspace.HasBlob("g")
    assert workspace.FetchBlob("f").dtype == np.float32 and workspace.FetchBlob("f").shape == (2, 3)
    assert workspace.FetchBlob("i").dtype == np.int32
    assert workspace.FetchBlob("s") == b"bytes"
    with pytest.raises(KeyError, match="'g'"):
        workspace.FetchBlob("g")


def test_run_operator_once():
    workspace.FeedBlob("x", np.array([-1.0, 1.0], np.float32))
    assert workspace.RunOperatorOnce(core.CreateOperator("Relu", ["x"], ["y"]))
    np.testing.assert_array_equal(workspace.FetchBlob("y"), [0.0, 1.0])


def test_netdef_text_and_binary_round_trip():
    from google.protobuf import text_format
    net = core.Net("round_trip_api_test")
    with core.DeviceScope(core.DeviceOption(caffe2_pb2.CUDA, 0)):
        net.Relu(["x"], "y", engine="CUDNN", order="NCHW", ratio=0.5, kernels=[2, 2])
    proto = net.Proto()
    text = str(proto)
    assert 'type: "Relu"' in text and 'engine: "CUDNN"' in text
    assert text_format.Parse(text, caffe2_pb2.NetDef()) == proto
    assert caffe2_pb2.NetDef.FromString(proto.SerializeToString()) == proto


def test_utils_tensor_proto_round_trip():
    arr = np.arange(12, dtype=np.float32).reshape(3, 4)
    tensor = utils.NumpyArrayToCaffe2Tensor(arr, "w")
    assert tensor.name == "w" and list(tensor.dims) == [3, 4]
    assert tensor.data_type == caffe2_pb2.TensorProto.FLOAT
    np.testing.assert_array_equal(utils.Caffe2TensorToNumpyArray(tensor), arr)
    ints = utils.Caffe2TensorToNumpyArray(utils.NumpyArrayToCaffe2Tensor(np.array([1, 2], np.int64)))
    assert ints.dtype == np.int64 and ints.tolist() == [1, 2]


def test_make_argument_types():
    assert utils.MakeArgument("f", 1.5).f == 1.5
    assert utils.MakeArgument("i", True).i == 1
    assert utils.MakeArgument("s", "NCHW").s == b"NCHW"
    assert list(utils.MakeArgument("shape", [1, 2]).ints) == [1, 2]
    assert list(utils.MakeArgument("v", np.array([0.5], np.float32)).floats) == [0.5]
    with pytest.raises(ValueError, match="mixed"):
        utils.MakeArgument("bad", [1, "a"])


def test_workspace_root_is_cwd_independent(tmp_path):
    workspace.ResetWorkspace(str(tmp_path / "r"))
    old = os.getcwd()
    try:
        os.chdir(tmp_path)
        assert workspace.RootFolder() == str(tmp_path / "r")
    finally:
        os.chdir(old)
