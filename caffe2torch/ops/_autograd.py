"""Gradient ops computed by differentiating a forward written in PyTorch (no family: no ops here).

Several Caffe2 gradient ops (LRNGradient, LayerNormGradient, RoIAlignGradient, ...) are, as
formulas, the vector-Jacobian product of their forward. Writing that formula twice invites the
two to drift apart, so these gradient ops re-run the forward under autograd and ask torch for the
product: one definition per op, and the gradient is exact by construction.
"""
import torch


def vjp(fn, inputs, wrt, grads):
    """Gradients of ``fn(*inputs)`` with respect to ``inputs[i]`` for i in ``wrt``.

    ``grads`` are the upstream gradients of fn's outputs, in order (None: that output gets none).
    Inputs that do not reach an output get zero gradients, as Caffe2 writes them.
    """
    wrt = list(wrt)
    with torch.enable_grad():
        xs = [x.detach().requires_grad_(True) if i in wrt else x for i, x in enumerate(inputs)]
        outs = fn(*xs)
        outs = list(outs) if isinstance(outs, (list, tuple)) else [outs]
        pairs = [(o, g) for o, g in zip(outs, grads)
                 if g is not None and isinstance(o, torch.Tensor) and o.requires_grad]
        if not pairs:
            return [torch.zeros_like(xs[i]) for i in wrt]
        found = torch.autograd.grad([o for o, _ in pairs], [xs[i] for i in wrt],
                                    [g.to(o.dtype).reshape(o.shape) for o, g in pairs],
                                    allow_unused=True)
    return [torch.zeros_like(xs[i]) if g is None else g for i, g in zip(wrt, found)]
