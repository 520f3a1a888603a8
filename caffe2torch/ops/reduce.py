"""Reductions: ReduceSum/Mean/Max/Min/L1/L2 over ``axes``, ReduceFront*/ReduceBack*, ArgMax/ArgMin.

``Reduce<Op>`` reduces the listed ``axes`` (default all; negative ones count from the end) and
keeps them as size 1 unless ``keepdims=0``; its gradient op ``Reduce<Op>Gradient(dY, X, Y)``
broadcasts dY back. ``ReduceFront<Op>``/``ReduceBack<Op>`` reduce the first/last
``num_reduce_dim`` dims (default 1), optionally only the first ``lengths[j]`` values of each
reduced vector. Max/min gradients go to every tied extreme, as in Caffe2.
"""
import math

import torch

from caffe2torch.ops.registry import NO_GRADIENT, gradient_op, grad_name, register_op


def _axes_setup(ctx):
    axes = ctx.arg("axes")
    ctx.state["reduce"] = (None if axes is None else [int(a) for a in axes],
                           bool(ctx.arg("keepdims", 1)))


def _axes(ctx, x):
    axes, _ = ctx.state["reduce"]
    if axes is None:
        return tuple(range(x.dim()))
    out = []
    for a in axes:
        if not -x.dim() <= a < x.dim():
            raise ValueError(f"operator {ctx.op.type}: axis {a} is out of range for an input "
                             f"with {x.dim()} dims")
        out.append(a + x.dim() if a < 0 else a)
    return tuple(sorted(set(out)))


def _reduce_grad(grad_type):
    def maker(op, g_output):
        g = grad_name(op.input[0])
        return [gradient_op(op, grad_type, [g_output[0], op.input[0], op.output[0]], [g])], [g]
    maker.__doc__ = f"{grad_type}(dY, X, Y) -> dX."
    return maker


def _reduce(op_type, fn, grad, doc, grad_doc):
    def forward(ctx, inputs):
        x = inputs[0]
        axes = _axes(ctx, x)
        keep = ctx.state["reduce"][1]
        if not axes:
            return [x.clone()]
        return [fn(x, axes, keep)]
    forward.__doc__ = doc
    forward.__name__ = op_type

    def backward(ctx, inputs):
        dy, x, y = inputs
        axes = _axes(ctx, x)
        shape = [1 if i in axes else d for i, d in enumerate(x.shape)]
        return [grad(dy.reshape(shape), x, y.reshape(shape), axes).expand(x.shape).contiguous()]
    backward.__doc__ = grad_doc
    backward.__name__ = op_type + "Gradient"
    register_op(op_type, gradient=_reduce_grad(op_type + "Gradient"), setup=_axes_setup)(forward)
    register_op(op_type + "Gradient", setup=_axes_setup)(backward)


def _count(x, axes):
    return math.prod(x.shape[a] for a in axes)


def _amax(x, axes, keep):
    return torch.amax(x, axes, keep)


def _l2_gradient(dy, x, y, axes):
    safe = torch.where(y == 0, torch.ones_like(y), y)
    return torch.where(y == 0, torch.zeros_like(x), dy * x / safe)


_reduce("ReduceSum", lambda x, a, k: torch.sum(x, a, k), lambda dy, x, y, a: dy,
        "Y = Σ X over ``axes`` (default all); keepdims (default 1).",
        "(dY, X, Y) -> dX = dY broadcast to X.")
_reduce("ReduceMean", lambda x, a, k: torch.mean(x, a, k),
        lambda dy, x, y, a: dy / _count(x, a),
        "Y = mean of X over ``axes`` (default all); keepdims (default 1).",
        "(dY, X, Y) -> dX = dY / count, broadcast to X.")
_reduce("ReduceMax", _amax, lambda dy, x, y, a: dy * (x == y),
        "Y = max of X over ``axes`` (default all); keepdims (default 1).",
        "(dY, X, Y) -> dX = dY where X equals its max, else 0.")
_reduce("ReduceMin", lambda x, a, k: torch.amin(x, a, k), lambda dy, x, y, a: dy * (x == y),
        "Y = min of X over ``axes`` (default all); keepdims (default 1).",
        "(dY, X, Y) -> dX = dY where X equals its min, else 0.")
_reduce("ReduceL1", lambda x, a, k: torch.sum(torch.abs(x), a, k),
        lambda dy, x, y, a: dy * torch.sign(x),
        "Y = Σ |X| over ``axes`` (default all); keepdims (default 1).",
        "(dY, X, Y) -> dX = sign(X)·dY.")
_reduce("ReduceL2", lambda x, a, k: torch.sqrt(torch.sum(x * x, a, k)), _l2_gradient,
        "Y = √(Σ X²) over ``axes`` (default all); keepdims (default 1).",
        "(dY, X, Y) -> dX = X/Y·dY (0 where Y = 0).")


# --- ReduceFront* / ReduceBack* -----------------------------------------------------------------

def _front_back_setup(ctx):
    n = int(ctx.arg("num_reduce_dim", 1))
    if n < 0:
        raise ValueError(f"operator {ctx.op.type}: num_reduce_dim must be >= 0, got {n}")
    ctx.state["num_reduce_dim"] = n


def _as_rows(ctx, x, front):
    """X as [rows, cols] (front: the reduced dims are the rows), the output shape, the axis."""
    n = ctx.state["num_reduce_dim"]
    if n > x.dim():
        raise ValueError(f"operator {ctx.op.type}: num_reduce_dim {n} exceeds the input's "
                         f"{x.dim()} dims")
    split = n if front else x.dim() - n
    rows, cols = math.prod(x.shape[:split]), math.prod(x.shape[split:])
    out_shape = x.shape[split:] if front else x.shape[:split]
    return x.reshape(rows, cols), out_shape, 0 if front else 1


def _mask(x2, lengths, axis):
    """Which values of [rows, cols] X count: the first lengths[j] of each reduced vector j."""
    if lengths is None:
        return None
    other = x2.shape[1 - axis]
    if lengths.numel() != other:
        raise ValueError(f"lengths has {lengths.numel()} values but the input has {other} "
                         "vectors to reduce")
    positions = torch.arange(x2.shape[axis], device=x2.device)
    lengths = lengths.reshape(-1).to(x2.device)
    return positions[:, None] < lengths[None, :] if axis == 0 else \
        positions[None, :] < lengths[:, None]


def _front_back(name, front, kind):
    op_type = f"Reduce{'Front' if front else 'Back'}{name}"
    where = "first" if front else "last"

    def forward(ctx, inputs):
        x = inputs[0]
        x2, out_shape, axis = _as_rows(ctx, x, front)
        mask = _mask(x2, inputs[1] if len(inputs) > 1 else None, axis)
        if kind == "max":
            values = x2 if mask is None else x2.masked_fill(~mask, -math.inf)
            y = values.amax(axis)
        else:
            y = (x2 if mask is None else x2 * mask).sum(axis)
            if kind == "mean":
                y = y / (x2.shape[axis] if mask is None else mask.sum(axis))
        return [y.reshape(out_shape)]
    forward.__doc__ = (f"Y = {kind} of X over its {where} ``num_reduce_dim`` dims (default 1); "
                       "optional lengths input.")
    forward.__name__ = op_type

    def backward(ctx, inputs):
        dy, x = inputs[0], inputs[1]
        extra = 3 if kind == "max" else 2
        x2, _, axis = _as_rows(ctx, x, front)
        mask = _mask(x2, inputs[extra] if len(inputs) > extra else None, axis)
        dy2 = dy.reshape(-1).unsqueeze(axis)
        if kind == "max":
            dx = dy2 * (x2 == inputs[2].reshape(-1).unsqueeze(axis))
        elif kind == "mean":
            count = x2.shape[axis] if mask is None else mask.sum(axis, keepdim=True)
            dx = (dy2 / count).expand_as(x2)
        else:
            dx = dy2.expand_as(x2)
        if mask is not None:
            dx = dx * mask
        return [dx.reshape(x.shape).contiguous()]
    extra_doc = ", Y" if kind == "max" else ""
    backward.__doc__ = f"(dY, X{extra_doc}[, lengths]) -> dX of {op_type}."
    backward.__name__ = op_type + "Gradient"

    def maker(op, g_output):
        ins = [g_output[0], op.input[0]] + ([op.output[0]] if kind == "max" else []) \
            + list(op.input[1:2])
        g = grad_name(op.input[0])
        return [gradient_op(op, op_type + "Gradient", ins, [g])], [g] + [None] * (len(op.input) - 1)
    maker.__doc__ = f"{op_type}Gradient(dY, X{extra_doc}[, lengths]) -> dX."
    register_op(op_type, gradient=maker, setup=_front_back_setup)(forward)
    register_op(op_type + "Gradient", setup=_front_back_setup)(backward)


for _front in (True, False):
    for _name, _kind in (("Sum", "sum"), ("Mean", "mean"), ("Max", "max")):
        _front_back(_name, _front, _kind)


# --- ArgMax / ArgMin ----------------------------------------------------------------------------

def _arg_setup(ctx):
    ctx.state["arg"] = (int(ctx.arg("axis", -1)), bool(ctx.arg("keepdims", 1)))


def _arg_extreme(op_type, fn, what):
    def forward(ctx, inputs):
        x = inputs[0]
        axis, keep = ctx.state["arg"]
        if not -x.dim() <= axis < x.dim():
            raise ValueError(f"operator {op_type}: axis {axis} is out of range for an input "
                             f"with {x.dim()} dims")
        return [fn(x, axis, keep)]
    forward.__doc__ = (f"Y = int64 index of the {what} along ``axis`` (default -1; first on "
                       "ties); keepdims (default 1).")
    forward.__name__ = op_type
    register_op(op_type, gradient=NO_GRADIENT, setup=_arg_setup)(forward)


_arg_extreme("ArgMax", torch.argmax, "max")
_arg_extreme("ArgMin", torch.argmin, "min")


# --- SumElements, RowwiseMax, ColwiseMax --------------------------------------------------------

def _sum_elements_grad(op, g_output):
    """SumElementsGradient(X, dY) -> dX."""
    g = grad_name(op.input[0])
    return [gradient_op(op, "SumElementsGradient", [op.input[0], g_output[0]], [g])], [g]


@register_op("SumElements", gradient=_sum_elements_grad)
def sum_elements(ctx, inputs):
    """Y = Σ X as a 0-d tensor; average=1 gives the mean."""
    x = inputs[0]
    return [x.mean() if ctx.arg("average", 0) else x.sum()]


@register_op("SumElementsGradient")
def sum_elements_gradient(ctx, inputs):
    """(X, dY) -> dX = dY (divided by the count with average=1) everywhere."""
    x, dy = inputs
    scale = 1.0 / x.numel() if ctx.arg("average", 0) else 1.0
    return [(dy.reshape(()) * scale).expand(x.shape).contiguous()]


@register_op("SumElementsInt", gradient=NO_GRADIENT)
def sum_elements_int(ctx, inputs):
    """Y = Σ X of an int32 tensor as a 0-d int32."""
    x = inputs[0]
    if x.dtype != torch.int32:
        raise ValueError(f"operator SumElementsInt takes an int32 tensor, got {x.dtype}")
    return [x.sum(dtype=torch.int32)]


def _wise_max(op_type, axis):
    def forward(ctx, inputs):
        x = inputs[0]
        if x.dim() != 3:
            raise ValueError(f"operator {op_type} takes a 3-D [batch, M, N] tensor, got shape "
                             f"{tuple(x.shape)}")
        return [x.amax(axis)]
    forward.__doc__ = (f"Y = max of 3-D X [batch, M, N] over {'N' if axis == 2 else 'M'}: "
                       f"[batch, {'M' if axis == 2 else 'N'}].")
    forward.__name__ = op_type

    def backward(ctx, inputs):
        x, y, dy = inputs
        return [dy.unsqueeze(axis) * (x == y.unsqueeze(axis))]
    backward.__doc__ = "(X, Y, dY) -> dX = dY where X is its row's max (every tie), else 0."
    backward.__name__ = op_type + "Gradient"

    def maker(op, g_output):
        g = grad_name(op.input[0])
        return [gradient_op(op, op_type + "Gradient", [op.input[0], op.output[0], g_output[0]],
                            [g])], [g]
    maker.__doc__ = f"{op_type}Gradient(X, Y, dY) -> dX."
    register_op(op_type, gradient=maker)(forward)
    register_op(op_type + "Gradient")(backward)


_wise_max("RowwiseMax", 2)
_wise_max("ColwiseMax", 1)


# --- Moments ------------------------------------------------------------------------------------

def _moments_grad(op, g_output):
    """MomentsGradient(dmean, dvariance, X, mean) -> dX (a missing output gradient counts as 0)."""
    ops, grads = [], []
    for k, g in enumerate(g_output[:2]):
        if g is None:
            g = f"_{op.output[k]}_zero_grad"
            ops.append(gradient_op(op, "ConstantFill", [op.output[k]], [g], copy_args=False,
                                   value=0.0))
        grads.append(g)
    gx = grad_name(op.input[0])
    ops.append(gradient_op(op, "MomentsGradient", grads + [op.input[0], op.output[0]], [gx]))
    return ops, [gx]


@register_op("Moments", gradient=_moments_grad, setup=_axes_setup)
def moments(ctx, inputs):
    """(X) -> (mean, variance) over ``axes`` (default all; variance divides by the count)."""
    x = inputs[0]
    axes = _axes(ctx, x)
    keep = ctx.state["reduce"][1]
    var, mean = torch.var_mean(x, axes, correction=0, keepdim=keep)
    return [mean, var]


@register_op("MomentsGradient", setup=_axes_setup)
def moments_gradient(ctx, inputs):
    """(dmean, dvariance, X, mean) -> dX = dmean/n + 2·dvariance·(X − mean)/n."""
    dmean, dvar, x, mean = inputs
    axes = _axes(ctx, x)
    shape = [1 if i in axes else d for i, d in enumerate(x.shape)]
    n = _count(x, axes)
    dx = dmean.reshape(shape) / n + 2 * dvar.reshape(shape) * (x - mean.reshape(shape)) / n
    return [dx.expand(x.shape).contiguous()]
