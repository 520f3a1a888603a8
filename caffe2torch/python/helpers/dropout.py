"""Dropout helper (Caffe2's ``helpers/dropout.py``)."""


def dropout(model, blob_in, blob_out, use_cudnn=False, **kwargs):
    """Dropout with outputs (``blob_out``, ``_<blob_out>_mask``); ``is_test`` is required."""
    kwargs["engine"] = "CUDNN" if use_cudnn else "DEFAULT"
    if "is_test" not in kwargs:
        raise ValueError("brew.dropout needs is_test: pass is_test=0 for training, 1 for inference")
    return model.net.Dropout(blob_in, [blob_out, "_" + str(blob_out) + "_mask"], **kwargs)[0]
