"""``workspace.InferShapesAndTypes``: each blob's shape and DataType, found by running the nets.

Caffe2 infers shapes from each op schema's inference function. caffe2torch has no such
functions: it runs the nets' ops, in order, on a scratch copy of the workspace (so nothing the
user holds changes), with zero-filled stand-ins for the blobs given in ``blob_dimensions``. Ops
with side effects (Save, DB readers, Print ...) are not run, and neither is any op whose inputs
are unknown or which fails: their outputs are left out of the answer, as Caffe2 leaves out
blobs it cannot infer.
"""
import torch

from caffe2torch.ops import registry
from caffe2torch.ops.utility import TORCH_DTYPES
from caffe2torch.proto import caffe2_pb2
from caffe2torch.python.executor import PreparedNet

_DATA_TYPES = {v: k for k, v in reversed(list(TORCH_DTYPES.items()))}
_DATA_TYPES[torch.uint8] = caffe2_pb2.TensorProto.UINT8


class _Scratch:
    def __init__(self, workspace):
        self.blobs = {}
        self.nets = {}
        self.root_folder = workspace.root_folder
        self.root_folder_name = getattr(workspace, "root_folder_name", workspace.root_folder)


def _copy(value):
    if isinstance(value, torch.Tensor):
        return value.clone()
    return value


def _net_proto(net, nets_proto):
    if isinstance(net, (bytes, bytearray)):
        proto = caffe2_pb2.NetDef()
        proto.ParseFromString(bytes(net))
        return proto
    return net.Proto() if hasattr(net, "Proto") else net


def infer_shapes_and_types(nets, workspace, blob_dimensions=None, blob_types=None):
    """({blob: [dims]}, {blob: TensorProto.DataType}) for the blobs of ``nets``."""
    scratch = _Scratch(workspace)
    given = dict(blob_dimensions or {})
    types = dict(blob_types or {})
    for name, value in workspace.blobs.items():
        if value is not None and name not in given:
            scratch.blobs[name] = _copy(value.resolve() if type(value) is registry.Deferred
                                        else value)
    from caffe2torch.ops.utility import torch_dtype
    for name, dims in given.items():
        dtype = torch_dtype(types.get(name, caffe2_pb2.TensorProto.FLOAT))
        scratch.blobs[name] = torch.zeros([int(d) for d in dims], dtype=dtype)
    with torch.no_grad():
        for net in nets if isinstance(nets, (list, tuple)) else [nets]:
            proto = _net_proto(net, False)
            for op in proto.op:
                _run_one(op, proto, scratch)
    shapes, dtypes = {}, {}
    for name, value in scratch.blobs.items():
        if isinstance(value, torch.Tensor):
            shapes[name] = list(value.shape)
            dtypes[name] = _DATA_TYPES.get(value.dtype, caffe2_pb2.TensorProto.UNDEFINED)
    return shapes, dtypes


def _run_one(op, net_proto, scratch):
    if not registry.is_registered(op.type):
        return
    if registry.get_schema(op.type).side_effects or any(n not in scratch.blobs for n in op.input):
        return
    single = caffe2_pb2.NetDef(name="shape_inference")
    if net_proto.HasField("device_option"):
        single.device_option.CopyFrom(net_proto.device_option)
    single.op.add().CopyFrom(op)
    before = {n: scratch.blobs.get(n) for n in op.output}
    try:
        prepared = PreparedNet(single, scratch)
        try:
            prepared.run(1)
        finally:
            prepared.close()
    except Exception:  # noqa: BLE001 (an op that cannot run: its outputs stay unknown)
        for name, value in before.items():
            if value is None:
                scratch.blobs.pop(name, None)
            else:
                scratch.blobs[name] = value
        return
    for name in op.output:
        value = scratch.blobs.get(name)
        if type(value) is registry.Deferred:
            scratch.blobs[name] = value.resolve()
        elif value is None:
            scratch.blobs.pop(name, None)
