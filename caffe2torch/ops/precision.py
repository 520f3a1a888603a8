"""Half precision: HalfToFloat / FloatToHalf (each the other's gradient) and the float16 fills
Float16ConstantFill / Float16UniformFill (Caffe2's ``half_float_ops``), what
``PseudoFP16Initializer`` and ``build_multi_precision_sgd`` build on."""
import torch

from caffe2torch.ops.fill import _shape_setup, alloc, fill_shape
from caffe2torch.ops.registry import NO_GRADIENT, grad_name, gradient_op, register_op

_FP16_MAX = torch.finfo(torch.float16).max


def _need(ctx, x, dtype):
    if not isinstance(x, torch.Tensor) or x.dtype != dtype:
        got = getattr(x, "dtype", type(x).__name__)
        raise ValueError(f"operator {ctx.op.type}: input {ctx.input_names[0]!r} must be {dtype}, "
                         f"got {got}")


def _half_to_float_grad(op, g_output):
    """FloatToHalf(dY) -> dX."""
    dx = grad_name(op.input[0])
    return [gradient_op(op, "FloatToHalf", [g_output[0]], [dx], copy_args=False)], [dx]


def _float_to_half_grad(op, g_output):
    """HalfToFloat(dY) -> dX."""
    dx = grad_name(op.input[0])
    return [gradient_op(op, "HalfToFloat", [g_output[0]], [dx], copy_args=False)], [dx]


@register_op("HalfToFloat", gradient=_half_to_float_grad)
def half_to_float(ctx, inputs):
    """Y = X (float16) as float32."""
    _need(ctx, inputs[0], torch.float16)
    return [inputs[0].float()]


@register_op("FloatToHalf", gradient=_float_to_half_grad)
def float_to_half(ctx, inputs):
    """Y = X (float32) as float16; ``clip=1`` first clamps to float16's range (else ±inf)."""
    _need(ctx, inputs[0], torch.float32)
    x = inputs[0]
    if ctx.arg("clip", 0):
        x = x.clamp(-_FP16_MAX, _FP16_MAX)
    return [x.half()]


@register_op("Float16ConstantFill", gradient=NO_GRADIENT, setup=_shape_setup,
             cpu_only_inputs=True)
def float16_constant_fill(ctx, inputs):
    """Y (float16) = ``value`` (default 0) everywhere, of shape ``shape``."""
    return [alloc(ctx, fill_shape(ctx, inputs), torch.float16).fill_(float(ctx.arg("value", 0.0)))]


def _uniform_setup(ctx):
    _shape_setup(ctx)
    low, high = float(ctx.arg("min", 0.0)), float(ctx.arg("max", 1.0))
    if low > high:
        raise ValueError(f"operator Float16UniformFill: min ({low}) must not exceed max ({high})")


@register_op("Float16UniformFill", gradient=NO_GRADIENT, setup=_uniform_setup,
             cpu_only_inputs=True)
def float16_uniform_fill(ctx, inputs):
    """Y (float16) ~ Uniform(``min``, ``max``) (defaults 0 and 1), drawn in float32."""
    out = alloc(ctx, fill_shape(ctx, inputs), torch.float32)
    out.uniform_(float(ctx.arg("min", 0.0)), float(ctx.arg("max", 1.0)), generator=ctx.generator)
    return [out.half()]
