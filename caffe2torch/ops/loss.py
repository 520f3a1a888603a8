"""Losses and metrics: LabelCrossEntropy, AveragedLoss, SoftmaxWithLoss, Accuracy."""
import math

import torch

from caffe2torch.ops._helpers import tracing
from caffe2torch.ops.registry import NO_GRADIENT, gradient_op, grad_name, register_op

_LOG_THRESHOLD = 1e-20  # Caffe2 clamps probabilities before the log (kLOG_THRESHOLD)


def _labels(ctx, label, n, d=None):
    """Integer labels as a [N, 1] int64 index; range-checked when they live on the CPU."""
    if label.dtype.is_floating_point or label.dtype == torch.bool:
        raise ValueError(f"operator {ctx.op.type}: label {ctx.input_names[1]!r} must be an "
                         f"integer tensor (int32), got {label.dtype}")
    if label.numel() != n:
        raise ValueError(f"operator {ctx.op.type}: {n} rows but label {ctx.input_names[1]!r} has "
                         f"shape {tuple(label.shape)}; expected [{n}] or [{n}, 1]")
    index = label.reshape(n, 1).long()
    # Checking a CUDA tensor would wait for the GPU, and a traced or compiled one has no values:
    # gather (or inductor's bounds checks) reports bad indices there.
    if d is not None and label.device.type == "cpu" and n and not tracing() and (
            int(index.min()) < 0 or int(index.max()) >= d):
        raise ValueError(f"operator {ctx.op.type}: labels must lie in [0, {d}), got values from "
                         f"{int(index.min())} to {int(index.max())}")
    return index


def _as_rows(x):
    return x.reshape(1, -1) if x.dim() == 1 else x


# --- LabelCrossEntropy --------------------------------------------------------------------------

def _xent_grad(op, g_output):
    """LabelCrossEntropyGradient(X, label, dY) -> dX."""
    return [gradient_op(op, "LabelCrossEntropyGradient", [op.input[0], op.input[1], g_output[0]],
                        [grad_name(op.input[0])])], [grad_name(op.input[0]), None]


@register_op("LabelCrossEntropy", gradient=_xent_grad)
def label_cross_entropy(ctx, inputs):
    """Y[i] = −log(max(X[i, label[i]], 1e-20)) for X [N, D] (1-D: N = 1), int label [N]."""
    x = _as_rows(inputs[0])
    index = _labels(ctx, inputs[1], x.shape[0], x.shape[1])
    return [x.gather(1, index).clamp_min_(_LOG_THRESHOLD).log_().neg_().view(x.shape[0])]


@register_op("LabelCrossEntropyGradient")
def label_cross_entropy_gradient(ctx, inputs):
    """dX = 0 except dX[i, label[i]] = −dY[i] / max(X[i, label[i]], 1e-20)."""
    x_in, label, dy = inputs
    x = _as_rows(x_in)
    index = _labels(ctx, label, x.shape[0])
    picked = x.gather(1, index).clamp_min_(_LOG_THRESHOLD)
    dx = torch.zeros_like(x).scatter_(1, index, -dy.reshape(-1, 1) / picked)
    return [dx.view(x_in.shape)]


# --- AveragedLoss -------------------------------------------------------------------------------

def _averaged_loss_grad(op, g_output):
    """AveragedLossGradient(X, dY) -> dX."""
    return [gradient_op(op, "AveragedLossGradient", [op.input[0], g_output[0]],
                        [grad_name(op.input[0])])], [grad_name(op.input[0])]


@register_op("AveragedLoss", gradient=_averaged_loss_grad)
def averaged_loss(ctx, inputs):
    """Y = sum(X) / numel(X) as a 0-d scalar."""
    return [inputs[0].mean()]


@register_op("AveragedLossGradient")
def averaged_loss_gradient(ctx, inputs):
    """dX = dY / numel(X) everywhere."""
    x, dy = inputs
    # dY is the float32 autogen 1.0 for any X; dX takes X's dtype.
    return [(dy.reshape(()).to(x.dtype) / x.numel()).expand(x.shape).contiguous()]


# --- SoftmaxWithLoss ----------------------------------------------------------------------------

def _softmax_loss_grad(op, g_output):
    """SoftmaxWithLossGradient(X, label, [weight,] P, dLoss) -> dX."""
    if g_output[1] is None:
        raise ValueError("SoftmaxWithLoss backpropagates from its loss output only; use "
                         "Softmax + LabelCrossEntropy to backpropagate through the softmax output")
    inputs = list(op.input[:2]) + list(op.input[2:3]) + [op.output[0], g_output[1]]
    return [gradient_op(op, "SoftmaxWithLossGradient", inputs, [grad_name(op.input[0])])], \
        [grad_name(op.input[0])] + [None] * (len(op.input) - 1)


def _softmax_loss_setup(ctx):
    if int(ctx.arg("spatial", 0)):
        raise ValueError("operator SoftmaxWithLoss: spatial=1 is not supported by caffe2torch")
    ctx.state["loss"] = (float(ctx.arg("scale", 1.0)), bool(ctx.arg("label_prob", 0)))
    ctx.state["axis"] = int(ctx.arg("axis", 1))


def _rows_at(ctx, x):
    """X as the [N, D] matrix Caffe2 coerces it to at ``axis`` (a 1-D X is one row)."""
    if x.dim() == 1:
        return x.reshape(1, -1)
    axis = ctx.state["axis"]
    axis = axis + x.dim() if axis < 0 else axis
    if not 0 < axis < x.dim():
        raise ValueError(f"operator {ctx.op.type}: axis {ctx.state['axis']} is out of range for "
                         f"X of shape {tuple(x.shape)}")
    return x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:]))


def _target(ctx, label, p):
    """The target distribution: one-hot rows of the labels, or the given label probabilities."""
    if ctx.state["loss"][1]:
        return label.reshape(p.shape).to(p.dtype)
    index = _labels(ctx, label, p.shape[0], p.shape[1])
    return torch.zeros_like(p).scatter_(1, index, 1.0)


@register_op("SoftmaxWithLoss", gradient=_softmax_loss_grad, setup=_softmax_loss_setup)
def softmax_with_loss(ctx, inputs):
    """(X [N,D], label[, weight]) -> (P = softmax(X), loss = scale·Σwᵢ·CEᵢ / Σwᵢ as 0-d)."""
    scale, label_prob = ctx.state["loss"]
    x = _rows_at(ctx, inputs[0])
    log_p = torch.log_softmax(x, 1)
    if label_prob:
        per_row = -(log_p.exp().clamp_min(_LOG_THRESHOLD).log() * _target(ctx, inputs[1], x)).sum(1)
    else:
        per_row = -log_p.gather(1, _labels(ctx, inputs[1], x.shape[0], x.shape[1])).view(-1)
    if len(inputs) > 2:
        weight = inputs[2].reshape(-1).to(x.dtype)
        total = weight.sum()
        loss = torch.where(total != 0, (per_row * weight).sum() / total, 0.0)
    else:
        loss = per_row.mean()
    return [log_p.exp_().view(inputs[0].shape), loss * scale]


@register_op("SoftmaxWithLossGradient", setup=_softmax_loss_setup)
def softmax_with_loss_gradient(ctx, inputs):
    """dX = (P − target)·wᵢ·scale·dLoss / Σw (Σw = N without weights)."""
    scale, _ = ctx.state["loss"]
    x, label = inputs[0], inputs[1]
    p, d_loss = inputs[-2], inputs[-1]
    p2 = _rows_at(ctx, p)
    dx = p2 - _target(ctx, label, p2)
    factor = d_loss.reshape(()).to(p2.dtype) * scale
    if len(inputs) == 5:
        weight = inputs[2].reshape(-1, 1).to(p2.dtype)
        total = weight.sum()
        dx.mul_(weight).mul_(torch.where(total != 0, factor / total, 0.0))
    else:
        dx.mul_(factor / p2.shape[0])
    return [dx.view(x.shape)]


# --- Accuracy -----------------------------------------------------------------------------------

def _accuracy_setup(ctx):
    ctx.state["top_k"] = int(ctx.arg("top_k", 1))


@register_op("Accuracy", gradient=NO_GRADIENT, setup=_accuracy_setup)
def accuracy(ctx, inputs):
    """Fraction of rows whose label ranks within top_k (ties: lower class index ranks first)."""
    pred, label = inputs
    if pred.dim() != 2:
        raise ValueError(f"operator Accuracy: predictions must be 2-D [N, D], got shape "
                         f"{tuple(pred.shape)}")
    n, d = pred.shape
    index = _labels(ctx, label, n, d)
    true_score = pred.gather(1, index)
    classes = torch.arange(d, device=pred.device)
    # Caffe2's rule: count classes scoring higher, or equal with a smaller index.
    ahead = (pred > true_score) | ((pred == true_score) & (classes < index))
    correct = ahead.sum(1) < ctx.state["top_k"]
    return [correct.float().mean()]
