"""FCTransposed and BatchMatMul vs PyTorch."""
import numpy as np
import pytest
import torch

from caffe2torch.python import core, workspace

from .helpers import check_op, rand


pytestmark = pytest.mark.usefixtures("fresh_workspace")


@pytest.mark.parametrize("x_shape, w_shape, axis, bias", [
    ((4, 3), (3, 5), 1, True), ((2, 3, 4), (12, 2), 1, True), ((2, 3, 4), (4, 6), 2, False)])
def test_fc_transposed(x_shape, w_shape, axis, bias):
    inputs = {"X": rand(*x_shape), "W": rand(*w_shape, seed=1)}
    if bias:
        inputs["b"] = rand(w_shape[1], seed=2)

    def reference(x, w, b=None):
        y = x.reshape(int(torch.tensor(x.shape[:axis]).prod()), -1) @ w
        y = y if b is None else y + b
        return y.reshape(x.shape[:axis] + (w.shape[1],))
    check_op("FCTransposed", inputs, ["Y"], dict(axis=axis), reference)


@pytest.mark.parametrize("a_shape, b_shape, ta, tb", [
    ((3, 2, 4), (3, 4, 5), 0, 0), ((2, 4, 3), (2, 4, 5), 1, 0), ((3, 2, 4), (3, 5, 4), 0, 1),
    ((2, 2, 4, 3), (2, 2, 5, 4), 1, 1), ((3, 4), (4, 2), 0, 0)])
def test_batch_mat_mul(a_shape, b_shape, ta, tb):
    def reference(a, b):
        return torch.matmul(a.transpose(-1, -2) if ta else a, b.transpose(-1, -2) if tb else b)
    check_op("BatchMatMul", {"A": rand(*a_shape), "B": rand(*b_shape, seed=1)}, ["Y"],
             dict(trans_a=ta, trans_b=tb), reference)


def test_batch_mat_mul_same_input():
    """A·Aᵀ: both gradient contributions go to A's one gradient blob."""
    a = rand(2, 3, 3)
    net = core.Net("bmm_same")
    net.BatchMatMul(["A", "A"], "Y", trans_b=1)
    net.AddGradientOperators({"Y": "dY"})
    dy = rand(2, 3, 3, seed=4)
    workspace.FeedBlob("A", a)
    workspace.FeedBlob("dY", dy)
    workspace.RunNetOnce(net)
    t = torch.tensor(a, requires_grad=True)
    (t @ t.transpose(-1, -2)).backward(torch.tensor(dy))
    np.testing.assert_allclose(workspace.FetchBlob("A_grad"), t.grad.numpy(), rtol=1e-12)


@pytest.mark.parametrize("a_shape, b_shape", [((2, 3, 4), (4, 5)), ((4,), (2, 4, 3)),
                                              ((1, 3, 4), (2, 4, 2))])
def test_batch_mat_mul_broadcast(a_shape, b_shape):
    check_op("BatchMatMul", {"A": rand(*a_shape), "B": rand(*b_shape, seed=1)}, ["Y"],
             dict(broadcast=1), torch.matmul, grad=False)
    net = core.Net("bmm")
    net.BatchMatMul(["A", "B"], "Y", broadcast=1)
    with pytest.raises(ValueError, match="broadcast=1 is not supported"):
        net.AddGradientOperators({"Y": "dY"})


def test_batch_mat_mul_needs_equal_batches_without_broadcast():
    with pytest.raises(Exception, match="set broadcast=1"):
        check_op("BatchMatMul", {"A": rand(2, 3, 4), "B": rand(4, 5)}, ["Y"], {},
                 torch.matmul, grad=False)
