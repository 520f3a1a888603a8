"""Normalization ops: LRN, LayerNorm, GroupNorm, InstanceNorm and Detectron's AffineChannel.

Each forward is a small PyTorch function of its inputs; the gradient ops take Caffe2's inputs
(e.g. LRNGradient(X, Y, scale, dY)) and differentiate that same function with autograd
(:func:`caffe2torch.ops._autograd.vjp`), so forward and gradient cannot disagree.
"""
import math

import torch.nn.functional as F

from caffe2torch.ops._autograd import vjp
from caffe2torch.ops.registry import gradient_op, grad_name, register_op


def _nhwc(ctx):
    order = ctx.arg("order", "NCHW")
    if order not in ("NCHW", "NHWC"):
        raise ValueError(f"operator {ctx.op.type}: order must be 'NCHW' or 'NHWC', not {order!r}")
    return order == "NHWC"


def _channels_first(x, nhwc):
    return x.movedim(-1, 1) if nhwc else x


def _channels_back(x, nhwc):
    return x.movedim(1, -1) if nhwc else x


# --- LRN ----------------------------------------------------------------------------------------

def _lrn_setup(ctx):
    size = int(ctx.require("size"))
    if size < 1:
        raise ValueError(f"operator {ctx.op.type}: size must be >= 1, got {size}")
    ctx.state["lrn"] = (size, float(ctx.arg("alpha", 0.0)), float(ctx.arg("beta", 0.0)),
                        float(ctx.arg("bias", 1.0)), _nhwc(ctx))


def _lrn(state, x):
    """(Y, scale): scale = bias + alpha/size · Σ x² over ``size`` channels, Y = X · scale^-beta."""
    size, alpha, beta, bias, nhwc = state
    xc = _channels_first(x, nhwc)
    # Caffe2 pads (size - 1) / 2 channels in front and the rest behind: an average pool over
    # the zero-padded channel axis of X² viewed as (N, 1, C, H·W) is alpha-free Σ/size.
    sq = (xc * xc).reshape(xc.shape[0], 1, xc.shape[1], -1)
    sq = F.pad(sq, (0, 0, (size - 1) // 2, size // 2))
    mean_sq = F.avg_pool2d(sq, (size, 1), stride=1).reshape(xc.shape)
    scale = mean_sq * alpha + bias
    y = xc * scale.pow(-beta)
    return _channels_back(y, nhwc), _channels_back(scale, nhwc)


def _lrn_grad(op, g_output):
    """LRNGradient(X, Y, scale, dY) -> dX (Y and scale only when LRN writes them)."""
    ins = [op.input[0]] + list(op.output[:2]) + [g_output[0]]
    return [gradient_op(op, "LRNGradient", ins, [grad_name(op.input[0])])], \
        [grad_name(op.input[0])]


@register_op("LRN", gradient=_lrn_grad, setup=_lrn_setup)
def lrn(ctx, inputs):
    """Y = X·(bias + alpha/size·Σ X² over ``size`` adjacent channels)^−beta; outputs Y, scale."""
    y, scale = _lrn(ctx.state["lrn"], inputs[0])
    return [y, scale][:max(1, len(ctx.output_names))]


@register_op("LRNGradient", setup=_lrn_setup)
def lrn_gradient(ctx, inputs):
    """(X, [Y, scale,] dY) -> dX."""
    return vjp(lambda x: _lrn(ctx.state["lrn"], x)[0], [inputs[0]], [0], [inputs[-1]])


def _need_moments(op, names):
    if len(op.output) < 3:
        raise ValueError(f"the gradient of {op.type} needs its moments: give {op.type} three "
                         f"outputs (Y, {names})")


# --- LayerNorm ----------------------------------------------------------------------------------

def _layer_norm_setup(ctx):
    affine = bool(ctx.arg("elementwise_affine", 0))
    ctx.state["ln"] = (int(ctx.arg("axis", 1)), float(ctx.arg("epsilon", 1e-5)), affine)
    want = 3 if affine else 1
    if not ctx.op.type.endswith("Gradient") and len(ctx.input_names) != want:
        raise ValueError(f"operator LayerNorm with elementwise_affine={int(affine)} takes "
                         f"{want} input(s) (X{', gamma, beta' if affine else ''}), got "
                         f"{len(ctx.input_names)}")


def _layer_norm(state, x, gamma=None, beta=None):
    """(Y, mean, std) with moments over dims [axis:], each of shape X.dims[:axis] + [1]."""
    axis, eps, _ = state
    axis = axis + x.dim() if axis < 0 else axis
    x2 = x.reshape(math.prod(x.shape[:axis]), -1)
    mean = x2.mean(1, keepdim=True)
    std = (x2.var(1, unbiased=False, keepdim=True) + eps).sqrt()
    y = ((x2 - mean) / std).reshape(x.shape)
    if gamma is not None:
        inner = x.shape[axis:]
        y = y * gamma.reshape(inner) + beta.reshape(inner)
    moments = tuple(x.shape[:axis]) + (1,)
    return y, mean.reshape(moments), std.reshape(moments)


def _layer_norm_grad(op, g_output):
    """LayerNormGradient(dY, Y, mean, std, X[, gamma, beta]) -> (dX[, dgamma, dbeta])."""
    _need_moments(op, "mean, std")
    affine = len(op.input) == 3
    ins = [g_output[0], op.output[0], op.output[1], op.output[2], op.input[0]]
    outs = [grad_name(op.input[0])]
    if affine:
        ins += [op.input[1], op.input[2]]
        outs += [grad_name(op.input[1]), grad_name(op.input[2])]
    return [gradient_op(op, "LayerNormGradient", ins, outs)], outs


@register_op("LayerNorm", gradient=_layer_norm_grad, setup=_layer_norm_setup)
def layer_norm(ctx, inputs):
    """Normalize X over dims [axis:] (default 1): outputs Y, mean, std (sqrt(var + epsilon))."""
    return list(_layer_norm(ctx.state["ln"], *inputs))


@register_op("LayerNormGradient", setup=_layer_norm_setup)
def layer_norm_gradient(ctx, inputs):
    """(dY, Y, mean, std, X[, gamma, beta]) -> (dX[, dgamma, dbeta])."""
    dy, x, params = inputs[0], inputs[4], inputs[5:]
    fn = lambda *t: _layer_norm(ctx.state["ln"], *t)[0]  # noqa: E731
    return vjp(fn, [x, *params], range(1 + len(params)), [dy])


# --- GroupNorm ----------------------------------------------------------------------------------

def _group_norm_setup(ctx):
    group = int(ctx.arg("group", 32))
    if group < 1:
        raise ValueError(f"operator {ctx.op.type}: group must be >= 1, got {group}")
    ctx.state["gn"] = (group, float(ctx.arg("epsilon", 1e-5)), _nhwc(ctx))


def _group_norm(state, x, gamma, beta):
    """(Y, mean, inv_std) with moments per (sample, group), each of shape (N, group)."""
    group, eps, nhwc = state
    xc = _channels_first(x, nhwc)
    n, c = xc.shape[:2]
    if c % group:
        raise ValueError(f"operator GroupNorm: {c} channels do not split into {group} groups")
    x3 = xc.reshape(n, group, -1)
    mean = x3.mean(2, keepdim=True)
    inv_std = (x3.var(2, unbiased=False, keepdim=True) + eps).rsqrt()
    shape = (1, c) + (1,) * (xc.dim() - 2)
    y = ((x3 - mean) * inv_std).reshape(xc.shape) * gamma.reshape(shape) + beta.reshape(shape)
    return _channels_back(y, nhwc), mean.reshape(n, group), inv_std.reshape(n, group)


def _group_norm_grad(op, g_output):
    """GroupNormGradient(dY, X, gamma, beta, mean, inv_std) -> (dX, dgamma, dbeta)."""
    _need_moments(op, "mean, inv_std")
    outs = [grad_name(n) for n in op.input]
    return [gradient_op(op, "GroupNormGradient", [g_output[0]] + list(op.input) +
                        list(op.output[1:3]), outs)], outs


@register_op("GroupNorm", gradient=_group_norm_grad, setup=_group_norm_setup)
def group_norm(ctx, inputs):
    """(X, gamma, beta) -> (Y, mean, inv_std): normalize each of ``group`` channel groups."""
    return list(_group_norm(ctx.state["gn"], *inputs))


@register_op("GroupNormGradient", setup=_group_norm_setup)
def group_norm_gradient(ctx, inputs):
    """(dY, X, gamma, beta, mean, inv_std) -> (dX, dgamma, dbeta)."""
    fn = lambda *t: _group_norm(ctx.state["gn"], *t)[0]  # noqa: E731
    return vjp(fn, inputs[1:4], range(3), [inputs[0]])


# --- InstanceNorm -------------------------------------------------------------------------------

def _instance_norm_setup(ctx):
    ctx.state["in"] = (float(ctx.arg("epsilon", 1e-5)), _nhwc(ctx))


def _instance_norm(state, x, scale, bias):
    """(Y, mean, inv_std) with moments per (sample, channel), each of shape (N, C)."""
    eps, nhwc = state
    xc = _channels_first(x, nhwc)
    n, c = xc.shape[:2]
    x3 = xc.reshape(n, c, -1)
    mean = x3.mean(2, keepdim=True)
    inv_std = (x3.var(2, unbiased=False, keepdim=True) + eps).rsqrt()
    y = (x3 - mean) * inv_std * scale.reshape(1, c, 1) + bias.reshape(1, c, 1)
    return _channels_back(y.reshape(xc.shape), nhwc), mean.reshape(n, c), inv_std.reshape(n, c)


def _instance_norm_grad(op, g_output):
    """InstanceNormGradient(X, scale, bias, dY[, mean, inv_stdev]) -> (dX, dscale, dbias)."""
    outs = [grad_name(n) for n in op.input]
    return [gradient_op(op, "InstanceNormGradient", list(op.input) + [g_output[0]] +
                        list(op.output[1:3]), outs)], outs


@register_op("InstanceNorm", gradient=_instance_norm_grad, setup=_instance_norm_setup)
def instance_norm(ctx, inputs):
    """(X, scale, bias) -> (Y[, mean, inv_stdev]): normalize each channel of each sample."""
    return list(_instance_norm(ctx.state["in"], *inputs))[:max(1, len(ctx.output_names))]


@register_op("InstanceNormGradient", setup=_instance_norm_setup)
def instance_norm_gradient(ctx, inputs):
    """(X, scale, bias, dY[, mean, inv_stdev]) -> (dX, dscale, dbias)."""
    fn = lambda *t: _instance_norm(ctx.state["in"], *t)[0]  # noqa: E731
    return vjp(fn, inputs[:3], range(3), [inputs[3]])


# --- AffineChannel ------------------------------------------------------------------------------

def _affine_setup(ctx):
    ctx.state["nhwc"] = _nhwc(ctx)


def _per_channel(v, x, nhwc):
    return v if nhwc else v.reshape((-1,) + (1,) * (x.dim() - 2))


def _affine_grad(op, g_output):
    """AffineChannelGradient(dY, scale[, X]) -> dX[, dscale, dbias] (X when is_learnable=1)."""
    learnable = any(a.name == "is_learnable" and a.i for a in op.arg)
    if learnable:
        outs = [grad_name(n) for n in op.input]
        return [gradient_op(op, "AffineChannelGradient", [g_output[0], op.input[1], op.input[0]],
                            outs)], outs
    return [gradient_op(op, "AffineChannelGradient", [g_output[0], op.input[1]],
                        [grad_name(op.input[0])])], [grad_name(op.input[0]), None, None]


@register_op("AffineChannel", gradient=_affine_grad, setup=_affine_setup)
def affine_channel(ctx, inputs):
    """Y = X·scale + bias per channel (Detectron's frozen batch norm); NCHW or NHWC."""
    x, scale, bias = inputs
    nhwc = ctx.state["nhwc"]
    return [x * _per_channel(scale, x, nhwc) + _per_channel(bias, x, nhwc)]


@register_op("AffineChannelGradient", setup=_affine_setup)
def affine_channel_gradient(ctx, inputs):
    """(dY, scale[, X]) -> dX = dY·scale[, dscale = Σ dY·X, dbias = Σ dY] per channel."""
    dy, scale = inputs[0], inputs[1]
    nhwc = ctx.state["nhwc"]
    outputs = [dy * _per_channel(scale, dy, nhwc)]
    if len(inputs) > 2:
        axes = tuple(range(dy.dim() - 1)) if nhwc else (0,) + tuple(range(2, dy.dim()))
        outputs += [(dy * inputs[2]).sum(axes), dy.sum(axes)]
    return outputs
