"""FCTransposed (FC with W stored [K, N]) and BatchMatMul (batched, optionally broadcasting)."""
import math

import torch

from caffe2torch.ops.registry import gradient_op, grad_name, register_op


# --- FCTransposed -------------------------------------------------------------------------------

def _fct_setup(ctx):
    ctx.state["axes"] = (int(ctx.arg("axis", 1)), int(ctx.arg("axis_w", 1)))


def _fct_views(ctx, x, w):
    axis, axis_w = ctx.state["axes"]
    axis = axis + x.dim() if axis < 0 else axis
    axis_w = axis_w + w.dim() if axis_w < 0 else axis_w
    x2 = x.reshape(math.prod(x.shape[:axis]), -1)
    w2 = w.reshape(math.prod(w.shape[:axis_w]), -1)
    if x2.shape[1] != w2.shape[0]:
        raise ValueError(f"operator {ctx.op.type}: X {tuple(x.shape)} flattened at axis {axis} has "
                         f"K={x2.shape[1]} but W {tuple(w.shape)} (stored [K, N]) has "
                         f"K={w2.shape[0]}")
    return x2, w2, x.shape[:axis] + (w2.shape[1],)


def _fct_grad(op, g_output):
    """FCTransposedGradient(X, W, dY) -> (dW, db, dX)."""
    outs = [grad_name(op.input[1])] + ([grad_name(op.input[2])] if len(op.input) == 3 else []) \
        + [grad_name(op.input[0])]
    extra = {} if len(op.input) == 3 else {"no_bias": 1}
    return [gradient_op(op, "FCTransposedGradient", [op.input[0], op.input[1], g_output[0]],
                        outs, **extra)], [grad_name(n) for n in op.input]


@register_op("FCTransposed", gradient=_fct_grad, setup=_fct_setup)
def fc_transposed(ctx, inputs):
    """Y = X·W + b with X viewed [M, K] at ``axis`` and W viewed [K, N] at ``axis_w``."""
    x2, w2, shape = _fct_views(ctx, inputs[0], inputs[1])
    y = torch.mm(x2, w2)
    if len(inputs) > 2:
        y = y + inputs[2]
    return [y.view(shape)]


@register_op("FCTransposedGradient", setup=_fct_setup)
def fc_transposed_gradient(ctx, inputs):
    """(X, W, dY) -> (dW = Xᵀ·dY, db = Σ dY, dX = dY·Wᵀ)."""
    x, w, dy = inputs
    x2, w2, _ = _fct_views(ctx, x, w)
    dy2 = dy.reshape(x2.shape[0], w2.shape[1])
    outputs = [torch.mm(x2.t(), dy2).view(w.shape)]
    if not ctx.arg("no_bias", 0):
        outputs.append(dy2.sum(0))
    outputs.append(torch.mm(dy2, w2.t()).view(x.shape))
    return outputs


# --- BatchMatMul --------------------------------------------------------------------------------

def _bmm_setup(ctx):
    ctx.state["bmm"] = (bool(ctx.arg("trans_a", 0)), bool(ctx.arg("trans_b", 0)),
                        bool(ctx.arg("broadcast", 0)))


def _bmm_grad(op, g_output):
    """BatchMatMul(dY, B) -> dA, BatchMatMul(A, dY) -> dB, transposed per case (not broadcast=1)."""
    args = {a.name: a.i for a in op.arg if a.name in ("trans_a", "trans_b", "broadcast")}
    if args.get("broadcast", 0):
        raise ValueError("the gradient of BatchMatMul with broadcast=1 is not supported (as in "
                         "Caffe2); use broadcast=0 with inputs of equal batch dimensions")
    a, b, dy = op.input[0], op.input[1], g_output[0]
    ta, tb = args.get("trans_a", 0), args.get("trans_b", 0)
    da, db = grad_name(a), grad_name(b)
    if a == b:
        da, db = f"_{da}_a", f"_{db}_b"
    plan = {  # (trans_a, trans_b) -> dA as (lhs, rhs, trans_a, trans_b), dB likewise
        (0, 0): ((dy, b, 0, 1), (a, dy, 1, 0)),
        (1, 0): ((b, dy, 0, 1), (a, dy, 0, 0)),
        (0, 1): ((dy, b, 0, 0), (dy, a, 1, 0)),
        (1, 1): ((b, dy, 1, 1), (dy, a, 1, 1)),
    }[(ta, tb)]
    ops = [gradient_op(op, "BatchMatMul", [lhs, rhs], [out], copy_args=False, trans_a=t_a,
                       trans_b=t_b) for (lhs, rhs, t_a, t_b), out in zip(plan, (da, db))]
    if a == b:
        ops.append(gradient_op(op, "Sum", [da, db], [grad_name(a)], copy_args=False))
        return ops, [grad_name(a), None]
    return ops, [da, db]


@register_op("BatchMatMul", gradient=_bmm_grad, setup=_bmm_setup)
def batch_mat_mul(ctx, inputs):
    """Y[i] = op(A[i])·op(B[i]) over leading batch dims (broadcast=1: numpy matmul rules)."""
    trans_a, trans_b, broadcast = ctx.state["bmm"]
    a, b = inputs
    if not broadcast:
        if a.dim() != b.dim() or a.dim() < 2 or a.shape[:-2] != b.shape[:-2]:
            raise ValueError(f"operator BatchMatMul: A {tuple(a.shape)} and B {tuple(b.shape)} "
                             "need the same rank (>= 2) and batch dimensions; set broadcast=1 "
                             "to broadcast them")
    if trans_a and a.dim() >= 2:
        a = a.transpose(-1, -2)
    if trans_b and b.dim() >= 2:
        b = b.transpose(-1, -2)
    if a.shape[-1] != b.shape[0 if b.dim() == 1 else -2]:
        raise ValueError(f"operator BatchMatMul: inner dimensions differ: A "
                         f"{tuple(inputs[0].shape)} (trans_a={int(trans_a)}) and B "
                         f"{tuple(inputs[1].shape)} "
                         f"(trans_b={int(trans_b)})")
    return [torch.matmul(a, b)]
