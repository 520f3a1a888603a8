"""math ops (Scale, Sum, WeightedSum, Add/Sub/Mul/Div, MatMul) vs PyTorch."""
import math

import numpy as np
import pytest
import torch

from caffe2torch.python import core, workspace

from .helpers import DEVICES, check_op, rand


pytestmark = pytest.mark.usefixtures("fresh_workspace")


@pytest.mark.parametrize("args, factor", [({}, 1.0), (dict(scale=0.00390625), 0.00390625),
                                          (dict(scale=-2.5), -2.5)])
def test_scale(args, factor):
    check_op("Scale", {"X": rand(3, 4)}, ["Y"], args, lambda x: x * factor)


def test_scale_in_place_and_its_gradient_op():
    grads = check_op("Scale", {"X": rand(3, 4)}, ["X"], dict(scale=2.0), lambda x: x * 2)
    assert str(grads["X"]) == "X_grad"


def test_scale_of_uint8_gives_float_like_the_tutorial():
    """The tutorial casts uint8 pixels to float, then scales by 1/256."""
    workspace.FeedBlob("data_uint8", np.array([[0, 128, 255]], dtype=np.uint8))
    workspace.RunOperatorsOnce([
        core.CreateOperator("Cast", ["data_uint8"], ["data"], to=1),
        core.CreateOperator("Scale", ["data"], ["data"], scale=0.00390625)])
    out = workspace.FetchBlob("data")
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, [[0.0, 0.5, 255 / 256]])


@pytest.mark.parametrize("n", [1, 2, 3])
def test_sum(n):
    inputs = {f"X{i}": rand(2, 3, seed=i) for i in range(n)}
    grads = check_op("Sum", inputs, ["Y"], {}, lambda *xs: sum(xs))
    # Caffe2's Sum gradient is a pass-through: every input's gradient is the blob dY itself.
    assert all(str(grads[name]) == "Y_upstream" for name in inputs)


@pytest.mark.parametrize("device", DEVICES)
def test_weighted_sum(device):
    inputs = {"X0": rand(3, 4), "w0": np.array([0.5]), "X1": rand(3, 4, seed=1),
              "w1": np.array(-2.0), "X2": rand(3, 4, seed=2), "w2": np.array([[3.0]])}
    check_op("WeightedSum", inputs, ["Y"], {},
             lambda x0, w0, x1, w1, x2, w2: x0 * w0[0] + x1 * w1 + x2 * w2[0, 0],
             no_grad_inputs=("w0", "w1", "w2"), device=device)


def test_weighted_sum_updates_x0_in_place():
    """The SGD update WeightedSum([p, ONE, p_grad, LR], p) writes into p's own storage."""
    p, g = rand(5, 3), rand(5, 3, seed=1)
    workspace.FeedBlob("p", p)
    workspace.FeedBlob("g", g)
    workspace.FeedBlob("ONE", np.array([1.0]))
    workspace.FeedBlob("LR", np.array(-0.1))
    before = workspace.FetchTorch("p")
    workspace.RunOperatorOnce(core.CreateOperator("WeightedSum", ["p", "ONE", "g", "LR"], ["p"]))
    assert workspace.FetchTorch("p") is before
    np.testing.assert_allclose(workspace.FetchBlob("p"), p - 0.1 * g, rtol=1e-15)


def test_weighted_sum_rejects_in_place_on_a_later_input():
    workspace.FeedBlob("a", rand(2))
    workspace.FeedBlob("b", rand(2))
    workspace.FeedBlob("w", np.array([1.0]))
    with pytest.raises(ValueError, match="only X0 may be updated in place"):
        workspace.RunOperatorOnce(core.CreateOperator("WeightedSum", ["a", "w", "b", "w"], ["b"]))


BINARY = {"Add": torch.add, "Sub": torch.sub, "Mul": torch.mul, "Div": torch.div}


def legacy_view(b, a_dim, axis):
    """B placed at ``axis`` of an a_dim-D tensor, as Caffe2's broadcast=1 does."""
    axis = a_dim - b.dim() if axis == -1 else axis
    return b.reshape([1] * axis + list(b.shape) + [1] * (a_dim - axis - b.dim()))


@pytest.mark.parametrize("op_type", list(BINARY))
@pytest.mark.parametrize("a_shape, b_shape, args", [
    ((3, 4), (3, 4), {}),
    ((2, 3, 4), (4,), {}),               # numpy broadcasting of B
    ((2, 1, 4), (3, 1), {}),             # numpy broadcasting of both
    ((4,), (2, 4), {}),                  # numpy broadcasting of A
    ((2, 3, 4, 5), (4, 5), dict(broadcast=1)),          # legacy: B matches A's last dims
    ((2, 3, 4, 5), (3, 4), dict(broadcast=1, axis=1)),  # legacy: B matches A at axis 1
    ((2, 3, 4, 5), (3, 1), dict(broadcast=1, axis=1)),  # legacy with a 1 in B
    ((2, 3), (1,), dict(broadcast=1)),                  # legacy scalar-like B
])
def test_binary(op_type, a_shape, b_shape, args):
    inputs = {"A": rand(*a_shape), "B": rand(*b_shape, seed=1, low=0.5, high=1.5)}
    legacy = args.get("broadcast", 0)
    fn = BINARY[op_type]
    check_op(op_type, inputs, ["C"], args,
             lambda a, b: fn(a, legacy_view(b, a.dim(), args.get("axis", -1)) if legacy else b))


@pytest.mark.parametrize("op_type", list(BINARY))
def test_binary_with_itself(op_type):
    """Mul(x, x): both gradient contributions reach x (HEMT's predict net squares this way)."""
    fn = BINARY[op_type]
    inputs = {"X": rand(3, 4, low=0.5, high=1.5)}
    net = core.Net("self_binary")
    net.Proto().op.extend([core.CreateOperator(op_type, ["X", "X"], ["Y"])])
    grads = net.AddGradientOperators({"Y": "dY"})
    dy = rand(3, 4, seed=2)
    workspace.FeedBlob("X", inputs["X"])
    workspace.FeedBlob("dY", dy)
    workspace.RunNetOnce(net)
    x = torch.tensor(inputs["X"], requires_grad=True)
    (fn(x, x) * torch.tensor(dy)).sum().backward()
    np.testing.assert_allclose(workspace.FetchBlob(grads["X"]), x.grad.numpy(), rtol=1e-12,
                               atol=1e-12)


def test_legacy_broadcast_mismatch_is_a_clear_error():
    workspace.FeedBlob("A", rand(2, 3))
    workspace.FeedBlob("B", rand(4))
    with pytest.raises(RuntimeError, match="does not match A"):
        workspace.RunOperatorOnce(core.CreateOperator("Add", ["A", "B"], ["C"], broadcast=1))


@pytest.mark.parametrize("a_shape, b_shape, args", [
    ((3, 4), (4, 5), {}),
    ((4, 3), (4, 5), dict(trans_a=1)),
    ((3, 4), (5, 4), dict(trans_b=1)),   # HEMT's MatMul(x, w, trans_b=1)
    ((4, 3), (5, 4), dict(trans_a=1, trans_b=1)),
    ((2, 3, 4), (12, 5), {}),            # A flattened at axis_a=1 -> [2, 12]
    ((2, 3, 4), (4, 5), dict(axis_a=2)),
    ((3, 8), (2, 3, 8), dict(axis_b=2, trans_b=1)),
])
def test_matmul(a_shape, b_shape, args):
    def reference(a, b):
        axis_a, axis_b = args.get("axis_a", 1), args.get("axis_b", 1)
        a2 = a.reshape(math.prod(a.shape[:axis_a]), -1)
        b2 = b.reshape(math.prod(b.shape[:axis_b]), -1)
        return (a2.t() if args.get("trans_a") else a2) @ (b2.t() if args.get("trans_b") else b2)
    check_op("MatMul", {"A": rand(*a_shape), "B": rand(*b_shape, seed=1)}, ["Y"], args, reference)


def test_matmul_inner_dimension_mismatch_is_a_clear_error():
    workspace.FeedBlob("A", rand(3, 4))
    workspace.FeedBlob("B", rand(5, 4))
    with pytest.raises(RuntimeError, match="different inner dimensions 4 and 5"):
        workspace.RunOperatorOnce(core.CreateOperator("MatMul", ["A", "B"], ["Y"]))
