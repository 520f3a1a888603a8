"""Normalization helpers: spatial_bn, lrn, layer_norm, instance_norm (Caffe2's
``helpers/normalization.py``; softmax lives in nonlinearity.py here)."""
from caffe2torch.proto import caffe2_pb2
from caffe2torch.python import scope
from caffe2torch.python.model_helper import ExternalInitializer, Initializer, ParameterTags


def _param(model, name, shape, value, tags):
    initializer = Initializer("ConstantFill", value=value) if model.init_params else \
        ExternalInitializer()
    return model.create_param(param_name=name, shape=shape, initializer=initializer, tags=tags)


def spatial_bn(model, blob_in, blob_out, dim_in, order="NCHW", **kwargs):
    """SpatialBN with ``<out>_s`` (1), ``<out>_b`` (0) and running ``_rm`` (0) / ``_riv`` (1)."""
    blob_out = blob_out or model.net.NextName()
    scale = _param(model, blob_out + "_s", [dim_in], 1.0, ParameterTags.WEIGHT)
    bias = _param(model, blob_out + "_b", [dim_in], 0.0, ParameterTags.BIAS)
    running_mean = _param(model, blob_out + "_rm", [dim_in], 0.0, ParameterTags.COMPUTED_PARAM)
    running_inv_var = _param(model, blob_out + "_riv", [dim_in], 1.0,
                             ParameterTags.COMPUTED_PARAM)
    inputs = [blob_in, scale, bias, running_mean, running_inv_var]
    if kwargs.get("is_test"):
        return model.net.SpatialBN(inputs, [blob_out], order=order, **kwargs)
    outputs = [blob_out, running_mean, running_inv_var, blob_out + "_sm", blob_out + "_siv"]
    return model.net.SpatialBN(inputs, outputs, order=order, **kwargs)[0]


def lrn(model, blob_in, blob_out, order="NCHW", use_cudnn=False, **kwargs):
    """LRN; on CPU (or without cuDNN) it also writes ``_<out>_scale``, as Caffe2's helper."""
    dev = kwargs.get("device_option", scope.CurrentDeviceScope())
    is_cpu = dev is None or dev.device_type == caffe2_pb2.CPU
    if use_cudnn and not is_cpu:
        kwargs["engine"] = "CUDNN"
        return model.net.LRN(blob_in, blob_out, order=order, **kwargs)
    return model.net.LRN(blob_in, [blob_out, "_" + str(blob_out) + "_scale"], order=order,
                         **kwargs)[0]


def layer_norm(model, blob_in, blob_out, dim_in, axis=1, epsilon=1e-4, initial_scale=1.0,
               initial_bias=0.0):
    """LayerNorm then learned ``<out>_scale`` and ``<out>_bias``; returns (out, mean, std)."""
    normalized, mean, std = model.net.LayerNorm(
        [blob_in], [blob_out, blob_out + "_mean", blob_out + "_std"], axis=axis, epsilon=epsilon)
    shape = [dim_in] if isinstance(dim_in, int) else list(dim_in)
    scale = _param(model, f"{blob_out}_scale", shape, initial_scale, ParameterTags.WEIGHT)
    bias = _param(model, f"{blob_out}_bias", shape, initial_bias, ParameterTags.BIAS)
    scaled = model.net.Mul([normalized, scale], [f"{blob_out}_scaled"], broadcast=1, axis=axis)
    biased = model.net.Add([scaled, bias], [f"{blob_out}_biased"], broadcast=1, axis=axis)
    return biased, mean, std


def instance_norm(model, blob_in, blob_out, dim_in, order="NCHW", **kwargs):
    """InstanceNorm with ``<out>_s`` (1) and ``<out>_b`` (0)."""
    blob_out = blob_out or model.net.NextName()
    scale = _param(model, blob_out + "_s", [dim_in], 1.0, ParameterTags.WEIGHT)
    bias = _param(model, blob_out + "_b", [dim_in], 0.0, ParameterTags.BIAS)
    if kwargs.get("is_test"):
        return model.net.InstanceNorm([blob_in, scale, bias], [blob_out], order=order, **kwargs)
    return model.net.InstanceNorm([blob_in, scale, bias],
                                  [blob_out, blob_out + "_sm", blob_out + "_siv"],
                                  order=order, **kwargs)[0]
