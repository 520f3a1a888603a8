"""Caffe2's ``modeling.parameter_info`` (the classes live in model_helper)."""
from caffe2torch.python.model_helper import ParameterInfo, ParameterTags  # noqa: F401
