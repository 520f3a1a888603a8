"""LpPool and Caffe2's dimension-named poolings MaxPool1D/2D/3D and AveragePool1D/2D/3D.

The 2-D and 3-D aliases run MaxPool's and AveragePool's forwards and gradients under their own op
types (Caffe2 names each gradient ``<op type>Gradient``). The 1-D ones view (N, C, L) as
(N, C, L, 1) with the window arguments extended by a unit dimension.
"""
import torch.nn.functional as F

from caffe2torch.ops import nn
from caffe2torch.ops._autograd import vjp
from caffe2torch.ops.registry import register_op

_SUM_POOL = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


def _lp_setup(ctx):
    ctx.state["spatial"] = nn._Spatial(ctx, pool=True)
    p = float(ctx.arg("p", 2.0))
    if p <= 0:
        raise ValueError(f"operator {ctx.op.type}: p must be positive, got {p}")
    ctx.state["p"] = p


def lp_pool(ctx, x):
    """Y = (Σ |x|^p over each window)^(1/p); padding contributes nothing."""
    sp, p = ctx.state["spatial"], ctx.state["p"]
    xc = nn._to_nchw(x) if sp.nhwc else x
    nd = xc.dim() - 2
    if nd not in _SUM_POOL:
        raise ValueError(f"operator {ctx.op.type}: input must have 1-3 spatial dims, got shape "
                         f"{tuple(x.shape)}")
    plan = sp.plan(tuple(xc.shape[2:]))
    powered = xc.abs().pow(p)
    if plan.explicit is not None:
        powered = F.pad(powered, plan.explicit)
    total = _SUM_POOL[nd](powered, plan.kernel, plan.stride, plan.padding, plan.ceil_mode, True,
                          **({} if nd == 1 else {"divisor_override": 1}))
    if nd == 1:  # avg_pool1d has no divisor_override
        total = total * plan.kernel[0]
    y = total.pow(1.0 / p)
    return nn._to_nhwc(y) if sp.nhwc else y


@register_op("LpPool", gradient=nn._pool_grad("LpPoolGradient"), setup=_lp_setup)
def lp_pool_op(ctx, inputs):
    """Y = p-norm of each window, (Σ|X|^p)^(1/p) (``p`` default 2); kernel/stride/pad as MaxPool."""
    return [lp_pool(ctx, inputs[0])]


@register_op("LpPoolGradient", setup=_lp_setup)
def lp_pool_gradient(ctx, inputs):
    """(X, Y, dY) -> dX = dY·X·|X|^(p−2) / Y^(p−1) summed over the windows holding X."""
    return vjp(lambda x: lp_pool(ctx, x), [inputs[0]], [0], [inputs[2]])


# --- MaxPool1D/2D/3D, AveragePool1D/2D/3D -------------------------------------------------------

def _as_2d_window(sp):
    """Extend a 1-D window spec by a unit second dimension."""
    def two(v, fill):
        if v is None:
            return None
        return [v, fill] if isinstance(v, int) else list(v) + [fill]
    sp.kernel = two(sp.kernel, 1)
    sp.stride = two(sp.stride, 1)
    sp.dilation = two(sp.dilation, 1)
    sp.pads = [sp.pads, 0, sp.pads, 0] if isinstance(sp.pads, int) else \
        [sp.pads[0], 0, sp.pads[1], 0]


def _unsqueeze(x, nhwc):
    return x.unsqueeze(2) if nhwc else x.unsqueeze(-1)


def _squeeze(y, nhwc):
    return y.squeeze(2) if nhwc else y.squeeze(-1)


def _register_pool_alias(kind, nd, forward, backward, setup):
    name = f"{kind}{nd}D"

    def alias_setup(ctx):
        setup(ctx)
        if nd == 1:
            _as_2d_window(ctx.state["spatial"])

    def check(x):
        if x.dim() != nd + 2:
            raise ValueError(f"operator {name} needs an input of {nd} spatial dimension(s), got "
                             f"shape {tuple(x.shape)}")

    def fwd(ctx, inputs):
        check(inputs[0])
        if nd != 1:
            return forward(ctx, inputs)
        nhwc = ctx.state["spatial"].nhwc
        return [_squeeze(forward(ctx, [_unsqueeze(inputs[0], nhwc)])[0], nhwc)]

    def bwd(ctx, inputs):
        check(inputs[0])
        if nd != 1:
            return backward(ctx, inputs)
        nhwc = ctx.state["spatial"].nhwc
        return [_squeeze(backward(ctx, [_unsqueeze(t, nhwc) for t in inputs])[0], nhwc)]

    fwd.__doc__ = f"{kind} over {nd} spatial dimension(s) (Caffe2's alias of {kind})."
    bwd.__doc__ = f"(X, Y, dY) -> dX for {name}."
    fwd.__name__, bwd.__name__ = name.lower(), name.lower() + "_gradient"
    register_op(name, gradient=nn._pool_grad(name + "Gradient"), setup=alias_setup)(fwd)
    register_op(name + "Gradient", setup=alias_setup)(bwd)


for _nd in (1, 2, 3):
    _register_pool_alias("MaxPool", _nd, nn.max_pool, nn.max_pool_gradient, nn._spatial_setup(True))
    _register_pool_alias("AveragePool", _nd, nn.average_pool, nn.average_pool_gradient,
                         nn._avg_setup)
