"""Training helpers: the iteration counter and accuracy (Caffe2's ``helpers/train.py``)."""
from caffe2torch.proto import caffe2_pb2
from caffe2torch.python import core, scope


def iter(model, blob_out, **kwargs):  # noqa: A001 (Caffe2's name)
    """An int64 counter: ConstantFill 0 in the init net (on CPU), Iter (+1 per run) in net."""
    kwargs.pop("device_option", None)
    model.param_init_net.ConstantFill([], blob_out, shape=[1], value=0,
                                      dtype=core.DataType.INT64,
                                      device_option=core.DeviceOption(caffe2_pb2.CPU, 0),
                                      **kwargs)
    return model.net.Iter(blob_out, blob_out, **kwargs)


def accuracy(model, blob_in, blob_out, **kwargs):
    """Top-k accuracy of predictions ``blob_in[0]`` against labels ``blob_in[1]``.

    As in Caffe2, on CPU every kwarg (``top_k`` included) is dropped, so the op uses top_k=1;
    only on a GPU with top_k > 1 are the blobs copied to the host for a top-k Accuracy.
    """
    dev = kwargs.get("device_option", scope.CurrentDeviceScope())
    is_cpu = dev is None or dev.device_type == caffe2_pb2.CPU
    if not is_cpu and kwargs.get("top_k", 1) > 1:
        pred_host = model.net.CopyGPUToCPU(blob_in[0], str(blob_in[0]) + "_host")
        label_host = model.net.CopyGPUToCPU(blob_in[1], str(blob_in[1]) + "_host")
        kwargs["device_option"] = core.DeviceOption(caffe2_pb2.CPU, 0)
        return model.net.Accuracy([pred_host, label_host], blob_out, **kwargs)
    return model.net.Accuracy(blob_in, blob_out)


def add_weight_decay(model, weight_decay):
    """grad += weight_decay · w for the weights in the current name scope (after gradients)."""
    if weight_decay <= 0.0:
        return
    wd = model.param_init_net.ConstantFill([], "wd", shape=[1], value=weight_decay)
    one = model.param_init_net.ConstantFill([], "ONE", shape=[1], value=1.0)
    namescope = scope.CurrentNameScope()
    for param in model.weights:
        if param.GetNameScope() != namescope:
            continue
        grad = model.param_to_grad[param]
        model.net.WeightedSum([grad, one, param, wd], grad)
