"""Neural-network ops: Conv, pooling, FC, activations, Dropout, and their gradients."""
import torch

from caffe2torch.ops.registry import gradient_op, grad_name, register_op


def _relu_grad(op, g_output):
    return [gradient_op(op, "ReluGradient", [op.output[0], g_output[0]], [grad_name(op.input[0])])], \
        [grad_name(op.input[0])]


@register_op("Relu", gradient=_relu_grad)
def relu(ctx, inputs):
    """Y = max(X, 0)."""
    return [torch.relu(inputs[0])]


@register_op("ReluGradient")
def relu_gradient(ctx, inputs):
    """dX = dY where Y > 0, else 0 (inputs Y, dY)."""
    y, dy = inputs
    return [torch.ops.aten.threshold_backward(dy, y, 0)]
