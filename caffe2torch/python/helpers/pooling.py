"""Pooling helpers (Caffe2's ``helpers/pooling.py``)."""


def max_pool(model, blob_in, blob_out, use_cudnn=False, order="NCHW", **kwargs):
    """MaxPool (``kernel``, ``stride``, ``pad`` as kwargs)."""
    if use_cudnn:
        kwargs["engine"] = "CUDNN"
    return model.net.MaxPool(blob_in, blob_out, order=order, **kwargs)


def average_pool(model, blob_in, blob_out, use_cudnn=False, order="NCHW", **kwargs):
    """AveragePool (``kernel``, ``stride``, ``pad`` as kwargs)."""
    if use_cudnn:
        kwargs["engine"] = "CUDNN"
    return model.net.AveragePool(blob_in, blob_out, order=order, **kwargs)
