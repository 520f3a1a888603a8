"""Arithmetic ops: Scale, Sum, WeightedSum, Add/Sub/Mul/Div with broadcasting, MatMul.

Add/Sub/Mul/Div broadcast like numpy, or, with ``broadcast=1``, Caffe2's legacy way: B's shape
matches a contiguous run of A's dims starting at ``axis`` (default: A's last dims). Their gradient
ops (``AddGradient`` etc., inputs dY, A, B) sum the gradient back to each input's shape. Sum's
gradient is Caffe2's pass-through: every input's gradient is the blob dY itself, no op.
"""
import math

import torch

from caffe2torch.ops.registry import gradient_op, grad_name, in_traced_region, register_op


def _scale_grad(op, g_output):
    """Scale(dY) -> dX with the same ``scale``."""
    return [gradient_op(op, "Scale", [g_output[0]], [grad_name(op.input[0])])], \
        [grad_name(op.input[0])]


def _scale_setup(ctx):
    ctx.state["scale"] = float(ctx.arg("scale", 1.0))


@register_op("Scale", gradient=_scale_grad, setup=_scale_setup)
def scale(ctx, inputs):
    """Y = scale · X (``scale`` default 1.0); in place allowed."""
    return [torch.mul(inputs[0], ctx.state["scale"])]


def _sum_grad(op, g_output):
    """No op: each input's gradient is dY itself (Caffe2's pass-through)."""
    return [], [g_output[0]] * len(op.input)


@register_op("Sum", gradient=_sum_grad)
def sum_op(ctx, inputs):
    """Y = X0 + X1 + ... (numpy broadcasting); one input gives a copy."""
    if len(inputs) == 1:
        return [inputs[0].clone()]
    out = torch.add(inputs[0], inputs[1])
    for x in inputs[2:]:
        out = out.add_(x) if torch.broadcast_shapes(out.shape, x.shape) == out.shape else out + x
    return [out]


@register_op("SumGradient")
def sum_gradient(ctx, inputs):
    """(dY, X0, X1, ...) -> (dX0, dX1, ...): dY summed to each input's shape (broadcast Sum)."""
    dy = inputs[0]
    return [_reduce(dy, x.shape).clone() for x in inputs[1:]]


# --- WeightedSum --------------------------------------------------------------------------------

def _weighted_sum_grad(op, g_output):
    """WeightedSumGradient(dY, X0, w0, ...) -> (dX0, dX1, ...[, dw0, dw1, ...] with grad_on_w=1)."""
    xs = op.input[0::2]
    on_w = any(a.name == "grad_on_w" and a.i for a in op.arg)
    g_input = [grad_name(n) if i % 2 == 0 or on_w else None for i, n in enumerate(op.input)]
    outputs = [grad_name(n) for n in xs] + ([grad_name(n) for n in op.input[1::2]] if on_w else [])
    return [gradient_op(op, "WeightedSumGradient", [g_output[0]] + list(op.input), outputs)], \
        g_input


def _weighted_sum_setup(ctx):
    if len(ctx.input_names) % 2 or not ctx.input_names:
        raise ValueError(f"operator WeightedSum takes pairs X0, w0, X1, w1, ...; got "
                         f"{len(ctx.input_names)} inputs")
    for k, name in enumerate(ctx.input_names[2::2], start=1):
        if name == ctx.output_names[0]:
            raise ValueError(f"operator WeightedSum: only X0 may be updated in place, not X{k} "
                             f"({name!r})")
    ctx.state["inplace"] = ctx.inplace.get(0) == 0


def _weight(w):
    if w.numel() != 1:
        raise ValueError(f"operator WeightedSum: each weight must hold one value, got shape "
                         f"{tuple(w.shape)}")
    return w.reshape(())  # a view: the weight broadcasts without a host sync


@register_op("WeightedSum", gradient=_weighted_sum_grad, setup=_weighted_sum_setup)
def weighted_sum(ctx, inputs):
    """Y = Σ wᵢ·Xᵢ for inputs X0, w0, X1, w1, ...; with Y = X0 the update happens in place."""
    x0, w0 = inputs[0], _weight(inputs[1])
    if ctx.state["inplace"]:
        if in_traced_region() and x0.device.type == "cpu":
            # one opaque in-place op: functionalized, the update would be a new tensor, X0*w0
            # and a copy back into X0 (three passes over the parameter instead of one)
            torch.ops.caffe2torch.weighted_sum_(x0, w0, list(inputs[2:]))
        else:
            _update_in_place(x0, w0, inputs[2:])
        return [x0]
    else:
        out = x0 * w0
    for i in range(2, len(inputs), 2):
        out.addcmul_(inputs[i], _weight(inputs[i + 1]))
    return [out]


def _update_in_place(x0, w0, rest):
    """X0 = w0·X0 + Σ wᵢ·Xᵢ in place (``rest``: X1, w1, ...)."""
    # SGD's w0 is the blob ONE: on the CPU, reading it is free and saves a pass over X0.
    # Traced (torch.compile, torch.export): no host read; the multiply by 1 is exact anyway.
    if torch.compiler.is_compiling() or w0.device.type != "cpu" or float(w0) != 1.0:
        x0.mul_(w0)
    for i in range(0, len(rest), 2):
        x0.addcmul_(rest[i], _weight(rest[i + 1]))


# Registered with torch.library's low-level API: a custom_op's Python wrapper costs ~50 us a
# call, more than the update of a small parameter.
_LIBRARY = torch.library.Library("caffe2torch", "FRAGMENT")
_LIBRARY.define("weighted_sum_(Tensor(a!) x0, Tensor w0, Tensor[] rest) -> ()")
_LIBRARY.impl("weighted_sum_", _update_in_place, "CPU")
torch.library.register_fake("caffe2torch::weighted_sum_", lambda x0, w0, rest: None,
                            lib=_LIBRARY)


@register_op("WeightedSumGradient")
def weighted_sum_gradient(ctx, inputs):
    """(dY, X0, w0, ...) -> (dX0, ...) with dXᵢ = wᵢ·dY; grad_on_w=1 adds dwᵢ = Σ dY·Xᵢ."""
    dy = inputs[0]
    grads = [dy * _weight(w) for w in inputs[2::2]]
    if ctx.arg("grad_on_w", 0):
        grads += [(dy * x).sum().reshape(w.shape).to(w.dtype)
                  for x, w in zip(inputs[1::2], inputs[2::2])]
    return grads


# --- Add / Sub / Mul / Div ----------------------------------------------------------------------

def _broadcast_setup(ctx):
    axis = int(ctx.arg("axis", -1))
    axis_str = ctx.arg("axis_str", "")
    if axis_str:
        # Caffe2: axis_str names one letter of ``order`` (e.g. "C" of "NCHW").
        order = ctx.arg("order", "NCHW")
        if len(axis_str) != 1 or axis_str not in order:
            raise ValueError(f"operator {ctx.op.type}: axis_str {axis_str!r} must be one letter "
                             f"of order {order!r}")
        axis = order.index(axis_str)
    ctx.state["broadcast"] = (bool(ctx.arg("broadcast", 0)), axis)


def _b_shape(ctx, a, b):
    """The shape B broadcasts as: B itself (numpy rules) or B placed at ``axis`` of A (legacy)."""
    legacy, axis = ctx.state["broadcast"]
    # Ranks first: comparing sizes of different ranks guards a symbolic batch against B's dims.
    if not legacy or (a.dim() == b.dim() and a.shape == b.shape):
        return b.shape
    if b.numel() == 1:
        return torch.Size([])  # Caffe2's legacy broadcast takes a one-element B as a scalar
    if b.dim() > a.dim():
        raise ValueError(f"operator {ctx.op.type} with broadcast=1: B {tuple(b.shape)} has more "
                         f"dims than A {tuple(a.shape)}")
    if axis == -1:
        axis = a.dim() - b.dim()
    if not 0 <= axis <= a.dim() - b.dim() or any(
            d != 1 and d != a.shape[axis + i] for i, d in enumerate(b.shape)):
        raise ValueError(f"operator {ctx.op.type} with broadcast=1: B {tuple(b.shape)} does not "
                         f"match A {tuple(a.shape)} at axis {axis}")
    return torch.Size([1] * axis + list(b.shape) + [1] * (a.dim() - axis - b.dim()))


def _binary_grad(grad_type):
    def maker(op, g_output):
        a, b = op.input[0], op.input[1]
        outputs = [grad_name(a), grad_name(b)]
        if a != b:
            return [gradient_op(op, grad_type, [g_output[0], a, b], outputs)], outputs
        # X op X: two contributions to one blob; name them apart and add them up.
        parts = [f"_{grad_name(a)}_{grad_type}_{k}" for k in (0, 1)]
        total = gradient_op(op, "Sum", parts, [grad_name(a)], copy_args=False)
        return [gradient_op(op, grad_type, [g_output[0], a, b], parts), total], \
            [grad_name(a), None]
    maker.__doc__ = f"{grad_type}(dY, A, B) -> (dA, dB)."
    return maker


def _reduce(g, shape):
    """Gradient ``g`` summed back to a broadcast input's ``shape``."""
    return g if g.shape == shape else g.sum_to_size(shape)


def _binary(op_type, fn, doc):
    def forward(ctx, inputs):
        a, b = inputs
        if not ctx.state["broadcast"][0]:  # numpy broadcasting: torch's own
            return [fn(a, b)]
        b_shape = _b_shape(ctx, a, b)
        return [fn(a, b if b_shape == b.shape else b.reshape(b_shape))]
    forward.__doc__ = doc
    forward.__name__ = op_type
    register_op(op_type, gradient=_binary_grad(op_type + "Gradient"), setup=_broadcast_setup)(forward)


_binary("Add", torch.add, "C = A + B, broadcasting (numpy rules, or broadcast=1 with axis).")
_binary("Sub", torch.sub, "C = A − B, broadcasting (numpy rules, or broadcast=1 with axis).")
_binary("Mul", torch.mul, "C = A · B elementwise, broadcasting (numpy rules, or broadcast=1).")
_binary("Div", torch.div, "C = A / B elementwise, broadcasting (numpy rules, or broadcast=1).")


def _binary_gradient(op_type, grads, doc):
    def forward(ctx, inputs):
        dy, a, b = inputs
        b_shape = _b_shape(ctx, a, b)
        da, db = grads(dy, a, b if b_shape == b.shape else b.reshape(b_shape))
        return [_reduce(da, a.shape), _reduce(db, b_shape).reshape(b.shape)]
    forward.__doc__ = doc
    forward.__name__ = op_type
    register_op(op_type, setup=_broadcast_setup)(forward)


_binary_gradient("AddGradient", lambda dy, a, b: (dy, dy), "(dY, A, B) -> (dA, dB) = (dY, dY), "
                 "summed to each shape.")
_binary_gradient("SubGradient", lambda dy, a, b: (dy, -dy), "(dY, A, B) -> (dA, dB) = (dY, −dY), "
                 "summed to each shape.")
_binary_gradient("MulGradient", lambda dy, a, b: (dy * b, dy * a), "(dY, A, B) -> (dA, dB) = "
                 "(dY·B, dY·A), summed to each shape.")
_binary_gradient("DivGradient", lambda dy, a, b: (dy / b, -dy * a / (b * b)), "(dY, A, B) -> "
                 "(dA, dB) = (dY/B, −dY·A/B²), summed to each shape.")


# --- MatMul -------------------------------------------------------------------------------------

def _matmul_setup(ctx):
    ctx.state["matmul"] = (int(ctx.arg("axis_a", 1)), int(ctx.arg("axis_b", 1)),
                           bool(ctx.arg("trans_a", 0)), bool(ctx.arg("trans_b", 0)))


def _matmul_views(ctx, a, b):
    """A and B flattened to 2-D at axis_a / axis_b (not yet transposed)."""
    axis_a, axis_b, trans_a, trans_b = ctx.state["matmul"]
    if a.dim() == 2 and b.dim() == 2 and axis_a in (1, -1) and axis_b in (1, -1):
        a2, b2 = a, b  # already 2-D: no reshape calls (~1 us each on small tensors)
    else:
        axis_a = axis_a + a.dim() if axis_a < 0 else axis_a
        axis_b = axis_b + b.dim() if axis_b < 0 else axis_b
        a2 = a.reshape(math.prod(a.shape[:axis_a]), -1)
        b2 = b.reshape(math.prod(b.shape[:axis_b]), -1)
    p = a2.t() if trans_a else a2
    q = b2.t() if trans_b else b2
    if p.shape[1] != q.shape[0]:
        raise ValueError(f"operator {ctx.op.type}: A {tuple(a.shape)} (trans_a={int(trans_a)}) and "
                         f"B {tuple(b.shape)} (trans_b={int(trans_b)}) have different inner "
                         f"dimensions {p.shape[1]} and {q.shape[0]}")
    return p, q, trans_a, trans_b


@register_op("MatMul", gradient=_binary_grad("MatMulGradient"), setup=_matmul_setup)
def matmul(ctx, inputs):
    """Y = op(A)·op(B), A/B flattened to 2-D at axis_a/axis_b, op = transpose if trans_a/trans_b."""
    p, q, _, _ = _matmul_views(ctx, inputs[0], inputs[1])
    return [torch.mm(p, q)]


@register_op("MatMulGradient", setup=_matmul_setup)
def matmul_gradient(ctx, inputs):
    """(dY, A, B) -> (dA, dB)."""
    dy, a, b = inputs
    p, q, trans_a, trans_b = _matmul_views(ctx, a, b)
    dp = torch.mm(dy, q.t())
    dq = torch.mm(p.t(), dy)
    da = dp.t() if trans_a else dp
    db = dq.t() if trans_b else dq
    return [da.reshape(a.shape), db.reshape(b.shape)]

