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
