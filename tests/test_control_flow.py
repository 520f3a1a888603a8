"""If / While ops, brew.cond / brew.loop and net_builder's IfNet / Else / WhileNet blocks, with
the block rules of Caffe2's NetBuilder (blobs first written inside a block stay local)."""
import numpy as np
import pytest

from caffe2torch.python import brew, core, model_helper, workspace
from caffe2torch.python.net_builder import NetBuilder, ops

pytestmark = pytest.mark.usefixtures("fresh_workspace")


def _less_than(limit):
    def f(inputs, outputs):
        outputs[0].feed(np.array(inputs[0].data.reshape(()) < limit))
    return f


@pytest.mark.parametrize("cond, expected", [(True, 1.0), (False, 0.0)])
def test_if_op_runs_one_branch_and_keeps_new_blobs_local(cond, expected):
    then_net, else_net = core.Net("then"), core.Net("else")
    then_net.Copy("one", "tmp")
    then_net.Copy("tmp", "y")
    else_net.Copy("zero", "y")
    net = core.Net("if_test")
    net.If(["cond", "one", "zero"], ["y"], then_net=then_net.Proto(), else_net=else_net.Proto())
    for name, value in [("one", 1.0), ("zero", 0.0), ("y", -1.0)]:
        workspace.FeedBlob(name, np.array([value], np.float32))
    workspace.FeedBlob("cond", np.array(cond))
    workspace.RunNetOnce(net)
    np.testing.assert_array_equal(workspace.FetchBlob("y"), [expected])
    assert not workspace.HasBlob("tmp")


def test_while_op_with_cond_net():
    cond_net, loop_net = core.Net("cond"), core.Net("loop")
    cond_net.Python(_less_than(7))(["i"], ["go"])
    loop_net.Iter(["i"], ["i"])
    loop_net.Add(["total", "one"], ["total"])
    net = core.Net("while_test")
    net.While(["go", "i", "total", "one"], ["i", "total"], loop_net=loop_net.Proto(),
              cond_net=cond_net.Proto())
    workspace.FeedBlob("i", np.array([0], np.int64))
    workspace.FeedBlob("go", np.array(True))
    workspace.FeedBlob("total", np.array([0.0], np.float32))
    workspace.FeedBlob("one", np.array([1.0], np.float32))
    workspace.RunNetOnce(net)
    assert workspace.FetchBlob("i")[0] == 7 and workspace.FetchBlob("total")[0] == 7.0


def test_brew_cond_as_the_control_ops_tutorial():
    model = model_helper.ModelHelper(name="test_if_model")
    for name, value in [("zero", 0.0), ("one", 1.0), ("x", 0.5), ("y", 0.0)]:
        model.param_init_net.ConstantFill([], [name], shape=[1], value=value)
    model.param_init_net.ConstantFill([], ["cond"], shape=[], value=True,
                                      dtype=core.DataType.BOOL)
    then_model = model_helper.ModelHelper(name="then_test_model")
    then_model.net.Copy("one", "y")
    else_model = model_helper.ModelHelper(name="else_test_model")
    else_model.net.Copy("zero", "y")
    brew.cond(model=model, cond_blob="cond", external_blobs=["x", "y", "zero", "one"],
              then_model=then_model, else_model=else_model)
    op = model.net.Proto().op[-1]
    assert op.type == "If" and list(op.input) == ["cond", "one", "zero"]
    assert list(op.output) == ["y"]
    workspace.RunNetOnce(model.param_init_net)
    workspace.RunNetOnce(model.net)
    np.testing.assert_array_equal(workspace.FetchBlob("y"), [1.0])


def test_brew_loop():
    model = model_helper.ModelHelper(name="loop_model")
    model.param_init_net.ConstantFill([], "i", shape=[1], value=0, dtype=core.DataType.INT64)
    model.param_init_net.ConstantFill([], "go", shape=[], value=True, dtype=core.DataType.BOOL)
    loop_model = model_helper.ModelHelper(name="body")
    loop_model.net.Iter(["i"], ["i"])
    cond_model = model_helper.ModelHelper(name="check")
    cond_model.net.Python(_less_than(3))(["i"], ["go"])
    brew.loop(model, "go", ["i", "go"], loop_model, cond_model)
    workspace.RunNetOnce(model.param_init_net)
    workspace.RunNetOnce(model.net)
    assert workspace.FetchBlob("i")[0] == 3


def test_net_builder_if_else_blocks_nested_with_local_blobs():
    with NetBuilder() as nb:
        ops.Const(0.0, blob_out="zero")
        ops.Const(1.0, blob_out="one")
        ops.Const(2.0, blob_out="two")
        ops.Const(1.5, blob_out="x")
        ops.Const(0.0, blob_out="y")
        ops.Const(True, blob_out="x_positive")
        ops.Const(False, blob_out="x_small")
        with ops.IfNet("x_positive"):
            ops.Copy("x", "local_blob")
            with ops.IfNet("x_small"):
                ops.Copy("one", "y")
            with ops.Else():
                ops.Copy("two", "y")
        with ops.Else():
            ops.Copy("zero", "y")
    plan = core.Plan("if_net_test_2")
    plan.AddStep(core.to_execution_step(nb))
    ws = workspace.C.Workspace()
    ws.run(plan)
    assert ws.blobs["x"].fetch() == 1.5 and ws.blobs["y"].fetch() == 2.0
    assert "local_blob" not in ws.blobs
    assert len(nb.get()) == 1


def test_net_builder_while_net_with_condition():
    with NetBuilder() as nb:
        i = ops.Const(0, blob_out="i")
        ops.Const(0, blob_out="total")
        with ops.WhileNet():
            with ops.Condition():
                ops.Iter([i], [i])
                ops.Python(_less_than(5))([i], ["go"])
            ops.Add(["total", "i"], ["total"])
    workspace.RunPlan(core.Plan(core.to_execution_step(nb)))
    # i = 1, 2, 3, 4 pass the check; 5 stops the loop: total = 1 + 2 + 3 + 4
    assert workspace.FetchBlob("i") == 5 and workspace.FetchBlob("total") == 10


def test_else_must_follow_an_if_block():
    with NetBuilder():
        with pytest.raises(RuntimeError, match="must follow"):
            with ops.Else():
                pass
