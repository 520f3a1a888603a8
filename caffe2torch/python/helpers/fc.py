"""Fully connected helper (Caffe2's ``helpers/fc.py``)."""
from caffe2torch.python import core
from caffe2torch.python.model_helper import (ExternalInitializer, ParameterTags,
                                             update_initializer)


def fc(model, blob_in, blob_out, dim_in, dim_out, weight_init=None, bias_init=None,
       WeightInitializer=None, BiasInitializer=None, **kwargs):
    """FC layer: creates ``<out>_w`` [dim_out, dim_in] (XavierFill) and ``<out>_b`` [dim_out]."""
    blob_out = blob_out or model.net.NextName()
    if model.init_params:
        weight_initializer = update_initializer(WeightInitializer, weight_init, ("XavierFill", {}))
        bias_initializer = update_initializer(BiasInitializer, bias_init, ("ConstantFill", {}))
    else:
        # The weights come from another model sharing the workspace (test/deploy nets).
        weight_initializer = bias_initializer = ExternalInitializer()
    weight = model.create_param(param_name=blob_out + "_w", shape=[dim_out, dim_in],
                                initializer=weight_initializer, tags=ParameterTags.WEIGHT)
    if "freeze_bias" in kwargs:
        # A frozen bias feeds FC but is not a trained parameter (Caffe2 keeps it out of params).
        bias = bias_initializer.create_param(
            param_name=core.BlobReference(core.ScopedName(blob_out + "_b")),
            init_net=model.param_init_net, shape=[dim_out]).blob
        model.biases.append(bias)
    else:
        bias = model.create_param(param_name=blob_out + "_b", shape=[dim_out],
                                  initializer=bias_initializer, tags=ParameterTags.BIAS)
    # Caffe2 hands every remaining kwarg (order, use_cudnn, ...) to the FC op as an argument.
    return model.net.FC([blob_in, weight, bias], blob_out, **kwargs)
