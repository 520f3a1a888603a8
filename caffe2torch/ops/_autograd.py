"""Gradient ops computed by torch.autograd from the forward they belong to (no ops registered here).

Caffe2 hand-writes every ``XGradient`` kernel. Where the derivative is more than a line of
algebra (padding modes, cosine similarity, nearest resizing), caffe2torch's gradient op runs the
same PyTorch forward under autograd and returns the vector-Jacobian product: one definition of the
maths, so forward and gradient cannot drift apart.
"""
import torch


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
