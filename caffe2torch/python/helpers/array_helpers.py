"""Array helpers: concat, depth_concat (Caffe2's ``helpers/array_helpers.py``)."""


def concat(model, blobs_in, blob_out, **kwargs):
    """Concat along ``axis`` (or ``order``'s channel); split sizes go to ``_<out>_concat_dims``."""
    if kwargs.get("order") and kwargs.get("axis"):
        del kwargs["order"]  # an explicit axis wins over the order's channel axis
    return model.net.Concat(blobs_in, [blob_out, "_" + str(blob_out) + "_concat_dims"],
                            **kwargs)[0]


def depth_concat(model, blobs_in, blob_out, **kwargs):
    """The deprecated name of concat."""
    print("DepthConcat is deprecated. use Concat instead.")
    return concat(model, blobs_in, blob_out, **kwargs)
