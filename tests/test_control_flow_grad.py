"""Gradients through If / While (Caffe2's control_ops_grad): brew.cond, brew.loop and
net_builder's IfNet / WhileNet inside a net that AddGradientOperators backpropagates, checked
against finite differences with the project's gradient_checker."""
import numpy as np
import pytest

from caffe2torch.python import brew, core, model_helper, workspace
from caffe2torch.python.gradient_checker import NetGradientChecker
from caffe2torch.python.net_builder import NetBuilder, ops

pytestmark = pytest.mark.usefixtures("fresh_workspace")

RNG = np.random.RandomState(3)
X = RNG.uniform(0.2, 1.0, (2, 3)).astype(np.float32)
W = RNG.uniform(-1.0, 1.0, (2, 3)).astype(np.float32)


def _if_model(with_else):
    model = model_helper.ModelHelper(name="if_grad")
    then_model = model_helper.ModelHelper(name="then")
    then_model.net.Mul(["x", "w"], "t")       # t is local to the branch
    then_model.net.Tanh("t", "y")
    else_model = None
    if with_else:
        else_model = model_helper.ModelHelper(name="else")
        else_model.net.Add(["x", "x"], "y")
    model.net.Copy("x", "y")  # y exists before the If (the branch overwrites it)
    brew.cond(model, "cond", ["x", "w", "y"], then_model, else_model)
    model.net.Scale("y", "out", scale=2.0)
    model.net.AddExternalOutput("out")
    return model.net


@pytest.mark.parametrize("cond", [True, False])
@pytest.mark.parametrize("with_else", [True, False])
@pytest.mark.parametrize("wrt", ["x", "w"])
def test_if_gradient_matches_finite_differences(cond, with_else, wrt):
    net = _if_model(with_else)
    values = {"x": X, "w": W, "cond": np.array(cond)}
    grad, _ = NetGradientChecker.Check(net, [0], values, wrt, step_size=1e-3, threshold=1e-2)
    if wrt == "w" and not cond:
        np.testing.assert_array_equal(grad, 0)  # the branch not taken: zero, as Caffe2
    assert not workspace.HasBlob("t")  # the branch's blobs stay out of the workspace


def test_if_gradient_op_in_the_training_net():
    net = _if_model(with_else=True)
    grads = net.AddGradientOperators(["out"])
    types = [op.type for op in net.Proto().op]
    assert "IfGradient" in types and str(grads["x"]) == "x_grad"
    workspace.FeedBlob("x", X)
    workspace.FeedBlob("w", W)
    workspace.FeedBlob("cond", np.array(True))
    workspace.RunNetOnce(net)
    t = np.tanh(X * W)
    np.testing.assert_allclose(workspace.FetchBlob("w_grad"), 2 * (1 - t ** 2) * X, rtol=1e-5)


def test_net_builder_if_else_backpropagates():
    with NetBuilder(initial_scope=["x", "w", "cond", "y"]) as nb:
        with ops.IfNet("cond"):
            ops.Mul(["x", "w"], "h")
            ops.Sigmoid("h", "y")
        with ops.Else():
            ops.Sub(["x", "w"], "y")
    net = core.Net("nb_if")
    for n in nb.get():
        net.AppendNet(n)
    net.AddExternalOutput("y")
    for cond in (True, False):
        values = {"x": X, "w": W, "cond": np.array(cond), "y": np.zeros_like(X)}
        NetGradientChecker.Check(net, [0], values, "w", step_size=1e-3, threshold=1e-2)


def _loop_net(steps):
    """h <- tanh(h * w) for ``steps`` iterations (brew.loop, counter i against n)."""
    model = model_helper.ModelHelper(name="loop_grad")
    body = model_helper.ModelHelper(name="body")
    body.net.Mul(["h", "w"], "hw")
    body.net.Tanh("hw", "h")
    body.net.Add(["acc", "h"], "acc")      # acc sums the states: a second carried blob
    body.net.Add(["i", "one"], "i")
    body.net.LT(["i", "n"], "go")
    model.net.Copy("h0", "h")
    model.net.ConstantFill("h0", "acc", value=0.0)
    model.net.LT(["i0", "n"], "go")
    model.net.Copy("i0", "i")
    brew.loop(model, "go", ["h", "w", "acc", "i", "one", "n", "go"], body)
    model.net.AddExternalOutput("acc")
    return model.net, {"h0": X, "w": W, "i0": np.array([0.0], np.float32),
                       "one": np.array([1.0], np.float32),
                       "n": np.array([float(steps)], np.float32)}


@pytest.mark.parametrize("steps", [0, 1, 3])
@pytest.mark.parametrize("wrt", ["h0", "w"])
def test_while_gradient_matches_finite_differences(steps, wrt):
    net, values = _loop_net(steps)
    grad, _ = NetGradientChecker.Check(net, [0], values, wrt, step_size=1e-3, threshold=1e-2)
    if steps == 0:
        np.testing.assert_array_equal(grad, 0)


def test_while_gradient_by_hand_for_two_iterations():
    net, values = _loop_net(2)
    grads = net.AddGradientOperators(["acc"])
    for k, v in values.items():
        workspace.FeedBlob(k, v)
    workspace.RunNetOnce(net)
    h1 = np.tanh(X * W)
    h2 = np.tanh(h1 * W)
    # acc = h1 + h2; d acc / d w = dh1/dw + dh2/dw
    dh1 = (1 - h1 ** 2) * X
    dh2 = (1 - h2 ** 2) * (dh1 * W + h1)
    np.testing.assert_allclose(workspace.FetchBlob(grads["w"]), dh1 + dh2, rtol=1e-5)
    np.testing.assert_allclose(workspace.FetchBlob("acc"), h1 + h2, rtol=1e-6)


def test_while_net_of_net_builder_backpropagates():
    with NetBuilder(initial_scope=["x", "w", "i0", "one", "n"]) as nb:
        ops.Copy("x", "h")
        ops.Copy("i0", "i")
        with ops.WhileNet():
            with ops.Condition():
                ops.LT(["i", "n"], "go")
            ops.Mul(["h", "w"], "h")
            ops.Add(["i", "one"], "i")
    net = core.Net("nb_while")
    for n in nb.get():
        net.AppendNet(n)
    net.AddExternalOutput("h")
    values = {"x": X, "w": W, "i0": np.array([0.0], np.float32),
              "one": np.array([1.0], np.float32), "n": np.array([3.0], np.float32)}
    grad, _ = NetGradientChecker.Check(net, [0], values, "w", step_size=1e-3, threshold=1e-2)
    np.testing.assert_allclose(grad, 3 * W ** 2 * X ** 2 * W ** 3, rtol=1e-4)


def test_if_gradient_before_its_forward_says_so():
    net = _if_model(with_else=True)
    net.AddGradientOperators(["out"])
    grad_only = core.Net("grad_only")
    grad_only.Proto().op.extend(op for op in net.Proto().op if op.type == "IfGradient")
    workspace.FeedBlob("cond", np.array(True))
    for name in ("x", "w", "y", "out_grad", "y_grad"):
        workspace.FeedBlob(name, X)
    with pytest.raises(RuntimeError, match="forward If op, which has not run"):
        workspace.RunNetOnce(grad_only)
