"""Reductions (Reduce*, ReduceFront*/ReduceBack*, ArgMax/ArgMin) vs PyTorch."""
import math

import numpy as np
import pytest
import torch

from caffe2torch.python import core, workspace

from .helpers import DEVICES, check_op, rand

pytestmark = pytest.mark.usefixtures("fresh_workspace")

REDUCE = {
    "ReduceSum": lambda x, a, k: x.sum(a, k),
    "ReduceMean": lambda x, a, k: x.mean(a, k),
    "ReduceMax": lambda x, a, k: x.amax(a, k),
    "ReduceMin": lambda x, a, k: x.amin(a, k),
    "ReduceL1": lambda x, a, k: x.abs().sum(a, k),
    "ReduceL2": lambda x, a, k: x.pow(2).sum(a, k).sqrt(),
}


@pytest.mark.parametrize("op_type", list(REDUCE))
@pytest.mark.parametrize("axes, keepdims", [(None, 1), (None, 0), ([1], 1), ([0, 2], 0),
                                            ([-1], 0)])
def test_reduce(op_type, axes, keepdims):
    shape = (2, 3, 4)
    args = dict(keepdims=keepdims)
    if axes is not None:
        args["axes"] = axes
    dims = tuple(range(3)) if axes is None else tuple(a % 3 for a in axes)
    check_op(op_type, {"X": rand(*shape)}, ["Y"], args,
             lambda x: REDUCE[op_type](x, dims, bool(keepdims)))


@pytest.mark.parametrize("op_type", ["ReduceSum", "ReduceMax", "ReduceL2"])
@pytest.mark.parametrize("device", DEVICES)
def test_reduce_on_every_device(op_type, device):
    check_op(op_type, {"X": rand(3, 5)}, ["Y"], dict(axes=[0]),
             lambda x: REDUCE[op_type](x, (0,), True), device=device)


def test_reduce_max_gradient_goes_to_every_tie():
    workspace.FeedBlob("x", np.array([[1.0, 3.0, 3.0]]))
    workspace.FeedBlob("dy", np.array([[2.0]]))
    net = core.Net("ties")
    net.ReduceMax("x", "y", axes=[1])
    grads = net.AddGradientOperators({"y": "dy"})
    workspace.RunNetOnce(net)
    assert workspace.FetchBlob(grads["x"]).tolist() == [[0.0, 2.0, 2.0]]


FRONT_BACK = {"Sum": torch.sum, "Mean": torch.mean, "Max": torch.amax}


@pytest.mark.parametrize("name", list(FRONT_BACK))
@pytest.mark.parametrize("front", [True, False])
@pytest.mark.parametrize("shape, n", [((4, 3), 1), ((2, 3, 4), 2), ((2, 3, 4), 1)])
def test_reduce_front_back(name, front, shape, n):
    op_type = f"Reduce{'Front' if front else 'Back'}{name}"
    dims = tuple(range(n)) if front else tuple(range(len(shape) - n, len(shape)))
    check_op(op_type, {"X": rand(*shape)}, ["Y"], dict(num_reduce_dim=n),
             lambda x: FRONT_BACK[name](x, dims))


@pytest.mark.parametrize("name", list(FRONT_BACK))
@pytest.mark.parametrize("front", [True, False])
@pytest.mark.parametrize("device", DEVICES)
def test_reduce_front_back_with_lengths(name, front, device):
    op_type = f"Reduce{'Front' if front else 'Back'}{name}"
    x = rand(4, 3)
    lengths = np.array([2, 4, 1], np.int32) if front else np.array([3, 1, 2, 2], np.int32)

    def reference(t, lens):
        cols = t.t() if front else t            # one reduced vector per row here
        parts = [FRONT_BACK[name](cols[j, :int(n)]) for j, n in enumerate(lens)]
        return torch.stack(parts)
    check_op(op_type, {"X": x, "lengths": lengths}, ["Y"], {}, reference, device=device)


def test_reduce_front_back_doc_examples():
    """Caffe2's documented examples: lengths count the values of each reduced vector."""
    x = np.array([[1, 5, 2, 9], [4, 1, 8, 2], [2, 7, 0, 3]], np.float32)
    workspace.FeedBlob("X", x)
    workspace.FeedBlob("L", np.array([2, 3, 1, 2], np.int32))
    workspace.RunOperatorOnce(core.CreateOperator("ReduceFrontMax", ["X", "L"], ["Y"]))
    assert workspace.FetchBlob("Y").tolist() == [4, 7, 2, 9]
    workspace.FeedBlob("L", np.array([2, 3, 1], np.int32))
    workspace.RunOperatorOnce(core.CreateOperator("ReduceBackMean", ["X", "L"], ["Y"]))
    np.testing.assert_allclose(workspace.FetchBlob("Y"), [3, 13 / 3, 2], rtol=1e-6)


@pytest.mark.parametrize("op_type, fn", [("ArgMax", torch.argmax), ("ArgMin", torch.argmin)])
@pytest.mark.parametrize("axis, keepdims", [(None, 1), (0, 0), (1, 1), (-2, 0)])
@pytest.mark.parametrize("device", DEVICES)
def test_arg_extremes(op_type, fn, axis, keepdims, device):
    args = dict(keepdims=keepdims)
    if axis is not None:
        args["axis"] = axis
    out = check_op(op_type, {"X": rand(3, 4, 5)}, ["Y"], args,
                   lambda x: fn(x, -1 if axis is None else axis, bool(keepdims)), grad=False,
                   device=device)
    assert out is None and workspace.FetchBlob("Y").dtype == np.int64


def test_arg_max_takes_the_first_of_ties():
    workspace.FeedBlob("X", np.array([[1.0, 4.0, 4.0, 0.0]]))
    workspace.RunOperatorOnce(core.CreateOperator("ArgMax", ["X"], ["Y"]))
    assert workspace.FetchBlob("Y").tolist() == [[1]]
    assert math.prod(workspace.FetchBlob("Y").shape) == 1


@pytest.mark.parametrize("average", [0, 1])
def test_sum_elements(average):
    check_op("SumElements", {"X": rand(3, 4)}, ["Y"], dict(average=average),
             lambda x: x.mean() if average else x.sum())
    check_op("SumElementsInt", {"X": np.arange(6, dtype=np.int32)}, ["Y"], {},
             lambda x: torch.tensor(15, dtype=torch.int32), grad=False)


@pytest.mark.parametrize("op_type, axis", [("RowwiseMax", 2), ("ColwiseMax", 1)])
def test_rowwise_and_colwise_max(op_type, axis):
    check_op(op_type, {"X": rand(2, 3, 4)}, ["Y"], {}, lambda x: x.amax(axis))


@pytest.mark.parametrize("axes, keepdims", [(None, 1), ([0, 2], 0), ([1], 1)])
@pytest.mark.parametrize("outputs", [["mean", "var"], ["var"]])
def test_moments(axes, keepdims, outputs):
    args = dict(keepdims=keepdims)
    if axes is not None:
        args["axes"] = axes
    dims = tuple(range(3)) if axes is None else tuple(axes)

    def reference(x):
        var, mean = torch.var_mean(x, dims, correction=0, keepdim=bool(keepdims))
        return mean, var
    # With grad_outputs ["var"] only, the mean's gradient input is a zero fill.
    check_op("Moments", {"X": rand(2, 3, 4)}, ["mean", "var"], args, reference,
             grad_outputs=outputs)
