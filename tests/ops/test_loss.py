"""Loss and metric ops (LabelCrossEntropy, AveragedLoss, SoftmaxWithLoss, Accuracy) vs PyTorch."""
import math

import numpy as np
import pytest
import torch

from caffe2torch.python import core, workspace

from .helpers import DEVICES, check_op, rand


pytestmark = pytest.mark.usefixtures("fresh_workspace")


def labels(*shape, d=5, seed=0):
    return np.random.default_rng(seed).integers(0, d, shape).astype(np.int32)


def xent_reference(x, label):
    x2 = x.reshape(1, -1) if x.dim() == 1 else x
    return -torch.log(x2.gather(1, label.reshape(-1, 1).long()).reshape(-1))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("x_shape, label_shape", [((6, 5), (6,)), ((6, 5), (6, 1)), ((5,), (1,))])
def test_label_cross_entropy(x_shape, label_shape, device):
    inputs = {"X": rand(*x_shape, low=0.05, high=1.0), "label": labels(*label_shape)}
    check_op("LabelCrossEntropy", inputs, ["Y"], {}, xent_reference, device=device)


def test_label_cross_entropy_clamps_at_1e_20():
    """−log(max(p, 1e-20)): a zero probability costs 46.05, and its gradient is −dY/1e-20."""
    workspace.FeedBlob("X", np.array([[0.0, 1.0], [0.5, 0.5]], dtype=np.float32))
    workspace.FeedBlob("label", np.array([0, 1], dtype=np.int32))
    workspace.FeedBlob("dY", np.array([1e-21, 2.0], dtype=np.float32))
    workspace.RunOperatorsOnce([
        core.CreateOperator("LabelCrossEntropy", ["X", "label"], ["Y"]),
        core.CreateOperator("LabelCrossEntropyGradient", ["X", "label", "dY"], ["dX"])])
    np.testing.assert_allclose(workspace.FetchBlob("Y"), [-math.log(1e-20), math.log(2)], rtol=1e-6)
    np.testing.assert_allclose(workspace.FetchBlob("dX"), [[-0.1, 0.0], [0.0, -4.0]], rtol=1e-6)


def test_label_cross_entropy_label_out_of_range_is_a_clear_error():
    workspace.FeedBlob("X", rand(2, 3))
    workspace.FeedBlob("label", np.array([0, 3], dtype=np.int32))
    with pytest.raises(RuntimeError, match=r"labels must lie in \[0, 3\)"):
        workspace.RunOperatorOnce(core.CreateOperator("LabelCrossEntropy", ["X", "label"], ["Y"]))


def test_label_cross_entropy_float_label_is_a_clear_error():
    workspace.FeedBlob("X", rand(2, 3))
    workspace.FeedBlob("label", np.array([0.0, 1.0]))
    with pytest.raises(RuntimeError, match="must be an integer tensor"):
        workspace.RunOperatorOnce(core.CreateOperator("LabelCrossEntropy", ["X", "label"], ["Y"]))


@pytest.mark.parametrize("shape", [(7,), (3, 4), (2, 3, 4)])
def test_averaged_loss(shape):
    check_op("AveragedLoss", {"X": rand(*shape)}, ["loss"], {}, lambda x: x.sum() / x.numel())
    assert workspace.FetchBlob("loss").shape == ()  # a 0-d scalar, as Caffe2's


def softmax_loss_reference(scale=1.0, label_prob=False):
    def forward(x, label, weight=None):
        log_p = torch.log_softmax(x, 1)
        if label_prob:
            per_row = -(log_p * label).sum(1)
        else:
            per_row = -log_p.gather(1, label.reshape(-1, 1).long()).reshape(-1)
        w = torch.ones_like(per_row) if weight is None else weight
        return log_p.exp(), scale * (per_row * w).sum() / w.sum()
    return forward


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("args", [{}, dict(scale=0.5)])
@pytest.mark.parametrize("weighted", [False, True])
def test_softmax_with_loss(args, weighted, device):
    inputs = {"X": rand(6, 5, low=-3, high=3), "label": labels(6)}
    if weighted:
        inputs["weight"] = rand(6, seed=3, low=0.1, high=2.0)
    check_op("SoftmaxWithLoss", inputs, ["P", "loss"], args,
             softmax_loss_reference(args.get("scale", 1.0)), grad_outputs=["loss"],
             no_grad_inputs=("weight",) if weighted else (), device=device)


def test_softmax_with_loss_label_prob():
    target = np.random.default_rng(1).dirichlet(np.ones(5), 6)
    check_op("SoftmaxWithLoss", {"X": rand(6, 5), "label": target}, ["P", "loss"],
             dict(label_prob=1), softmax_loss_reference(label_prob=True), grad_outputs=["loss"],
             no_grad_inputs=("label",))


def test_softmax_with_loss_zero_total_weight_gives_zero():
    workspace.FeedBlob("X", rand(3, 4))
    workspace.FeedBlob("label", labels(3, d=4))
    workspace.FeedBlob("weight", np.zeros(3))
    workspace.RunOperatorOnce(core.CreateOperator("SoftmaxWithLoss", ["X", "label", "weight"],
                                                  ["P", "loss"]))
    assert workspace.FetchBlob("loss") == 0.0


def test_softmax_with_loss_gradient_inputs_follow_caffe2():
    net = core.Net("swl")
    net.SoftmaxWithLoss(["X", "label", "weight"], ["P", "loss"])
    net.AddGradientOperators(["loss"])
    grad = net.Proto().op[-1]
    assert grad.type == "SoftmaxWithLossGradient"
    assert list(grad.input) == ["X", "label", "weight", "P", "loss_autogen_grad"]
    assert list(grad.output) == ["X_grad"]


def run_accuracy(pred, label, **args):
    workspace.FeedBlob("pred", np.asarray(pred, dtype=np.float32))
    workspace.FeedBlob("label", np.asarray(label, dtype=np.int32))
    workspace.RunOperatorOnce(core.CreateOperator("Accuracy", ["pred", "label"], ["acc"], **args))
    out = workspace.FetchBlob("acc")
    assert out.shape == () and out.dtype == np.float32
    return float(out)


def test_accuracy_top1():
    pred = [[0.1, 0.7, 0.2], [0.5, 0.3, 0.2], [0.2, 0.2, 0.6], [0.3, 0.4, 0.3]]
    assert run_accuracy(pred, [1, 0, 1, 2]) == 0.5


def test_accuracy_tie_rule():
    """A tie counts against the label only for classes with a smaller index."""
    pred = [[0.4, 0.4, 0.2], [0.4, 0.4, 0.2], [0.2, 0.4, 0.4]]
    # Row 0: label 0 ties with class 1 (larger index): correct. Row 1: label 1 ties with class 0
    # (smaller index): ranked second, wrong. Row 2: label 2 ties with class 1: wrong.
    assert run_accuracy(pred, [0, 1, 2]) == pytest.approx(1 / 3)
    assert run_accuracy(pred, [0, 1, 2], top_k=2) == 1.0


def test_accuracy_top_k():
    pred = np.array([[0.1, 0.2, 0.3, 0.4]] * 4)
    assert run_accuracy(pred, [3, 2, 1, 0], top_k=1) == 0.25
    assert run_accuracy(pred, [3, 2, 1, 0], top_k=3) == 0.75


def test_accuracy_stops_backpropagation():
    net = core.Net("acc")
    net.Accuracy(["pred", "label"], "acc")
    net.AveragedLoss("acc", "loss")
    grads = net.AddGradientOperators(["loss"])
    assert "pred" not in grads and "acc" in grads
    assert [op.type for op in net.Proto().op[2:]] == ["ConstantFill", "AveragedLossGradient"]
