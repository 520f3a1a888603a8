"""Caffe2's workspace API beyond the tutorial: blobs view, FetchBlobs, GPU queries, serialized
protos, RunPlan, InferShapesAndTypes, Predictor and the C namespace."""
import numpy as np
import pytest

from caffe2torch.proto import caffe2_pb2
from caffe2torch.python import core, workspace


@pytest.fixture(autouse=True)
def _fresh(fresh_workspace):
    yield


def test_fetch_missing_blob_raises_runtime_error_as_caffe2():
    with pytest.raises(RuntimeError, match="invincible_pink_unicorn"):
        workspace.FetchBlob("invincible_pink_unicorn")


def test_blobs_dict_view_reads_and_writes():
    workspace.blobs["x"] = np.arange(3, dtype=np.float32)
    assert "x" in workspace.blobs and len(workspace.blobs) == 1
    np.testing.assert_array_equal(workspace.blobs["x"], [0, 1, 2])
    workspace.RunOperatorOnce(core.CreateOperator("Scale", ["x"], ["y"], scale=2.0))
    assert list(workspace.blobs) == ["x", "y"]
    np.testing.assert_array_equal(workspace.blobs["y"], [0, 2, 4])
    assert workspace.blobs.get("nope") is None
    del workspace.blobs["y"]
    assert not workspace.HasBlob("y")
    a, b = workspace.FetchBlobs(["x", "x"])
    np.testing.assert_array_equal(a, b)


def test_global_init_in_workspace_and_root_folder(tmp_path):
    assert workspace.GlobalInit(["caffe2", "--caffe2_log_level=1"])
    assert core.GetFlag("caffe2_log_level") == "1"
    workspace.SwitchWorkspace("fresh_root_test", True)
    try:
        assert workspace.RootFolder() == "."  # Caffe2's default root folder
    finally:
        workspace.SwitchWorkspace("default")


def test_gpu_queries_answer_from_torch():
    import torch
    assert workspace.has_gpu_support == torch.cuda.is_available()
    assert workspace.NumCudaDevices() == (torch.cuda.device_count() if torch.cuda.is_available()
                                          else 0)
    version = workspace.GetCUDAVersion()
    if torch.version.cuda:
        major, minor = map(int, torch.version.cuda.split(".")[:2])
        assert version == major * 1000 + minor * 10
    else:
        assert version == 0
    assert isinstance(workspace.GetCuDNNVersion(), int)
    if torch.cuda.is_available():
        assert workspace.GetDeviceProperties(0)["name"] == torch.cuda.get_device_name(0)
    else:
        with pytest.raises(RuntimeError, match="no CUDA device"):
            workspace.GetDeviceProperties(0)


def _relu_net(name):
    net = core.Net(name)
    net.Relu(["x"], ["y"])
    return net


def test_serialized_protos_are_accepted():
    workspace.FeedBlob("x", np.array([-1.0, 2.0], np.float32))
    net = _relu_net("serialized_relu")
    assert workspace.RunNetOnce(net.Proto().SerializeToString())
    np.testing.assert_array_equal(workspace.FetchBlob("y"), [0, 2])
    op = core.CreateOperator("Scale", ["x"], ["z"], scale=3.0)
    workspace.RunOperatorOnce(op.SerializeToString())
    np.testing.assert_array_equal(workspace.FetchBlob("z"), [-3, 6])
    assert workspace.CreateNet(net.Proto().SerializeToString())
    assert workspace.RunNet(net.Name())


def test_run_plan_num_iter_and_should_stop_blob():
    init = core.Net("plan_init")
    init.ConstantFill([], "counter", shape=[1], value=0, dtype=core.DataType.INT64)
    init.ConstantFill([], "limit", shape=[1], value=5, dtype=core.DataType.INT64)
    step_net = core.Net("plan_step")
    step_net.Iter(["counter"], ["counter"])
    looping = core.Net("plan_loop")
    looping.Iter(["counter"], ["counter"])
    looping.GE(["counter", "limit"], "stop") if core.IsOperator("GE") else \
        looping.ConstantFill(["counter"], "stop", value=True, dtype=core.DataType.BOOL)
    plan = core.Plan("my_plan")
    plan.AddStep(core.execution_step("init", init))
    plan.AddStep(core.execution_step("three", step_net, num_iter=3))
    assert workspace.RunPlan(plan)
    assert workspace.FetchBlob("counter")[0] == 3
    assert {n.name for n in plan.Proto().network} == {"plan_init", "plan_step"}
    stop = core.execution_step("until", looping, should_stop_blob="stop")
    workspace.RunPlan(core.Plan(stop))
    # GE stops at 5; without GE the stand-in stops after the first run.
    assert workspace.FetchBlob("counter")[0] == (5 if core.IsOperator("GE") else 4)


def test_run_plan_nested_substeps_and_serialized():
    init = core.Net("nested_init")
    init.ConstantFill([], "c", shape=[1], value=0, dtype=core.DataType.INT64)
    inc = core.Net("nested_inc")
    inc.Iter(["c"], ["c"])
    inner = core.execution_step("inner", inc, num_iter=2)
    outer = core.execution_step("outer", [inner], num_iter=3)
    plan = core.Plan("nested")
    plan.AddStep(core.execution_step("init", init))
    plan.AddStep(outer)
    workspace.RunPlan(plan.Proto().SerializeToString())
    assert workspace.FetchBlob("c")[0] == 6
    with pytest.raises(RuntimeError, match="undefined net"):
        bad = caffe2_pb2.PlanDef(name="bad")
        bad.execution_step.add(name="s", network=["nowhere"])
        workspace.RunPlan(bad)


def test_infer_shapes_and_types():
    net = core.Net("shapes")
    net.FC(["data", "w", "b"], "fc")
    net.Relu("fc", "relu")
    net.Cast("relu", "as_int", to=core.DataType.INT32)
    workspace.FeedBlob("w", np.zeros((10, 6), np.float32))
    workspace.FeedBlob("b", np.zeros(10, np.float32))
    shapes, types = workspace.InferShapesAndTypes([net], {"data": [4, 6]})
    assert shapes["fc"] == [4, 10] and shapes["relu"] == [4, 10] and shapes["data"] == [4, 6]
    assert types["fc"] == caffe2_pb2.TensorProto.FLOAT
    assert types["as_int"] == caffe2_pb2.TensorProto.INT32
    assert not workspace.HasBlob("fc")  # nothing ran in the user's workspace
    # A net whose input is unknown: its blobs are left out, as Caffe2 leaves them out.
    shapes, _ = workspace.InferShapesAndTypes([net])
    assert "fc" not in shapes and shapes["w"] == [10, 6]


def test_predictor_runs_init_then_predict_net():
    init = core.Net("pred_init")
    init.GivenTensorFill([], "w", shape=[2, 3], values=[1.0, 0.0, 0.0, 0.0, 1.0, 0.0])
    init.ConstantFill([], "b", shape=[2], value=0.5)
    predict = core.Net("pred_net")
    predict.FC(["data", "w", "b"], "fc")
    predict.Relu("fc", "out")
    predict.Proto().external_input[:] = ["data", "w", "b"]
    predict.Proto().external_output[:] = ["out"]
    p = workspace.Predictor(init.Proto().SerializeToString(), predict.Proto().SerializeToString())
    x = np.array([[1.0, -2.0, 3.0]], np.float32)
    [out] = p.run([x])
    np.testing.assert_allclose(out, [[1.5, 0.0]])
    [out2] = p.run({"data": -x})
    np.testing.assert_allclose(out2, [[0.0, 2.5]])
    assert not workspace.HasBlob("w")  # the predictor's blobs are its own
    with pytest.raises(ValueError, match="not inputs"):
        p.run({"nope": x})


def test_c_namespace_workspace_db_and_honest_errors(tmp_path):
    assert workspace.C() is workspace.C()  # still the current Workspace object
    path = str(tmp_path / "own.minidb")
    db = core.C.create_db("minidb", path, core.C.Mode.new)
    txn = db.new_transaction()
    txn.put("k1", b"v1")
    txn.put("k2", b"v2")
    del txn
    db.close()
    reader = workspace.C.create_db("minidb", path, workspace.C.Mode.read)
    cursor = reader.new_cursor()
    seen = []
    while cursor.valid():
        seen.append((cursor.key(), cursor.value()))
        cursor.next()
    reader.close()
    assert seen == [(b"k1", b"v1"), (b"k2", b"v2")]

    ws = workspace.C.Workspace()
    ws.create_blob("x").feed(np.array([-1.0, 1.0], np.float32))
    ws.run(_relu_net("own_ws_relu"))
    np.testing.assert_array_equal(ws.blobs["y"].fetch(), [0, 1])
    assert not workspace.HasBlob("y")
    assert "Relu" in workspace.C.registered_operators()
    with pytest.raises(AttributeError, match="does not provide"):
        _ = workspace.C.get_stats
