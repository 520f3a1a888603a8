"""Helpers shared by the op families (private: no ops are registered here).

``vjp``: where a derivative is more than a line of algebra (padding modes, cosine similarity,
padded dot products), the gradient op runs the same PyTorch forward under autograd and returns
the vector-Jacobian product: one definition of the maths, so forward and gradient cannot drift.
"""
import torch

from caffe2torch.ops.registry import gradient_op, grad_name


def own(ctx, y, x, index=0):
    """``y`` (a view of input ``index``, ``x``) as its own copy unless the op runs in place."""
    if ctx.inplace.get(0) == index:
        return y
    # Storage identity, not data pointers: torch.export's fake tensors have no data.
    if torch._C._is_alias_of(y, x):
        return y.clone()
    return y


def tracing():
    """True while torch.export (or torch.compile) traces the op.

    Checks that read tensor values in Python (index ranges, lengths, NaN) run in eager mode
    only: a traced graph cannot branch on values, and the exported program runs the same maths.
    """
    return torch.compiler.is_compiling()


def canonical_axis(ctx, axis, ndim, what="axis"):
    """``axis`` counted from 0 (negative counts from the end); out of range is a clear error."""
    if not -ndim <= axis < ndim:
        raise ValueError(f"operator {ctx.op.type}: {what} {axis} is out of range for an input "
                         f"with {ndim} dims")
    return axis + ndim if axis < 0 else axis


def ints(value):
    """A host tensor or list of ints as a Python list."""
    if isinstance(value, torch.Tensor):
        return [int(v) for v in value.reshape(-1).tolist()]
    return [int(v) for v in value]


def single_grad(grad_type, inputs="dY", **extra):
    """A maker emitting ``grad_type`` on (``inputs`` spelled with X = input 0, dY, Y) -> dX."""
    def maker(op, g_output):
        names = {"X": op.input[0], "dY": g_output[0], "Y": op.output[0]}
        ins = [names[n] for n in inputs.split(",")]
        return [gradient_op(op, grad_type, ins, [grad_name(op.input[0])], **extra)], \
            [grad_name(op.input[0])] + [None] * (len(op.input) - 1)
    maker.__doc__ = f"{grad_type}({inputs.replace(',', ', ')}) -> dX."
    return maker


def vjp(fn, inputs, grad_outputs, wrt=None):
    """The gradients of ``fn(*inputs)`` w.r.t. ``inputs[i]`` for i in ``wrt`` (default: all)."""
    wrt = range(len(inputs)) if wrt is None else wrt
    with torch.enable_grad():
        leaves = [x.detach().requires_grad_(i in wrt) if isinstance(x, torch.Tensor)
                  and x.is_floating_point() else x for i, x in enumerate(inputs)]
        outputs = fn(*leaves)
        if isinstance(outputs, torch.Tensor):
            outputs, grad_outputs = [outputs], [grad_outputs]
        grads = torch.autograd.grad(outputs, [leaves[i] for i in wrt], grad_outputs,
                                    allow_unused=True)
    return [torch.zeros_like(inputs[i]) if g is None else g for i, g in zip(wrt, grads)]
