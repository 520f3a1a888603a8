"""Convolution helpers (Caffe2's ``helpers/conv.py``)."""
from caffe2torch.python.model_helper import (ExternalInitializer, ParameterTags,
                                             update_initializer)


def _cudnn_args(kwargs, use_cudnn, exhaustive_search, ws_nbytes_limit):
    """Caffe2's use_cudnn arguments: engine CUDNN and its search/workspace settings."""
    if use_cudnn:
        kwargs["engine"] = "CUDNN"
        kwargs["exhaustive_search"] = exhaustive_search
        if ws_nbytes_limit:
            kwargs["ws_nbytes_limit"] = ws_nbytes_limit


def _weight_and_bias(model, blob_out, weight_shape, dim_out, use_bias, weight_init, bias_init,
                     WeightInitializer=None, BiasInitializer=None):
    """[<out>_w (XavierFill), <out>_b (ConstantFill) if use_bias] as the model's parameters."""
    if model.init_params:
        weight_initializer = update_initializer(WeightInitializer, weight_init, ("XavierFill", {}))
        bias_initializer = update_initializer(BiasInitializer, bias_init, ("ConstantFill", {}))
    else:
        # The weights come from another model sharing the workspace (test/deploy nets).
        weight_initializer = bias_initializer = ExternalInitializer()
    params = [model.create_param(param_name=blob_out + "_w", shape=weight_shape,
                                 initializer=weight_initializer, tags=ParameterTags.WEIGHT)]
    if use_bias:
        params.append(model.create_param(param_name=blob_out + "_b", shape=[dim_out],
                                         initializer=bias_initializer, tags=ParameterTags.BIAS))
    return params


def _conv_base(model, is_nd, blob_in, blob_out, dim_in, dim_out, kernel, weight_init=None,
               bias_init=None, WeightInitializer=None, BiasInitializer=None, group=1,
               transform_inputs=None, use_cudnn=False, order="NCHW",
               cudnn_exhaustive_search=False, ws_nbytes_limit=None, **kwargs):
    if is_nd:
        kernels = list(kernel) if isinstance(kernel, (list, tuple)) else [kernel]
    elif isinstance(kernel, (list, tuple)):  # Caffe2 accepts kernel=[kh, kw] for 2-D
        if len(kernel) != 2:
            raise ValueError(f"brew.conv takes kernel=k or kernel=[kh, kw], got {list(kernel)}")
        kernels = list(kernel)
    else:
        kernels = [kernel] * 2
    _cudnn_args(kwargs, use_cudnn, cudnn_exhaustive_search, ws_nbytes_limit)
    use_bias = not kwargs.get("no_bias", False)
    blob_out = blob_out or model.net.NextName()
    weight_shape = [dim_out]
    if order == "NCHW":
        weight_shape.append(int(dim_in / group))
        weight_shape.extend(kernels)
    else:
        weight_shape.extend(kernels)
        weight_shape.append(int(dim_in / group))

    inputs = [blob_in] + _weight_and_bias(model, blob_out, weight_shape, dim_out, use_bias,
                                          weight_init, bias_init, WeightInitializer,
                                          BiasInitializer)
    if transform_inputs is not None:
        transform_inputs(model, blob_out, inputs)
    # Conv infers "no bias" from its input count.
    kwargs.pop("no_bias", None)
    if group != 1:
        kwargs["group"] = group
    if is_nd:
        return model.net.Conv(inputs, blob_out, kernels=kernels, order=order, **kwargs)
    if isinstance(kernel, (list, tuple)):
        return model.net.Conv(inputs, blob_out, kernel_h=kernels[0], kernel_w=kernels[1],
                              order=order, **kwargs)
    return model.net.Conv(inputs, blob_out, kernel=kernel, order=order, **kwargs)


def conv(model, blob_in, blob_out, dim_in, dim_out, kernel, weight_init=None, bias_init=None,
         WeightInitializer=None, BiasInitializer=None, group=1, transform_inputs=None, **kwargs):
    """2-D convolution: creates ``<out>_w`` (XavierFill) and ``<out>_b`` (ConstantFill), adds Conv."""
    return _conv_base(model, False, blob_in, blob_out, dim_in, dim_out, kernel, weight_init,
                      bias_init, WeightInitializer, BiasInitializer, group, transform_inputs,
                      **kwargs)


def conv_nd(model, blob_in, blob_out, dim_in, dim_out, kernel, weight_init=None, bias_init=None,
            WeightInitializer=None, BiasInitializer=None, group=1, transform_inputs=None,
            order="NCHW", **kwargs):
    """N-D convolution (NCHW only): ``kernel`` is a list, one size per spatial axis."""
    if order != "NCHW":
        raise ValueError(f"conv_nd supports order='NCHW' only, got {order!r}")
    return _conv_base(model, True, blob_in, blob_out, dim_in, dim_out, kernel, weight_init,
                      bias_init, WeightInitializer, BiasInitializer, group, transform_inputs,
                      order=order, **kwargs)


def group_conv(model, blob_in, blob_out, dim_in, dim_out, kernel, weight_init=None,
               bias_init=None, group=1, **kwargs):
    """Grouped 2-D convolution: ``<out>_w`` is [dim_out, dim_in / group, k, k]."""
    return _conv_base(model, False, blob_in, blob_out, dim_in, dim_out, kernel, weight_init,
                      bias_init, group=group, **kwargs)


def conv_transpose(model, blob_in, blob_out, dim_in, dim_out, kernel, weight_init=None,
                   bias_init=None, use_cudnn=False, order="NCHW", cudnn_exhaustive_search=False,
                   ws_nbytes_limit=None, **kwargs):
    """Transposed convolution: ``<out>_w`` [dim_in, dim_out, k, k] (NCHW) and ``<out>_b``."""
    blob_out = blob_out or model.net.NextName()
    weight_shape = [dim_in, dim_out, kernel, kernel] if order == "NCHW" else \
        [dim_in, kernel, kernel, dim_out]
    params = _weight_and_bias(model, blob_out, weight_shape, dim_out, True, weight_init,
                              bias_init)
    _cudnn_args(kwargs, use_cudnn, cudnn_exhaustive_search, ws_nbytes_limit)
    return model.net.ConvTranspose([blob_in] + params, blob_out, kernel=kernel, order=order,
                                   **kwargs)
