"""More of Caffe2's ``caffe2/sgd`` and gradient-clipping ops: Lars (the layer-wise rate factor),
RowWiseSparseAdagrad, FP16MomentumSGDUpdate / FP32MomentumSGDUpdate (with weight decay), LpNorm
and ClipTensorByScaling. Sign conventions as in :mod:`caffe2torch.ops.optimizer`."""
import torch

from caffe2torch.ops.optimizer import _farg, _momentum_step, _rows, _scalar
from caffe2torch.ops.registry import NO_GRADIENT, grad_name, gradient_op, register_op


@register_op("Lars", gradient=NO_GRADIENT)
def lars(ctx, inputs):
    """(X, dX, wd, trust, lr_max) -> [1] factor trust/(‖dX‖/‖X‖ + wd + offset), in [lr_min, lr_max]."""
    x, dx, wd, trust, lr_max = inputs
    if x.numel() != dx.numel():
        raise ValueError(f"operator Lars: the gradient {ctx.input_names[1]!r} has {dx.numel()} "
                         f"values, the parameter {ctx.input_names[0]!r} {x.numel()}")
    offset, lr_min = _farg(ctx, "offset", 0.5), _farg(ctx, "lr_min", 0.02)
    if offset < 0 or lr_min < 0:
        raise ValueError("operator Lars: offset and lr_min must be >= 0")
    x_norm = torch.linalg.vector_norm(x.float())
    dx_norm = torch.linalg.vector_norm(dx.float())
    wd, trust, lr_max = (_scalar(ctx, t, x_norm, name) for t, name in
                         ((wd, "wd"), (trust, "trust"), (lr_max, "lr_max")))
    val = torch.where(x_norm > 0, trust / (dx_norm / x_norm + wd + offset),
                      torch.ones_like(x_norm))
    return [torch.clamp(torch.minimum(val, lr_max), min=lr_min).reshape(1)]


def _rowwise_setup(ctx):
    if len(ctx.output_names) != 2:
        raise ValueError("operator RowWiseSparseAdagrad takes 2 outputs (param, moment)")


@register_op("RowWiseSparseAdagrad", gradient=NO_GRADIENT, setup=_rowwise_setup)
def rowwise_sparse_adagrad(ctx, inputs):
    """(param, moment, indices, grad, lr) -> (param', moment'): one moment per row, += mean(g²)."""
    param, moment, indices, grad, lr = inputs[:5]
    if moment.dim() != 1 or moment.shape[0] != param.shape[0]:
        raise ValueError(f"operator RowWiseSparseAdagrad: moment {ctx.input_names[1]!r} must be "
                         f"1-D with one value per row of the parameter ({param.shape[0]}), got "
                         f"shape {tuple(moment.shape)}")
    eps, wd = _farg(ctx, "epsilon", 1e-5), _farg(ctx, "weight_decay", 0.0)
    lr = _scalar(ctx, lr, param)
    idx, repeated = _rows(indices)
    param, moment = param.clone(), moment.clone()
    p2 = param.reshape(param.shape[0], -1)
    rows = grad.reshape(idx.numel(), -1)
    if not repeated:
        g = rows + wd * p2[idx] if wd else rows
        moment[idx] = moment[idx] + (g * g).mean(dim=1)
        p2[idx] = p2[idx] + lr * g / (torch.sqrt(moment[idx]) + eps).unsqueeze(1)
        return [param, moment]
    for i, row in enumerate(idx.tolist()):  # Caffe2's order: repeated rows accumulate
        g = rows[i] + wd * p2[row] if wd else rows[i]
        moment[row] += (g * g).mean()
        p2[row] += lr * g / (torch.sqrt(moment[row]) + eps)
    return [param, moment]


def _momentum_wd(ctx, inputs):
    grad, moment, lr, param = inputs
    dtype = param.dtype
    g = grad.float() + _farg(ctx, "weight_decay", 0.0) * param.float()
    adjusted, new_moment = _momentum_step(ctx, g, moment.float(), lr.float())
    return [adjusted.to(grad.dtype), new_moment.to(moment.dtype),
            (param.float() - adjusted).to(dtype)]


@register_op("FP16MomentumSGDUpdate", gradient=NO_GRADIENT)
def fp16_momentum_sgd_update(ctx, inputs):
    """MomentumSGDUpdate on float16 blobs (computed in float32), grad += weight_decay·param."""
    return _momentum_wd(ctx, inputs)


@register_op("FP32MomentumSGDUpdate", gradient=NO_GRADIENT)
def fp32_momentum_sgd_update(ctx, inputs):
    """MomentumSGDUpdate with grad += weight_decay·param (float32 blobs)."""
    return _momentum_wd(ctx, inputs)


def _lp_setup(ctx):
    if ctx.arg("p", 2) not in (1, 2):
        raise ValueError(f"operator {ctx.op.type}: p must be 1 or 2, got {ctx.arg('p')}")


def _lp_norm_grad(op, g_output):
    """LpNormGradient(X, dY) -> dX."""
    dx = grad_name(op.input[0])
    return [gradient_op(op, "LpNormGradient", [op.input[0], g_output[0]], [dx])], [dx]


@register_op("LpNorm", gradient=_lp_norm_grad, setup=_lp_setup)
def lp_norm(ctx, inputs):
    """[1] Σ|x| (p=1) or Σx² (p=2, no square root), divided by the size with ``average=1``."""
    x = inputs[0]
    out = x.abs().sum() if ctx.arg("p", 2) == 1 else (x * x).sum()
    if ctx.arg("average", 0):
        out = out / max(x.numel(), 1)
    return [out.reshape(1)]


@register_op("LpNormGradient", gradient=NO_GRADIENT, setup=_lp_setup)
def lp_norm_gradient(ctx, inputs):
    """dX = dY·sign(x) (p=1) or dY·2x (p=2), divided by the size with ``average=1``."""
    x, dy = inputs
    dy = dy.reshape(())
    dx = dy * torch.sign(x) if ctx.arg("p", 2) == 1 else dy * 2 * x
    if ctx.arg("average", 0):
        dx = dx / max(x.numel(), 1)
    return [dx]


@register_op("ClipTensorByScaling", gradient=NO_GRADIENT)
def clip_tensor_by_scaling(ctx, inputs):
    """(X, val[, additional_threshold]) -> X·threshold/val when val > threshold, else X."""
    x, val = inputs[0], inputs[1]
    threshold = float(ctx.require("threshold"))
    if threshold <= 0:
        raise ValueError(f"operator ClipTensorByScaling: threshold must be > 0, got {threshold}")
    threshold = torch.tensor(threshold, dtype=x.dtype, device=x.device)
    if len(inputs) > 2:
        threshold = threshold * _scalar(ctx, inputs[2], x, "additional_threshold")
    val = _scalar(ctx, val, x, "val")
    return [torch.where(val > threshold, x * (threshold / val), x)]
