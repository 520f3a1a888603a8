"""Smaller parts of Caffe2's API: workspace.SerializeBlob / DeserializeBlob /
RunPlanInBackground, Net.ClonePartial / LogInfo, core.get_op_ids_in_path / remap_input,
utils.TryReadProtoWithClass / DebugMode / BuildUniqueMutexIter, brew.conv_transpose /
group_conv / prelu (checked against torch)."""
import numpy as np
import pytest
import torch
from google.protobuf import text_format

from caffe2torch.proto import caffe2_pb2
from caffe2torch.python import brew, core, model_helper, utils, workspace

pytestmark = pytest.mark.usefixtures("fresh_workspace")


@pytest.mark.parametrize("value", [np.arange(6, dtype=np.float32).reshape(2, 3),
                                   np.array([1, -2], np.int64), b"some bytes"])
def test_serialize_and_deserialize_blob(value):
    workspace.FeedBlob("x", value)
    data = workspace.SerializeBlob("x")
    blob = caffe2_pb2.BlobProto.FromString(data)
    assert blob.name == "x" and blob.type == ("std::string" if isinstance(value, bytes)
                                              else "Tensor")
    workspace.DeserializeBlob("y", data)
    got = workspace.FetchBlob("y")
    if isinstance(value, bytes):
        assert got == value
    else:
        np.testing.assert_array_equal(got, value)
        assert got.dtype == value.dtype


def test_deserialize_blob_of_garbage_says_so():
    with pytest.raises(ValueError, match="not a serialized Caffe2 BlobProto"):
        workspace.DeserializeBlob("y", b"\xff\xff\xff")


def test_run_plan_in_background():
    net = core.Net("bg")
    net.ConstantFill([], "c", shape=[1], value=0.0)
    add = core.Net("bg_add")
    add.Add(["c", "c"], "c")
    net.ConstantFill([], "one", shape=[1], value=1.0)
    add.Add(["c", "one"], "c")
    plan = core.Plan("bg_plan")
    plan.AddStep(core.execution_step("init", net))
    plan.AddStep(core.execution_step("loop", add, num_iter=4))
    handle = workspace.RunPlanInBackground(plan)
    assert handle.wait(timeout=60) and handle.is_done() and handle.is_succeeded()
    assert workspace.FetchBlob("c")[0] == 15.0  # c = 2c + 1, four times from 0
    bad = core.Net("bg_bad")
    bad.Add(["nope", "nope"], "z")
    failing = workspace.RunPlanInBackground(core.execution_step("bad", bad))
    failing.wait(timeout=60)
    assert failing.is_done() and not failing.is_succeeded() and failing.error is not None


def _chain():
    net = core.Net("chain")
    net.AddExternalInput("a")
    net.Scale("a", "b", scale=2.0)
    net.Relu("b", "c")
    net.Scale("c", "d", scale=3.0)
    net.Sigmoid("a", "unrelated")
    return net


def test_get_op_ids_in_path():
    net = _chain()
    ssa, versions = core.get_ssa(net)
    assert core.get_op_ids_in_path(ssa, versions, ["a"], ["d"]) == [0, 1, 2]
    assert core.get_op_ids_in_path(ssa, versions, ["a"], ["unrelated"]) == [3]
    assert core.get_op_ids_in_path(ssa, versions, ["b"], ["d"]) == [1, 2]  # b as it is last


def test_clone_partial():
    net = _chain()
    partial, (out,) = net.ClonePartial("part", {"a": "a_in"}, ["d"])
    assert [op.type for op in partial.Proto().op] == ["Scale", "Relu", "Scale"]
    assert [o for op in partial.Proto().op for o in op.output] == ["part/b", "part/c", "part/d"]
    assert list(partial.Proto().external_input) == ["a_in"] and str(out) == "part/d"
    workspace.FeedBlob("a_in", np.array([-1.0, 2.0], np.float32))
    workspace.RunNetOnce(partial)
    np.testing.assert_array_equal(workspace.FetchBlob("part/d"), [0.0, 12.0])
    with pytest.raises(ValueError, match="does not produce"):
        net.ClonePartial("bad", ["a"], ["zzz"])
    from_b, _ = net.ClonePartial("from_b", ["b"], ["d"])
    assert [op.type for op in from_b.Proto().op] == ["Relu", "Scale"]
    cut = core.Net("cut")
    cut.Concat(["a1", "a2"], ["b1", "b2"], axis=0)
    cut.Sum(["b1"], ["c1"])
    cut.Sum(["c1", "b2"], ["d"])
    with pytest.raises(ValueError, match="also produce the given inputs"):
        cut.ClonePartial("bad", ["a1", "a2", "c1"], ["d"])  # Concat makes b2 and, via b1, c1


def test_remap_input():
    op = core.CreateOperator("Add", ["x", "y"], ["z"])
    new = core.remap_input(op, {"x": "x2"})
    assert list(new.input) == ["x2", "y"] and list(op.input) == ["x", "y"]


def test_log_info_prints_messages_and_blobs(tmp_path, caplog):
    net = core.Net("log")
    v = net.ConstantFill([], "v", shape=[2], value=1.5)
    net.LogInfo("hello", v)
    assert [op.type for op in net.Proto().op].count("Print") == 2
    workspace.RunNetOnce(net)


def test_try_read_proto_with_class():
    net = core.Net("proto_read")
    net.Relu("x", "y")
    for data in (text_format.MessageToString(net.Proto()), net.Proto().SerializeToString()):
        got = utils.TryReadProtoWithClass(caffe2_pb2.NetDef, data)
        assert got == net.Proto()
    with pytest.raises(ValueError, match="neither text format nor binary"):
        utils.TryReadProtoWithClass(caffe2_pb2.NetDef, b"\xff\xfe garbage {")


def test_debug_mode(monkeypatch):
    assert utils.DebugMode.run(lambda: 42) == 42
    entered = []
    monkeypatch.setattr("pdb.post_mortem", lambda *a: entered.append(True))

    def boom():
        raise ValueError("boom")
    with pytest.raises(SystemExit):
        utils.DebugMode.run(boom)
    assert entered == [True]


def test_build_unique_mutex_iter():
    init_net, net = core.Net("it_init"), core.Net("it")
    it = utils.BuildUniqueMutexIter(init_net, net, iter_val=5)
    assert utils.BuildUniqueMutexIter(init_net, net) == it  # once per init net
    workspace.RunNetOnce(init_net)
    workspace.CreateNet(net)
    workspace.RunNet(net.Name(), 3)
    assert workspace.FetchBlob(it)[0] == 8


def _params(model):
    workspace.RunNetOnce(model.param_init_net)
    workspace.RunNetOnce(model.net)


def test_brew_conv_transpose_matches_torch():
    model = model_helper.ModelHelper(name="deconv")
    brew.conv_transpose(model, "x", "y", dim_in=2, dim_out=3, kernel=3, stride=2)
    x = np.random.default_rng(0).standard_normal((1, 2, 4, 4)).astype(np.float32)
    workspace.FeedBlob("x", x)
    _params(model)
    w, b = workspace.FetchBlob("y_w"), workspace.FetchBlob("y_b")
    assert w.shape == (2, 3, 3, 3) and b.shape == (3,)
    expected = torch.nn.functional.conv_transpose2d(torch.tensor(x), torch.tensor(w),
                                                    torch.tensor(b), stride=2)
    np.testing.assert_allclose(workspace.FetchBlob("y"), expected.numpy(), rtol=1e-5, atol=1e-5)


def test_brew_group_conv_matches_torch():
    model = model_helper.ModelHelper(name="gconv")
    brew.group_conv(model, "x", "y", dim_in=4, dim_out=6, kernel=3, group=2, pad=1)
    x = np.random.default_rng(1).standard_normal((2, 4, 5, 5)).astype(np.float32)
    workspace.FeedBlob("x", x)
    _params(model)
    w, b = workspace.FetchBlob("y_w"), workspace.FetchBlob("y_b")
    assert w.shape == (6, 2, 3, 3)
    expected = torch.nn.functional.conv2d(torch.tensor(x), torch.tensor(w), torch.tensor(b),
                                          padding=1, groups=2)
    np.testing.assert_allclose(workspace.FetchBlob("y"), expected.numpy(), rtol=1e-5, atol=1e-5)


def test_brew_prelu():
    model = model_helper.ModelHelper(name="prelu")
    brew.prelu(model, "x", "y", num_channels=3)
    assert [str(p) for p in model.params] == ["y_slope"]
    x = np.random.default_rng(2).standard_normal((2, 3, 2, 2)).astype(np.float32)
    workspace.FeedBlob("x", x)
    _params(model)
    np.testing.assert_array_equal(workspace.FetchBlob("y_slope"), [0.25] * 3)
    np.testing.assert_allclose(workspace.FetchBlob("y"), np.where(x > 0, x, 0.25 * x),
                               rtol=1e-6)


def test_c_workspace_nets_blob_serde_and_tensor_view():
    ws = workspace.C.Workspace()
    assert ws.nets == {} and ws.blobs == {}
    net = core.Net("c_ws_net")
    net.ConstantFill([], "t", shape=[2], value=1.0)
    handle = ws.create_net(net)
    with pytest.raises(RuntimeError, match="already exists"):
        ws.create_net(net)
    assert list(ws.nets) == [net.Name()] and handle.run()
    blob = ws.blobs["t"]
    copy = ws.create_blob("t_copy")
    copy.deserialize(blob.serialize("t"))
    np.testing.assert_array_equal(copy.fetch(), [1.0, 1.0])
    view = blob.tensor()
    view.data[0] = 5.0  # a view: the blob changes
    np.testing.assert_array_equal(blob.fetch(), [5.0, 1.0])
    view.init([2, 2], core.DataType.INT32)
    assert blob.fetch().dtype == np.int32 and blob.fetch().shape == (2, 2)
    with pytest.raises(RuntimeError, match="string tensors"):
        view.init([1], core.DataType.STRING)
    with pytest.raises(TypeError):
        ws.create_net("...")
    assert workspace.C.Workspace.current.blobs is not None  # a class-level property


def test_switch_to_a_missing_workspace_is_a_runtime_error():
    with pytest.raises(RuntimeError, match="no workspace named"):
        workspace.SwitchWorkspace("no-such-workspace")


def test_stringify_proto_is_the_serialized_proto_and_blob_sizes():
    net = core.Net("stringify")
    assert workspace.StringifyProto(net) == net.Proto().SerializeToString()
    workspace.FeedBlob("f", np.zeros((2, 3), np.float16))
    assert workspace.GetBlobSizeBytes("f") == 12
    workspace.FeedBlob("s1", np.array([b"Hello World!", b"abcd"], dtype=object))
    workspace.FeedBlob("s2", np.array([b"element1", b"element2"], dtype=object))
    assert workspace.GetBlobSizeBytes("s1") - workspace.GetBlobSizeBytes("s2") == 0


def test_extract_predictor_net_drops_readers_losses_and_gradients():
    model = model_helper.ModelHelper(name="extract")
    model.net.Copy("reader_out", "xx/data")  # stands in for a data reader
    fc = brew.fc(model, "xx/data", "pred", dim_in=3, dim_out=2)
    model.net.SoftmaxWithLoss([fc, "label"], ["softmax", "loss"])
    model.AddGradientOperators(["loss"])
    predict, export = model_helper.ExtractPredictorNet(
        model.net.Proto(), ["xx/data"], ["pred"], renames={"xx/data": "image"})
    ops = predict.Proto().op
    assert [op.type for op in ops] == ["FC"] and ops[0].input[0] == "image"
    assert set(export) == {"pred_w", "pred_b"}
    assert list(predict.Proto().external_output) == ["pred"]


def test_plan_create_from_proto_and_operator_source_lines():
    net = core.Net("from_proto")
    net.ConstantFill([], "v", shape=[1], value=2.0); line = __import__("inspect").currentframe().f_lineno  # noqa: E702,E501
    plan = core.Plan("p")
    plan.AddStep(core.execution_step("s", net, num_iter=3))
    copy = core.Plan.create_from_proto(plan.Proto())
    assert len(copy.Steps()) == 1 and copy.Steps()[0].Proto().num_iter == 3
    assert copy.Nets()[0].Name().startswith("from_proto")
    workspace.RunPlan(copy)
    assert workspace.FetchBlob("v")[0] == 2.0
    net.PopulateProtoWithFileName()
    assert net.Proto().op[0].name == f"{__file__}:{line}"
    assert core.IsOperatorWithEngine("Relu", "DEFAULT")
    assert not core.IsOperatorWithEngine("Relu", "CUDNN")
    net._CheckLookupTables()


def test_counters_save_load_and_serialize_as_caffe2(tmp_path):
    workspace.RunOperatorOnce(core.CreateOperator("CreateCounter", [], ["c"], init_count=22))
    db = str(tmp_path / "counter.minidb")
    workspace.RunOperatorOnce(core.CreateOperator("Save", ["c"], [], absolute_path=1,
                                                  db_type="minidb", db=db))
    for _ in range(3):
        workspace.RunOperatorOnce(core.CreateOperator("CountDown", ["c"], ["done"]))
    workspace.RunOperatorOnce(core.CreateOperator("Load", [], ["c"], absolute_path=1,
                                                  db_type="minidb", db=db))
    workspace.RunOperatorOnce(core.CreateOperator("RetrieveCount", ["c"], ["n"]))
    assert workspace.FetchBlob("n") == 22
    blob = caffe2_pb2.BlobProto.FromString(workspace.SerializeBlob("c"))
    assert blob.type == "std::unique_ptr<Counter<int64_t>>" and list(blob.tensor.int64_data) == [22]
    workspace.DeserializeBlob("c2", blob.SerializeToString())
    workspace.RunOperatorOnce(core.CreateOperator("RetrieveCount", ["c2"], ["n2"]))
    assert workspace.FetchBlob("n2") == 22
