"""Shape and tensor ops: Reshape, Flatten, Transpose, Squeeze/ExpandDims, Slice, Gather, Tile, ...

Outputs never share storage with a differently named input blob (Caffe2 copies unless the op
runs in place), except ``Alias``, whose whole point is sharing. Shape-like inputs (Reshape's
``new_shape``, Slice's ``starts``/``ends``, Tile's ``tiles``/``axis``) are read on the host, so
these ops take ``cpu_only_inputs`` and move their data input to the op's device themselves.
Behaviour decisions: ``Slice`` may slice several dimensions at once (Caffe2 allows one);
``ResizeLike`` has a gradient (ResizeLike back to the input) although Caffe2 gives it none.
"""
import math

import torch
import torch.nn.functional as F

from caffe2torch.ops._autograd import vjp
from caffe2torch.ops.registry import NO_GRADIENT, gradient_op, grad_name, register_op

aten = torch.ops.aten


def _own(ctx, y, x, index=0):
    """``y`` (a view of input ``index``, ``x``) as its own copy unless the op runs in place."""
    if ctx.inplace.get(0) == index:
        return y
    if y.untyped_storage().data_ptr() == x.untyped_storage().data_ptr():
        return y.clone()
    return y


def _canonical_axis(ctx, axis, ndim, what="axis"):
    if not -ndim <= axis < ndim:
        raise ValueError(f"operator {ctx.op.type}: {what} {axis} is out of range for an input "
                         f"with {ndim} dims")
    return axis + ndim if axis < 0 else axis


def _ints(value):
    """A host tensor or list of ints as a Python list."""
    if isinstance(value, torch.Tensor):
        return [int(v) for v in value.reshape(-1).tolist()]
    return [int(v) for v in value]


def _single_grad(grad_type, inputs="dY", **extra):
    """A maker emitting ``grad_type`` on (``inputs`` spelled with X = input 0, dY, Y) -> dX."""
    def maker(op, g_output):
        names = {"X": op.input[0], "dY": g_output[0], "Y": op.output[0]}
        ins = [names[n] for n in inputs.split(",")]
        return [gradient_op(op, grad_type, ins, [grad_name(op.input[0])], **extra)], \
            [grad_name(op.input[0])] + [None] * (len(op.input) - 1)
    maker.__doc__ = f"{grad_type}({inputs.replace(',', ', ')}) -> dX."
    return maker


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
    ctx.state["shape"] = _ints(ctx.args["shape"]) if "shape" in ctx.args else None


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
    shape = ctx.state["shape"] if ctx.state["shape"] is not None else _ints(inputs[1])
    y = _own(ctx, x.reshape(new_shape(ctx, x, shape)), x)
    return [y, torch.tensor(x.shape, dtype=torch.int64)]


def _flatten_setup(ctx):
    ctx.state["axis"] = int(ctx.arg("axis", 1))


@register_op("Flatten", gradient=_single_grad("ResizeLike", "dY,X"), setup=_flatten_setup)
def flatten(ctx, inputs):
    """Y = X as 2-D [prod(dims[:axis]), prod(dims[axis:])] (``axis`` default 1)."""
    x = inputs[0]
    axis = ctx.state["axis"]
    axis = axis + x.dim() if axis < 0 else axis
    if not 0 <= axis <= x.dim():
        raise ValueError(f"operator Flatten: axis {ctx.state['axis']} is out of range for an "
                         f"input with {x.dim()} dims")
    return [_own(ctx, x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:])), x)]


@register_op("FlattenToVec", gradient=_single_grad("ResizeLike", "dY,X"))
def flatten_to_vec(ctx, inputs):
    """Y = X as a 1-D vector."""
    return [_own(ctx, inputs[0].reshape(-1), inputs[0])]


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
    return [_own(ctx, x.reshape(like.shape), x)]


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
    ctx.state["axes"] = None if axes is None or axes == [] else _ints(axes)


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
    dims = sorted(set(_ints(ctx.require("dims"))))
    if dims and dims[0] < 0:
        raise ValueError(f"operator {ctx.op.type}: dims {dims} must be non-negative")
    ctx.state["dims"] = dims


@register_op("Squeeze", gradient=_single_grad("ExpandDims"), setup=_dims_setup)
def squeeze(ctx, inputs):
    """Y = X without the size-1 dims listed in ``dims``."""
    x = inputs[0]
    dims = ctx.state["dims"]
    if dims and dims[-1] >= x.dim() or any(x.shape[d] != 1 for d in dims):
        raise ValueError(f"operator Squeeze: dims {dims} of input {tuple(x.shape)} are not all "
                         "of size 1")
    shape = [d for i, d in enumerate(x.shape) if i not in dims]
    return [_own(ctx, x.reshape(shape), x)]


@register_op("ExpandDims", gradient=_single_grad("Squeeze"), setup=_dims_setup)
def expand_dims(ctx, inputs):
    """Y = X with size-1 dims inserted at ``dims`` (positions in the output)."""
    x = inputs[0]
    shape = list(x.shape)
    for d in ctx.state["dims"]:
        if d > len(shape):
            raise ValueError(f"operator ExpandDims: dims {ctx.state['dims']} do not fit an input "
                             f"with {x.dim()} dims")
        shape.insert(d, 1)
    return [_own(ctx, x.reshape(shape), x)]


# --- Shape, Size, Alias, EnsureCPUOutput, LengthsToRanges ---------------------------------------

@register_op("Shape", gradient=NO_GRADIENT, cpu_only_inputs=True)
def shape(ctx, inputs):
    """Y = the int64 dims of X (only those listed in ``axes``, if given)."""
    x = inputs[0]
    dims = list(x.shape)
    if "axes" in ctx.args:
        dims = [dims[_canonical_axis(ctx, a, x.dim(), "axes entry")] for a in _ints(ctx.args["axes"])]
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


@register_op("LengthsToRanges", gradient=NO_GRADIENT)
def lengths_to_ranges(ctx, inputs):
    """(lengths [N] int32) -> ranges [N, 2] of (offset, length) per segment."""
    lengths = inputs[0]
    if lengths.dim() != 1:
        raise ValueError(f"operator LengthsToRanges: lengths must be 1-D, got shape "
                         f"{tuple(lengths.shape)}")
    offsets = torch.cumsum(lengths, 0) - lengths
    return [torch.stack([offsets, lengths], 1).to(lengths.dtype)]


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
        return _ints(inputs[first]), _ints(inputs[first + 1])
    return _ints(ctx.require("starts")), _ints(ctx.require("ends"))


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


# --- Gather, BatchGather, SparseToDense ---------------------------------------------------------

def _gather_grad(op, g_output):
    """SparseToDense(indices, dY, data) -> d_data (axis 0); else BatchGatherGradient(data, indices, dY)."""
    axis = [a.i for a in op.arg if a.name == "axis"]
    axis = axis[0] if axis else (1 if op.type == "BatchGather" else 0)
    wrap = any(a.name == "wrap_indices" and a.i for a in op.arg)
    g = grad_name(op.input[0])
    if axis == 0 and not wrap:
        return [gradient_op(op, "SparseToDense", [op.input[1], g_output[0], op.input[0]], [g],
                            copy_args=False)], [g, None]
    # SparseToDense cannot wrap negative indices: BatchGatherGradient (with wrap_indices) can.
    return [gradient_op(op, "BatchGatherGradient", [op.input[0], op.input[1], g_output[0]], [g],
                        copy_args=wrap, axis=axis)], [g, None]


def _gather_setup(ctx):
    default = 1 if ctx.op.type == "BatchGather" else 0
    ctx.state["gather"] = (int(ctx.arg("axis", default)), bool(ctx.arg("wrap_indices", 0)))


def _gather_indices(ctx, indices, n):
    """Indices as int64, negative ones wrapped (wrap_indices=1) or rejected."""
    _, wrap = ctx.state["gather"]
    if indices.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"operator {ctx.op.type}: indices must be int32 or int64, got "
                         f"{indices.dtype}")
    idx = indices.long()
    if wrap:
        idx = torch.where(idx < 0, idx + n, idx)
    if idx.numel() and (bool((idx < 0).any()) or bool((idx >= n).any())):
        raise ValueError(f"operator {ctx.op.type}: indices out of range [0, {n})")
    return idx


@register_op("Gather", gradient=_gather_grad, setup=_gather_setup)
def gather(ctx, inputs):
    """(DATA, INDICES) -> DATA's slices at INDICES along ``axis`` (default 0)."""
    data, indices = inputs
    axis = _canonical_axis(ctx, ctx.state["gather"][0], data.dim())
    idx = _gather_indices(ctx, indices, data.shape[axis])
    out = torch.index_select(data, axis, idx.reshape(-1))
    return [out.reshape(data.shape[:axis] + indices.shape + data.shape[axis + 1:])]


@register_op("BatchGather", gradient=_gather_grad, setup=_gather_setup)
def batch_gather(ctx, inputs):
    """(DATA, INDICES) -> Gather along axis 1: the same INDICES for every row of DATA."""
    return gather(ctx, inputs)


@register_op("BatchGatherGradient", setup=_gather_setup)
def batch_gather_gradient(ctx, inputs):
    """(DATA, INDICES, dY) -> dDATA: dY summed into the gathered slices along ``axis``."""
    data, indices, dy = inputs
    axis = _canonical_axis(ctx, ctx.state["gather"][0], data.dim())
    idx = _gather_indices(ctx, indices, data.shape[axis]).reshape(-1)
    flat = dy.reshape(data.shape[:axis] + (idx.numel(),) + data.shape[axis + 1:])
    return [dy.new_zeros(data.shape).index_add_(axis, idx, flat)]


def _sparse_to_dense_grad(op, g_output):
    """Gather(dY, indices) -> dvalues."""
    g = grad_name(op.input[1])
    return [gradient_op(op, "Gather", [g_output[0], op.input[0]], [g], copy_args=False)], \
        [None, g] + [None] * (len(op.input) - 2)


@register_op("SparseToDense", gradient=_sparse_to_dense_grad, data_dependent=True)
def sparse_to_dense(ctx, inputs):
    """(indices, values[, data_to_infer_dim]) -> dense: values summed into rows at indices."""
    indices, values = inputs[0], inputs[1]
    if values.shape[:indices.dim()] != indices.shape:
        raise ValueError(f"operator SparseToDense: values {tuple(values.shape)} must start with "
                         f"the shape of indices {tuple(indices.shape)}")
    idx = indices.long().reshape(-1)
    if len(inputs) > 2:
        rows = inputs[2].shape[0]
    else:
        rows = int(idx.max()) + 1 if idx.numel() else 0
    flat = values.reshape((idx.numel(),) + values.shape[indices.dim():])
    if idx.numel() and (bool((idx < 0).any()) or bool((idx >= rows).any())):
        raise ValueError(f"operator SparseToDense: indices out of range [0, {rows})")
    return [flat.new_zeros((rows,) + flat.shape[1:]).index_add_(0, idx, flat)]


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
    return tiles, _canonical_axis(ctx, axis, x.dim())


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


@register_op("Clip", gradient=_single_grad("ClipGradient", "Y,dY"), setup=_clip_setup)
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


# --- PadImage, ChannelShuffle -------------------------------------------------------------------

_PAD_MODES = {"constant": "constant", "reflect": "reflect", "edge": "replicate"}


def _pad_setup(ctx):
    args = ctx.args
    if "pads" in args:
        pads = _ints(args["pads"])
    elif "pad" in args:
        pads = [int(args["pad"])] * 4
    else:
        pads = [int(args.get(k, 0)) for k in ("pad_t", "pad_l", "pad_b", "pad_r")]
    if len(pads) != 4 or min(pads) < 0:
        raise ValueError(f"operator {ctx.op.type}: pads must be 4 non-negative values "
                         f"(t, l, b, r), got {pads}")
    mode = ctx.arg("mode", "constant")
    if mode not in _PAD_MODES:
        raise ValueError(f"operator {ctx.op.type}: mode must be one of constant, reflect, edge; "
                         f"got {mode!r}")
    order = ctx.arg("order", "NCHW")
    if order not in ("NCHW", "NHWC"):
        raise ValueError(f"operator {ctx.op.type}: order must be 'NCHW' or 'NHWC', not {order!r}")
    t, l, b, r = pads
    ctx.state["pad"] = ([l, r, t, b], _PAD_MODES[mode], float(ctx.arg("value", 0.0)),
                        order == "NHWC")


def _pad_image(ctx, x):
    pads, mode, value, nhwc = ctx.state["pad"]
    if x.dim() != 4:
        raise ValueError(f"operator {ctx.op.type} pads 4-D images, got shape {tuple(x.shape)}")
    if nhwc:
        x = x.permute(0, 3, 1, 2)
    y = F.pad(x, pads, mode=mode, value=value) if mode == "constant" else F.pad(x, pads, mode=mode)
    return y.permute(0, 2, 3, 1).contiguous() if nhwc else y


@register_op("PadImage", gradient=_single_grad("PadImageGradient"), setup=_pad_setup)
def pad_image(ctx, inputs):
    """Y = X padded by pad_t/pad_l/pad_b/pad_r (or pad, pads); mode constant (value), reflect, edge."""
    return [_pad_image(ctx, inputs[0])]


@register_op("PadImageGradient", setup=_pad_setup)
def pad_image_gradient(ctx, inputs):
    """(dY) -> dX: dY of the padding added back onto the border it copies (reflect, edge)."""
    dy = inputs[0]
    pads, _, _, nhwc = ctx.state["pad"]
    h_axis, w_axis = (1, 2) if nhwc else (2, 3)
    shape = list(dy.shape)
    shape[h_axis] -= pads[2] + pads[3]
    shape[w_axis] -= pads[0] + pads[1]
    x = dy.new_zeros(shape)
    return vjp(lambda x: _pad_image(ctx, x), [x], dy)


def _channel_shuffle(ctx, x, groups):
    nhwc = ctx.arg("order", "NCHW") == "NHWC"
    c_axis = x.dim() - 1 if nhwc else 1
    c = x.shape[c_axis]
    if c % groups:
        raise ValueError(f"operator {ctx.op.type}: {c} channels do not split into {groups} groups")
    shape = x.shape[:c_axis] + (groups, c // groups) + x.shape[c_axis + 1:]
    return x.reshape(shape).transpose(c_axis, c_axis + 1).reshape(x.shape).contiguous()


@register_op("ChannelShuffle", gradient=_single_grad("ChannelShuffleGradient"))
def channel_shuffle(ctx, inputs):
    """Y = X's channels, viewed [group, C/group], transposed (``group``, ``order``)."""
    x = inputs[0]
    return [_channel_shuffle(ctx, x, int(ctx.arg("group", 1))).clone()]


@register_op("ChannelShuffleGradient")
def channel_shuffle_gradient(ctx, inputs):
    """(dY) -> dX: the inverse shuffle."""
    dy = inputs[0]
    groups = int(ctx.arg("group", 1))
    c = dy.shape[dy.dim() - 1 if ctx.arg("order", "NCHW") == "NHWC" else 1]
    if c % groups:
        raise ValueError(f"operator ChannelShuffleGradient: {c} channels do not split into "
                         f"{groups} groups")
    return [_channel_shuffle(ctx, dy, c // groups).clone()]


# --- UpsampleNearest, ResizeNearest -------------------------------------------------------------

def _upsample_setup(ctx):
    scale = int(ctx.arg("scale", 2))
    if scale < 1:
        raise ValueError(f"operator {ctx.op.type}: scale must be >= 1, got {scale}")
    ctx.state["scale"] = scale


def _nearest(x, rows, cols):
    """x[..., rows, :][..., cols] on the last two dims."""
    return x.index_select(-2, rows).index_select(-1, cols)


def _nearest_grad(dy, shape, rows, cols):
    dx = dy.new_zeros(shape[:-1] + (dy.shape[-1],)).index_add_(-2, rows, dy)
    return dy.new_zeros(shape).index_add_(-1, cols, dx)


@register_op("UpsampleNearest", gradient=_single_grad("UpsampleNearestGradient", "X,dY"),
             setup=_upsample_setup)
def upsample_nearest(ctx, inputs):
    """Y = each pixel of NCHW X repeated ``scale`` (int, default 2) times in H and W."""
    x = inputs[0]
    s = ctx.state["scale"]
    return [x.repeat_interleave(s, -2).repeat_interleave(s, -1)]


@register_op("UpsampleNearestGradient", setup=_upsample_setup)
def upsample_nearest_gradient(ctx, inputs):
    """(X, dY) -> dX: dY summed over each scale×scale block."""
    x, dy = inputs
    s = ctx.state["scale"]
    h, w = x.shape[-2:]
    return [dy.reshape(dy.shape[:-2] + (h, s, w, s)).sum((-3, -1))]


def _resize_grad(op, g_output):
    """ResizeNearestGradient(dY, X[, scales]) -> dX."""
    ins = [g_output[0], op.input[0]] + list(op.input[1:2])
    return [gradient_op(op, "ResizeNearestGradient", ins, [grad_name(op.input[0])])], \
        [grad_name(op.input[0])] + [None] * (len(op.input) - 1)


def _resize_plan(ctx, x, scales):
    """(output H, output W, source rows, source cols) for NCHW/NHWC X."""
    if scales is not None:
        values = scales.reshape(-1).tolist()
        if len(values) != 2:
            raise ValueError(f"operator {ctx.op.type}: scales must hold [height_scale, "
                             f"width_scale], got {values}")
        hs, ws = values
    else:
        hs, ws = float(ctx.arg("height_scale", 1.0)), float(ctx.arg("width_scale", 1.0))
    if hs <= 0 or ws <= 0:
        raise ValueError(f"operator {ctx.op.type}: scales must be positive, got {hs}, {ws}")
    nhwc = ctx.arg("order", "NCHW") == "NHWC"
    h, w = (x.shape[1], x.shape[2]) if nhwc else (x.shape[2], x.shape[3])
    out_h, out_w = int(h * hs), int(w * ws)
    # Caffe2 computes min(int(y / scale), size - 1) in float32.
    f32 = torch.float32
    rows = torch.clamp((torch.arange(out_h, dtype=f32, device=x.device)
                        / torch.tensor(hs, dtype=f32)).long(), max=h - 1)
    cols = torch.clamp((torch.arange(out_w, dtype=f32, device=x.device)
                        / torch.tensor(ws, dtype=f32)).long(), max=w - 1)
    return nhwc, rows, cols


@register_op("ResizeNearest", gradient=_resize_grad)
def resize_nearest(ctx, inputs):
    """Y = X resized by height_scale/width_scale (or input scales), nearest neighbour; NCHW/NHWC."""
    x = inputs[0]
    if x.dim() != 4:
        raise ValueError(f"operator ResizeNearest takes 4-D images, got shape {tuple(x.shape)}")
    nhwc, rows, cols = _resize_plan(ctx, x, inputs[1] if len(inputs) > 1 else None)
    if nhwc:
        return [x.index_select(1, rows).index_select(2, cols)]
    return [_nearest(x, rows, cols)]


@register_op("ResizeNearestGradient")
def resize_nearest_gradient(ctx, inputs):
    """(dY, X[, scales]) -> dX: each output pixel's gradient added to its source pixel."""
    dy, x = inputs[0], inputs[1]
    nhwc, rows, cols = _resize_plan(ctx, x, inputs[2] if len(inputs) > 2 else None)
    if nhwc:
        dx = dy.new_zeros((x.shape[0], x.shape[1], dy.shape[2], x.shape[3]))
        dx.index_add_(1, rows, dy)
        return [dy.new_zeros(x.shape).index_add_(2, cols, dx)]
    return [_nearest_grad(dy, tuple(x.shape), rows, cols)]


# --- Expand, TopK, Range ------------------------------------------------------------------------

def _expand_grad(op, g_output):
    """ExpandGradient(dY, X) -> dX."""
    g = grad_name(op.input[0])
    return [gradient_op(op, "ExpandGradient", [g_output[0], op.input[0]], [g])], [g, None]


@register_op("Expand", gradient=_expand_grad, cpu_only_inputs=True)
def expand(ctx, inputs):
    """(X, shape) -> X broadcast against ``shape`` both ways (numpy rules; dims <= 0 count as 1)."""
    x = inputs[0].to(ctx.device)
    dims = [d if d > 0 else 1 for d in _ints(inputs[1])]
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


def _top_k_grad(op, g_output):
    """TopKGradient(dValues, Indices, X) -> dX."""
    if len(op.output) < 2:
        raise ValueError("the gradient of TopK needs its Indices output: give TopK two outputs")
    g = grad_name(op.input[0])
    return [gradient_op(op, "TopKGradient", [g_output[0], op.output[1], op.input[0]], [g])], [g]


def _top_k_setup(ctx):
    k = int(ctx.require("k"))
    if k < 1:
        raise ValueError(f"operator {ctx.op.type}: k must be >= 1, got {k}")
    ctx.state["top_k"] = (k, int(ctx.arg("axis", -1)))


@register_op("TopK", gradient=_top_k_grad, setup=_top_k_setup)
def top_k(ctx, inputs):
    """(X) -> (Values, Indices int64[, FlattenIndices]): the k largest along ``axis``, ties by index."""
    x = inputs[0]
    k, axis = ctx.state["top_k"]
    axis = _canonical_axis(ctx, axis, x.dim())
    if k > x.shape[axis]:
        raise ValueError(f"operator TopK: k={k} exceeds dim {axis} of size {x.shape[axis]}")
    # A stable descending sort: among equal values the smaller index comes first, as in Caffe2.
    values, indices = torch.sort(x, dim=axis, descending=True, stable=True)
    values, indices = values.narrow(axis, 0, k).contiguous(), indices.narrow(axis, 0, k).contiguous()
    outputs = [values, indices]
    if len(ctx.output_names) > 2:
        positions = torch.arange(x.numel(), device=x.device).reshape(x.shape)
        outputs.append(positions.gather(axis, indices).reshape(-1))
    return outputs


@register_op("TopKGradient", setup=_top_k_setup)
def top_k_gradient(ctx, inputs):
    """(dValues, Indices, X) -> dX: each value's gradient back at its position, 0 elsewhere."""
    dv, indices, x = inputs
    axis = _canonical_axis(ctx, ctx.state["top_k"][1], x.dim())
    return [dv.new_zeros(x.shape).scatter_(axis, indices, dv)]


@register_op("Range", gradient=NO_GRADIENT, cpu_only_inputs=True, data_dependent=True)
def range_op(ctx, inputs):
    """(stop) or (start, stop[, step]) scalars -> [start, start + step, ...) of their type."""
    if not 1 <= len(inputs) <= 3:
        raise ValueError(f"operator Range takes 1 to 3 scalar inputs, got {len(inputs)}")
    values = [x.reshape(()).item() for x in inputs]
    start, stop, step = ([0] + values + [1])[:3] if len(values) == 1 else (values + [1])[:3]
    if step == 0:
        raise ValueError("operator Range: step must not be 0")
    return [torch.arange(start, stop, step, dtype=inputs[0].dtype, device=ctx.device)]


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


# --- BooleanMask, Unique, LengthsToSegmentIds, SegmentIdsToLengths (data-dependent sizes) -------

def _boolean_mask_grad(op, g_output):
    """BooleanMaskGradient(mask, dY) -> d_data."""
    g = grad_name(op.input[0])
    return [gradient_op(op, "BooleanMaskGradient", [op.input[1], g_output[0]], [g])], [g, None]


def _check_mask(ctx, mask, rows):
    if mask.dtype != torch.bool or mask.dim() != 1 or mask.shape[0] != rows:
        raise ValueError(f"operator {ctx.op.type}: mask must be a 1-D bool tensor of the data's "
                         f"first dim {rows}, got {mask.dtype} {tuple(mask.shape)}")


@register_op("BooleanMask", gradient=_boolean_mask_grad, data_dependent=True)
def boolean_mask(ctx, inputs):
    """(data, mask) -> (masked_data[, masked_indices int64]): the rows of data where mask is true."""
    data, mask = inputs
    _check_mask(ctx, mask, data.shape[0] if data.dim() else 0)
    outputs = [data[mask]]
    if len(ctx.output_names) > 1:
        outputs.append(torch.nonzero(mask).reshape(-1))
    return outputs


@register_op("BooleanMaskGradient")
def boolean_mask_gradient(ctx, inputs):
    """(mask, dY) -> d_data: dY at the kept rows, 0 at the others."""
    mask, dy = inputs
    dx = dy.new_zeros((mask.shape[0],) + dy.shape[1:])
    dx[mask] = dy
    return [dx]


@register_op("Unique", gradient=NO_GRADIENT, data_dependent=True)
def unique(ctx, inputs):
    """(indices 1-D int) -> (unique values, sorted[, remapping: each input's position in them])."""
    x = inputs[0]
    if x.dim() != 1 or x.is_floating_point():
        raise ValueError(f"operator Unique takes a 1-D int32/int64 tensor, got {x.dtype} "
                         f"{tuple(x.shape)}")
    values, inverse = torch.unique(x, sorted=True, return_inverse=True)
    return [values, inverse.to(torch.int32)][:max(1, len(ctx.output_names))]


@register_op("LengthsToSegmentIds", gradient=NO_GRADIENT, data_dependent=True)
def lengths_to_segment_ids(ctx, inputs):
    """(lengths [N] int32) -> segment ids: i repeated lengths[i] times."""
    lengths = inputs[0]
    if lengths.dim() != 1:
        raise ValueError(f"operator LengthsToSegmentIds: lengths must be 1-D, got shape "
                         f"{tuple(lengths.shape)}")
    ids = torch.arange(lengths.shape[0], dtype=lengths.dtype, device=lengths.device)
    return [torch.repeat_interleave(ids, lengths.long())]


@register_op("SegmentIdsToLengths", gradient=NO_GRADIENT, data_dependent=True)
def segment_ids_to_lengths(ctx, inputs):
    """(sorted segment ids[, data_to_infer_dim]) -> lengths of segments 0 .. last (or dim 0 - 1)."""
    ids = inputs[0].reshape(-1).long()
    if ids.numel() > 1 and bool((ids[1:] < ids[:-1]).any()):
        raise ValueError("operator SegmentIdsToLengths: segment ids must be sorted")
    n = inputs[1].shape[0] if len(inputs) > 1 else (int(ids[-1]) + 1 if ids.numel() else 0)
    return [torch.bincount(ids, minlength=n).to(inputs[0].dtype)[:n]]
