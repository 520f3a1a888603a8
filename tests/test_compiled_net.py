"""The "compiled" net type: equal to eager over a short training run, side effects outside the
compiled region, a split around an op torch.compile cannot trace, inductor's cache."""
import logging

import numpy as np
import pytest
from caffe2torch.ops import registry
from caffe2torch.python import core, workspace
from caffe2torch.python.compiled import schedule

ITERS = 12
PARAMS = ["conv_w", "conv_b", "fc_w", "fc_b"]


def _train_net(net_type):
    """Conv → MaxPool → FC → Softmax → loss, gradients, Iter/LR and SGD, Print and Summarize."""
    net = core.Net(f"tiny_train_{net_type}")
    net.Conv(["data", "conv_w", "conv_b"], "conv", kernel=3)
    net.MaxPool("conv", "pool", kernel=2, stride=2)
    net.FC(["pool", "fc_w", "fc_b"], "pred")
    net.Softmax("pred", "softmax")
    net.LabelCrossEntropy(["softmax", "label"], "xent")
    net.AveragedLoss("xent", "loss")
    net.Accuracy(["softmax", "label"], "accuracy")
    net.AddGradientOperators(["loss"])
    net.Iter("iter", "iter")
    net.LearningRate("iter", "LR", base_lr=-0.5, policy="step", stepsize=1, gamma=0.99)
    for param in PARAMS:
        net.WeightedSum([param, "ONE", param + "_grad", "LR"], param)
    net.Print("loss", [], to_file=1)
    net.Summarize("fc_w", [], to_file=1)
    net.Proto().type = net_type
    return net


def _feed():
    rng = np.random.default_rng(0)
    workspace.FeedBlob("data", rng.standard_normal((4, 1, 8, 8)).astype(np.float32))
    workspace.FeedBlob("label", np.array([0, 1, 2, 1], np.int32))
    workspace.FeedBlob("conv_w", (0.3 * rng.standard_normal((2, 1, 3, 3))).astype(np.float32))
    workspace.FeedBlob("conv_b", np.zeros(2, np.float32))
    workspace.FeedBlob("fc_w", (0.3 * rng.standard_normal((3, 18))).astype(np.float32))
    workspace.FeedBlob("fc_b", np.zeros(3, np.float32))
    workspace.FeedBlob("ONE", np.ones(1, np.float32))
    workspace.FeedBlob("iter", np.zeros(1, np.int64))


def _train(root, net_type):
    """Run the tiny training net ITERS times in workspace ``net_type``: losses, params, files."""
    workspace.SwitchWorkspace(net_type, create_if_missing=True)
    workspace.ResetWorkspace(str(root))
    _feed()
    net = _train_net(net_type)
    workspace.CreateNet(net)
    losses = []
    for _ in range(ITERS):
        workspace.RunNet(net.Name())
        losses.append(float(workspace.FetchBlob("loss")))
    prepared = workspace.C().nets[net.Name()]
    result = {
        "losses": np.array(losses),
        "params": {p: workspace.FetchBlob(p) for p in PARAMS},
        "data_grad": workspace.FetchBlob("data_grad"),
        "loss_log": (root / "loss.log").read_text().splitlines(),
        "summary": (root / "fc_w.summary").read_text().splitlines(),
        "regions": prepared.compiled.regions if prepared.compiled else None,
        "eager_steps": prepared.compiled.eager_steps if prepared.compiled else None,
        "compile_seconds": prepared.compile_seconds,
        "direct": [(p.direct, len(p.variants)) for p in prepared.compiled.parts
                   if not isinstance(p, list)] if prepared.compiled else None,
    }
    workspace.ResetWorkspace()
    workspace.SwitchWorkspace("default")
    return result


@pytest.fixture(scope="module")
def runs(tmp_path_factory, monkeypatch_module):
    """The same training run as a "simple" net and as a "compiled" net (compiled once)."""
    monkeypatch_module.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path_factory.mktemp("inductor")))
    return {t: _train(tmp_path_factory.mktemp(t), t) for t in ("simple", "compiled")}


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def test_compiled_training_equals_eager(runs):
    # Bit for bit: the ops whose fused code rounds differently (softmax, sums, mean, log, SGD's
    # addcmul) keep ATen's kernels inside the compiled graph.
    eager, compiled = runs["simple"], runs["compiled"]
    np.testing.assert_array_equal(compiled["losses"], eager["losses"])
    assert eager["losses"][-1] < eager["losses"][0]  # it did learn
    for param in PARAMS:
        np.testing.assert_array_equal(compiled["params"][param], eager["params"][param],
                                      err_msg=param)
    # the first conv's data gradient (no op reads it) is still there when fetched
    np.testing.assert_allclose(compiled["data_grad"], eager["data_grad"], rtol=1e-5, atol=1e-7)
    # on the CPU the region is compiled directly (make_fx + inductor), once
    assert compiled["direct"] == [(True, 1)]


def test_side_effect_ops_stay_outside_one_compiled_region(runs):
    compiled = runs["compiled"]
    # Iter and LearningRate move ahead of the forward pass: the rest is a single region
    assert compiled["eager_steps"] == ["Iter", "LearningRate", "Print", "Summarize"]
    assert len(compiled["regions"]) == 1
    assert compiled["regions"][0][:2] == ["Conv", "MaxPool"]
    assert compiled["regions"][0][-4:] == ["WeightedSum"] * 4
    assert runs["compiled"]["compile_seconds"] > 0
    assert runs["simple"]["compile_seconds"] == 0.0


def test_compiled_bookkeeping_files_match_eager(runs):
    eager, compiled = runs["simple"], runs["compiled"]
    assert len(compiled["loss_log"]) == len(compiled["summary"]) == ITERS
    assert [line.rsplit(": ", 1)[0] for line in compiled["loss_log"]] == \
        ["Tensor loss of type float. Dims: ()"] * ITERS
    got = np.array([[float(v) for v in line.split()] for line in compiled["summary"]])
    want = np.array([[float(v) for v in line.split()] for line in eager["summary"]])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


def test_recompiling_the_same_net_hits_inductors_cache(runs, tmp_path):
    from torch._dynamo.utils import counters
    before = counters["inductor"]["fxgraph_cache_hit"]
    again = _train(tmp_path, "compiled")
    assert counters["inductor"]["fxgraph_cache_hit"] > before
    np.testing.assert_allclose(again["losses"], runs["compiled"]["losses"], rtol=1e-6)


def test_op_that_cannot_be_traced_runs_eagerly(fresh_workspace, monkeypatch, caplog):
    schema = registry.get_schema("Relu")
    relu = schema.forward

    def relu_with_host_branch(ctx, inputs):
        """A Relu that reads a value on the host: torch.compile breaks its graph there."""
        if float(inputs[0].sum()) > 1e30:
            raise AssertionError("unreachable")
        return relu(ctx, inputs)

    monkeypatch.setattr(schema, "forward", relu_with_host_branch)
    x = np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4)
    workspace.FeedBlob("x", x)
    net = core.Net("breaks")
    net.Scale("x", "s", scale=2.0)
    net.Relu("s", "r")
    net.Scale("r", "y", scale=3.0)
    net.Proto().type = "compiled"
    workspace.CreateNet(net)
    with caplog.at_level(logging.WARNING, logger="caffe2torch"):
        for _ in range(3):
            workspace.RunNet(net.Name())
    np.testing.assert_allclose(workspace.FetchBlob("y"), 6 * np.maximum(x, 0), rtol=1e-6)
    compiled = workspace.C().nets[net.Name()].compiled
    assert compiled.eager_steps == ["Relu"]
    assert compiled.regions == [["Scale"], ["Scale"]]
    assert "cannot trace op #1 Relu" in caplog.text


class _FakeStep:
    def __init__(self, name, inputs, outputs):
        self.name, self.inputs, self.outputs = name, inputs, outputs


def test_schedule_moves_eager_ops_only_past_ops_they_share_no_blob_with():
    steps = [_FakeStep("db", [], ["x"]),          # eager
             _FakeStep("fwd", ["x", "w"], ["y"]),
             _FakeStep("grad", ["y", "w"], ["g"]),
             _FakeStep("iter", ["it"], ["it"]),     # eager, independent: moves up
             _FakeStep("lr", ["it"], ["lr"]),       # eager
             _FakeStep("sgd", ["w", "g", "lr"], ["w"]),
             _FakeStep("print", ["y"], []),        # eager, reads y: after fwd
             _FakeStep("summ", ["w"], [])]         # eager, reads w after sgd
    eager = [s.name in ("db", "iter", "lr", "print", "summ") for s in steps]
    order = [s.name for s in schedule(steps, eager)]
    assert order == ["db", "iter", "lr", "fwd", "grad", "sgd", "print", "summ"]


def test_compile_mode_is_read_from_the_netdef(fresh_workspace):
    workspace.FeedBlob("x", np.ones((2, 2), np.float32))
    net = core.Net("tuned")
    net.Scale("x", "y", scale=2.0)
    net.Proto().type = "compiled"
    net.Proto().arg.add(name="compile_mode", s=b"max-autotune-no-cudagraphs")
    workspace.CreateNet(net)
    assert workspace.C().nets[net.Name()].compiled.mode == "max-autotune-no-cudagraphs"


def test_direct_region_compiles_again_for_a_new_batch_size(fresh_workspace):
    rng = np.random.default_rng(1)
    workspace.FeedBlob("w", rng.standard_normal((3, 5)).astype(np.float32))
    workspace.FeedBlob("b", rng.standard_normal(3).astype(np.float32))
    nets = {}
    for net_type in ("simple", "compiled"):
        net = core.Net(f"predict_{net_type}")
        net.FC(["x", "w", "b"], "fc_" + net_type)
        net.Sigmoid("fc_" + net_type, "y_" + net_type)
        net.ConstantFill("y_" + net_type, "ones_" + net_type, value=1.0)
        net.Sub(["ones_" + net_type, "y_" + net_type], "z_" + net_type)
        net.Proto().type = net_type
        nets[net_type] = net
    workspace.FeedBlob("x", rng.standard_normal((4, 5)).astype(np.float32))
    for net in nets.values():
        workspace.CreateNet(net)
    for batch in (4, 4, 4, 7, 7, 4):
        workspace.FeedBlob("x", rng.standard_normal((batch, 5)).astype(np.float32))
        for net in nets.values():
            workspace.RunNet(net.Name())
        # inductor's sigmoid may differ from ATen's in the last bit
        np.testing.assert_allclose(workspace.FetchBlob("z_compiled"),
                                   workspace.FetchBlob("z_simple"), rtol=1e-6, atol=1e-7)
        assert workspace.FetchBlob("z_compiled").shape == (batch, 3)
    region = workspace.C().nets[nets["compiled"].Name()].compiled.parts[0]
    assert region.direct and len(region.variants) == 2  # one per batch size


def test_direct_region_hands_over_to_torch_compile_past_its_keys(fresh_workspace, monkeypatch):
    from caffe2torch.python import compiled

    monkeypatch.setattr(compiled, "_MAX_KEYS", 1)
    net = core.Net("many_shapes")
    net.Scale("x", "y", scale=3.0)
    net.Proto().type = "compiled"
    workspace.FeedBlob("x", np.ones((2, 2), np.float32))
    workspace.CreateNet(net)
    region = workspace.C().nets[net.Name()].compiled.parts[0]
    for rows in (2, 2, 5, 5, 3):
        x = np.arange(rows * 2, dtype=np.float32).reshape(rows, 2)
        workspace.FeedBlob("x", x)
        workspace.RunNet(net.Name())
        np.testing.assert_array_equal(workspace.FetchBlob("y"), 3 * x)
    assert not region.direct and region.variants == {}


@pytest.mark.parametrize("w0", [1.0, 0.5])
def test_compiled_in_place_weighted_sum_equals_eager(w0):
    """A compiled WeightedSum updating X0 in place (one opaque op in the graph) gives the simple
    net's bits, with w0 = ONE (the SGD case, no multiply) or another weight, and several pairs;
    the update stays in place (the blob is the same tensor after the runs)."""
    rng = np.random.default_rng(7)
    values = {"p": rng.standard_normal((5, 4)).astype(np.float32),
              "g": rng.standard_normal((5, 4)).astype(np.float32),
              "h": rng.standard_normal((5, 4)).astype(np.float32),
              "W0": np.full(1, w0, np.float32), "LR": np.full(1, -0.1, np.float32),
              "TWO": np.full(1, 2.0, np.float32)}
    results = {}
    for net_type in ("simple", "compiled"):
        workspace.ResetWorkspace()
        for name, value in values.items():
            workspace.FeedBlob(name, value)
        net = core.Net(f"sgd_{net_type}")
        net.Scale("g", "g2", scale=1.5)
        net.WeightedSum(["p", "W0", "g2", "LR", "h", "TWO"], "p")
        net.Proto().type = net_type
        workspace.CreateNet(net)
        before = workspace.FetchTorch("p")
        for _ in range(4):
            workspace.RunNet(net.Name())
        assert workspace.FetchTorch("p") is before
        results[net_type] = workspace.FetchBlob("p")
        if net_type == "compiled":
            assert workspace.C().nets[net.Name()].compiled.regions == [["Scale", "WeightedSum"]]
    np.testing.assert_array_equal(results["compiled"], results["simple"])


def test_direct_region_rechecks_inputs_that_change_under_the_same_blob(fresh_workspace):
    """A predict region reuses its last function while its inputs keep dtype, shape and strides
    (a fast check); a blob changed in place, transposed, re-typed or given a new shape in the
    same tensor object (``.data``) is caught and gets the right function."""
    net = core.Net("rechecked")
    net.Scale("x", "y", scale=2.0)
    net.Relu("y", "z")
    net.Proto().type = "compiled"
    x = np.arange(-6, 6, dtype=np.float32).reshape(3, 4)
    workspace.FeedBlob("x", x)
    workspace.CreateNet(net)
    region = workspace.C().nets[net.Name()].compiled.parts[0]

    def run_and_check(expected_input):
        workspace.RunNet(net.Name())
        np.testing.assert_array_equal(workspace.FetchBlob("z"), np.maximum(2 * expected_input, 0))

    for _ in range(3):
        run_and_check(x)
    assert region.last is not None
    blob = workspace.FetchTorch("x")
    blob.mul_(-1)  # in place: same shape, new values
    run_and_check(-x)
    blob.data = blob.data.reshape(4, 3)  # same object, same storage, another shape
    run_and_check(-x.reshape(4, 3))
    workspace.FeedBlob("x", x.T.copy().T)  # same shape, transposed strides
    run_and_check(x)
    workspace.FeedBlob("x", x.astype(np.float64))
    run_and_check(x)
    assert len(region.variants) == 4  # (3,4), (4,3), the transposed strides, float64
