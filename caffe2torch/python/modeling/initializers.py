"""Caffe2's ``modeling.initializers`` (the classes live in model_helper, where brew uses them)."""
from caffe2torch.python.model_helper import (  # noqa: F401
    ExternalInitializer, Initializer, update_initializer)


class PseudoFP16Initializer(Initializer):
    """A float32 parameter meant to be stored as float16; caffe2torch keeps it float32."""


ReallyFP16Initializer = PseudoFP16Initializer
