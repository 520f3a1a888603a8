"""Elementwise math, activations, comparisons, logic and distances vs PyTorch."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from caffe2torch.python import core, workspace

from .helpers import DEVICES, check_op, rand

pytestmark = pytest.mark.usefixtures("fresh_workspace")

SELU_ALPHA, SELU_SCALE = 1.6732632423543772848170429916717, 1.0507009873554804934193349852946

UNARY = [  # op, args, torch reference, (low, high) of the inputs, differentiable
    ("Abs", {}, torch.abs, (-1, 1), True),
    ("Exp", {}, torch.exp, (-1, 1), True),
    ("Log", {}, torch.log, (0.5, 2), True),
    ("Sqrt", {}, torch.sqrt, (0.5, 2), True),
    ("Sqr", {}, lambda x: x * x, (-1, 1), True),
    ("Sin", {}, torch.sin, (-3, 3), True),
    ("Cos", {}, torch.cos, (-3, 3), True),
    ("Negative", {}, torch.neg, (-1, 1), True),
    ("Reciprocal", {}, torch.reciprocal, (0.5, 2), True),
    ("Rsqrt", {}, torch.rsqrt, (0.5, 2), True),
    ("Erf", {}, torch.erf, (-2, 2), True),
    ("Sign", {}, torch.sign, (-1, 1), False),
    ("Floor", {}, torch.floor, (-3, 3), False),
    ("Ceil", {}, torch.ceil, (-3, 3), False),
    ("Swish", {}, lambda x: x * torch.sigmoid(x), (-3, 3), True),
    ("Softplus", {}, F.softplus, (-3, 3), True),
    ("Softsign", {}, F.softsign, (-3, 3), True),
    ("Elu", {}, F.elu, (-2, 2), True),
    ("Elu", dict(alpha=0.3), lambda x: F.elu(x, 0.3), (-2, 2), True),
    ("Selu", {}, F.selu, (-2, 2), True),
    ("Selu", dict(alpha=1.2, scale=0.9),
     lambda x: 0.9 * torch.where(x > 0, x, 1.2 * torch.expm1(x)), (-2, 2), True),
    ("LeakyRelu", {}, lambda x: F.leaky_relu(x, 0.01), (-2, 2), True),
    ("LeakyRelu", dict(alpha=0.2), lambda x: F.leaky_relu(x, 0.2), (-2, 2), True),
    ("HardSigmoid", {}, lambda x: torch.clamp(0.2 * x + 0.5, 0, 1), (-4, 4), True),
    ("HardSigmoid", dict(alpha=0.5, beta=0.25), lambda x: torch.clamp(0.5 * x + 0.25, 0, 1),
     (-3, 3), True),
    ("Gelu", {}, F.gelu, (-3, 3), True),
    ("Gelu", dict(fast_gelu=1), lambda x: F.gelu(x, approximate="tanh"), (-3, 3), True),
    ("Pow", dict(exponent=3.0), lambda x: x ** 3, (-2, 2), True),
    ("Pow", dict(exponent=0.5), torch.sqrt, (0.5, 2), True),
    ("Pow", dict(exponent=-2.0), lambda x: x ** -2, (0.5, 2), True),
    ("Cube", {}, lambda x: x ** 3, (-2, 2), True),
    ("Cbrt", {}, lambda x: torch.sign(x) * x.abs() ** (1 / 3), (0.2, 2), True),
    ("Tan", {}, torch.tan, (-1, 1), True),
    ("Asin", {}, torch.asin, (-0.9, 0.9), True),
    ("Acos", {}, torch.acos, (-0.9, 0.9), True),
    ("Atan", {}, torch.atan, (-3, 3), True),
    ("Sinh", {}, torch.sinh, (-2, 2), True),
    ("Cosh", {}, torch.cosh, (-2, 2), True),
    ("Log1p", {}, torch.log1p, (-0.5, 2), True),
    ("Logit", {}, torch.logit, (0.05, 0.95), True),
    ("Logit", dict(eps=0.1), lambda x: torch.logit(x, 0.1), (0.2, 0.8), True),
    ("ReluN", {}, lambda x: torch.clamp(x, 0, 6), (-8, 8), True),
    ("ReluN", dict(n=1.5), lambda x: torch.clamp(x, 0, 1.5), (-3, 3), True),
]


@pytest.mark.parametrize("op_type, args, fn, bounds, differentiable", UNARY,
                         ids=[f"{u[0]}{'-' + '-'.join(map(str, u[1].values())) if u[1] else ''}"
                              for u in UNARY])
@pytest.mark.parametrize("shape", [(3, 4), (2, 3, 5)])
def test_unary(op_type, args, fn, bounds, differentiable, shape):
    check_op(op_type, {"X": rand(*shape, low=bounds[0], high=bounds[1])}, ["Y"], args, fn,
             grad=differentiable)


@pytest.mark.parametrize("op_type, fn", [("Relu", None), ("Exp", torch.exp), ("Sqr", None),
                                         ("LeakyRelu", None), ("Gelu", F.gelu)])
@pytest.mark.parametrize("device", DEVICES)
def test_unary_on_every_device(op_type, fn, device):
    fns = {"Relu": torch.relu, "Sqr": lambda x: x * x, "LeakyRelu": lambda x: F.leaky_relu(x, 0.01)}
    check_op(op_type, {"X": rand(4, 5)}, ["Y"], {}, fn or fns[op_type], device=device)


def test_leaky_relu_in_place():
    check_op("LeakyRelu", {"X": rand(3, 4)}, ["X"], dict(alpha=0.1), lambda x: F.leaky_relu(x, 0.1))


@pytest.mark.parametrize("x_shape, e_shape, args", [
    ((3, 4), (3, 4), {}),
    ((3, 4), (1,), {}),                                  # one exponent value
    ((2, 3, 4), (4,), dict(broadcast=1)),                # legacy broadcast, last dims
    ((2, 3, 4), (3,), dict(broadcast=1, axis=1)),
])
def test_pow_with_a_tensor_exponent(x_shape, e_shape, args):
    def reference(x, e):
        if args.get("broadcast"):
            axis = args.get("axis", x.dim() - e.dim())
            e = e.reshape([1] * axis + list(e.shape) + [1] * (x.dim() - axis - e.dim()))
        return x ** e
    check_op("Pow", {"X": rand(*x_shape, low=0.5, high=2),
                     "E": rand(*e_shape, seed=1, low=-1.5, high=2.5)}, ["Y"], args, reference,
             rtol=1e-6)


@pytest.mark.parametrize("op_type, fn", [("Max", torch.maximum), ("Min", torch.minimum),
                                         ("Mean", None)])
@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("device", DEVICES)
def test_variadic(op_type, fn, n, device):
    inputs = {f"X{i}": rand(3, 4, seed=i) for i in range(n)}

    def reference(*xs):
        if fn is None:
            return sum(xs) / len(xs)
        out = xs[0]
        for x in xs[1:]:
            out = fn(out, x)
        return out * 1.0
    check_op(op_type, inputs, ["Y"], {}, reference, device=device)


def test_max_gradient_goes_to_every_tie():
    x = np.array([1.0, 2.0, 3.0])
    workspace.FeedBlob("a", x)
    workspace.FeedBlob("b", np.array([1.0, 5.0, 0.0]))
    net = core.Net("ties")
    net.Max(["a", "b"], "y")
    grads = net.AddGradientOperators({"y": "dy"})
    workspace.FeedBlob("dy", np.array([10.0, 20.0, 30.0]))
    workspace.RunNetOnce(net)
    assert workspace.FetchBlob(grads["a"]).tolist() == [10.0, 0.0, 30.0]
    assert workspace.FetchBlob(grads["b"]).tolist() == [10.0, 20.0, 0.0]


@pytest.mark.parametrize("x_shape, slope_shape, order", [
    ((2, 3, 4, 5), (3,), "NCHW"), ((2, 3, 4, 5), (1,), "NCHW"), ((2, 4, 5, 3), (3,), "NHWC"),
    ((4, 3), (3,), "NCHW")])
@pytest.mark.parametrize("device", DEVICES)
def test_prelu(x_shape, slope_shape, order, device):
    def reference(x, w):
        if w.numel() > 1:
            shape = [1] * x.dim()
            shape[x.dim() - 1 if order == "NHWC" else 1] = -1
            w = w.reshape(shape)
        return torch.where(x > 0, x, x * w)
    check_op("PRelu", {"X": rand(*x_shape), "W": rand(*slope_shape, seed=1, low=0, high=0.5)},
             ["Y"], dict(order=order), reference, device=device)


COMPARE = {"LT": torch.lt, "LE": torch.le, "GT": torch.gt, "GE": torch.ge, "EQ": torch.eq,
           "NE": torch.ne}


@pytest.mark.parametrize("op_type", list(COMPARE))
@pytest.mark.parametrize("a_shape, b_shape, args", [
    ((3, 4), (3, 4), {}), ((2, 3, 4), (4,), {}), ((2, 1, 4), (3, 1), {}),
    ((2, 3, 4), (3,), dict(broadcast=1, axis=1))])
def test_comparisons(op_type, a_shape, b_shape, args):
    a = np.round(rand(*a_shape) * 2) / 2        # halves, so that EQ and the ≤ ties happen
    b = np.round(rand(*b_shape, seed=1) * 2) / 2

    def reference(x, y):
        if args.get("broadcast"):
            y = y.reshape([1, -1, 1])
        return COMPARE[op_type](x, y)
    out = check_op(op_type, {"A": a, "B": b}, ["C"], args, reference, grad=False)
    assert out is None and workspace.FetchBlob("C").dtype == np.bool_


@pytest.mark.parametrize("op_type, fn", [("And", torch.logical_and), ("Or", torch.logical_or),
                                         ("Xor", torch.logical_xor)])
@pytest.mark.parametrize("device", DEVICES)
def test_logic(op_type, fn, device):
    a, b = rand(3, 4) > 0, rand(4, seed=1) > 0
    check_op(op_type, {"A": a, "B": b}, ["C"], {}, fn,
             grad=False, device=device)
    check_op("Not", {"A": a}, ["C"], {}, lambda x: ~x, grad=False, device=device)


def test_logic_ops_reject_non_bool_inputs():
    workspace.FeedBlob("A", rand(2))
    workspace.FeedBlob("B", rand(2))
    with pytest.raises(RuntimeError, match="takes bool tensors.*Cast them with to=BOOL"):
        workspace.RunOperatorOnce(core.CreateOperator("And", ["A", "B"], ["C"]))


@pytest.mark.parametrize("a_shape, b_shape, axis", [((2, 3, 4), (3, 4), -1), ((2, 3, 4), (3,), 1),
                                                    ((2, 3, 4), (1,), -1), ((2, 3), (2, 3), -1)])
def test_sum_reduce_like(a_shape, b_shape, axis):
    def reference(a, b):
        start = a.dim() - b.dim() if axis == -1 else axis
        dims = [d for d in range(a.dim()) if not start <= d < start + b.dim()]
        out = a.sum(dims) if dims else a
        return out.reshape(b.shape) if b.numel() > 1 else a.sum().reshape(b.shape)
    check_op("SumReduceLike", {"A": rand(*a_shape), "B": rand(*b_shape)}, ["C"],
             {} if axis == -1 else dict(axis=axis), reference, grad=False)


@pytest.mark.parametrize("average", [0, 1])
def test_sum_sqr_elements(average):
    check_op("SumSqrElements", {"X": rand(3, 4)}, ["Y"], dict(average=average),
             lambda x: (x * x).sum() / (x.numel() if average else 1), grad=False)


DISTANCES = {
    "DotProduct": lambda x, y: (x * y).sum(1),
    "CosineSimilarity": lambda x, y: F.cosine_similarity(x, y, 1, eps=1e-30),
    "SquaredL2Distance": lambda x, y: 0.5 * ((x - y) ** 2).sum(1),
    "L1Distance": lambda x, y: (x - y).abs().sum(1),
}


@pytest.mark.parametrize("op_type", list(DISTANCES))
@pytest.mark.parametrize("shape", [(4, 3), (2, 3, 2), (5,)])
@pytest.mark.parametrize("device", DEVICES)
def test_rowwise_distances(op_type, shape, device):
    fn = DISTANCES[op_type]
    n = shape[0]
    check_op(op_type, {"X": rand(*shape), "Y": rand(*shape, seed=1)}, ["Z"], {},
             lambda x, y: fn(x.reshape(n, -1), y.reshape(n, -1)), device=device)


def test_cosine_similarity_of_a_zero_row_is_zero():
    x = np.zeros((1, 3))
    check_op("CosineSimilarity", {"X": x, "Y": rand(1, 3)}, ["Z"], {},
             lambda a, b: torch.zeros(1, dtype=a.dtype), grad=False)


@pytest.mark.parametrize("x_cols, y_cols, args", [(3, 5, {}), (5, 3, dict(pad_value=0.5)),
                                                  (2, 6, dict(replicate=1)), (4, 4, {})])
def test_dot_product_with_padding(x_cols, y_cols, args):
    def reference(x, y):
        short, long_ = (x, y) if x_cols <= y_cols else (y, x)
        d = long_.shape[1]
        if args.get("replicate"):
            short = short.repeat(1, d // short.shape[1])
        else:
            short = F.pad(short, [0, d - short.shape[1]], value=args.get("pad_value", 0.0))
        return (short * long_).sum(1)
    check_op("DotProductWithPadding", {"X": rand(3, x_cols), "Y": rand(3, y_cols, seed=1)}, ["Z"],
             args, reference)


def test_exp_log_gradients_are_caffe2s_ops():
    net = core.Net("grads")
    net.Exp("x", "e")
    net.Log("e", "l")
    net.Sqrt("l", "s")
    net.AddGradientOperators({"s": "ds"})
    types = [op.type for op in net.Proto().op[3:]]
    assert types == ["Scale", "Div", "Div", "Mul"]
    x = rand(3, low=0.5, high=1.5)
    workspace.FeedBlob("x", x)
    workspace.FeedBlob("ds", np.ones(3))
    workspace.RunNetOnce(net)
    np.testing.assert_allclose(workspace.FetchBlob("x_grad"), 0.5 / np.sqrt(x), rtol=1e-12)
    assert math.isclose(float(workspace.FetchBlob("s")[0]), math.sqrt(x[0]), rel_tol=1e-12)


def test_pow_in_place_gradient_follows_caffe2():
    """In place, Caffe2's Pow gradient takes Y^((e − 1)/e) = X^(e − 1) (positive X)."""
    check_op("Pow", {"X": rand(3, 4, low=0.5, high=2)}, ["X"], dict(exponent=3.0),
             lambda x: x ** 3)


def test_logit_clamps_to_eps():
    check_op("Logit", {"X": np.array([0.0, 0.5, 1.0])}, ["Y"], dict(eps=0.01),
             lambda x: torch.logit(x, 0.01), grad=False)


@pytest.mark.parametrize("follow", [0, 1])
def test_mod(follow):
    x = np.array([-7, -3, 0, 4, 9], np.int64)
    expected = np.mod(x, 4) if follow else np.fmod(x, 4)
    check_op("Mod", {"X": x}, ["Y"], dict(divisor=4, sign_follow_divisor=follow),
             lambda t: torch.tensor(expected), grad=False)


@pytest.mark.parametrize("op_type, fn", [("BitwiseAnd", torch.bitwise_and),
                                         ("BitwiseOr", torch.bitwise_or),
                                         ("BitwiseXor", torch.bitwise_xor)])
def test_bitwise(op_type, fn):
    a = np.arange(12, dtype=np.int32).reshape(3, 4)
    b = np.array([1, 2, 4, 7], np.int32)
    check_op(op_type, {"A": a, "B": b}, ["C"], {}, fn, grad=False)


@pytest.mark.parametrize("shape, axis", [((4, 3), 1), ((2, 3, 4), 2), ((2, 3, 2), 1)])
@pytest.mark.parametrize("device", DEVICES)
def test_elementwise_linear(shape, axis, device):
    d = int(np.prod(shape[axis:]))
    check_op("ElementwiseLinear", {"X": rand(*shape), "a": rand(d, seed=1), "b": rand(d, seed=2)},
             ["Y"], dict(axis=axis),
             lambda x, a, b: (x.reshape(-1, d) * a + b).reshape(shape), device=device)
