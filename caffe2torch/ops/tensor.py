"""Shape and tensor ops: Reshape, Flatten, Transpose, Squeeze/ExpandDims, Shape, Slice, Tile, ...

Outputs never share storage with a differently named input blob (Caffe2 copies unless the op
runs in place), except ``Alias``, whose whole point is sharing. Shape-like inputs (Reshape's
``new_shape``, Slice's ``starts``/``ends``, Tile's ``tiles``/``axis``, Expand's ``shape``) are read
on the host, so these ops take ``cpu_only_inputs`` and move their data input to the op's device
themselves. Behaviour decisions: ``Slice`` may slice several dimensions at once (Caffe2 allows
one); ``ResizeLike`` has a gradient (ResizeLike back to the input) although Caffe2 gives it none.
"""
import math

import torch

from caffe2torch.ops._helpers import canonical_axis, ints, own, single_grad
from caffe2torch.ops.registry import NO_GRADIENT, gradient_op, grad_name, register_op


# --- Reshape, Flatten, FlattenToVec, ResizeLike -------------------------------------------------

def _reshape_grad(op, g_output):
    """Reshape(dY, old_shape) -> dX (needs Reshape's second output, old_shape)."""
    if len(op.output) < 2:
        raise ValueError(f"the gradient of Reshape ({list(op.input)} -> {list(op.output)}) needs "
                         "its second output old_shape: give Reshape two outputs")
    g = grad_name(op.input[0])
    return [gradient_op(op, "Reshape", [g_output[0], op.output[1]], [g, f"_{g}_dims"],
                        copy_args=False)], [g] + [None] * (len(op.input) - 1)


def _reshape_setup(ctx):
    if len(ctx.input_names) > 1 and "shape" in ctx.args:
        raise ValueError("operator Reshape: the new shape comes from input new_shape; do not also "
                         "pass argument 'shape'")
    if len(ctx.input_names) == 1 and "shape" not in ctx.args:
        raise ValueError("operator Reshape needs argument 'shape' or a second input new_shape")
    ctx.state["shape"] = ints(ctx.args["shape"]) if "shape" in ctx.args else None


def new_shape(ctx, x, shape):
    """Caffe2's Reshape rule: 0 copies the input's dim at that index, one -1 is inferred."""
    out = [x.shape[i] if d == 0 and i < x.dim() else d for i, d in enumerate(shape)]
    if out.count(-1) > 1:
        raise ValueError(f"operator {ctx.op.type}: shape {shape} has more than one -1")
    known = math.prod(d for d in out if d != -1)
    if -1 in out:
        if known == 0 or x.numel() % known:
            raise ValueError(f"operator {ctx.op.type}: cannot reshape {tuple(x.shape)} to {shape}")
        out[out.index(-1)] = x.numel() // known
    if math.prod(out) != x.numel():
        raise ValueError(f"operator {ctx.op.type}: cannot reshape {tuple(x.shape)} "
                         f"({x.numel()} values) to {shape}")
    return out


@register_op("Reshape", gradient=_reshape_grad, setup=_reshape_setup, cpu_only_inputs=True)
def reshape(ctx, inputs):
    """(data[, new_shape]) -> (reshaped, old_shape): ``shape`` with 0 = keep that dim, -1 = infer."""
    x = inputs[0].to(ctx.device)
    shape = ctx.state["shape"] if ctx.state["shape"] is not None else ints(inputs[1])
    y = own(ctx, x.reshape(new_shape(ctx, x, shape)), x)
    return [y, torch.tensor(x.shape, dtype=torch.int64)]


def _flatten_setup(ctx):
    ctx.state["axis"] = int(ctx.arg("axis", 1))


@register_op("Flatten", gradient=single_grad("ResizeLike", "dY,X"), setup=_flatten_setup)
def flatten(ctx, inputs):
    """Y = X as 2-D [prod(dims[:axis]), prod(dims[axis:])] (``axis`` default 1)."""
    x = inputs[0]
    axis = ctx.state["axis"]
    axis = axis + x.dim() if axis < 0 else axis
    if not 0 <= axis <= x.dim():
        raise ValueError(f"operator Flatten: axis {ctx.state['axis']} is out of range for an "
                         f"input with {x.dim()} dims")
    return [own(ctx, x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:])), x)]


@register_op("FlattenToVec", gradient=single_grad("ResizeLike", "dY,X"))
def flatten_to_vec(ctx, inputs):
    """Y = X as a 1-D vector."""
    return [own(ctx, inputs[0].reshape(-1), inputs[0])]


def _resize_like_grad(op, g_output):
    """ResizeLike(dY, data) -> d_data."""
    return [gradient_op(op, "ResizeLike", [g_output[0], op.input[0]],
                        [grad_name(op.input[0])])], [grad_name(op.input[0]), None]


@register_op("ResizeLike", gradient=_resize_like_grad)
def resize_like(ctx, inputs):
    """(data, shape_like) -> data reshaped to shape_like's shape (same number of values)."""
    x, like = inputs
    if x.numel() != like.numel():
        raise ValueError(f"operator ResizeLike: data {tuple(x.shape)} and shape_like "
                         f"{tuple(like.shape)} hold different numbers of values")
    return [own(ctx, x.reshape(like.shape), x)]


# --- Transpose, Squeeze, ExpandDims -------------------------------------------------------------

def _transpose_grad(op, g_output):
    """Transpose(dY) with the inverse ``axes`` -> dX."""
    axes = [list(a.ints) for a in op.arg if a.name == "axes"]
    extra = {}
    if axes:
        extra["axes"] = sorted(range(len(axes[0])), key=lambda i: axes[0][i])
    return [gradient_op(op, "Transpose", [g_output[0]], [grad_name(op.input[0])], **extra)], \
        [grad_name(op.input[0])]


def _transpose_setup(ctx):
    axes = ctx.arg("axes")
    ctx.state["axes"] = None if axes is None or axes == [] else ints(axes)


@register_op("Transpose", gradient=_transpose_grad, setup=_transpose_setup)
def transpose(ctx, inputs):
    """Y = X with its dims permuted by ``axes`` (default: reversed)."""
    x = inputs[0]
    axes = ctx.state["axes"]
    if axes is None:
        axes = list(range(x.dim() - 1, -1, -1))
    elif sorted(axes) != list(range(x.dim())):
        raise ValueError(f"operator Transpose: axes {axes} is not a permutation of the input's "
                         f"{x.dim()} dims")
    return [x.permute(axes).clone(memory_format=torch.contiguous_format)]


def _dims_setup(ctx):
    dims = sorted(set(ints(ctx.require("dims"))))
    if dims and dims[0] < 0:
        raise ValueError(f"operator {ctx.op.type}: dims {dims} must be non-negative")
    ctx.state["dims"] = dims


@register_op("Squeeze", gradient=single_grad("ExpandDims"), setup=_dims_setup)
def squeeze(ctx, inputs):
    """Y = X without the size-1 dims listed in ``dims``."""
    x = inputs[0]
    dims = ctx.state["dims"]
    if dims and dims[-1] >= x.dim() or any(x.shape[d] != 1 for d in dims):
        raise ValueError(f"operator Squeeze: dims {dims} of input {tuple(x.shape)} are not all "
                         "of size 1")
    shape = [d for i, d in enumerate(x.shape) if i not in dims]
    return [own(ctx, x.reshape(shape), x)]


@register_op("ExpandDims", gradient=single_grad("Squeeze"), setup=_dims_setup)
def expand_dims(ctx, inputs):
    """Y = X with size-1 dims inserted at ``dims`` (positions in the output)."""
    x = inputs[0]
    shape = list(x.shape)
    for d in ctx.state["dims"]:
        if d > len(shape):
            raise ValueError(f"operator ExpandDims: dims {ctx.state['dims']} do not fit an input "
                             f"with {x.dim()} dims")
        shape.insert(d, 1)
    return [own(ctx, x.reshape(shape), x)]


# --- Shape, Size, Alias, EnsureCPUOutput --------------------------------------------------------

@register_op("Shape", gradient=NO_GRADIENT, cpu_only_inputs=True)
def shape(ctx, inputs):
    """Y = the int64 dims of X (only those listed in ``axes``, if given)."""
    x = inputs[0]
    dims = list(x.shape)
    if "axes" in ctx.args:
        dims = [dims[canonical_axis(ctx, a, x.dim(), "axes entry")] for a in ints(ctx.args["axes"])]
    return [torch.tensor(dims, dtype=torch.int64, device=ctx.device)]


@register_op("Size", gradient=NO_GRADIENT, cpu_only_inputs=True)
def size(ctx, inputs):
    """Y = the number of values of X (a 0-d int64)."""
    return [torch.tensor(inputs[0].numel(), dtype=torch.int64, device=ctx.device)]


@register_op("Alias", gradient=NO_GRADIENT, cpu_only_inputs=True)
def alias(ctx, inputs):
    """Y = X sharing X's storage (a write to one shows in the other)."""
    return [inputs[0]]


@register_op("EnsureCPUOutput", gradient=NO_GRADIENT, cpu_only_inputs=True)
def ensure_cpu_output(ctx, inputs):
    """Y = X in host memory (copied from the GPU if needed)."""
    x = inputs[0]
    return [x if ctx.inplace.get(0) == 0 and x.device.type == "cpu" else x.to("cpu", copy=True)]


# --- Slice --------------------------------------------------------------------------------------

def _slice_grad(op, g_output):
    """SliceGradient(data, [starts, ends,] dY) -> d_data."""
    ins = [op.input[0]] + list(op.input[1:3]) + [g_output[0]]
    return [gradient_op(op, "SliceGradient", ins, [grad_name(op.input[0])])], \
        [grad_name(op.input[0])] + [None] * (len(op.input) - 1)


def _slice_index(ctx, x, starts, ends):
    """The tuple of slices for ``x``; negative indices count from dim + 1 (Caffe2's rule)."""
    if len(starts) != len(ends) or len(starts) > x.dim():
        raise ValueError(f"operator {ctx.op.type}: starts {starts} and ends {ends} must have the "
                         f"same length, at most the input's {x.dim()} dims")
    index = []
    for i, (s, e) in enumerate(zip(starts, ends)):
        n = x.shape[i]
        s = min(n + 1 + s if s < 0 else s, n)
        e = min(n + 1 + e if e < 0 else e, n)
        if s < 0 or e < s:
            raise ValueError(f"operator {ctx.op.type}: dim {i} of size {n} cannot be sliced from "
                             f"{starts[i]} to {ends[i]}")
        index.append(slice(s, e))
    return tuple(index)


def _slice_bounds(ctx, inputs, first):
    if len(inputs) > first:
        return ints(inputs[first]), ints(inputs[first + 1])
    return ints(ctx.require("starts")), ints(ctx.require("ends"))


@register_op("Slice", gradient=_slice_grad, cpu_only_inputs=True)
def slice_op(ctx, inputs):
    """Y = X[starts:ends] per dim (args or inputs starts/ends); -1 as an end means the end."""
    x = inputs[0].to(ctx.device)
    starts, ends = _slice_bounds(ctx, inputs[:3], 1)
    return [x[_slice_index(ctx, x, starts, ends)].clone()]


@register_op("SliceGradient", cpu_only_inputs=True)
def slice_gradient(ctx, inputs):
    """(data, [starts, ends,] dY) -> d_data: dY in the sliced window, 0 elsewhere."""
    x, dy = inputs[0], inputs[-1].to(ctx.device)
    starts, ends = _slice_bounds(ctx, inputs[:-1], 1)
    dx = dy.new_zeros(x.shape)
    dx[_slice_index(ctx, x, starts, ends)] = dy
    return [dx]


# --- Tile ---------------------------------------------------------------------------------------

def _tile_grad(op, g_output):
    """TileGradient(dY[, tiles, axis]) -> dX."""
    ins = [g_output[0]] + list(op.input[1:3])
    return [gradient_op(op, "TileGradient", ins, [grad_name(op.input[0])])], \
        [grad_name(op.input[0])] + [None] * (len(op.input) - 1)


def _tile_args(ctx, inputs, x):
    tiles = int(inputs[1].reshape(()).item()) if len(inputs) > 1 else int(ctx.arg("tiles", 1))
    axis = int(inputs[2].reshape(()).item()) if len(inputs) > 2 else int(ctx.arg("axis", 0))
    if tiles < 1:
        raise ValueError(f"operator {ctx.op.type}: tiles must be >= 1, got {tiles}")
    return tiles, canonical_axis(ctx, axis, x.dim())


@register_op("Tile", gradient=_tile_grad, cpu_only_inputs=True)
def tile(ctx, inputs):
    """Y = X repeated ``tiles`` times along ``axis`` (args, or inputs tiles and axis)."""
    x = inputs[0].to(ctx.device)
    tiles, axis = _tile_args(ctx, inputs, x)
    reps = [1] * x.dim()
    reps[axis] = tiles
    return [x.repeat(reps)]


@register_op("TileGradient", cpu_only_inputs=True)
def tile_gradient(ctx, inputs):
    """(dY[, tiles, axis]) -> dX: the tiles of dY summed."""
    dy = inputs[0].to(ctx.device)
    tiles, axis = _tile_args(ctx, inputs, dy)
    shape = dy.shape[:axis] + (tiles, dy.shape[axis] // tiles) + dy.shape[axis + 1:]
    return [dy.reshape(shape).sum(axis)]


# --- Expand -------------------------------------------------------------------------------------

def _expand_grad(op, g_output):
    """ExpandGradient(dY, X) -> dX."""
    g = grad_name(op.input[0])
    return [gradient_op(op, "ExpandGradient", [g_output[0], op.input[0]], [g])], [g, None]


@register_op("Expand", gradient=_expand_grad, cpu_only_inputs=True, data_dependent=True)
def expand(ctx, inputs):
    """(X, shape) -> X broadcast against ``shape`` both ways (numpy rules; dims <= 0 count as 1)."""
    x = inputs[0].to(ctx.device)
    dims = [d if d > 0 else 1 for d in ints(inputs[1])]
    try:
        out = torch.broadcast_shapes(tuple(x.shape), tuple(dims))
    except RuntimeError:
        raise ValueError(f"operator Expand: X {tuple(x.shape)} does not broadcast to shape "
                         f"{dims}") from None
    return [x.expand(out).contiguous() if out != x.shape else x.clone()]


@register_op("ExpandGradient")
def expand_gradient(ctx, inputs):
    """(dY, X) -> dX: dY summed back to X's shape."""
    dy, x = inputs
    return [dy.sum_to_size(x.shape).contiguous()]


# --- Where, Clip --------------------------------------------------------------------------------

@register_op("Where", gradient=NO_GRADIENT)
def where(ctx, inputs):
    """Z = C ? X : Y elementwise (same shapes), or per row of X with broadcast_on_rows=1."""
    c, x, y = inputs
    if c.dtype != torch.bool:
        raise ValueError(f"operator Where: C must be a bool tensor, got {c.dtype}; Cast it with "
                         "to=BOOL")
    if x.shape != y.shape:
        raise ValueError(f"operator Where: X {tuple(x.shape)} and Y {tuple(y.shape)} differ")
    if ctx.arg("broadcast_on_rows", 0):
        if c.dim() != 1 or x.dim() < 1 or c.shape[0] != x.shape[0]:
            raise ValueError(f"operator Where with broadcast_on_rows=1: C {tuple(c.shape)} must "
                             f"be 1-D of X's first dim {x.shape[0] if x.dim() else 0}")
        c = c.reshape((-1,) + (1,) * (x.dim() - 1))
    elif c.shape != x.shape:
        raise ValueError(f"operator Where: C {tuple(c.shape)} and X {tuple(x.shape)} differ; "
                         "set broadcast_on_rows=1 to select whole rows")
    return [torch.where(c, x, y)]


def _clip_setup(ctx):
    low, high = ctx.arg("min"), ctx.arg("max")
    ctx.state["clip"] = (None if low is None else float(low), None if high is None else float(high))


@register_op("Clip", gradient=single_grad("ClipGradient", "Y,dY"), setup=_clip_setup)
def clip(ctx, inputs):
    """Y = X limited to [min, max] (each side unbounded when its argument is not set)."""
    low, high = ctx.state["clip"]
    if low is None and high is None:
        return [inputs[0].clone()]
    return [torch.clamp(inputs[0], low, high)]


@register_op("ClipGradient", setup=_clip_setup)
def clip_gradient(ctx, inputs):
    """(Y, dY) -> dX = dY where min < Y < max, else 0."""
    low, high = ctx.state["clip"]
    y, dy = inputs
    keep = torch.ones_like(y, dtype=torch.bool)
    if low is not None:
        keep &= y > low
    if high is not None:
        keep &= y < high
    return [dy * keep]


# --- NCHW2NHWC / NHWC2NCHW ----------------------------------------------------------------------

def _order_switch(op_type, back, to_nhwc):
    def forward(ctx, inputs):
        x = inputs[0]
        if not 3 <= x.dim() <= 5:
            raise ValueError(f"operator {op_type} takes 3-D to 5-D tensors (1 to 3 spatial dims), "
                             f"got shape {tuple(x.shape)}")
        perm = [0, *range(2, x.dim()), 1] if to_nhwc else [0, x.dim() - 1, *range(1, x.dim() - 1)]
        return [x.permute(perm).contiguous()]
    forward.__doc__ = ("Y = X from N C H.. to N H.. C order." if to_nhwc else
                       "Y = X from N H.. C to N C H.. order.")
    forward.__name__ = op_type

    def maker(op, g_output):
        g = grad_name(op.input[0])
        return [gradient_op(op, back, [g_output[0]], [g])], [g]
    maker.__doc__ = f"{back}(dY) -> dX."
    register_op(op_type, gradient=maker)(forward)


_order_switch("NCHW2NHWC", "NHWC2NCHW", True)
_order_switch("NHWC2NCHW", "NCHW2NHWC", False)
