"""Caffe2's ``modeling.initializers`` (Initializer, ExternalInitializer and update_initializer
live in model_helper, where brew uses them) and the float16 initializers."""
from caffe2torch.python import core
from caffe2torch.python.model_helper import (  # noqa: F401
    ExternalInitializer, Initializer, ParameterInfo, update_initializer)


def create_xavier_fill_initializer():
    """An Initializer using XavierFill."""
    return Initializer("XavierFill")


def create_constant_fill_initializer(value=None):
    """An Initializer using ConstantFill (with ``value`` when given)."""
    return Initializer("ConstantFill") if value is None else Initializer("ConstantFill",
                                                                          value=value)


class PseudoFP16Initializer(Initializer):
    """A float16 parameter with a float32 master copy ``<name>_fp32`` (mixed precision).

    The fill op makes the float32 copy; FloatToHalf makes the parameter. The optimizer
    (``build_multi_precision_sgd``) updates the copy and casts it back.
    """

    def create_param(self, param_name, init_net, shape):
        """The fill into ``<param_name>_fp32`` and FloatToHalf into ``param_name``."""
        param_fp32 = getattr(init_net, self.operator_name)(
            [], str(param_name) + "_fp32", shape=shape, **self.operator_kwargs)
        param = init_net.FloatToHalf(param_fp32, str(param_name))
        return ParameterInfo(param_id=None, param=param, shape=shape,
                             blob_copy={core.DataType.FLOAT: param_fp32})


class ReversePseudoFP16Initializer(Initializer):
    """A float32 parameter with a float16 copy ``<name>_fp16`` (PseudoFP16Initializer reversed)."""

    def create_param(self, param_name, init_net, shape):
        """The fill into ``param_name`` and FloatToHalf into ``<param_name>_fp16``."""
        param = getattr(init_net, self.operator_name)(
            [], str(param_name), shape=shape, **self.operator_kwargs)
        param_fp16 = init_net.FloatToHalf(param, str(param_name) + "_fp16")
        return ParameterInfo(param_id=None, param=param, shape=shape,
                             blob_copy={core.DataType.FLOAT16: param_fp16})
