"""Algebra helpers: sum, transpose, batch_mat_mul (Caffe2's ``helpers/algebra.py``)."""


def transpose(model, blob_in, blob_out, use_cudnn=False, **kwargs):
    """Transpose (``axes``; default reverses the dims)."""
    if use_cudnn:
        kwargs["engine"] = "CUDNN"
    return model.net.Transpose(blob_in, blob_out, **kwargs)


def sum(model, blob_in, blob_out, **kwargs):  # noqa: A001 (Caffe2's name)
    """Sum of the input blobs."""
    return model.net.Sum(blob_in, blob_out, **kwargs)


def batch_mat_mul(model, blob_in, blob_out, enable_tensor_core=False, **kwargs):
    """BatchMatMul (engine TENSORCORE when asked, which changes nothing here)."""
    if enable_tensor_core:
        kwargs["engine"] = "TENSORCORE"
    return model.net.BatchMatMul(blob_in, blob_out, **kwargs)
