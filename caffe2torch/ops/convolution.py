"""ConvTranspose and Caffe2's dimension-named aliases Conv1D, Conv2D and Conv3D.

ConvTranspose runs PyTorch's transposed convolution without padding and cuts Caffe2's (possibly
asymmetric) pads off the result; its gradient differentiates that same function with autograd.
The aliases run Conv's forward and gradient under their own op types, as Caffe2 registers them.
"""
import torch
import torch.nn.functional as F

from caffe2torch.ops import nn
from caffe2torch.ops._autograd import vjp
from caffe2torch.ops.registry import gradient_op, grad_name, register_op

_CONV_TRANSPOSE = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


class _TransposeArgs:
    """kernel, stride, pads, adj, group and order of ConvTranspose (ConvTransposeUnpoolBase)."""

    def __init__(self, ctx):
        args = ctx.args
        self.nhwc = nn._order(ctx)
        self.kernel = nn._per_dim(args, "kernel", "kernels", "kernel_h", "kernel_w")
        self.stride = nn._per_dim(args, "stride", "strides", "stride_h", "stride_w", 1)
        self.adj = nn._per_dim(args, "adj", "adjs", "adj_h", "adj_w", 0)
        if "pads" in args:
            self.pads = [int(v) for v in args["pads"]]
        elif any(k in args for k in ("pad_t", "pad_l", "pad_b", "pad_r")):
            self.pads = [int(args.get(k, 0)) for k in ("pad_t", "pad_l", "pad_b", "pad_r")]
        else:
            self.pads = int(args.get("pad", 0))
        if int(args.get("legacy_pad", nn.NOTSET)) not in (nn.NOTSET, nn.VALID):
            raise ValueError(f"operator {ctx.op.type}: legacy_pad other than VALID is not "
                             "supported for ConvTranspose")
        self.group = int(args.get("group", 1))
        self.op_type = ctx.op.type

    def lists(self, nd, w_kernel):
        """(kernel, stride, adj, head pads, tail pads) as lists of ``nd`` values."""
        def each(v, what, n=nd):
            if isinstance(v, int):
                return [v] * n
            if len(v) != n:
                raise ValueError(f"operator {self.op_type}: {what} has {len(v)} values, expected "
                                 f"{n} for {nd} spatial dimensions")
            return list(v)
        kernel = list(w_kernel) if self.kernel is None else each(self.kernel, "kernel")
        if kernel != list(w_kernel):
            raise ValueError(f"operator {self.op_type}: kernel {kernel} does not match the "
                             f"filter's spatial shape {list(w_kernel)}")
        stride, adj = each(self.stride, "stride"), each(self.adj, "adj")
        if any(a >= s for a, s in zip(adj, stride)):
            raise ValueError(f"operator {self.op_type}: adj {adj} must be smaller than stride "
                             f"{stride}")
        pads = each(self.pads, "pads", 2 * nd)
        return kernel, stride, adj, pads[:nd], pads[nd:]


def conv_transpose(args, x, w, b=None):
    """Caffe2's ConvTranspose: Y size (H − 1)·stride + kernel + adj − pad_head − pad_tail."""
    if args.nhwc:
        x, w = nn._to_nchw(x), nn._to_nchw(w)
    nd = x.dim() - 2
    if nd not in _CONV_TRANSPOSE:
        raise ValueError(f"operator {args.op_type}: input must have 1-3 spatial dims, got shape "
                         f"{tuple(x.shape)}")
    _, stride, adj, head, tail = args.lists(nd, w.shape[2:])
    y = _CONV_TRANSPOSE[nd](x, w, b, stride, 0, adj, args.group)
    for i in range(nd):
        size = y.shape[2 + i] - head[i] - tail[i]
        if size < 1:
            raise ValueError(f"operator {args.op_type}: pads {head + tail} leave no output for "
                             f"input shape {tuple(x.shape)}")
        y = y.narrow(2 + i, head[i], size)
    return nn._to_nhwc(y) if args.nhwc else y


def _conv_transpose_setup(ctx):
    ctx.state["args"] = _TransposeArgs(ctx)


def _conv_transpose_grad(op, g_output):
    """ConvTransposeGradient(X, filter, dY) -> (dfilter, dbias, dX); dbias only with a bias."""
    with_bias = len(op.input) == 3
    outs = [grad_name(op.input[1])] + ([grad_name(op.input[2])] if with_bias else []) + \
        [grad_name(op.input[0])]
    extra = {} if with_bias else {"no_bias": 1}
    return [gradient_op(op, "ConvTransposeGradient", [op.input[0], op.input[1], g_output[0]],
                        outs, **extra)], [grad_name(n) for n in op.input]


@register_op("ConvTranspose", gradient=_conv_transpose_grad, setup=_conv_transpose_setup)
def conv_transpose_op(ctx, inputs):
    """Y = transposed conv(X, filter [C_in, C_out/group, k...]) + b; pads crop, adj extends."""
    return [conv_transpose(ctx.state["args"], *inputs)]


@register_op("ConvTransposeGradient", setup=_conv_transpose_setup)
def conv_transpose_gradient(ctx, inputs):
    """(X, filter, dY) -> (dfilter, dbias, dX)."""
    x, w, dy = inputs
    args = ctx.state["args"]
    if ctx.arg("no_bias", 0):
        dx, dw = vjp(lambda x, w: conv_transpose(args, x, w), [x, w], [0, 1], [dy])
        return [dw, dx]
    c_out = w.shape[-1] * args.group if args.nhwc else w.shape[1] * args.group
    bias = torch.zeros(c_out, dtype=x.dtype, device=x.device)
    dx, dw, db = vjp(lambda x, w, b: conv_transpose(args, x, w, b), [x, w, bias], [0, 1, 2], [dy])
    return [dw, db, dx]


# --- Conv1D / Conv2D / Conv3D -------------------------------------------------------------------

def _named_conv_grad(name):
    def maker(op, g_output):
        ops, g_input = nn._conv_grad(op, g_output)
        ops[0].type = name + "Gradient"  # Caffe2's GetConvGradient names it after the op
        return ops, g_input
    maker.__doc__ = f"{name}Gradient(X, W, dY) -> (dW, db, dX), as Conv's gradient."
    return maker


def _register_conv_alias(nd):
    name = f"Conv{nd}D"

    def forward(ctx, inputs):
        x = inputs[0]
        if x.dim() != nd + 2:
            raise ValueError(f"operator {name} needs an input of {nd} spatial dimensions, got "
                             f"shape {tuple(x.shape)}")
        return nn.conv(ctx, inputs)

    forward.__doc__ = f"Conv over {nd} spatial dimension(s) (Caffe2's alias of Conv)."
    forward.__name__ = name.lower()
    register_op(name, gradient=_named_conv_grad(name), setup=nn._conv_setup)(forward)

    def backward(ctx, inputs):
        return nn.conv_gradient(ctx, inputs)

    backward.__doc__ = f"(X, W, dY) -> (dW, db, dX) for {name}."
    backward.__name__ = name.lower() + "_gradient"
    register_op(name + "Gradient", setup=nn._conv_gradient_setup)(backward)


for _nd in (1, 2, 3):
    _register_conv_alias(_nd)
