"""Caffe2's ``core.GradientRegistry`` and ``core.GradientSlice``, over the op registry's makers.

A gradient maker is ``maker(op, g_output) -> (grad_ops, g_input)``. Example, for one's own op::

    @core.GradientRegistry.RegisterGradient("MyScale")
    def my_scale_grad(op, g_output):
        return [core.CreateOperator("MyScale", [g_output[0]], [op.input[0] + "_grad"])], \
            [op.input[0] + "_grad"]
"""
import collections

from caffe2torch.ops import registry

GradientSlice = collections.namedtuple("GradientSlice", ["indices", "values"])


class GradientRegistry:
    """Registers gradient makers and builds backward passes (Caffe2's class of that name)."""

    gradient_registry_ = {}

    @classmethod
    def RegisterGradient(cls, op_type):
        """Decorator: ``maker(op, g_output)`` becomes the gradient of ``op_type``."""
        def wrapper(maker):
            registry.register_gradient(op_type, maker)
            cls.gradient_registry_[op_type] = maker
            return maker
        return wrapper

    @classmethod
    def GetGradientForOp(cls, op, g_output):
        """(gradient ops, input gradient names) of one OperatorDef given its output gradients."""
        schema = registry.get_schema(op.type)
        if schema.gradient == registry.NO_GRADIENT:
            return [], [None] * len(op.input)
        if schema.gradient is None:
            raise RuntimeError(f"No gradient registered for {op.type}; register one with "
                               "@core.GradientRegistry.RegisterGradient")
        g_output = [str(g) if g is not None and not isinstance(g, GradientSlice) else g
                    for g in g_output]
        grad_ops, g_input = schema.gradient(op, g_output)
        return list(grad_ops), list(g_input)

    @classmethod
    def GetBackwardPass(cls, operators, ys, ys_generate_gradient=False):
        """(gradient ops, {blob: gradient}) for ``operators`` given ``ys`` ({blob: grad or None}).

        A None gradient starts from ones (ConstantFill of the blob), as Caffe2's IR does.
        """
        from caffe2torch.python import core, gradients
        if isinstance(ys, (list, tuple)):
            ys = {str(y): None for y in ys}
        ys = {str(k): (None if v is None else str(v)) for k, v in ys.items()}
        ops = [op for op in operators]
        return gradients.backward_pass(ops, ys, core.CreateOperator)
