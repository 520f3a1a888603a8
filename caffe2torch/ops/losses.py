"""More losses (beside loss.py): the sigmoid cross entropies, CrossEntropy, MakeTwoClass,
SpatialSoftmaxWithLoss and Detectron's SmoothL1Loss and SigmoidCrossEntropyLoss.

Each loss is one PyTorch function of its inputs; its gradient op takes Caffe2's inputs and
differentiates that function with autograd, so forward and gradient agree by construction.
"""
import torch
import torch.nn.functional as F

from caffe2torch.ops._autograd import vjp
from caffe2torch.ops._helpers import tracing
from caffe2torch.ops.loss import _LOG_THRESHOLD
from caffe2torch.ops.registry import gradient_op, grad_name, register_op


def _grad_of_first(grad_type, with_inputs):
    """A maker emitting grad_type(dY, X, ...) or grad_type(X, ..., dY) -> dX; the rest get none."""
    def maker(op, g_output):
        ins = list(op.input)
        ins = [g_output[0]] + ins if with_inputs == "dy_first" else ins + [g_output[0]]
        return [gradient_op(op, grad_type, ins, [grad_name(op.input[0])])], \
            [grad_name(op.input[0])] + [None] * (len(op.input) - 1)
    maker.__doc__ = f"{grad_type}({'dY, inputs' if with_inputs == 'dy_first' else 'inputs, dY'})" \
        " -> dX."
    return maker


def _same_shape(ctx, a, b, what):
    if a.shape != b.shape:
        raise ValueError(f"operator {ctx.op.type}: {what} {tuple(b.shape)} must have the logits' "
                         f"shape {tuple(a.shape)}")


# --- SigmoidCrossEntropyWithLogits --------------------------------------------------------------

def _sigmoid_xent_setup(ctx):
    log_d, unjoined = bool(ctx.arg("log_D_trick", 0)), bool(ctx.arg("unjoined_lr_loss", 0))
    if log_d and unjoined:
        raise ValueError(f"operator {ctx.op.type}: log_D_trick and unjoined_lr_loss exclude each "
                         "other")
    ctx.state["xent"] = (log_d, unjoined)


def _sigmoid_xent(state, x, t, w=None):
    """−mean over the last dim of the per-element log-likelihood (Caffe2's three variants)."""
    log_d, unjoined = state
    if unjoined:
        value = x * t - (1 - t) * F.softplus(x)
    elif log_d:
        value = (2 * t - 1) * F.logsigmoid(x)
    else:
        value = x * t - F.softplus(x)
    if w is not None:
        value = value * w
    return -value.mean(-1) if x.dim() else -value


def _check_xent(ctx, inputs):
    for name, t in zip(("targets", "weights"), inputs[1:]):
        _same_shape(ctx, inputs[0], t, name)


@register_op("SigmoidCrossEntropyWithLogits", setup=_sigmoid_xent_setup,
             gradient=_grad_of_first("SigmoidCrossEntropyWithLogitsGradient", "dy_first"))
def sigmoid_cross_entropy_with_logits(ctx, inputs):
    """Y = −mean over the last dim of t·log σ(x) + (1 − t)·log(1 − σ(x)) (log_D_trick, unjoined)."""
    _check_xent(ctx, inputs)
    return [_sigmoid_xent(ctx.state["xent"], *inputs)]


@register_op("SigmoidCrossEntropyWithLogitsGradient", setup=_sigmoid_xent_setup)
def sigmoid_cross_entropy_with_logits_gradient(ctx, inputs):
    """(dY, logits, targets) -> dlogits."""
    dy, x, t = inputs
    return vjp(lambda x: _sigmoid_xent(ctx.state["xent"], x, t), [x], [0], [dy])


def _weighted_setup(ctx):
    ctx.state["xent"] = (False, False)


@register_op("WeightedSigmoidCrossEntropyWithLogits", setup=_weighted_setup,
             gradient=_grad_of_first("WeightedSigmoidCrossEntropyWithLogitsGradient", "dy_first"))
def weighted_sigmoid_cross_entropy_with_logits(ctx, inputs):
    """(logits, targets, weights) -> Y = −mean over the last dim of weights · log-likelihood."""
    _check_xent(ctx, inputs)
    return [_sigmoid_xent(ctx.state["xent"], *inputs)]


@register_op("WeightedSigmoidCrossEntropyWithLogitsGradient", setup=_weighted_setup)
def weighted_sigmoid_cross_entropy_with_logits_gradient(ctx, inputs):
    """(dY, logits, targets, weights) -> dlogits."""
    dy, x, t, w = inputs
    return vjp(lambda x: _sigmoid_xent(ctx.state["xent"], x, t, w), [x], [0], [dy])


# --- CrossEntropy -------------------------------------------------------------------------------

def _cross_entropy(x, label):
    x2 = x.reshape(1, -1) if x.dim() == 1 else x
    return -(label.reshape(x2.shape) * x2.clamp_min(_LOG_THRESHOLD).log()).sum(1)


@register_op("CrossEntropy", gradient=_grad_of_first("CrossEntropyGradient", "inputs_first"))
def cross_entropy(ctx, inputs):
    """Y[i] = −Σⱼ label[i, j]·log(max(X[i, j], 1e-20)); probabilities X, soft labels [N, D]."""
    x, label = inputs
    _same_shape(ctx, x, label, "label")
    return [_cross_entropy(x, label.to(x.dtype))]


@register_op("CrossEntropyGradient")
def cross_entropy_gradient(ctx, inputs):
    """(X, label, dY) -> dX = −dY·label / max(X, 1e-20)."""
    x, label, dy = inputs
    return vjp(lambda x: _cross_entropy(x, label.to(x.dtype)), [x], [0], [dy])


# --- MakeTwoClass -------------------------------------------------------------------------------

def _two_class_grad(op, g_output):
    """MakeTwoClassGradient(dY) -> dX."""
    return [gradient_op(op, "MakeTwoClassGradient", [g_output[0]], [grad_name(op.input[0])])], \
        [grad_name(op.input[0])]


@register_op("MakeTwoClass", gradient=_two_class_grad)
def make_two_class(ctx, inputs):
    """Y[..., :] = [1 − X, X]: one probability becomes two classes (shape X.shape + [2])."""
    x = inputs[0]
    return [torch.stack([1 - x, x], -1)]


@register_op("MakeTwoClassGradient")
def make_two_class_gradient(ctx, inputs):
    """dX = dY[..., 1] − dY[..., 0]."""
    dy = inputs[0]
    return [dy[..., 1] - dy[..., 0]]


# --- SpatialSoftmaxWithLoss ---------------------------------------------------------------------

_DONT_CARE = -1  # Caffe2's label for pixels that do not count


def _spatial_setup(ctx):
    if ctx.arg("order", "NCHW") != "NCHW":
        raise ValueError(f"operator {ctx.op.type} supports order NCHW only")
    ctx.state["scale"] = float(ctx.arg("scale", 1.0))


def _spatial_loss(ctx, x, label, weight=None):
    """(P, loss): softmax over channels; loss = Σ w·(−log p_label) / Σ w over counted pixels."""
    if x.dim() != 4 or tuple(label.shape) != (x.shape[0],) + tuple(x.shape[2:]):
        raise ValueError(f"operator {ctx.op.type}: X must be (N, D, H, W) and label (N, H, W), got "
                         f"{tuple(x.shape)} and {tuple(label.shape)}")
    if label.dtype.is_floating_point:
        raise ValueError(f"operator {ctx.op.type}: label must be an integer tensor")
    log_p = torch.log_softmax(x, 1)
    care = label != _DONT_CARE
    bad = ((label < 0) & care) | (label >= x.shape[1])
    if label.device.type == "cpu" and not tracing() and bool(bad.any()):
        raise ValueError(f"operator {ctx.op.type}: labels must lie in [0, {x.shape[1]}) or be −1 "
                         "(not counted)")
    w = care.to(x.dtype) if weight is None else weight.reshape(label.shape).to(x.dtype) * care
    index = label.long().clamp(min=0).unsqueeze(1)
    nll = -log_p.exp().gather(1, index).squeeze(1).clamp_min(_LOG_THRESHOLD).log()
    total = w.sum()
    loss = torch.where(total > 0, (nll * w).sum() / total, torch.zeros((), dtype=x.dtype,
                                                                       device=x.device))
    return log_p.exp(), loss


def _spatial_grad(op, g_output):
    """SpatialSoftmaxWithLossGradient(X, label[, weight], P, dLoss) -> dX."""
    ins = list(op.input) + [op.output[0], g_output[1]]
    return [gradient_op(op, "SpatialSoftmaxWithLossGradient", ins, [grad_name(op.input[0])])], \
        [grad_name(op.input[0])] + [None] * (len(op.input) - 1)


@register_op("SpatialSoftmaxWithLoss", gradient=_spatial_grad, setup=_spatial_setup)
def spatial_softmax_with_loss(ctx, inputs):
    """(X [N,D,H,W], label [N,H,W][, weight]) -> (P, loss); label −1 pixels do not count;
    ``scale`` multiplies the gradient only, as in Caffe2."""
    return list(_spatial_loss(ctx, *inputs))


@register_op("SpatialSoftmaxWithLossGradient", setup=_spatial_setup)
def spatial_softmax_with_loss_gradient(ctx, inputs):
    """(X, label[, weight], P, dLoss) -> dX = (P − onehot)·w·scale·dLoss / Σw."""
    x, rest, d_loss = inputs[0], inputs[1:-2], inputs[-1]
    # Caffe2 applies ``scale`` in the gradient only: its forward loss is unscaled.
    (dx,) = vjp(lambda x: _spatial_loss(ctx, x, *rest)[1], [x], [0], [d_loss])
    return [dx.mul_(ctx.state["scale"])]


def _like_first(ctx, inputs, names):
    """The inputs, each later one viewed in the first one's shape (Detectron compares sizes)."""
    first = inputs[0]
    for name, t in zip(names, inputs[1:]):
        if t.numel() != first.numel():
            raise ValueError(f"operator {ctx.op.type}: {name} has {t.numel()} elements but "
                             f"{ctx.input_names[0]!r} has {first.numel()}")
    return [first] + [t.reshape(first.shape) for t in inputs[1:]]


# --- SmoothL1Loss (Detectron) -------------------------------------------------------------------

def _smooth_l1_setup(ctx):
    ctx.state["smooth"] = (float(ctx.arg("beta", 1.0)), float(ctx.arg("scale", 1.0)))


def _smooth_l1(state, y_hat, y, alpha_in, alpha_out):
    beta, scale = state
    d = (alpha_in * (y_hat - y)).abs()
    per = torch.where(d < beta, 0.5 * d * d / beta, d - 0.5 * beta)
    return (alpha_out * per).sum() * (scale / y_hat.shape[0])


@register_op("SmoothL1Loss", setup=_smooth_l1_setup,
             gradient=_grad_of_first("SmoothL1LossGradient", "inputs_first"))
def smooth_l1_loss(ctx, inputs):
    """(Y_hat, Y, alpha_in, alpha_out) -> scale/N · Σ alpha_out·smoothL1(alpha_in·(Y_hat − Y))."""
    return [_smooth_l1(ctx.state["smooth"], *_like_first(ctx, inputs,
                                                         ("Y", "alpha_in", "alpha_out")))]


@register_op("SmoothL1LossGradient", setup=_smooth_l1_setup)
def smooth_l1_loss_gradient(ctx, inputs):
    """(Y_hat, Y, alpha_in, alpha_out, dLoss) -> dY_hat."""
    y_hat, rest, d_loss = inputs[0], _like_first(ctx, inputs[:4], ("Y", "a", "b"))[1:], inputs[4]
    return vjp(lambda t: _smooth_l1(ctx.state["smooth"], t, *rest), [y_hat], [0], [d_loss])


# --- SigmoidCrossEntropyLoss (Detectron) --------------------------------------------------------

def _sigmoid_loss_setup(ctx):
    ctx.state["sigmoid_loss"] = (float(ctx.arg("scale", 1.0)), bool(ctx.arg("normalize", 1)))


def _sigmoid_loss(state, x, targets):
    scale, normalize = state
    care = (targets != _DONT_CARE).to(x.dtype)
    t = targets.to(x.dtype)
    per = (F.softplus(x) - x * t) * care
    # Detectron divides by the count of counted targets (at least 1e-5), else not at all.
    norm = care.sum().clamp(min=1e-5) if normalize else 1.0
    return per.sum() * scale / norm


@register_op("SigmoidCrossEntropyLoss", setup=_sigmoid_loss_setup,
             gradient=_grad_of_first("SigmoidCrossEntropyLossGradient", "inputs_first"))
def sigmoid_cross_entropy_loss(ctx, inputs):
    """(X, int targets; −1 ignored) -> scale · Σ sigmoid cross entropy (/ count if normalize)."""
    return [_sigmoid_loss(ctx.state["sigmoid_loss"], *_like_first(ctx, inputs, ("targets",)))]


@register_op("SigmoidCrossEntropyLossGradient", setup=_sigmoid_loss_setup)
def sigmoid_cross_entropy_loss_gradient(ctx, inputs):
    """(X, targets, dLoss) -> dX = scale·(σ(X) − t)·valid·dLoss / normalizer."""
    x, targets = _like_first(ctx, inputs[:2], ("targets",))
    d_loss = inputs[2]
    return vjp(lambda x: _sigmoid_loss(ctx.state["sigmoid_loss"], x, targets), [x], [0], [d_loss])


# --- SigmoidFocalLoss, SoftmaxFocalLoss (Detectron's RetinaNet) ---------------------------------

_FLT_MIN = 1.1754943508222875e-38  # Detectron clamps probabilities to FLT_MIN before the log


def _focal_setup(ctx):
    default_classes = 80 if ctx.op.type.startswith("Sigmoid") else 81
    ctx.state["focal"] = (float(ctx.arg("scale", 1.0)), float(ctx.arg("gamma", 1.0)),
                          float(ctx.arg("alpha", 0.25)),
                          int(ctx.arg("num_classes", default_classes)))


def _focal_shapes(ctx, x, targets):
    num_classes = ctx.state["focal"][3]
    if x.dim() != 4 or x.shape[1] % num_classes:
        raise ValueError(f"operator {ctx.op.type}: logits must be (N, A·{num_classes}, H, W), got "
                         f"{tuple(x.shape)}")
    n, d, h, w = x.shape
    a = d // num_classes
    if tuple(targets.shape) != (n, a, h, w):
        raise ValueError(f"operator {ctx.op.type}: targets must be (N, A, H, W) = "
                         f"{(n, a, h, w)}, got {tuple(targets.shape)}")
    return x.reshape(n, a, num_classes, h, w), targets.long()


def _sigmoid_focal(ctx, x, targets, fg_num):
    scale, gamma, alpha, num_classes = ctx.state["focal"]
    x5, t = _focal_shapes(ctx, x, targets)
    classes = torch.arange(1, num_classes + 1, device=x.device).reshape(1, 1, -1, 1, 1)
    t = t.unsqueeze(2)
    pos = (t == classes).to(x.dtype)
    neg = ((t != -1) & (t != classes)).to(x.dtype)
    norm = fg_num.reshape(-1)[0].to(x.dtype).clamp(min=1.0)
    p = torch.sigmoid(x5)
    term1 = (1 - p).pow(gamma) * p.clamp(min=_FLT_MIN).log()
    term2 = p.pow(gamma) * -F.softplus(x5)  # p^γ·log(1 − p)
    losses = -pos * term1 * (alpha / norm) - neg * term2 * ((1 - alpha) / norm)
    return losses.sum() * scale


def _focal_grad(grad_type, with_p):
    def maker(op, g_output):
        ins = list(op.input[:3]) + ([op.output[1]] if with_p else []) + [g_output[0]]
        return [gradient_op(op, grad_type, ins, [grad_name(op.input[0])])], \
            [grad_name(op.input[0]), None, None]
    maker.__doc__ = f"{grad_type}(logits, targets, fg_num{', P' if with_p else ''}, dLoss) -> " \
        "dlogits."
    return maker


@register_op("SigmoidFocalLoss", gradient=_focal_grad("SigmoidFocalLossGradient", False),
             setup=_focal_setup)
def sigmoid_focal_loss(ctx, inputs):
    """(logits [N, A·C, H, W], targets [N, A, H, W] in 1..C, 0 bg, −1 ignored, fg_num) -> loss."""
    return [_sigmoid_focal(ctx, *inputs)]


@register_op("SigmoidFocalLossGradient", setup=_focal_setup)
def sigmoid_focal_loss_gradient(ctx, inputs):
    """(logits, targets, fg_num, dLoss) -> dlogits."""
    x, targets, fg_num, d_loss = inputs
    return vjp(lambda x: _sigmoid_focal(ctx, x, targets, fg_num), [x], [0], [d_loss])


def _softmax_focal(ctx, x, targets, fg_num):
    """(loss, P): softmax over each anchor's C classes; −(1 − p_t)^γ·log p_t weighted by α."""
    scale, gamma, alpha, _ = ctx.state["focal"]
    x5, t = _focal_shapes(ctx, x, targets)
    if t.device.type == "cpu" and not tracing() and t.numel() and int(t.max()) >= x5.shape[2]:
        raise ValueError(f"operator {ctx.op.type}: labels must lie in [-1, {x5.shape[2]}), got "
                         f"{int(t.max())}")
    p = torch.softmax(x5, 2)
    care = t >= 0
    p_t = p.gather(2, t.clamp(min=0).unsqueeze(2)).squeeze(2)
    norm = fg_num.reshape(-1)[0].to(x.dtype).clamp(min=1.0)
    z = torch.where(t == 0, (1 - alpha) / norm, alpha / norm) * care
    losses = -(1 - p_t).pow(gamma) * p_t.clamp(min=_FLT_MIN).log() * z
    return losses.sum() * scale, p.reshape(x.shape)


@register_op("SoftmaxFocalLoss", gradient=_focal_grad("SoftmaxFocalLossGradient", True),
             setup=_focal_setup)
def softmax_focal_loss(ctx, inputs):
    """(logits [N, A·C, H, W], targets [N, A, H, W] in 0..C−1, −1 ignored, fg_num) -> (loss, P)."""
    loss, p = _softmax_focal(ctx, *inputs)
    return [loss, p]


@register_op("SoftmaxFocalLossGradient", setup=_focal_setup)
def softmax_focal_loss_gradient(ctx, inputs):
    """(logits, targets, fg_num, P, dLoss) -> dlogits."""
    x, targets, fg_num, _, d_loss = inputs
    return vjp(lambda x: _softmax_focal(ctx, x, targets, fg_num)[0], [x], [0], [d_loss])


# --- SelectSmoothL1Loss (RetinaNet) -------------------------------------------------------------

def _select_smooth_l1(state, y_hat, y, locations, count):
    """scale · Σ smoothL1(Y_hat[n, c + j, y, x] − Y[i, j]) / max(count, 1) over the M locations."""
    beta, scale = state
    if y.numel() == 0:
        return y_hat.sum() * 0.0
    n, d, h, w = y_hat.shape
    loc = locations.reshape(-1, 4).long()
    j = torch.arange(4, device=y_hat.device)
    flat = ((loc[:, :1] * d + loc[:, 1:2] + j) * h + loc[:, 2:3]) * w + loc[:, 3:4]  # (M, 4)
    diff = (y_hat.reshape(-1)[flat] - y.reshape(-1, 4).to(y_hat.dtype)).abs()
    per = torch.where(diff < beta, 0.5 * diff * diff / beta, diff - 0.5 * beta)
    # Written into a buffer the size of Y_hat, as the kernel does: a location listed twice
    # counts once.
    buff = y_hat.new_zeros(y_hat.numel()).index_put((flat.reshape(-1),), per.reshape(-1))
    return buff.sum() * scale / count.reshape(-1)[0].to(y_hat.dtype).clamp(min=1.0)


@register_op("SelectSmoothL1Loss", setup=_smooth_l1_setup,
             gradient=_grad_of_first("SelectSmoothL1LossGradient", "inputs_first"))
def select_smooth_l1_loss(ctx, inputs):
    """(Y_hat [N, D, H, W], Y [M, 4], locations [M, 4] = (n, c, y, x), count) -> smooth L1 of the
    four box values at each location, / max(count, 1)."""
    y_hat = inputs[0]
    if y_hat.dim() != 4 or inputs[1].numel() != inputs[2].numel():
        raise ValueError(f"operator SelectSmoothL1Loss: Y_hat must be 4-D and Y, locations "
                         f"(M, 4); got {tuple(y_hat.shape)}, {tuple(inputs[1].shape)}, "
                         f"{tuple(inputs[2].shape)}")
    return [_select_smooth_l1(ctx.state["smooth"], *inputs)]


@register_op("SelectSmoothL1LossGradient", setup=_smooth_l1_setup)
def select_smooth_l1_loss_gradient(ctx, inputs):
    """(Y_hat, Y, locations, count, dLoss) -> dY_hat (zero off the listed locations)."""
    y_hat, y, loc, count, d_loss = inputs
    return vjp(lambda t: _select_smooth_l1(ctx.state["smooth"], t, y, loc, count), [y_hat], [0],
               [d_loss])
