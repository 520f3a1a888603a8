"""Neural-network ops: Conv, pooling, FC, activations, Softmax, Dropout, SpatialBN, Concat/Split.

Each forward is plain PyTorch; each gradient op calls PyTorch's own backward kernel
(``aten.convolution_backward``, ``aten.max_pool2d_with_indices_backward``, ...). Arguments are
parsed once per CreateNet by the op's ``setup`` and kept in ``ctx.state``; shape-dependent work
(padding plans) is cached per input shape. cuDNN-only arguments (``engine``, ``use_cudnn``,
``exhaustive_search``, ``cudnn_exhaustive_search``, ``ws_nbytes_limit``) are accepted and ignored.
"""
import math
import weakref

import torch
import torch.nn.functional as F

from caffe2torch.ops.registry import (NO_GRADIENT, gradient_op, grad_name, in_traced_region,
                                      register_op)

aten = torch.ops.aten

# Caffe2's LegacyPadding enum (caffe2_legacy.proto).
NOTSET, VALID, SAME, CAFFE_LEGACY_POOLING = 0, 1, 2, 3


def _order(ctx):
    order = ctx.arg("order", "NCHW")
    if order not in ("NCHW", "NHWC"):
        raise ValueError(f"operator {ctx.op.type}: order must be 'NCHW' or 'NHWC', not {order!r}")
    return order == "NHWC"


def _to_nchw(x):
    """An NHWC tensor viewed as NCHW (a channels-last view: no copy)."""
    return x.permute(0, x.dim() - 1, *range(1, x.dim() - 1))


def _to_nhwc(x):
    """An NCHW tensor viewed as NHWC."""
    return x.permute(0, *range(2, x.dim()), 1)


def _per_dim(args, single, repeated, h_name, w_name, default=None):
    """One spatial argument as a list, an int for every dimension, or ``default``."""
    if repeated in args:
        return [int(v) for v in args[repeated]]
    if single in args:
        return int(args[single])
    if h_name in args or w_name in args:
        fallback = 1 if default is None else default
        return [int(args.get(h_name, fallback)), int(args.get(w_name, fallback))]
    return default


class _Plan:
    """How one op maps onto PyTorch for one input shape."""

    __slots__ = ("kernel", "stride", "dilation", "padding", "explicit", "ceil_mode", "head",
                 "in_size", "count", "key")

    def __init__(self, kernel, stride, dilation, padding, explicit, ceil_mode, head, in_size):
        self.kernel = kernel
        self.stride = stride
        self.dilation = dilation
        self.padding = padding  # symmetric padding handed to PyTorch
        self.explicit = explicit  # F.pad list when the padding must be applied by hand, else None
        self.ceil_mode = ceil_mode
        self.head = head
        self.in_size = in_size
        self.count = None  # AveragePool: number of real inputs per window (explicit padding)
        self.key = (tuple(kernel), tuple(stride), tuple(dilation), tuple(padding),
                    tuple(explicit or ()), ceil_mode, tuple(in_size))


class _Spatial:
    """Kernel, stride, pad, dilation, order and legacy_pad of Conv/pooling (ConvPoolOpBase)."""

    def __init__(self, ctx, pool):
        args = ctx.args
        self.op_type = ctx.op.type
        self.pool = pool
        self.nhwc = _order(ctx)
        self.kernel = _per_dim(args, "kernel", "kernels", "kernel_h", "kernel_w")
        self.stride = _per_dim(args, "stride", "strides", "stride_h", "stride_w", 1)
        self.dilation = _per_dim(args, "dilation", "dilations", "dilation_h", "dilation_w", 1)
        if "pads" in args:
            self.pads = [int(v) for v in args["pads"]]
        elif "pad" in args:
            self.pads = int(args["pad"])
        elif any(k in args for k in ("pad_t", "pad_l", "pad_b", "pad_r")):
            self.pads = [int(args.get(k, 0)) for k in ("pad_t", "pad_l", "pad_b", "pad_r")]
        else:
            self.pads = 0
        self.legacy = int(args.get("legacy_pad", NOTSET))
        if self.legacy not in (NOTSET, VALID, SAME, CAFFE_LEGACY_POOLING):
            raise ValueError(f"operator {self.op_type}: unknown legacy_pad {self.legacy} "
                             "(0 NOTSET, 1 VALID, 2 SAME, 3 CAFFE_LEGACY_POOLING)")
        self.global_pooling = bool(args.get("global_pooling", 0))
        self.plans = {}

    def _list(self, value, nd, what):
        if isinstance(value, int):
            return [value] * nd
        if len(value) != nd:
            raise ValueError(f"operator {self.op_type}: {what} has {len(value)} values but the "
                             f"input has {nd} spatial dimensions")
        return value

    def plan(self, in_size, w_kernel=None):
        """The plan for spatial input size ``in_size`` (a tuple), cached."""
        key = (in_size, w_kernel)
        plan = self.plans.get(key)
        if plan is None:
            plan = self.plans[key] = self._make_plan(list(in_size), w_kernel)
        return plan

    def _make_plan(self, in_size, w_kernel):
        nd = len(in_size)
        if self.global_pooling:
            kernel, stride, dilation, pads = in_size, [1] * nd, [1] * nd, [0] * (2 * nd)
        else:
            if self.kernel is None and w_kernel is None:
                raise ValueError(f"operator {self.op_type} needs argument 'kernel' (or kernels, "
                                 "kernel_h/kernel_w, or global_pooling=1)")
            kernel = list(w_kernel) if self.kernel is None else self._list(self.kernel, nd, "kernel")
            stride = self._list(self.stride, nd, "stride")
            dilation = self._list(self.dilation, nd, "dilation")
            pads = self._list(self.pads, 2 * nd, "pads") if not isinstance(self.pads, int) \
                else [self.pads] * (2 * nd)
        if any(k <= 0 for k in kernel):
            raise ValueError(f"operator {self.op_type}: kernel must be positive, got {kernel}")
        head, tail = [], []
        for i in range(nd):
            h, t = self._pad_dim(in_size[i], kernel[i], stride[i], dilation[i], pads[i], pads[i + nd])
            head.append(h)
            tail.append(t)
            out = (in_size[i] + h + t - (dilation[i] * (kernel[i] - 1) + 1)) // stride[i] + 1
            if out < 1:
                raise ValueError(f"operator {self.op_type}: kernel {kernel} does not fit input of "
                                 f"spatial size {in_size} with pads {pads}")
        symmetric = head == tail
        fits = all(h <= k // 2 for h, k in zip(head, kernel))
        ceil_mode = False
        if self.pool and self.legacy == CAFFE_LEGACY_POOLING and fits and max(dilation) == 1:
            # Caffe's ceil-mode sizes are exactly PyTorch's ceil_mode with the head padding.
            return _Plan(kernel, stride, dilation, head, None, True, head, in_size)
        if symmetric and (not self.pool or fits):
            return _Plan(kernel, stride, dilation, head, None, ceil_mode, head, in_size)
        explicit = []
        for h, t in zip(reversed(head), reversed(tail)):
            explicit += [h, t]
        return _Plan(kernel, stride, dilation, [0] * nd, explicit, ceil_mode, head, in_size)

    def _pad_dim(self, size, k, s, d, head, tail):
        """(pad_head, pad_tail) for one dimension, by Caffe2's ComputeSizeAndPad."""
        if self.legacy == VALID:
            return 0, 0
        if self.legacy == SAME:
            target = (size + s - 1) // s
            needed = max((target - 1) * s + k - size, 0)
            return needed // 2, needed - needed // 2
        if self.legacy == CAFFE_LEGACY_POOLING:
            out = math.ceil((size + 2 * head - k) / s) + 1
            if head > 0 and (out - 1) * s >= size + head:
                out -= 1
            standard = (size + 2 * head - k) // s + 1
            return head, head + s * (out - standard)
        return head, tail


def _spatial_setup(pool):
    def setup(ctx):
        ctx.state["spatial"] = _Spatial(ctx, pool)
    return setup


def _unpad(grad, plan):
    """Cut the explicit padding off a gradient computed on the padded input."""
    nd = len(plan.in_size)
    for i in range(nd):
        grad = grad.narrow(2 + i, plan.head[i], plan.in_size[i])
    return grad


# --- Conv ---------------------------------------------------------------------------------------

def _conv_inputs(sp, x, w):
    if sp.nhwc:
        x, w = _to_nchw(x), _to_nchw(w)
    plan = sp.plan(tuple(x.shape[2:]), tuple(w.shape[2:]))
    return x, w, plan


def _conv_grad(op, g_output):
    """ConvGradient(X, W, dY) -> (dW, db, dX); db only with a bias, dX unless no_gradient_to_input."""
    with_bias = len(op.input) == 3
    need_dx = not any(a.name == "no_gradient_to_input" and a.i for a in op.arg)
    outputs = [grad_name(op.input[1])] + ([grad_name(op.input[2])] if with_bias else [])
    if need_dx:
        outputs.append(grad_name(op.input[0]))
    extra = {} if with_bias else {"no_bias": 1}
    g_input = [grad_name(op.input[0]) if need_dx else None, grad_name(op.input[1])]
    if with_bias:
        g_input.append(grad_name(op.input[2]))
    return [gradient_op(op, "ConvGradient", [op.input[0], op.input[1], g_output[0]], outputs,
                        **extra)], g_input


def _conv_setup(ctx):
    ctx.state["spatial"] = _Spatial(ctx, pool=False)
    ctx.state["group"] = int(ctx.arg("group", 1))


@register_op("Conv", gradient=_conv_grad, setup=_conv_setup)
def conv(ctx, inputs):
    """Y = conv(X, W) + b over 1-3 spatial dims; NCHW or NHWC; pads, strides, dilations, groups."""
    sp = ctx.state["spatial"]
    x, w, plan = _conv_inputs(sp, inputs[0], inputs[1])
    if plan.explicit is not None:
        x = F.pad(x, plan.explicit)
    bias = inputs[2] if len(inputs) > 2 else None
    y = torch.convolution(x, w, bias, plan.stride, plan.padding, plan.dilation, False,
                          [0] * len(plan.stride), ctx.state["group"])
    return [_to_nhwc(y) if sp.nhwc else y]


# oneDNN's CPU backward-data kernel is ~6x slower than PyTorch's native one when the conv has
# 1-3 input channels per group (a first layer: LeNet's conv1 computes data_grad, as in Caffe2).
_FEW_CHANNELS = 3


def _native_input_grad(dy, x, w, conv):
    """dX of a CPU convolution computed with oneDNN (mkldnn) switched off for this call."""
    enabled = torch._C._get_mkldnn_enabled()
    torch._C._set_mkldnn_enabled(False)
    try:
        return aten.convolution_backward(dy, x, w, None, *conv, [True, False, False])[0]
    finally:
        torch._C._set_mkldnn_enabled(enabled)


def _conv_gradient_setup(ctx):
    _conv_setup(ctx)
    ctx.state["mask"] = [not ctx.arg("no_gradient_to_input", 0), True, not ctx.arg("no_bias", 0)]


def _conv_args(ctx, plan):
    return (plan.stride, plan.padding, plan.dilation, False, [0] * len(plan.stride),
            ctx.state["group"])


def _native_dx_faster(x, w):
    return x.device.type == "cpu" and w.shape[1] <= _FEW_CHANNELS


def _finish_dx(sp, plan, dx):
    """dX on the padded NCHW view, back to the input's layout."""
    if plan.explicit is not None:
        dx = _unpad(dx, plan)
    return _to_nhwc(dx) if sp.nhwc else dx


@register_op("ConvGradient", setup=_conv_gradient_setup)
def conv_gradient(ctx, inputs):
    """(X, W, dY) -> (dW, db, dX) with aten.convolution_backward.

    When no op of the net reads dX (the first convolution's ``data_grad``, which Caffe2 writes
    but training never uses), dX is deferred: computed only if someone fetches it.
    """
    sp = ctx.state["spatial"]
    mask = ctx.state["mask"]
    lazy_dx = mask[0] and (len(ctx.output_names) - 1) in ctx.lazy_outputs
    x, w, plan = _conv_inputs(sp, inputs[0], inputs[1])
    dy = _to_nchw(inputs[2]) if sp.nhwc else inputs[2]
    if plan.explicit is not None:
        x = F.pad(x, plan.explicit)
    # dX comes from the same call unless it is deferred or faster computed alone.
    compiling = torch.compiler.is_compiling()
    fused_dx = mask[0] and not lazy_dx and (compiling or not _native_dx_faster(x, w))
    dx, dw, db = aten.convolution_backward(
        dy, x, w, [w.shape[0]] if mask[2] else None, *_conv_args(ctx, plan),
        [fused_dx, True, mask[2]])
    if sp.nhwc:
        dw = _to_nhwc(dw).contiguous()
    outputs = [dw]
    if mask[2]:
        outputs.append(db)
    if fused_dx:
        outputs.append(_finish_dx(sp, plan, dx))
    elif lazy_dx:
        # A compiled net leaves the unread dX out of its graph and defers it itself.
        outputs.append(None if compiling else
                       ctx.defer(lambda x, w, dy: _conv_dx(ctx, x, w, dy), inputs))
    elif mask[0]:
        outputs.append(_conv_dx(ctx, *inputs))
    return outputs


def _conv_dx(ctx, x_in, w_in, dy_in):
    """ConvGradient's dX alone."""
    sp = ctx.state["spatial"]
    x, w, plan = _conv_inputs(sp, x_in, w_in)
    dy = _to_nchw(dy_in) if sp.nhwc else dy_in
    if plan.explicit is not None:
        x = F.pad(x, plan.explicit)
    conv = _conv_args(ctx, plan)
    if _native_dx_faster(x, w):
        dx = _native_input_grad(dy, x, w, conv)
    else:
        dx = aten.convolution_backward(dy, x, w, None, *conv, [True, False, False])[0]
    return _finish_dx(sp, plan, dx)


# --- MaxPool / AveragePool ----------------------------------------------------------------------

_MAX_POOL = {2: aten.max_pool2d_with_indices, 3: aten.max_pool3d_with_indices}
_MAX_POOL_BACKWARD = {2: aten.max_pool2d_with_indices_backward,
                      3: aten.max_pool3d_with_indices_backward}
_AVG_POOL = {2: aten.avg_pool2d, 3: aten.avg_pool3d}
_AVG_POOL_BACKWARD = {2: aten.avg_pool2d_backward, 3: aten.avg_pool3d_backward}


def _pool_input(sp, x):
    """(x as NCHW, spatial dims, plan); 1-D input (N, C, L) is pooled as (N, C, L, 1)."""
    if sp.nhwc:
        x = _to_nchw(x)
    nd = x.dim() - 2
    if nd == 1:
        return x.unsqueeze(-1), 2, _lift_1d(sp, x.shape[2])
    if nd not in (2, 3):
        raise ValueError(f"operator {sp.op_type}: caffe2torch pools 1-D, 2-D and 3-D inputs "
                         f"(N, C and 1 to 3 spatial dims), got shape {tuple(x.shape)}")
    return x, nd, sp.plan(tuple(x.shape[2:]))


def _lift_1d(sp, length):
    """The 1-D plan for ``length`` as a 2-D plan whose second dimension is 1 (kernel 1)."""
    key = ("1d", length)
    plan = sp.plans.get(key)
    if plan is None:
        p = sp.plan((length,))
        explicit = None if p.explicit is None else [0, 0] + list(p.explicit)
        plan = sp.plans[key] = _Plan(list(p.kernel) + [1], list(p.stride) + [1],
                                     list(p.dilation) + [1], list(p.padding) + [0], explicit,
                                     p.ceil_mode, list(p.head) + [0], (length, 1))
    return plan


def _pool_output(sp, y, like):
    """Y back in the input's layout: 1-D inputs lose the helper dimension, NHWC is restored."""
    if like.dim() == 3:
        y = y.squeeze(-1)
    return _to_nhwc(y) if sp.nhwc else y


def _pool_dy(sp, dy):
    dy = _to_nchw(dy) if sp.nhwc else dy
    return dy.unsqueeze(-1) if dy.dim() == 3 else dy


def _pool_grad(grad_type):
    def maker(op, g_output):
        return [gradient_op(op, grad_type, [op.input[0], op.output[0], g_output[0]],
                            [grad_name(op.input[0])])], [grad_name(op.input[0])]
    maker.__doc__ = f"{grad_type}(X, Y, dY) -> dX."
    return maker


# PyTorch's CPU max-pool kernel for NCHW tensors walks each window in scalar code; its
# channels-last kernel runs along the channels in vector registers. From 8 channels on, copying the
# input to channels-last, pooling there and copying the output back is 2-3x faster: the forward
# of LeNet's pools on one thread goes from 4.5 to 2.2 ms and from 1.4 to 0.5 ms per batch of 64
# (with the gradient, bench/max_pool.py: ratios 0.49 and 0.40). Both kernels visit a window in
# the same order and keep its first maximum (or its last NaN): values and argmax are the same.
_CHANNELS_LAST_POOL = 8
_CHANNELS_LAST = {2: torch.channels_last, 3: torch.channels_last_3d}


def _max_pool(x, nd, plan):
    """(Y, argmax indices) of the NCHW view ``x`` (already padded by hand where the plan says).

    Both are contiguous NCHW tensors.
    """
    args = (list(plan.kernel), list(plan.stride), list(plan.padding), list(plan.dilation),
            bool(plan.ceil_mode))
    if (x.shape[1] >= _CHANNELS_LAST_POOL and x.is_contiguous() and x.device.type == "cpu"
            and x.is_floating_point()):
        if not torch.compiler.is_compiling():
            return _pool_channels_last(x, *args)
        if in_traced_region():
            return torch.ops.caffe2torch.max_pool_channels_last(x, *args)
    return _MAX_POOL[nd](x, *args)


def _pool_channels_last(x, kernel, stride, padding, dilation, ceil_mode):
    """Y and the indices both back in NCHW (the backward kernel is ~2x slower on channels-last
    indices than this copy of them costs)."""
    nd = x.dim() - 2
    y, indices = _MAX_POOL[nd](x.contiguous(memory_format=_CHANNELS_LAST[nd]), kernel, stride,
                               padding, dilation, ceil_mode)
    return y.contiguous(), indices.contiguous()


# In a compiled region the channels-last pooling is one opaque op: inductor would lower the
# layout change away (and its own max-pool and transposes are slower than ATen's kernels).
@torch.library.custom_op("caffe2torch::max_pool_channels_last", mutates_args=())
def _max_pool_channels_last(x: torch.Tensor, kernel: list[int], stride: list[int],
                            padding: list[int], dilation: list[int],
                            ceil_mode: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return _pool_channels_last(x, kernel, stride, padding, dilation, ceil_mode)


@_max_pool_channels_last.register_fake
def _(x, kernel, stride, padding, dilation, ceil_mode):
    y, indices = _MAX_POOL[x.dim() - 2](x, kernel, stride, padding, dilation, ceil_mode)
    return y.contiguous(), indices.contiguous()


def _max_pool_indices(x, nd, plan):
    if plan.explicit is not None:
        x = F.pad(x, plan.explicit, value=-math.inf)
    return x, _max_pool(x, nd, plan)


@register_op("MaxPool", gradient=_pool_grad("MaxPoolGradient"), setup=_spatial_setup(True))
def max_pool(ctx, inputs):
    """Y = max over each window; kernel/stride/pad/order/legacy_pad/global_pooling as Conv."""
    sp = ctx.state["spatial"]
    x_in = inputs[0]
    x, nd, plan = _pool_input(sp, x_in)
    _, (y, indices) = _max_pool_indices(x, nd, plan)
    y = _pool_output(sp, y, x_in)
    # Keep the argmax positions for MaxPoolGradient, as PyTorch's autograd does (also while a
    # compiled net's region is traced by make_fx; under dynamo the gradient recomputes them).
    if not torch.compiler.is_dynamo_compiling():
        y._caffe2torch_maxpool = (weakref.ref(x_in), plan.key, indices)
    return [y]


@register_op("MaxPoolGradient", setup=_spatial_setup(True))
def max_pool_gradient(ctx, inputs):
    """(X, Y, dY) -> dX: dY goes to the (first) max of each window, as PyTorch and cuDNN do."""
    sp = ctx.state["spatial"]
    x_in, y, dy = inputs
    x, nd, plan = _pool_input(sp, x_in)
    saved = (None if torch.compiler.is_dynamo_compiling()
             else getattr(y, "_caffe2torch_maxpool", None))
    if plan.explicit is not None:
        x = F.pad(x, plan.explicit, value=-math.inf)
    if saved is not None and saved[0]() is x_in and saved[1] == plan.key:
        indices = saved[2]
    else:
        indices = _max_pool(x, nd, plan)[1]
    dy = _pool_dy(sp, dy)
    dx = _MAX_POOL_BACKWARD[nd](dy, x, plan.kernel, plan.stride, plan.padding, plan.dilation,
                                plan.ceil_mode, indices)
    if plan.explicit is not None:
        dx = _unpad(dx, plan)
    return [_pool_output(sp, dx, x_in)]


def _avg_setup(ctx):
    sp = ctx.state["spatial"] = _Spatial(ctx, pool=True)
    # Caffe2's CPU AveragePool divides by the number of real (non-padding) inputs in the window;
    # later versions name this count_include_pad, default false.
    sp.count_include_pad = bool(ctx.arg("count_include_pad", 0))


def _avg_count(x, nd, plan):
    """Real inputs per window when the padding is applied by hand (cached in the plan)."""
    if plan.count is None or plan.count.device != x.device or plan.count.dtype != x.dtype:
        ones = F.pad(x.new_ones((1, 1) + tuple(plan.in_size)), plan.explicit)
        plan.count = _AVG_POOL[nd](ones, plan.kernel, plan.stride, 0, False, True, 1)
    return plan.count


@register_op("AveragePool", gradient=_pool_grad("AveragePoolGradient"), setup=_avg_setup)
def average_pool(ctx, inputs):
    """Y = mean over each window (padding not counted unless count_include_pad=1)."""
    sp = ctx.state["spatial"]
    x_in = inputs[0]
    x, nd, plan = _pool_input(sp, x_in)
    if max(plan.dilation) != 1:
        raise ValueError("operator AveragePool: dilation is not supported")
    if sp.global_pooling:
        y = x.mean(dim=tuple(range(2, x.dim())), keepdim=True)
    elif plan.explicit is None:
        y = _AVG_POOL[nd](x, plan.kernel, plan.stride, plan.padding, plan.ceil_mode,
                          sp.count_include_pad, None)
    elif sp.count_include_pad:
        y = _AVG_POOL[nd](F.pad(x, plan.explicit), plan.kernel, plan.stride, 0, False, True, None)
    else:
        total = _AVG_POOL[nd](F.pad(x, plan.explicit), plan.kernel, plan.stride, 0, False, True, 1)
        y = total / _avg_count(x, nd, plan)
    return [_pool_output(sp, y, x_in)]


@register_op("AveragePoolGradient", setup=_avg_setup)
def average_pool_gradient(ctx, inputs):
    """(X, Y, dY) -> dX with aten.avg_pool*_backward."""
    sp = ctx.state["spatial"]
    x, nd, plan = _pool_input(sp, inputs[0])
    dy = _pool_dy(sp, inputs[2])
    if plan.explicit is None:
        dx = _AVG_POOL_BACKWARD[nd](dy, x, plan.kernel, plan.stride, plan.padding, plan.ceil_mode,
                                    sp.count_include_pad, None)
    else:
        padded = F.pad(x, plan.explicit)
        if sp.count_include_pad:
            dx = _AVG_POOL_BACKWARD[nd](dy, padded, plan.kernel, plan.stride, 0, False, True, None)
        else:
            dx = _AVG_POOL_BACKWARD[nd](dy / _avg_count(x, nd, plan), padded, plan.kernel,
                                        plan.stride, 0, False, True, 1)
        dx = _unpad(dx, plan)
    return [_pool_output(sp, dx, inputs[0])]


# --- FC -----------------------------------------------------------------------------------------

def _fc_setup(ctx):
    ctx.state["axes"] = (int(ctx.arg("axis", 1)), int(ctx.arg("axis_w", 1)))


def _fc_views(ctx, x, w):
    axis, axis_w = ctx.state["axes"]
    if x.dim() == 2 and w.dim() == 2 and axis in (1, -1) and axis_w in (1, -1):
        # The common case needs no views: each torch call costs ~1 us on small tensors.
        if x.shape[1] != w.shape[1]:
            raise ValueError(f"operator FC: X {tuple(x.shape)} has K={x.shape[1]} but W "
                             f"{tuple(w.shape)} has K={w.shape[1]}")
        return x, w, None
    axis = axis + x.dim() if axis < 0 else axis
    axis_w = axis_w + w.dim() if axis_w < 0 else axis_w
    m = math.prod(x.shape[:axis])
    n = math.prod(w.shape[:axis_w])
    # Explicit sizes, not -1: an empty batch (M = 0) is valid and gives an empty Y.
    x2 = x.reshape(m, math.prod(x.shape[axis:]))
    w2 = w.reshape(n, math.prod(w.shape[axis_w:]))
    if x2.shape[1] != w2.shape[1]:
        raise ValueError(f"operator FC: X {tuple(x.shape)} flattened at axis {axis} has "
                         f"K={x2.shape[1]} but W {tuple(w.shape)} has K={w2.shape[1]}")
    return x2, w2, x.shape[:axis] + (n,)


def _fc_grad(op, g_output):
    """FCGradient(X, W, dY) -> (dW, db, dX)."""
    with_bias = len(op.input) == 3
    outputs = [grad_name(op.input[1])] + ([grad_name(op.input[2])] if with_bias else []) \
        + [grad_name(op.input[0])]
    extra = {} if with_bias else {"no_bias": 1}
    return [gradient_op(op, "FCGradient", [op.input[0], op.input[1], g_output[0]], outputs,
                        **extra)], [grad_name(n) for n in op.input]


@register_op("FC", gradient=_fc_grad, setup=_fc_setup)
def fc(ctx, inputs):
    """Y = X·Wᵀ + b with X viewed [M,K] at ``axis`` and W viewed [N,K] at ``axis_w``."""
    x2, w2, out_shape = _fc_views(ctx, inputs[0], inputs[1])
    bias = inputs[2] if len(inputs) > 2 else None
    y = F.linear(x2, w2, bias)
    return [y if out_shape is None else y.view(out_shape)]


@register_op("FCGradient", setup=_fc_setup)
def fc_gradient(ctx, inputs):
    """(X, W, dY) -> (dW, db, dX)."""
    x, w, dy = inputs
    x2, w2, out_shape = _fc_views(ctx, x, w)
    if out_shape is None:  # 2-D X and W: no views
        outputs = [torch.mm(dy.t(), x)]
        if not ctx.arg("no_bias", 0):
            outputs.append(dy.sum(0))
        outputs.append(torch.mm(dy, w))
        return outputs
    dy2 = dy.reshape(x2.shape[0], w2.shape[0])
    outputs = [torch.mm(dy2.t(), x2).view(w.shape)]
    if not ctx.arg("no_bias", 0):
        outputs.append(dy2.sum(0))
    outputs.append(torch.mm(dy2, w2).view(x.shape))
    return outputs


# --- Activations --------------------------------------------------------------------------------

def _from_output_grad(grad_type):
    def maker(op, g_output):
        return [gradient_op(op, grad_type, [op.output[0], g_output[0]],
                            [grad_name(op.input[0])])], [grad_name(op.input[0])]
    maker.__doc__ = f"{grad_type}(Y, dY) -> dX."
    return maker


@register_op("Relu", gradient=_from_output_grad("ReluGradient"))
def relu(ctx, inputs):
    """Y = max(X, 0)."""
    return [torch.relu(inputs[0])]


@register_op("ReluGradient")
def relu_gradient(ctx, inputs):
    """dX = dY where Y > 0, else 0 (inputs Y, dY)."""
    y, dy = inputs
    return [aten.threshold_backward(dy, y, 0)]


@register_op("Sigmoid", gradient=_from_output_grad("SigmoidGradient"))
def sigmoid(ctx, inputs):
    """Y = 1 / (1 + exp(-X))."""
    return [torch.sigmoid(inputs[0])]


@register_op("SigmoidGradient")
def sigmoid_gradient(ctx, inputs):
    """dX = dY·Y·(1 − Y) (inputs Y, dY)."""
    y, dy = inputs
    return [aten.sigmoid_backward(dy, y)]


@register_op("Tanh", gradient=_from_output_grad("TanhGradient"))
def tanh(ctx, inputs):
    """Y = tanh(X)."""
    return [torch.tanh(inputs[0])]


@register_op("TanhGradient")
def tanh_gradient(ctx, inputs):
    """dX = dY·(1 − Y²) (inputs Y, dY)."""
    y, dy = inputs
    return [aten.tanh_backward(dy, y)]


def _softmax_setup(ctx):
    ctx.state["axis"] = int(ctx.arg("axis", 1))


def _as_2d(x, axis):
    """X coerced to 2-D [prod(dims[:axis]), prod(dims[axis:])], as Caffe2's Softmax does."""
    axis = axis + x.dim() if axis < 0 else axis
    if x.dim() == 2 and axis == 1:
        return x
    return x.reshape(math.prod(x.shape[:axis]), -1)


@register_op("Softmax", gradient=_from_output_grad("SoftmaxGradient"), setup=_softmax_setup)
def softmax(ctx, inputs):
    """Softmax of X coerced to 2-D at ``axis`` (default 1), rows normalized."""
    x = inputs[0]
    return [torch.softmax(_as_2d(x, ctx.state["axis"]), 1).view(x.shape)]


@register_op("SoftmaxGradient", setup=_softmax_setup)
def softmax_gradient(ctx, inputs):
    """dX = Y·(dY − sum(dY·Y)) per row (inputs Y, dY)."""
    y, dy = inputs
    axis = ctx.state["axis"]
    y2 = _as_2d(y, axis)
    return [aten._softmax_backward_data(_as_2d(dy, axis), y2, 1, y2.dtype).view(y.shape)]


# --- Dropout ------------------------------------------------------------------------------------

def _dropout_grad(op, g_output):
    """DropoutGradient(dY, mask) -> dX."""
    if len(op.output) < 2:
        raise ValueError("the gradient of Dropout needs its mask: give Dropout two outputs "
                         "(Y, mask)")
    return [gradient_op(op, "DropoutGradient", [g_output[0], op.output[1]],
                        [grad_name(op.input[0])])], [grad_name(op.input[0])]


def _dropout_setup(ctx):
    ratio = float(ctx.arg("ratio", 0.5))
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"operator {ctx.op.type}: ratio must be in [0, 1), got {ratio}")
    ctx.state["dropout"] = (ratio, 1.0 / (1.0 - ratio), bool(ctx.arg("is_test", 0)))


@register_op("Dropout", gradient=_dropout_grad, setup=_dropout_setup)
def dropout(ctx, inputs):
    """Training: Y = X·mask/(1 − ratio), mask kept with probability 1 − ratio. is_test=1: Y = X."""
    ratio, scale, is_test = ctx.state["dropout"]
    x = inputs[0]
    if is_test:
        return [x.clone()]  # Caffe2 leaves the mask output unwritten in test mode
    if ctx.generator is None:
        y, mask = torch.native_dropout(x, ratio, True)
        return [y, mask]
    mask = torch.rand(x.shape, generator=ctx.generator, device=x.device) >= ratio
    return [x * mask * scale, mask]


@register_op("DropoutGradient", setup=_dropout_setup)
def dropout_gradient(ctx, inputs):
    """dX = dY·mask/(1 − ratio) (inputs dY, mask); dX = dY when is_test=1."""
    _, scale, is_test = ctx.state["dropout"]
    dy = inputs[0]
    if is_test:
        return [dy.clone()]
    return [aten.native_dropout_backward(dy, inputs[1], scale)]


# --- SpatialBN ----------------------------------------------------------------------------------

def _bn_setup(ctx):
    ctx.state["bn"] = (float(ctx.arg("epsilon", 1e-5)), float(ctx.arg("momentum", 0.9)),
                       bool(ctx.arg("is_test", 0)), _order(ctx))
    ctx.state["num_batches"] = int(ctx.arg("num_batches", 1))


def _bn_grad(op, g_output):
    """SpatialBNGradient(X, scale, dY, saved_mean, saved_inv_var) -> (dX, dscale, dbias)."""
    if len(op.output) < 5:
        raise ValueError("the gradient of SpatialBN needs a training-mode op (is_test=0) with "
                         "outputs Y, running_mean, running_var, saved_mean, saved_inv_var")
    ins = [op.input[0], op.input[1], g_output[0], op.output[3], op.output[4]]
    g = [grad_name(n) for n in op.input[:3]]
    return [gradient_op(op, "SpatialBNGradient", ins, g)], g + [None, None]


@register_op("SpatialBN", gradient=_bn_grad, setup=_bn_setup)
def spatial_bn(ctx, inputs):
    """Batch norm over channels. is_test=1: running stats; else batch stats + running update."""
    eps, momentum, is_test, nhwc = ctx.state["bn"]
    x, scale, bias, mean, var = inputs[:5]
    xc = _to_nchw(x) if nhwc else x
    if is_test:
        y = F.batch_norm(xc, mean, var, scale, bias, False, 0.0, eps)
        return [_to_nhwc(y) if nhwc else y]
    if len(inputs) == 7:  # num_batches > 1: the sums and sums of squares of all the batches
        y, saved_mean, saved_inv_var = _bn_from_sums(xc, scale, bias, inputs[5], inputs[6],
                                                     ctx.state["num_batches"], eps)
    else:
        y, saved_mean, saved_inv_var = aten.native_batch_norm(xc, scale, bias, None, None,
                                                              True, 0.0, eps)
    # Caffe2 updates the running variance with the biased batch variance.
    batch_var = saved_inv_var.pow(-2).sub_(eps)
    running_mean = mean * momentum + saved_mean * (1.0 - momentum)
    running_var = var * momentum + batch_var * (1.0 - momentum)
    return [_to_nhwc(y) if nhwc else y, running_mean, running_var, saved_mean, saved_inv_var]


@register_op("SpatialBNGradient", setup=_bn_setup)
def spatial_bn_gradient(ctx, inputs):
    """(X, scale, dY, saved_mean, saved_inv_var) -> (dX, dscale, dbias)."""
    eps, _, _, nhwc = ctx.state["bn"]
    x, scale, dy, saved_mean, saved_inv_var = inputs[:5]
    if nhwc:
        x, dy = _to_nchw(x), _to_nchw(dy)
    if len(inputs) == 7:  # num_batches > 1: dscale, dbias summed over all the batches
        n = ctx.state["num_batches"]
        dscale, dbias = inputs[5] / n, inputs[6] / n  # Caffe2 outputs their mean
        shape = (1, -1) + (1,) * (x.dim() - 2)
        xhat = (x - saved_mean.view(shape)) * saved_inv_var.view(shape)
        count = x.numel() // x.shape[1]
        dx = (scale * saved_inv_var).view(shape) * (
            dy - (dbias.view(shape) + xhat * dscale.view(shape)) / count)
    else:
        dx, dscale, dbias = aten.native_batch_norm_backward(
            dy, x, scale, None, None, saved_mean, saved_inv_var, True, eps, [True, True, True])
    return [_to_nhwc(dx) if nhwc else dx, dscale, dbias]


def _bn_from_sums(x, scale, bias, sums, sumsq, num_batches, eps):
    """Batch norm with the statistics of ``num_batches`` equal batches: their channel sums."""
    count = num_batches * (x.numel() // x.shape[1])
    mean = sums / count
    inv_std = torch.rsqrt(sumsq / count - mean * mean + eps)
    shape = (1, -1) + (1,) * (x.dim() - 2)
    y = (x - mean.view(shape)) * (inv_std * scale).view(shape) + bias.view(shape)
    return y, mean, inv_std


def _channel_sums(x):
    dims = [0] + list(range(2, x.dim()))
    return x.sum(dims), (x * x).sum(dims)


@register_op("ChannelStats", gradient=NO_GRADIENT)
def channel_stats(ctx, inputs):
    """NCHW X -> (sum, sum of squares) per channel (for SpatialBN across devices)."""
    return list(_channel_sums(inputs[0]))


@register_op("ChannelBackpropStats", gradient=NO_GRADIENT)
def channel_backprop_stats(ctx, inputs):
    """(X, saved_mean, saved_inv_std, dY) -> (dscale, dbias) of SpatialBN, per channel."""
    x, mean, inv_std, dy = inputs
    shape = (1, -1) + (1,) * (x.dim() - 2)
    dims = [0] + list(range(2, x.dim()))
    xhat = (x - mean.view(shape)) * inv_std.view(shape)
    return [(dy * xhat).sum(dims), dy.sum(dims)]


# --- Concat / Split -----------------------------------------------------------------------------

def _axis_setup(ctx):
    if "axis" in ctx.args:
        axis = int(ctx.args["axis"])
    else:
        axis = 3 if _order(ctx) else 1
    ctx.state["axis"] = axis
    ctx.state["add_axis"] = bool(ctx.arg("add_axis", 0))


def _concat_grad(op, g_output):
    """Split(dY, split_info) -> dX0, dX1, ..."""
    g = [grad_name(n) for n in op.input]
    return [gradient_op(op, "Split", [g_output[0], op.output[1]], g)], g


@register_op("Concat", gradient=_concat_grad, setup=_axis_setup)
def concat(ctx, inputs):
    """Concatenate along ``axis`` (or the channel of ``order``); outputs Y and split_info."""
    axis = ctx.state["axis"]
    if ctx.state["add_axis"]:
        y = torch.stack(inputs, axis)
        sizes = [1] * len(inputs)
    else:
        y = torch.cat(inputs, axis)
        sizes = [t.shape[axis] for t in inputs]
    return [y, torch.tensor(sizes, dtype=torch.int32)]


def _split_grad(op, g_output):
    """Concat(dY0, dY1, ...) -> (dX, split_info)."""
    g = grad_name(op.input[0])
    return [gradient_op(op, "Concat", list(g_output), [g, f"_{g}_dims"])], \
        [g] + [None] * (len(op.input) - 1)


@register_op("Split", gradient=_split_grad, setup=_axis_setup, cpu_only_inputs=True)
def split(ctx, inputs):
    """Split X along ``axis`` by argument ``split`` or the int input ``split`` (default equal)."""
    x = inputs[0]
    axis = ctx.state["axis"]
    if len(inputs) > 1:
        sizes = [int(v) for v in inputs[1].tolist()]
    elif "split" in ctx.args:
        sizes = [int(v) for v in ctx.args["split"]]
    else:
        n = len(ctx.output_names)
        if x.shape[axis] % n:
            raise ValueError(f"operator Split: axis {axis} of size {x.shape[axis]} does not "
                             f"split into {n} equal parts; give argument 'split'")
        sizes = [x.shape[axis] // n] * n
    parts = torch.split(x, sizes, axis)
    if ctx.state["add_axis"]:
        parts = [t.squeeze(axis) for t in parts]
    return [t.clone() for t in parts]  # clones: output blobs never share storage
