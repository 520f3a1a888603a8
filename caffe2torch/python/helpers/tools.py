"""``brew.image_input``: the ImageInput op, with the NHWC -> NCHW switch (Caffe2's
``helpers/tools.py``)."""


def image_input(model, blob_in, blob_out, order="NCHW", use_gpu_transform=False, **kwargs):
    """ImageInput from reader ``blob_in`` into ``blob_out`` = [data, label]; is_test is required.

    The op writes NHWC; for ``order="NCHW"`` it writes ``<data>_nhwc`` and an NHWC2NCHW op makes
    ``data``, unless ``use_gpu_transform`` (the op then writes NCHW itself, on the GPU).
    """
    if "is_test" not in kwargs:
        raise ValueError("brew.image_input needs the argument is_test (True for a test or "
                         "deploy net: central crops; False for training: random crops)")
    blob_out = list(blob_out)
    if order != "NCHW":
        return model.net.ImageInput(blob_in, blob_out, **kwargs)
    if use_gpu_transform:
        kwargs["use_gpu_transform"] = 1
        return model.net.ImageInput(blob_in, blob_out, **kwargs)
    outputs = list(model.net.ImageInput(blob_in, [str(blob_out[0]) + "_nhwc"] + blob_out[1:],
                                        **kwargs))
    outputs[0] = model.net.NHWC2NCHW(outputs[0], blob_out[0])
    return tuple(outputs)
