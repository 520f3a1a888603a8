"""Glue ops: Cast, StopGradient, Copy, Iter/AtomicIter, LearningRate, Print, Summarize."""
import os

import numpy as np
import pytest

from caffe2torch.python import core, workspace

from .helpers import check_op, rand


pytestmark = pytest.mark.usefixtures("fresh_workspace")


def run(op_type, inputs, outputs, **args):
    workspace.RunOperatorOnce(core.CreateOperator(op_type, inputs, outputs, **args))


# --- Cast ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("to, dtype", [(1, np.float32), ("float", np.float32), ("INT32", np.int32),
                                       ("Double", np.float64), (10, np.int64), ("uint8", np.uint8),
                                       ("bool", np.bool_)])
def test_cast(to, dtype):
    workspace.FeedBlob("X", np.array([[0.0, 1.0, 2.9]], dtype=np.float32))
    run("Cast", ["X"], ["Y"], to=to)
    out = workspace.FetchBlob("Y")
    assert out.dtype == dtype
    np.testing.assert_array_equal(out, np.array([[0.0, 1.0, 2.9]], dtype=np.float32).astype(dtype))


def test_cast_truncates_towards_zero():
    workspace.FeedBlob("X", np.array([-1.7, 1.7], dtype=np.float32))
    run("Cast", ["X"], ["Y"], to=core.DataType.INT32)
    np.testing.assert_array_equal(workspace.FetchBlob("Y"), [-1, 1])


def test_cast_unknown_type_is_a_clear_error():
    workspace.FeedBlob("X", rand(2))
    with pytest.raises(ValueError, match="'float33' is not a Caffe2 DataType"):
        run("Cast", ["X"], ["Y"], to="float33")


def test_cast_gradient_casts_back_with_from_type():
    grads = check_op("Cast", {"X": rand(3, 2)}, ["Y"], dict(to="float", from_type="double"),
                     lambda x: x.float(), atol=1e-6, rtol=1e-6)
    assert workspace.FetchBlob(grads["X"]).dtype == np.float64
    net = core.Net("cast_grad")
    net.Cast("X", "Y", to=1, from_type=13)
    net.AddGradientOperators({"Y": "dY"})
    grad = net.Proto().op[-1]
    assert grad.type == "Cast" and list(grad.input) == ["dY"] and list(grad.output) == ["X_grad"]
    assert {a.name: a.i for a in grad.arg} == {"to": 13, "from_type": 1}


def test_cast_gradient_needs_from_type():
    net = core.Net("cast_no_from")
    net.Cast("X", "Y", to=1)
    with pytest.raises(ValueError, match="needs argument 'from_type'"):
        net.AddGradientOperators({"Y": "dY"})


# --- StopGradient and Copy ----------------------------------------------------------------------

def test_stop_gradient_is_identity_and_blobs_never_alias():
    workspace.FeedBlob("X", rand(2, 3))
    run("StopGradient", ["X"], ["Y"])
    assert workspace.FetchTorch("Y") is not workspace.FetchTorch("X")
    np.testing.assert_array_equal(workspace.FetchBlob("Y"), workspace.FetchBlob("X"))
    before = workspace.FetchTorch("X")
    run("StopGradient", ["X"], ["X"])
    assert workspace.FetchTorch("X") is before


def test_stop_gradient_cuts_backpropagation():
    net = core.Net("stop")
    net.Relu("X", "H")
    net.StopGradient("H", "S")
    net.Sigmoid("S", "Y")
    grads = net.AddGradientOperators({"Y": "dY"})
    assert "S" in grads and "H" not in grads and "X" not in grads
    assert [op.type for op in net.Proto().op[3:]] == ["SigmoidGradient"]


def test_copy():
    check_op("Copy", {"X": rand(3, 4)}, ["Y"], {}, lambda x: x.clone())
    assert workspace.FetchTorch("Y") is not workspace.FetchTorch("X")


# --- Iteration counters -------------------------------------------------------------------------

def test_iter_counts_from_one():
    init, net = core.Net("iter_init"), core.Net("iter_net")
    init.ConstantFill([], "iter", shape=[1], value=0, dtype=core.DataType.INT64)
    net.Iter("iter", "iter")
    workspace.RunNetOnce(init)
    workspace.CreateNet(net)
    counter = workspace.FetchTorch("iter")
    seen = []
    for _ in range(3):
        workspace.RunNet(net.Name())
        seen.append(workspace.FetchBlob("iter").tolist())
    assert seen == [[1], [2], [3]]
    assert workspace.FetchTorch("iter") is counter  # incremented in place
    assert workspace.FetchBlob("iter").dtype == np.int64


def test_iter_old_form_without_input():
    net = core.Net("old_iter")
    net.Iter([], "it")
    workspace.CreateNet(net)
    workspace.RunNet(net.Name(), 2)
    assert workspace.FetchBlob("it").tolist() == [2]


@pytest.mark.parametrize("value, outputs, match", [
    (np.array([0.0], dtype=np.float32), ["iter"], "must be an int64 counter"),
    (np.array([0], dtype=np.int64), ["other"], "works in place"),
])
def test_iter_misuse_is_a_clear_error(value, outputs, match):
    workspace.FeedBlob("iter", value)
    with pytest.raises(Exception, match=match):
        run("Iter", ["iter"], outputs)


def test_atomic_iter_with_mutex():
    workspace.FeedBlob("optimizer_iteration", np.array([0], dtype=np.int64))
    net = core.Net("atomic")
    net.CreateMutex([], "iteration_mutex")
    net.AtomicIter(["iteration_mutex", "optimizer_iteration"], "optimizer_iteration")
    workspace.RunNetOnce(net)
    workspace.RunNetOnce(net)
    assert workspace.FetchBlob("optimizer_iteration").tolist() == [2]


# --- LearningRate -------------------------------------------------------------------------------

POLICIES = {
    "fixed": ({}, lambda it: 1.0),
    "step": (dict(stepsize=3, gamma=0.5), lambda it: 0.5 ** (it // 3)),
    "exp": (dict(gamma=0.999), lambda it: 0.999 ** it),
    "inv": (dict(gamma=0.1, power=0.75), lambda it: (1 + 0.1 * it) ** -0.75),
    "poly": (dict(max_iter=20, power=2.0), lambda it: (1 - it / 20) ** 2),
    "constantWarmup": (dict(multiplier=0.25, num_iter=5), lambda it: 0.25 if it < 5 else 1.0),
    "linearWarmup": (dict(start_multiplier=0.2, num_iter=5),
                     lambda it: 0.2 + 0.8 * it / 5 if it < 5 else 1.0),
}


@pytest.mark.parametrize("policy", list(POLICIES))
@pytest.mark.parametrize("it", [1, 4, 10])
def test_learning_rate(policy, it):
    args, f = POLICIES[policy]
    workspace.FeedBlob("iter", np.array([it], dtype=np.int64))
    run("LearningRate", ["iter"], ["lr"], base_lr=-0.1, policy=policy, **args)
    lr = workspace.FetchBlob("lr")
    assert lr.shape == () and lr.dtype == np.float32
    # Arguments are float32 in the proto (gamma=0.999 is 0.99900001...), hence the tolerance.
    assert lr == pytest.approx(-0.1 * f(it), rel=1e-5)


def test_learning_rate_tutorial_schedule():
    """The tutorial's step policy (stepsize=1, gamma=0.999) after Iter: lr = -0.1 * 0.999^iter."""
    init, net = core.Net("lr_init"), core.Net("lr_net")
    init.ConstantFill([], "iter", shape=[1], value=0, dtype=core.DataType.INT64)
    net.Iter("iter", "iter")
    net.LearningRate("iter", "LR", base_lr=-0.1, policy="step", stepsize=1, gamma=0.999)
    workspace.RunNetOnce(init)
    workspace.CreateNet(net)
    for it in range(1, 4):
        workspace.RunNet(net.Name())
        assert workspace.FetchBlob("LR") == pytest.approx(-0.1 * 0.999 ** it, rel=1e-6)


@pytest.mark.parametrize("args, match", [
    (dict(base_lr=0.1, policy="multistep"),
     r"unknown policy 'multistep'.*fixed, step, exp, inv, poly"),
    (dict(policy="fixed"), "needs argument 'base_lr'"),
    (dict(base_lr=0.1), "needs argument 'policy'"),
    (dict(base_lr=0.1, policy="step"), "needs argument 'stepsize'"),
])
def test_learning_rate_bad_arguments(args, match):
    workspace.FeedBlob("iter", np.array([1], dtype=np.int64))
    with pytest.raises(ValueError, match=match):
        run("LearningRate", ["iter"], ["lr"], **args)


# --- Print --------------------------------------------------------------------------------------

@pytest.mark.parametrize("value, line", [
    (np.array(0.046875, dtype=np.float32), "Tensor x of type float. Dims: (): 0.046875"),
    (np.array([[0.1, 1e-05, 123456789.0], [-0.000123, 1.5, -0.0]], dtype=np.float32),
     "Tensor x of type float. Dims: (2,3,): 0.1,1e-05,1.23457e+08,-0.000123,1.5,-0"),
    (np.array([1.0 / 3, 2.0]), "Tensor x of type double. Dims: (2,): 0.333333,2"),
    (np.array([[1, -2]], dtype=np.int32), "Tensor x of type int. Dims: (1,2,): 1,-2"),
    (np.array([7], dtype=np.int64), "Tensor x of type long. Dims: (1,): 7"),
    (np.array([0, 255], dtype=np.uint8), "Tensor x of type unsigned char. Dims: (2,): 0,255"),
    (np.array([True, False]), "Tensor x of type bool. Dims: (2,): 1,0"),
    (np.zeros((0, 3), dtype=np.float32), "Tensor x of type float. Dims: (0,3,): "),
])
def test_print_to_file(fresh_workspace, value, line):
    workspace.FeedBlob("x", value)
    run("Print", ["x"], [], to_file=1)
    assert (fresh_workspace / "x.log").read_text() == line + "\n"


def test_print_appends_per_run_and_truncates_at_create_net(fresh_workspace):
    log = fresh_workspace / "accuracy.log"
    log.write_text("left over from an earlier run\n")
    workspace.FeedBlob("accuracy", np.array(0.5, dtype=np.float32))
    net = core.Net("printer")
    net.Print("accuracy", [], to_file=1)
    workspace.CreateNet(net)
    assert log.read_text() == ""
    workspace.RunNet(net.Name(), 2)
    workspace.FeedBlob("accuracy", np.array(0.75, dtype=np.float32))
    workspace.RunNet(net.Name())
    assert log.read_text().splitlines() == [
        "Tensor accuracy of type float. Dims: (): 0.5",
        "Tensor accuracy of type float. Dims: (): 0.5",
        "Tensor accuracy of type float. Dims: (): 0.75"]


def test_print_limit_and_every_n(fresh_workspace):
    workspace.FeedBlob("v", np.arange(5, dtype=np.int32))
    net = core.Net("limited")
    net.Print("v", [], to_file=1, limit=3, every_n=2)
    workspace.CreateNet(net)
    for k in range(5):
        workspace.FeedBlob("v", np.arange(5, dtype=np.int32) + k)
        workspace.RunNet(net.Name())
    assert (fresh_workspace / "v.log").read_text().splitlines() == [
        "Tensor v of type int. Dims: (5,): 0,1,2",   # run 1
        "Tensor v of type int. Dims: (5,): 2,3,4",   # run 3
        "Tensor v of type int. Dims: (5,): 4,5,6"]   # run 5


def test_print_default_limit_is_1000(fresh_workspace):
    workspace.FeedBlob("big", np.zeros(1500, dtype=np.int64))
    run("Print", ["big"], [], to_file=1, limit=0)
    values = (fresh_workspace / "big.log").read_text().split("): ", 1)[1].strip().split(",")
    assert len(values) == 1000


def test_print_to_stdout(capsys):
    workspace.FeedBlob("loss", np.array(2.5, dtype=np.float32))
    run("Print", ["loss"], [])
    assert capsys.readouterr().out == "Tensor loss of type float. Dims: (): 2.5\n"


def test_print_file_is_closed_with_the_net(fresh_workspace):
    workspace.FeedBlob("a", np.array(1.0, dtype=np.float32))
    net = core.Net("closing")
    net.Print("a", [], to_file=1)
    workspace.CreateNet(net)
    handle = workspace.C().nets[net.Name()].steps[0].ctx.state["file"].file
    workspace.ResetWorkspace()
    assert handle.closed


# --- Summarize ----------------------------------------------------------------------------------

@pytest.mark.parametrize("values, line", [
    ([1, 2, 3, 4], "1 4 2.5 1.29099"),
    ([5], "5 5 5 0"),                                   # one value: std 0
    ([1e-05, 2e-05], "1e-05 2e-05 1.5e-05 7.07107e-06"),
    ([-0.000123, 1234567.0], "-0.000123 1.23457e+06 617283 872971"),
])
def test_summarize_to_file(fresh_workspace, values, line):
    workspace.FeedBlob("conv1_w", np.array(values, dtype=np.float32))
    run("Summarize", ["conv1_w"], [], to_file=1)
    assert (fresh_workspace / "conv1_w.summary").read_text() == line + "\n"


def test_summarize_file_name_and_output(fresh_workspace):
    x = rand(4, 5).astype(np.float32)
    workspace.FeedBlob("model/fc_w", x)
    net = core.Net("summaries")
    net.Summarize("model/fc_w", "stats", to_file=1)
    workspace.CreateNet(net)
    workspace.RunNet(net.Name(), 2)
    lines = (fresh_workspace / "model#fc_w.summary").read_text().splitlines()
    assert len(lines) == 2 and lines[0] == lines[1]
    stats = workspace.FetchBlob("stats")
    assert stats.dtype == np.float32 and stats.shape == (4,)
    np.testing.assert_allclose(stats, [x.min(), x.max(), x.mean(), x.std(ddof=1)], rtol=1e-6)
    assert [float(v) for v in lines[0].split()] == pytest.approx(
        [float("%g" % v) for v in stats], rel=1e-6)


def test_summarize_without_file_logs(caplog):
    workspace.FeedBlob("w", np.array([1.0, 3.0], dtype=np.float32))
    with caplog.at_level("INFO", logger="caffe2torch"):
        run("Summarize", ["w"], [])
    assert "Summary of w: 1 3 2 1.41421" in caplog.text
    assert not os.path.exists(os.path.join(workspace.RootFolder(), "w.summary"))


def test_utility_ops_have_no_gradient():
    for op_type in ("Iter", "LearningRate", "Print", "Summarize", "StopGradient"):
        net = core.Net(f"no_grad_{op_type}")
        net.Proto().op.extend([core.CreateOperator(op_type, ["X"], ["Y"], policy="fixed",
                                                   base_lr=1.0)])
        net.AveragedLoss("Y", "loss")
        grads = net.AddGradientOperators(["loss"])
        assert "X" not in grads, op_type



def test_device_copies_and_their_gradients():
    """CopyGPUToCPU / CopyCPUToGPU (brew.accuracy with top_k on a GPU uses them)."""
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    workspace.FeedBlob("x", x)
    net = core.Net("copies")
    net.CopyGPUToCPU("x", "x_host")
    net.CopyCPUToGPU("x_host", "x_dev")
    net.AveragedLoss("x_dev", "loss")
    net.AddGradientOperators(["loss"])
    types = [op.type for op in net.Proto().op]
    assert types[-2:] == ["CopyGPUToCPU", "CopyCPUToGPU"]  # each copy's gradient copies back
    workspace.RunNetOnce(net)
    np.testing.assert_array_equal(workspace.FetchBlob("x_dev"), x)
    assert workspace.FetchTorch("x_host").device.type == "cpu"
    np.testing.assert_allclose(workspace.FetchBlob("x_grad"), np.full_like(x, 1 / 6))
