"""Caffe2's ``predictor.mobile_exporter``: a net and its parameters as the two NetDefs
(init_net with Given*Fill ops, predict_net) that a Predictor loads. Example::

    init_net, predict_net = mobile_exporter.Export(workspace, deploy_model.net, deploy_model.params)
    p = workspace.Predictor(init_net.SerializeToString(), predict_net.SerializeToString())
"""
import numpy as np

from caffe2torch.proto import caffe2_pb2
from caffe2torch.python import core, utils

_FILLS = {
    np.dtype("float32"): "GivenTensorFill",
    np.dtype("int32"): "GivenTensorIntFill",
    np.dtype("int64"): "GivenTensorInt64Fill",
    np.dtype("uint8"): "GivenTensorStringFill",
}


def add_tensor(net, name, blob):
    """Append a fill op that recreates ``blob`` (uint8 as one string, as Caffe2 stores it)."""
    blob = np.asarray(blob)
    if blob.dtype not in _FILLS:
        raise ValueError(f"mobile_exporter: blob {name!r} has dtype {blob.dtype}; Caffe2's "
                         "exporter stores float32, int32, int64 and uint8")
    shape, values = list(blob.shape), blob
    if blob.dtype == np.dtype("uint8"):
        shape, values = [1], [blob.tobytes()]
    op = core.CreateOperator(_FILLS[blob.dtype], [], [name], arg=[
        utils.MakeArgument("shape", shape), utils.MakeArgument("values", values)])
    net.op.extend([op])


def Export(workspace, net, params):
    """(init_net, predict_net): the parameters' values as fills, inputs first in external_input."""
    proto = net if isinstance(net, caffe2_pb2.NetDef) else net.Proto()
    predict_net = caffe2_pb2.NetDef()
    predict_net.CopyFrom(proto)
    init_net = caffe2_pb2.NetDef()
    params = [str(p) for p in params]
    ssa, blob_versions = core.get_ssa(proto)
    read = {name for inputs, _ in ssa for name, _ in inputs}
    input_blobs = [b for b, v in blob_versions.items() if v == 0 and b not in params]
    output_blobs = [b for b, v in blob_versions.items() if v != 0 and b not in read]
    for name in params:
        add_tensor(init_net, name, workspace.FetchBlob(name))
    # The inputs must exist when the Predictor creates its net: a stand-in the caller replaces.
    for name in input_blobs:
        init_net.op.extend([core.CreateOperator("GivenTensorFill", [], [name], arg=[
            utils.MakeArgument("shape", [1, 1]), utils.MakeArgument("values", [0.0])])])
    external = list(input_blobs)
    external += [i for i in proto.external_input if i not in external]
    del predict_net.external_input[:]
    predict_net.external_input.extend(external)
    del predict_net.external_output[:]
    predict_net.external_output.extend(output_blobs)
    return init_net, predict_net
