"""Registry invariants, the generated ops table, and gradient construction across several ops."""
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from caffe2torch.ops import registry
from caffe2torch.python import core, workspace

ROOT = Path(__file__).resolve().parents[1]


def load_generator():
    path = ROOT / "tools" / "gen_ops_table.py"
    spec = importlib.util.spec_from_file_location("gen_ops_table", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


pytestmark = pytest.mark.usefixtures("fresh_workspace")


# --- Registry invariants ------------------------------------------------------------------------

def test_every_op_has_a_gradient_maker_or_says_it_has_none():
    missing = [s.type for s in registry.all_schemas()
               if s.gradient is None and not s.type.endswith("Gradient")]
    assert missing == [], f"ops with neither a gradient maker nor NO_GRADIENT: {missing}"


def test_every_gradient_maker_is_documented_and_emits_registered_ops():
    for schema in registry.all_schemas():
        if not schema.differentiable:
            continue
        doc = (schema.gradient.__doc__ or "").strip()
        assert doc, f"the gradient maker of {schema.type} has no docstring (docs/ops.md shows it)"
        emitted = doc.split("(", 1)[0]
        if not emitted.startswith("No op"):
            assert registry.is_registered(emitted), f"{schema.type}'s gradient emits {emitted}"


def test_every_op_has_a_one_line_doc():
    assert [s.type for s in registry.all_schemas() if not s.doc] == []


def test_the_ops_the_tutorial_and_the_real_nets_use_are_registered():
    needed = {"Cast", "Scale", "StopGradient", "Conv", "MaxPool", "FC", "Relu", "Softmax",
              "LabelCrossEntropy", "AveragedLoss", "Accuracy", "Iter", "LearningRate",
              "WeightedSum", "ConstantFill", "XavierFill", "Print", "Summarize", "MatMul", "Add",
              "Sub", "Mul", "Sigmoid", "Tanh", "GivenTensorFill", "Concat", "Dropout",
              "AveragePool", "SpatialBN", "Sum", "CreateMutex", "AtomicIter"}
    assert needed - set(registry.registered_ops()) == set()


def test_unknown_op_names_it_and_suggests_close_names():
    with pytest.raises(registry.UnknownOperatorError) as info:
        registry.get_schema("Convv")
    assert "'Convv'" in str(info.value) and "Did you mean Conv" in str(info.value)
    with pytest.raises(AttributeError, match=r"Method MaxPol is not a registered operator.*MaxPool"):
        core.Net("unknown").MaxPol("x", "y")


def test_registering_twice_raises():
    with pytest.raises(ValueError, match="'Relu' is registered twice"):
        registry.register_op("Relu")(lambda ctx, inputs: inputs)
    assert registry.get_schema("Relu").family == "nn"


def test_committed_ops_table_matches_the_registry():
    generator = load_generator()
    committed = generator.OUTPUT.read_text(encoding="utf-8") if generator.OUTPUT.exists() else ""
    assert committed == generator.render(), (
        f"docs/ops.md is stale: regenerate it with `{generator.COMMAND}` and commit it")


# --- Gradient construction ----------------------------------------------------------------------

def run_and_compare(net, feeds, loss_fn, wrt, grads):
    """Run ``net`` on ``feeds`` and compare the gradients of ``wrt`` with torch.autograd."""
    for name, value in feeds.items():
        workspace.FeedBlob(name, value)
    workspace.RunNetOnce(net)
    tensors = {name: torch.tensor(value, requires_grad=True) for name, value in feeds.items()}
    loss_fn(**tensors).backward()
    for name in wrt:
        np.testing.assert_allclose(workspace.FetchBlob(grads[name]), tensors[name].grad.numpy(),
                                   rtol=1e-10, atol=1e-12, err_msg=name)


def rand(*shape, seed=0):
    return np.random.default_rng(seed).uniform(-1, 1, shape)


def test_blob_used_by_two_ops_gets_autosplit_gradients_summed():
    net = core.Net("two_consumers")
    net.FC(["x", "w", "b"], "h")
    net.Relu("h", "a")
    net.Sigmoid("h", "s")
    net.Mul(["a", "s"], "y")
    net.AveragedLoss("y", "loss")
    grads = net.AddGradientOperators(["loss"])
    assert [(op.type, list(op.input), list(op.output)) for op in net.Proto().op[6:]] == [
        ("AveragedLossGradient", ["y", "loss_autogen_grad"], ["y_grad"]),
        ("MulGradient", ["y_grad", "a", "s"], ["a_grad", "s_grad"]),
        ("SigmoidGradient", ["s", "s_grad"], ["_h_grad_autosplit_0"]),
        ("ReluGradient", ["a", "a_grad"], ["_h_grad_autosplit_1"]),
        ("Sum", ["_h_grad_autosplit_0", "_h_grad_autosplit_1"], ["h_grad"]),
        ("FCGradient", ["x", "w", "h_grad"], ["w_grad", "b_grad", "x_grad"]),
    ]
    assert str(grads["h"]) == "h_grad"

    def loss_fn(x, w, b):
        h = x @ w.t() + b
        return (torch.relu(h) * torch.sigmoid(h)).mean()
    run_and_compare(net, {"x": rand(4, 3), "w": rand(5, 3, seed=1), "b": rand(5, seed=2)},
                    loss_fn, ["x", "w", "b"], grads)


def test_pass_through_gradient_meets_an_autosplit():
    """Sum's gradient is dY itself; summed with another consumer's gradient into <blob>_grad."""
    net = core.Net("residual")
    net.FC(["x", "w", "b"], "h")
    net.Tanh("h", "t")
    net.Sum(["t", "h"], "y")
    net.AveragedLoss("y", "loss")
    grads = net.AddGradientOperators(["loss"])
    sum_op = [op for op in net.Proto().op if op.type == "Sum"][-1]
    assert list(sum_op.input) == ["y_grad", "_h_grad_autosplit_1"]
    assert list(sum_op.output) == ["h_grad"]

    def loss_fn(x, w, b):
        h = x @ w.t() + b
        return (torch.tanh(h) + h).mean()
    run_and_compare(net, {"x": rand(4, 3), "w": rand(5, 3, seed=1), "b": rand(5, seed=2)},
                    loss_fn, ["x", "w", "b"], grads)


def test_in_place_ops_backpropagate_through_every_version():
    """Scale and Relu overwrite h in place; the gradient ops follow each version of h."""
    net = core.Net("in_place")
    net.FC(["x", "w", "b"], "h")
    net.Scale("h", "h", scale=3.0)
    net.Relu("h", "h")
    net.Sigmoid("h", "y")
    net.AveragedLoss("y", "loss")
    grads = net.AddGradientOperators(["loss"])
    assert [(op.type, list(op.input), list(op.output)) for op in net.Proto().op[6:]] == [
        ("AveragedLossGradient", ["y", "loss_autogen_grad"], ["y_grad"]),
        ("SigmoidGradient", ["y", "y_grad"], ["h_grad"]),
        ("ReluGradient", ["h", "h_grad"], ["h_grad"]),
        ("Scale", ["h_grad"], ["h_grad"]),
        ("FCGradient", ["x", "w", "h_grad"], ["w_grad", "b_grad", "x_grad"]),
    ]

    def loss_fn(x, w, b):
        return torch.sigmoid(torch.relu((x @ w.t() + b) * 3.0)).mean()
    run_and_compare(net, {"x": rand(4, 3), "w": rand(5, 3, seed=1), "b": rand(5, seed=2)},
                    loss_fn, ["x", "w", "b"], grads)


def test_lenet_gradient_sequence_follows_caffe2():
    """CAFFE2_SPEC section 5: the ten gradient ops of the tutorial's LeNet, in order."""
    net = core.Net("lenet")
    net.Conv(["data", "conv1_w", "conv1_b"], "conv1", kernel=5)
    net.MaxPool("conv1", "pool1", kernel=2, stride=2)
    net.Conv(["pool1", "conv2_w", "conv2_b"], "conv2", kernel=5)
    net.MaxPool("conv2", "pool2", kernel=2, stride=2)
    net.FC(["pool2", "fc3_w", "fc3_b"], "fc3")
    net.Relu("fc3", "relu3")
    net.FC(["relu3", "pred_w", "pred_b"], "pred")
    net.Softmax("pred", "softmax")
    net.LabelCrossEntropy(["softmax", "label"], "xent")
    net.AveragedLoss("xent", "loss")
    net.Accuracy(["softmax", "label"], "accuracy")
    net.AddGradientOperators(["loss"])
    grad_ops = [(op.type, list(op.output)) for op in net.Proto().op[12:]]
    assert grad_ops == [
        ("AveragedLossGradient", ["xent_grad"]),
        ("LabelCrossEntropyGradient", ["softmax_grad"]),
        ("SoftmaxGradient", ["pred_grad"]),
        ("FCGradient", ["pred_w_grad", "pred_b_grad", "relu3_grad"]),
        ("ReluGradient", ["fc3_grad"]),
        ("FCGradient", ["fc3_w_grad", "fc3_b_grad", "pool2_grad"]),
        ("MaxPoolGradient", ["conv2_grad"]),
        ("ConvGradient", ["conv2_w_grad", "conv2_b_grad", "pool1_grad"]),
        ("MaxPoolGradient", ["conv1_grad"]),
        ("ConvGradient", ["conv1_w_grad", "conv1_b_grad", "data_grad"]),
    ]
