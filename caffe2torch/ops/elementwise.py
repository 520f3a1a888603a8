"""Elementwise math, activations, comparisons, logic and row-wise distances.

Gradients follow Caffe2's makers: Exp's is ``Mul(Y, dY)``, Log's ``Div(dY, X)``, Sqr's and Sqrt's
a Scale then a Mul/Div, Pow's the chain of Pow/Mul/Scale (scalar exponent) or
ConstantFill/Sub/Pow/Mul/Log/SumReduceLike (tensor exponent); the others emit one
``<Op>Gradient`` whose inputs are those Caffe2 passes (X or Y, and dY). Comparisons (LT ... NE)
and logic (And, Or, Xor) broadcast like Add: numpy rules, or ``broadcast=1`` with ``axis``.
Sign, Floor, Ceil, comparisons, logic, SumReduceLike and SumSqrElements have no gradient.
"""
import math

import torch

from caffe2torch.ops._helpers import vjp
from caffe2torch.ops.math import _b_shape, _broadcast_setup
from caffe2torch.ops.registry import NO_GRADIENT, gradient_op, grad_name, register_op

aten = torch.ops.aten


def _maker(grad_type, inputs):
    """A maker emitting ``grad_type`` on ``inputs`` (names X, Y, dY, W) -> dX (and dW)."""
    def maker(op, g_output):
        names = {"X": op.input[0], "Y": op.output[0], "dY": g_output[0]}
        if len(op.input) > 1:
            names["W"] = op.input[1]
        outs = [grad_name(n) for n in op.input]
        return [gradient_op(op, grad_type, [names[n] for n in inputs.split(",")], outs)], outs
    maker.__doc__ = f"{grad_type}({inputs.replace(',', ', ')}) -> dX."
    return maker


def _unary(op_type, forward, doc, gradient=NO_GRADIENT, setup=None):
    def fn(ctx, inputs):
        return [forward(ctx, inputs[0])]
    fn.__doc__ = doc
    fn.__name__ = op_type
    register_op(op_type, gradient=gradient, setup=setup)(fn)


def _grad_op(op_type, backward, doc, setup=None):
    def fn(ctx, inputs):
        return [backward(ctx, *inputs)]
    fn.__doc__ = doc
    fn.__name__ = op_type
    register_op(op_type, setup=setup)(fn)


# --- Unary math ---------------------------------------------------------------------------------

_unary("Abs", lambda ctx, x: torch.abs(x), "Y = |X|.", _maker("AbsGradient", "X,dY"))
_grad_op("AbsGradient", lambda ctx, x, dy: dy * torch.sign(x), "(X, dY) -> dX = sign(X)·dY.")


def _exp_grad(op, g_output):
    """Mul(Y, dY) -> dX."""
    g = grad_name(op.input[0])
    return [gradient_op(op, "Mul", [op.output[0], g_output[0]], [g], copy_args=False)], [g]


_unary("Exp", lambda ctx, x: torch.exp(x), "Y = exp(X).", _exp_grad)


def _log_grad(op, g_output):
    """Div(dY, X) -> dX."""
    g = grad_name(op.input[0])
    return [gradient_op(op, "Div", [g_output[0], op.input[0]], [g], copy_args=False)], [g]


_unary("Log", lambda ctx, x: torch.log(x), "Y = ln(X).", _log_grad)


def _sqr_grad(op, g_output):
    """Scale(dY, scale=2), Mul(·, X) -> dX."""
    g = grad_name(op.input[0])
    return [gradient_op(op, "Scale", [g_output[0]], [g], copy_args=False, scale=2.0),
            gradient_op(op, "Mul", [g, op.input[0]], [g], copy_args=False)], [g]


_unary("Sqr", lambda ctx, x: x * x, "Y = X².", _sqr_grad)


def _sqrt_grad(op, g_output):
    """Scale(dY, scale=0.5), Div(·, Y) -> dX."""
    g = grad_name(op.input[0])
    return [gradient_op(op, "Scale", [g_output[0]], [g], copy_args=False, scale=0.5),
            gradient_op(op, "Div", [g, op.output[0]], [g], copy_args=False)], [g]


_unary("Sqrt", lambda ctx, x: torch.sqrt(x), "Y = √X.", _sqrt_grad)

_unary("Sin", lambda ctx, x: torch.sin(x), "Y = sin(X).", _maker("SinGradient", "X,dY"))
_grad_op("SinGradient", lambda ctx, x, dy: dy * torch.cos(x), "(X, dY) -> dX = cos(X)·dY.")
_unary("Cos", lambda ctx, x: torch.cos(x), "Y = cos(X).", _maker("CosGradient", "X,dY"))
_grad_op("CosGradient", lambda ctx, x, dy: -dy * torch.sin(x), "(X, dY) -> dX = −sin(X)·dY.")


def _negative_grad(op, g_output):
    """Negative(dY) -> dX."""
    g = grad_name(op.input[0])
    return [gradient_op(op, "Negative", [g_output[0]], [g])], [g]


_unary("Negative", lambda ctx, x: torch.neg(x), "Y = −X.", _negative_grad)
_unary("Reciprocal", lambda ctx, x: torch.reciprocal(x), "Y = 1/X.",
       _maker("ReciprocalGradient", "Y,dY"))
_grad_op("ReciprocalGradient", lambda ctx, y, dy: -dy * y * y, "(Y, dY) -> dX = −Y²·dY.")
_unary("Rsqrt", lambda ctx, x: torch.rsqrt(x), "Y = 1/√X.", _maker("RsqrtGradient", "dY,Y"))
_grad_op("RsqrtGradient", lambda ctx, dy, y: -0.5 * dy * y * y * y, "(dY, Y) -> dX = −Y³/2·dY.")
_unary("Sign", lambda ctx, x: torch.sign(x), "Y = sign(X) (−1, 0 or 1).")
_unary("Floor", lambda ctx, x: torch.floor(x), "Y = ⌊X⌋.")
_unary("Ceil", lambda ctx, x: torch.ceil(x), "Y = ⌈X⌉.")
_unary("Erf", lambda ctx, x: torch.erf(x), "Y = erf(X).", _maker("ErfGradient", "X,dY"))
_grad_op("ErfGradient", lambda ctx, x, dy: dy * (2 / math.sqrt(math.pi)) * torch.exp(-x * x),
         "(X, dY) -> dX = 2/√π·exp(−X²)·dY.")


# --- Pow ----------------------------------------------------------------------------------------

def _pow_grad(op, g_output):
    """Pow(X, exponent − 1), Mul(·, dY), Scale(·, exponent) -> dX; tensor exponents also dE."""
    args = {a.name: a for a in op.arg}
    x, y, dy = op.input[0], op.output[0], g_output[0]
    gx = grad_name(x)
    if "exponent" in args:
        e = args["exponent"].f if args["exponent"].HasField("f") else float(args["exponent"].i)
        power = e - 1.0
        if x == y:
            # In place, X now holds Y = X^e: Caffe2 takes Y^((e − 1)/e) (less precise).
            if abs(e) <= 1e-12:
                raise ValueError(f"the gradient of Pow({x!r}, exponent={e}) in place needs a "
                                 "non-zero exponent")
            power = (e - 1.0) / e
        return [gradient_op(op, "Pow", [x], [gx], copy_args=False, exponent=power),
                gradient_op(op, "Mul", [gx, dy], [gx], copy_args=False),
                gradient_op(op, "Scale", [gx], [gx], copy_args=False, scale=e)], [gx]
    exponent = op.input[1]
    if y in (x, exponent):
        raise ValueError("the gradient of Pow with a tensor exponent cannot be computed in place")
    ge = grad_name(exponent)
    pre = ge + "_autogen_pre_red"
    bargs = {k: a for k, a in args.items() if k in ("broadcast", "axis")}
    legacy = {k: (a.i if a.HasField("i") else a.s) for k, a in bargs.items()}
    axis = {"axis": legacy["axis"]} if "axis" in legacy else {}
    ops = [gradient_op(op, "ConstantFill", [exponent], [ge], copy_args=False, value=1.0),
           gradient_op(op, "Sub", [exponent, ge], [ge], copy_args=False),
           gradient_op(op, "Pow", [x, ge], [gx], copy_args=False, **legacy),
           gradient_op(op, "Mul", [gx, dy], [gx], copy_args=False),
           gradient_op(op, "Mul", [gx, exponent], [gx], copy_args=False, **legacy),
           gradient_op(op, "Log", [x], [pre], copy_args=False),
           gradient_op(op, "Mul", [pre, y], [pre], copy_args=False),
           gradient_op(op, "Mul", [pre, dy], [pre], copy_args=False),
           # Caffe2 reduces only with broadcast=1; reducing always also covers a one-value E.
           gradient_op(op, "SumReduceLike", [pre, exponent], [ge], copy_args=False, **axis)]
    return ops, [gx, ge]


@register_op("Pow", gradient=_pow_grad, setup=_broadcast_setup)
def pow_op(ctx, inputs):
    """Y = X^exponent: argument ``exponent``, or a tensor input (same shape, one value, broadcast=1)."""
    x = inputs[0]
    if len(inputs) == 1:
        if "exponent" not in ctx.args:
            raise ValueError("operator Pow needs argument 'exponent' or a second input")
        return [torch.pow(x, float(ctx.args["exponent"]))]
    if "exponent" in ctx.args:
        raise ValueError("operator Pow: give the exponent as an argument or an input, not both")
    e = inputs[1]
    if e.numel() == 1 and e.shape != x.shape:
        return [torch.pow(x, e.reshape(()))]
    legacy, _ = ctx.state["broadcast"]
    if not legacy and e.shape != x.shape:
        raise ValueError(f"operator Pow: exponent {tuple(e.shape)} must match X "
                         f"{tuple(x.shape)} or hold one value; set broadcast=1 to broadcast it")
    return [torch.pow(x, e.reshape(_b_shape(ctx, x, e)))]


# --- Variadic Max, Min, Mean --------------------------------------------------------------------

def _extreme_grad(grad_type):
    def maker(op, g_output):
        outs = [grad_name(n) for n in op.input]
        return [gradient_op(op, grad_type, [op.output[0], g_output[0]] + list(op.input), outs)], \
            outs
    maker.__doc__ = f"{grad_type}(Y, dY, X0, X1, ...) -> dX0, dX1, ..."
    return maker


def _same_shapes(ctx, inputs):
    if any(x.shape != inputs[0].shape for x in inputs):
        raise ValueError(f"operator {ctx.op.type}: all inputs must have the same shape, got "
                         f"{[tuple(x.shape) for x in inputs]}")


def _variadic(op_type, combine, doc, gradient):
    def fn(ctx, inputs):
        _same_shapes(ctx, inputs)
        out = inputs[0].clone()
        for x in inputs[1:]:
            out = combine(out, x)
        return [out / len(inputs) if op_type == "Mean" else out]
    fn.__doc__ = doc
    fn.__name__ = op_type
    register_op(op_type, gradient=gradient)(fn)


def _mean_grad(op, g_output):
    """MeanGradient(dY) -> dX0, dX1, ..."""
    outs = [grad_name(n) for n in op.input]
    return [gradient_op(op, "MeanGradient", [g_output[0]], outs)], outs


_variadic("Max", torch.maximum, "Y = elementwise max of X0, X1, ... (same shapes).",
          _extreme_grad("MaxGradient"))
_variadic("Min", torch.minimum, "Y = elementwise min of X0, X1, ... (same shapes).",
          _extreme_grad("MinGradient"))
_variadic("Mean", torch.add, "Y = elementwise mean of X0, X1, ... (same shapes).", _mean_grad)


def _extreme_gradient(op_type):
    def fn(ctx, inputs):
        y, dy = inputs[0], inputs[1]
        return [dy * (x == y) for x in inputs[2:]]
    fn.__doc__ = "(Y, dY, X0, X1, ...) -> dXi = dY where Xi equals Y (every tie gets it)."
    fn.__name__ = op_type
    register_op(op_type)(fn)


_extreme_gradient("MaxGradient")
_extreme_gradient("MinGradient")


@register_op("MeanGradient")
def mean_gradient(ctx, inputs):
    """(dY) -> dXi = dY / n for each of the n outputs."""
    n = len(ctx.output_names)
    return [inputs[0] / n for _ in range(n)]


# --- Activations --------------------------------------------------------------------------------

_unary("Swish", lambda ctx, x: x * torch.sigmoid(x), "Y = X·sigmoid(X).",
       _maker("SwishGradient", "X,Y,dY"))
_grad_op("SwishGradient", lambda ctx, x, y, dy: dy * (y + torch.sigmoid(x) * (1 - y)),
         "(X, Y, dY) -> dX = dY·(Y + sigmoid(X)·(1 − Y)).")
_unary("Softplus", lambda ctx, x: torch.nn.functional.softplus(x), "Y = ln(1 + exp(X)).",
       _maker("SoftplusGradient", "Y,dY"))
_grad_op("SoftplusGradient", lambda ctx, y, dy: dy * -torch.expm1(-y),
         "(Y, dY) -> dX = dY·(1 − exp(−Y)).")
_unary("Softsign", lambda ctx, x: x / (1 + torch.abs(x)), "Y = X / (1 + |X|).",
       _maker("SoftsignGradient", "X,dY"))
_grad_op("SoftsignGradient", lambda ctx, x, dy: dy / (1 + torch.abs(x)) ** 2,
         "(X, dY) -> dX = dY / (1 + |X|)².")


def _alpha_setup(default):
    def setup(ctx):
        ctx.state["alpha"] = float(ctx.arg("alpha", default))
    return setup


_unary("Elu", lambda ctx, x: torch.nn.functional.elu(x, ctx.state["alpha"]),
       "Y = X if X > 0 else alpha·(exp(X) − 1) (``alpha`` default 1.0).",
       _maker("EluGradient", "Y,dY"), _alpha_setup(1.0))
_grad_op("EluGradient", lambda ctx, y, dy: torch.where(y > 0, dy, dy * (y + ctx.state["alpha"])),
         "(Y, dY) -> dX = dY if Y > 0 else dY·(Y + alpha).", _alpha_setup(1.0))

_SELU_ALPHA = 1.6732632423543772848170429916717
_SELU_SCALE = 1.0507009873554804934193349852946


def _selu_setup(ctx):
    ctx.state["selu"] = (float(ctx.arg("alpha", _SELU_ALPHA)), float(ctx.arg("scale", _SELU_SCALE)))


def _selu(ctx, x):
    alpha, scale = ctx.state["selu"]
    return scale * torch.where(x > 0, x, alpha * torch.expm1(x))


def _selu_gradient(ctx, y, dy):
    alpha, scale = ctx.state["selu"]
    return torch.where(y > 0, dy * scale, dy * (y + alpha * scale))


_unary("Selu", _selu, "Y = scale·(X if X > 0 else alpha·(exp(X) − 1)) (self-normalizing defaults).",
       _maker("SeluGradient", "Y,dY"), _selu_setup)
_grad_op("SeluGradient", _selu_gradient, "(Y, dY) -> dX = scale·dY if Y > 0 else "
         "dY·(Y + alpha·scale).", _selu_setup)
_unary("LeakyRelu", lambda ctx, x: torch.where(x > 0, x, x * ctx.state["alpha"]),
       "Y = X if X > 0 else alpha·X (``alpha`` default 0.01).",
       _maker("LeakyReluGradient", "Y,dY"), _alpha_setup(0.01))
_grad_op("LeakyReluGradient", lambda ctx, y, dy: torch.where(y > 0, dy, dy * ctx.state["alpha"]),
         "(Y, dY) -> dX = dY if Y > 0 else alpha·dY.", _alpha_setup(0.01))


def _hard_sigmoid_setup(ctx):
    ctx.state["hs"] = (float(ctx.arg("alpha", 0.2)), float(ctx.arg("beta", 0.5)))


def _hard_sigmoid_gradient(ctx, y, dy):
    alpha, _ = ctx.state["hs"]
    return dy * alpha * ((y > 0) & (y < 1))


_unary("HardSigmoid", lambda ctx, x: torch.clamp(x * ctx.state["hs"][0] + ctx.state["hs"][1], 0, 1),
       "Y = max(0, min(1, alpha·X + beta)) (alpha 0.2, beta 0.5).",
       _maker("HardSigmoidGradient", "Y,dY"), _hard_sigmoid_setup)
_grad_op("HardSigmoidGradient", _hard_sigmoid_gradient,
         "(Y, dY) -> dX = alpha·dY where 0 < Y < 1, else 0.", _hard_sigmoid_setup)


def _gelu(ctx, x):
    approximate = "tanh" if ctx.arg("fast_gelu", 0) else "none"
    return torch.nn.functional.gelu(x, approximate=approximate)


_unary("Gelu", _gelu, "Y = X·Φ(X); fast_gelu=1 uses the tanh approximation.",
       _maker("GeluGradient", "dY,X"))
_grad_op("GeluGradient", lambda ctx, dy, x: aten.gelu_backward(
    dy, x, approximate="tanh" if ctx.arg("fast_gelu", 0) else "none"),
    "(dY, X) -> dX of Gelu (exact or fast_gelu).")


# --- PRelu --------------------------------------------------------------------------------------

def _prelu_grad(op, g_output):
    """PReluGradient(Y, dY, X, Slope) -> (dX, dSlope)."""
    outs = [grad_name(op.input[0]), grad_name(op.input[1])]
    return [gradient_op(op, "PReluGradient", [op.output[0], g_output[0], op.input[0],
                                                op.input[1]], outs)], outs


def _slope_view(ctx, x, w):
    """The slope broadcast against X: one value, or one per channel (NCHW axis 1, NHWC last)."""
    if w.numel() == 1:
        return w.reshape(())
    c_axis = x.dim() - 1 if ctx.arg("order", "NCHW") == "NHWC" else 1
    if x.dim() < 2 or w.numel() != x.shape[c_axis]:
        raise ValueError(f"operator {ctx.op.type}: slope of {w.numel()} values matches neither "
                         f"one value nor the {x.shape[c_axis] if x.dim() > 1 else 0} channels "
                         f"of X {tuple(x.shape)}")
    shape = [1] * x.dim()
    shape[c_axis] = -1
    return w.reshape(shape)


@register_op("PRelu", gradient=_prelu_grad)
def prelu(ctx, inputs):
    """Y = X if X > 0 else slope·X; Slope has one value or one per channel (``order``)."""
    x, w = inputs
    return [torch.where(x > 0, x, x * _slope_view(ctx, x, w))]


@register_op("PReluGradient")
def prelu_gradient(ctx, inputs):
    """(Y, dY, X, Slope) -> (dX, dSlope)."""
    _, dy, x, w = inputs
    slope = _slope_view(ctx, x, w)
    positive = x > 0
    dx = torch.where(positive, dy, dy * slope)
    contrib = torch.where(positive, torch.zeros_like(dy), dy * x)
    if w.numel() == 1:
        dw = contrib.sum().reshape(w.shape)
    else:
        dw = contrib.sum_to_size(slope.shape).reshape(w.shape)
    return [dx, dw]


# --- Comparisons and logic ----------------------------------------------------------------------

def _compare(op_type, fn, symbol, logic=False):
    def forward(ctx, inputs):
        a, b = inputs
        if logic and (a.dtype != torch.bool or b.dtype != torch.bool):
            raise ValueError(f"operator {op_type} takes bool tensors, got {a.dtype} and "
                             f"{b.dtype}; Cast them with to=BOOL")
        b_shape = _b_shape(ctx, a, b)
        return [fn(a, b if b_shape == b.shape else b.reshape(b_shape))]
    forward.__doc__ = f"C = A {symbol} B elementwise as bool, broadcasting (numpy rules, or " \
                      "broadcast=1 with axis)."
    forward.__name__ = op_type
    register_op(op_type, gradient=NO_GRADIENT, setup=_broadcast_setup)(forward)


_compare("LT", torch.lt, "<")
_compare("LE", torch.le, "≤")
_compare("GT", torch.gt, ">")
_compare("GE", torch.ge, "≥")
_compare("EQ", torch.eq, "==")
_compare("NE", torch.ne, "≠")
_compare("And", torch.logical_and, "and", logic=True)
_compare("Or", torch.logical_or, "or", logic=True)
_compare("Xor", torch.logical_xor, "xor", logic=True)


@register_op("Not", gradient=NO_GRADIENT)
def not_op(ctx, inputs):
    """Y = not X (bool)."""
    x = inputs[0]
    if x.dtype != torch.bool:
        raise ValueError(f"operator Not takes a bool tensor, got {x.dtype}; Cast it with to=BOOL")
    return [torch.logical_not(x)]


# --- SumReduceLike, SumSqrElements --------------------------------------------------------------

def _sum_reduce_like_setup(ctx):
    ctx.state["broadcast"] = (True, int(ctx.arg("axis", -1)))


@register_op("SumReduceLike", gradient=NO_GRADIENT, setup=_sum_reduce_like_setup)
def sum_reduce_like(ctx, inputs):
    """C = A summed to B's shape, B placed at ``axis`` of A (default: A's last dims)."""
    a, b = inputs
    if b.numel() == 1:
        return [a.sum().reshape(b.shape)]
    return [a.sum_to_size(_b_shape(ctx, a, b)).reshape(b.shape)]


@register_op("SumSqrElements", gradient=NO_GRADIENT)
def sum_sqr_elements(ctx, inputs):
    """Y = Σ X² as a 0-d tensor; average=1 divides by the number of values."""
    x = inputs[0]
    total = (x * x).sum()
    return [total / x.numel() if ctx.arg("average", 0) else total]


# --- Row-wise products and distances ------------------------------------------------------------

def _rows(ctx, x, y):
    """X and Y viewed [N, D] (N = first dim; a 0-d or 1-D input is one row)."""
    if x.shape != y.shape:
        raise ValueError(f"operator {ctx.op.type}: X {tuple(x.shape)} and Y {tuple(y.shape)} "
                         "must have the same shape")
    n = x.shape[0] if x.dim() > 0 else 1  # Caffe2: a 1-D input is N rows of one value
    return x.reshape(n, -1), y.reshape(n, -1)


def _rowwise(op_type, fn, doc):
    def forward(ctx, inputs):
        x, y = _rows(ctx, *inputs)
        return [fn(x, y)]
    forward.__doc__ = doc
    forward.__name__ = op_type

    def gradient(ctx, inputs):
        x, y, dz = inputs
        x2, y2 = _rows(ctx, x, y)
        dx, dy = vjp(fn, [x2, y2], dz.reshape(-1))
        return [dx.reshape(x.shape), dy.reshape(y.shape)]
    gradient.__doc__ = f"(X, Y, dZ) -> (dX, dY) of {op_type}."
    gradient.__name__ = op_type + "Gradient"

    def maker(op, g_output):
        outs = [grad_name(op.input[0]), grad_name(op.input[1])]
        return [gradient_op(op, op_type + "Gradient", [op.input[0], op.input[1], g_output[0]],
                            outs)], outs
    maker.__doc__ = f"{op_type}Gradient(X, Y, dZ) -> (dX, dY)."
    register_op(op_type, gradient=maker)(forward)
    register_op(op_type + "Gradient")(gradient)


_COS_EPS = 1e-12


def _cosine(x, y):
    xx = (x * x).sum(1).clamp_min(_COS_EPS)
    yy = (y * y).sum(1).clamp_min(_COS_EPS)
    return (x * y).sum(1) / torch.sqrt(xx * yy)


def _l1_distance(x, y):
    return torch.abs(x - y).sum(1)


_rowwise("DotProduct", lambda x, y: (x * y).sum(1), "Z[i] = Σ_j X[i, j]·Y[i, j] (same shapes).")
_rowwise("CosineSimilarity", _cosine,
         "Z[i] = X[i]·Y[i] / √(max(|X[i]|², 1e-12)·max(|Y[i]|², 1e-12)).")
_rowwise("SquaredL2Distance", lambda x, y: 0.5 * ((x - y) ** 2).sum(1),
         "Z[i] = ½·|X[i] − Y[i]|².")
_rowwise("L1Distance", _l1_distance, "Z[i] = Σ_j |X[i, j] − Y[i, j]|.")


def _dot_padding_setup(ctx):
    ctx.state["pad"] = (float(ctx.arg("pad_value", 0.0)), bool(ctx.arg("replicate", 0)))


def _dot_with_padding(ctx, x, y):
    pad_value, replicate = ctx.state["pad"]
    if x.dim() < 1 or y.dim() < 1 or x.shape[0] != y.shape[0]:
        raise ValueError(f"operator {ctx.op.type}: X {tuple(x.shape)} and Y {tuple(y.shape)} "
                         "need the same first dim")
    n = x.shape[0]
    x, y = x.reshape(n, -1), y.reshape(n, -1)
    short, long_ = (x, y) if x.shape[1] <= y.shape[1] else (y, x)
    d = long_.shape[1]
    if replicate:
        if short.shape[1] == 0 or d % short.shape[1]:
            raise ValueError(f"operator {ctx.op.type} with replicate=1: {short.shape[1]} does not "
                             f"divide {d}")
        short = short.repeat(1, d // short.shape[1])
    else:
        short = torch.nn.functional.pad(short, [0, d - short.shape[1]], value=pad_value)
    return (short * long_).sum(1)


def _dot_padding_grad(op, g_output):
    """DotProductWithPaddingGradient(X, Y, dZ) -> (dX, dY)."""
    outs = [grad_name(op.input[0]), grad_name(op.input[1])]
    return [gradient_op(op, "DotProductWithPaddingGradient",
                        [op.input[0], op.input[1], g_output[0]], outs)], outs


@register_op("DotProductWithPadding", gradient=_dot_padding_grad, setup=_dot_padding_setup)
def dot_product_with_padding(ctx, inputs):
    """Z[i] = X[i]·Y[i], the shorter row padded with pad_value (or tiled with replicate=1)."""
    return [_dot_with_padding(ctx, *inputs)]


@register_op("DotProductWithPaddingGradient", setup=_dot_padding_setup)
def dot_product_with_padding_gradient(ctx, inputs):
    """(X, Y, dZ) -> (dX, dY) of DotProductWithPadding."""
    x, y, dz = inputs
    return vjp(lambda a, b: _dot_with_padding(ctx, a, b), [x, y], dz.reshape(-1))


# --- More unary math (Caffe2's elementwise family) ----------------------------------------------

_unary("Cube", lambda ctx, x: x * x * x, "Y = X³.", _maker("CubeGradient", "dY,X"))
_grad_op("CubeGradient", lambda ctx, dy, x: 3 * dy * x * x, "(dY, X) -> dX = 3X²·dY.")
_unary("Cbrt", lambda ctx, x: torch.sign(x) * torch.abs(x) ** (1 / 3), "Y = ∛X.",
       _maker("CbrtGradient", "dY,Y"))
_grad_op("CbrtGradient", lambda ctx, dy, y: dy / (3 * y * y), "(dY, Y) -> dX = dY / (3Y²).")
_unary("Tan", lambda ctx, x: torch.tan(x), "Y = tan(X).", _maker("TanGradient", "X,dY"))
_grad_op("TanGradient", lambda ctx, x, dy: dy / torch.cos(x) ** 2, "(X, dY) -> dX = dY / cos²(X).")
_unary("Asin", lambda ctx, x: torch.asin(x), "Y = arcsin(X).", _maker("AsinGradient", "X,dY"))
_grad_op("AsinGradient", lambda ctx, x, dy: dy * torch.rsqrt(1 - x * x),
         "(X, dY) -> dX = dY / √(1 − X²).")
_unary("Acos", lambda ctx, x: torch.acos(x), "Y = arccos(X).", _maker("AcosGradient", "X,dY"))
_grad_op("AcosGradient", lambda ctx, x, dy: -dy * torch.rsqrt(1 - x * x),
         "(X, dY) -> dX = −dY / √(1 − X²).")
_unary("Atan", lambda ctx, x: torch.atan(x), "Y = arctan(X).", _maker("AtanGradient", "X,dY"))
_grad_op("AtanGradient", lambda ctx, x, dy: dy / (1 + x * x), "(X, dY) -> dX = dY / (1 + X²).")
_unary("Sinh", lambda ctx, x: torch.sinh(x), "Y = sinh(X).", _maker("SinhGradient", "dY,X"))
_grad_op("SinhGradient", lambda ctx, dy, x: dy * torch.cosh(x), "(dY, X) -> dX = cosh(X)·dY.")
_unary("Cosh", lambda ctx, x: torch.cosh(x), "Y = cosh(X).", _maker("CoshGradient", "dY,X"))
_grad_op("CoshGradient", lambda ctx, dy, x: dy * torch.sinh(x), "(dY, X) -> dX = sinh(X)·dY.")
_unary("Log1p", lambda ctx, x: torch.log1p(x), "Y = ln(1 + X).", _maker("Log1pGradient", "X,dY"))
_grad_op("Log1pGradient", lambda ctx, x, dy: dy / (1 + x), "(X, dY) -> dX = dY / (1 + X).")


def _eps_setup(ctx):
    ctx.state["eps"] = float(ctx.arg("eps", 1e-6))


def _logit_gradient(ctx, x, dy):
    eps = ctx.state["eps"]
    inside = (x >= eps) & (x <= 1 - eps)
    return torch.where(inside, dy / (x * (1 - x)), torch.zeros_like(dy))


_unary("Logit", lambda ctx, x: torch.logit(x, ctx.state["eps"]),
       "Y = ln(X / (1 − X)) with X clamped to [eps, 1 − eps] (eps default 1e-6).",
       _maker("LogitGradient", "X,dY"), _eps_setup)
_grad_op("LogitGradient", _logit_gradient,
         "(X, dY) -> dX = dY / (X(1 − X)) inside [eps, 1 − eps], else 0.", _eps_setup)


def _relu_n_setup(ctx):
    n = float(ctx.arg("n", 6.0))
    if n <= 0:
        raise ValueError(f"operator {ctx.op.type}: n must be positive, got {n}")
    ctx.state["n"] = n


_unary("ReluN", lambda ctx, x: torch.clamp(x, 0, ctx.state["n"]),
       "Y = min(max(X, 0), n) (``n`` default 6).", _maker("ReluNGradient", "Y,dY"), _relu_n_setup)
_grad_op("ReluNGradient", lambda ctx, y, dy: dy * ((y > 0) & (y < ctx.state["n"])),
         "(Y, dY) -> dX = dY where 0 < Y < n, else 0.", _relu_n_setup)


# --- Integer ops: Mod, bitwise ------------------------------------------------------------------

def _mod_setup(ctx):
    divisor = int(ctx.require("divisor"))
    if divisor == 0:
        raise ValueError("operator Mod: divisor must not be 0")
    ctx.state["mod"] = (divisor, bool(ctx.arg("sign_follow_divisor", 0)))


@register_op("Mod", gradient=NO_GRADIENT, setup=_mod_setup)
def mod(ctx, inputs):
    """Y = X mod ``divisor`` (ints); the sign follows X unless sign_follow_divisor=1."""
    x = inputs[0]
    if x.is_floating_point():
        raise ValueError(f"operator Mod takes int32/int64 tensors, got {x.dtype}")
    divisor, follow = ctx.state["mod"]
    return [torch.remainder(x, divisor) if follow else torch.fmod(x, divisor)]


def _bitwise(op_type, fn, symbol):
    def forward(ctx, inputs):
        a, b = inputs
        if a.is_floating_point() or b.is_floating_point():
            raise ValueError(f"operator {op_type} takes integer or bool tensors, got {a.dtype} "
                             f"and {b.dtype}")
        b_shape = _b_shape(ctx, a, b)
        return [fn(a, b if b_shape == b.shape else b.reshape(b_shape))]
    forward.__doc__ = f"C = A {symbol} B bitwise (ints or bools), broadcasting like Add."
    forward.__name__ = op_type
    register_op(op_type, gradient=NO_GRADIENT, setup=_broadcast_setup)(forward)


_bitwise("BitwiseAnd", torch.bitwise_and, "&")
_bitwise("BitwiseOr", torch.bitwise_or, "|")
_bitwise("BitwiseXor", torch.bitwise_xor, "^")


# --- ElementwiseLinear --------------------------------------------------------------------------

def _elementwise_linear_grad(op, g_output):
    """ElementwiseLinearGradient(dY, X, a) -> (dX, da, db)."""
    outs = [grad_name(n) for n in op.input]
    return [gradient_op(op, "ElementwiseLinearGradient", [g_output[0], op.input[0], op.input[1]],
                        outs)], outs


def _linear_rows(ctx, x, d):
    axis = int(ctx.arg("axis", 1))
    axis = axis + x.dim() if axis < 0 else axis
    x2 = x.reshape(math.prod(x.shape[:axis]), -1)
    if x2.shape[1] != d:
        raise ValueError(f"operator {ctx.op.type}: X {tuple(x.shape)} flattened at axis {axis} "
                         f"has {x2.shape[1]} columns but a has {d} values")
    return x2


@register_op("ElementwiseLinear", gradient=_elementwise_linear_grad)
def elementwise_linear(ctx, inputs):
    """Y = X·a + b per column, X viewed [N, D] at ``axis`` (default 1), a and b of size D."""
    x, a, b = inputs
    return [torch.addcmul(b, _linear_rows(ctx, x, a.numel()), a).reshape(x.shape)]


@register_op("ElementwiseLinearGradient")
def elementwise_linear_gradient(ctx, inputs):
    """(dY, X, a) -> (dX, da, db)."""
    dy, x, a = inputs
    x2 = _linear_rows(ctx, x, a.numel())
    dy2 = dy.reshape(x2.shape)
    return [(dy2 * a).reshape(x.shape), (dy2 * x2).sum(0).reshape(a.shape),
            dy2.sum(0).reshape(a.shape)]
