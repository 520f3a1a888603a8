"""Image ops: PadImage, ChannelShuffle, UpsampleNearest (Detectron), ResizeNearest.

NCHW unless ``order="NHWC"`` (UpsampleNearest is NCHW only, as in Detectron). PadImage's gradient
runs the padding under autograd, so reflect and edge modes add the padding's gradient back onto
the border values it copies. ResizeNearest picks source pixel min(int(y / scale), size − 1)
computed in float32, as Caffe2 does.
"""
import torch
import torch.nn.functional as F

from caffe2torch.ops._helpers import ints, single_grad, vjp
from caffe2torch.ops.registry import gradient_op, grad_name, register_op


# --- PadImage, ChannelShuffle -------------------------------------------------------------------

_PAD_MODES = {"constant": "constant", "reflect": "reflect", "edge": "replicate"}


def _pad_setup(ctx):
    args = ctx.args
    if "pads" in args:
        pads = ints(args["pads"])
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
    top, left, bottom, right = pads
    ctx.state["pad"] = ([left, right, top, bottom], _PAD_MODES[mode], float(ctx.arg("value", 0.0)),
                        order == "NHWC")


def _pad_image(ctx, x):
    pads, mode, value, nhwc = ctx.state["pad"]
    if x.dim() != 4:
        raise ValueError(f"operator {ctx.op.type} pads 4-D images, got shape {tuple(x.shape)}")
    if nhwc:
        x = x.permute(0, 3, 1, 2)
    y = F.pad(x, pads, mode=mode, value=value) if mode == "constant" else F.pad(x, pads, mode=mode)
    return y.permute(0, 2, 3, 1).contiguous() if nhwc else y


@register_op("PadImage", gradient=single_grad("PadImageGradient"), setup=_pad_setup)
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


@register_op("ChannelShuffle", gradient=single_grad("ChannelShuffleGradient"))
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


@register_op("UpsampleNearest", gradient=single_grad("UpsampleNearestGradient", "X,dY"),
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
