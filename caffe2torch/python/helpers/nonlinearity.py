"""Activation helpers: relu, tanh, sigmoid (Caffe2's ``helpers/nonlinearity.py``) and softmax
(which Caffe2 keeps in ``helpers/normalization.py``)."""


def relu(model, blob_in, blob_out, use_cudnn=False, order="NCHW", **kwargs):
    """Relu."""
    if use_cudnn:
        kwargs["engine"] = "CUDNN"
    return model.net.Relu(blob_in, blob_out, order=order, **kwargs)


def tanh(model, blob_in, blob_out, use_cudnn=False, order="NCHW", **kwargs):
    """Tanh."""
    if use_cudnn:
        kwargs["engine"] = "CUDNN"
    return model.net.Tanh(blob_in, blob_out, order=order, **kwargs)


def softmax(model, blob_in, blob_out=None, use_cudnn=False, **kwargs):
    """Softmax over axis 1 (``order`` and the other model-wide kwargs become op arguments)."""
    if use_cudnn:
        kwargs["engine"] = "CUDNN"
    if blob_out is not None:
        return model.net.Softmax(blob_in, blob_out, **kwargs)
    return model.net.Softmax(blob_in, **kwargs)


def prelu(model, blob_in, blob_out, num_channels=1, slope_init=None, **kwargs):
    """PRelu with a learned slope ``<out>_slope`` of ``num_channels`` values (0.25 at first)."""
    from caffe2torch.python.model_helper import ExternalInitializer, update_initializer
    initializer = update_initializer(None, slope_init, ("ConstantFill", {"value": 0.25})) \
        if model.init_params else ExternalInitializer()
    slope = model.create_param(param_name=blob_out + "_slope", shape=[num_channels],
                               initializer=initializer)
    return model.net.PRelu([blob_in, slope], [blob_out])
