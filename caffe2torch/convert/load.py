"""Build a :class:`NetModule` from what Caffe2 users have on disk: an init net, a DB of blobs, or
a predictor DB written by ``predictor_exporter``. Each runs in a private workspace (on the CPU,
whatever device the files were saved for), so the user's workspace is left alone."""
import os

import torch

from caffe2torch.convert.module import ExportError, NetModule, cpu_net
from caffe2torch.proto import caffe2_pb2, metanet_pb2
from caffe2torch.python.executor import PreparedNet
from caffe2torch.python.predictor.predictor_py_utils import GetBlobs, GetNet, predictor_constants
from caffe2torch.python.workspace import Workspace


def read_netdef(path):
    """A NetDef from a binary (``.pb``) or text (``.pbtxt``) file; a clear error for other files."""
    from google.protobuf import message, text_format

    with open(path, "rb") as f:
        data = f.read()
    net = caffe2_pb2.NetDef()
    try:
        net.ParseFromString(data)
        if net.op or net.external_input or net.name:
            return net
    except message.DecodeError:
        pass
    try:
        return text_format.Parse(data.decode("utf-8"), caffe2_pb2.NetDef())
    except (UnicodeDecodeError, text_format.ParseError) as exc:
        raise ExportError(f"{path}: not a Caffe2 NetDef (binary or text): {exc}") from None


def _as_netdef(net):
    if isinstance(net, (str, os.PathLike)):
        return read_netdef(net)
    if hasattr(net, "Proto"):
        return net.Proto()
    if isinstance(net, caffe2_pb2.NetDef):
        return net
    raise TypeError(f"expected a NetDef, core.Net or file path, got {type(net).__name__}")


def _run(netdef, ws=None):
    """Run ``netdef`` on the CPU in ``ws`` (a new private Workspace by default); return ``ws``."""
    ws = ws or Workspace()
    prepared = PreparedNet(cpu_net(netdef), ws)
    try:
        prepared.run(1)
    finally:
        prepared.close()
    return ws


def _load_all_op(db, db_type):
    op = caffe2_pb2.OperatorDef(type="Load")
    for name, value in (("db", db), ("db_type", db_type)):
        op.arg.add(name=name, s=value.encode("utf-8"))
    op.arg.add(name="load_all", i=1)
    op.arg.add(name="absolute_path", i=1)
    return op


def _tensors(ws):
    return {k: v for k, v in ws.blobs.items() if v is not None}


def from_netdefs(init_net, predict_net, inputs=None, outputs=None):
    """A NetModule from an init net (run once on the CPU) and a predict net (NetDefs or paths)."""
    init_net, predict_net = _as_netdef(init_net), _as_netdef(predict_net)
    params = _tensors(_run(init_net))
    module = NetModule(predict_net, params, inputs, outputs)
    # A deploy init net that fills the data blob says its shape and dtype.
    module.input_examples = {n: params[n] for n in module.input_names
                             if isinstance(params.get(n), torch.Tensor)}
    return module


def from_db(predict_net, db, db_type="minidb", inputs=None, outputs=None):
    """A NetModule whose parameters are the blobs of the minidb/LMDB ``db`` (as Save wrote them)."""
    net = caffe2_pb2.NetDef(name="load_parameters")
    net.op.append(_load_all_op(os.path.abspath(db), db_type))
    params = _tensors(_run(net))
    return NetModule(_as_netdef(predict_net), params, inputs, outputs)


def read_predictor(path, db_type="minidb"):
    """(MetaNetDef, {blob: tensor}) of a predictor DB (``predictor_exporter.save_to_db``)."""
    net = caffe2_pb2.NetDef(name="load_predictor")
    net.op.append(_load_all_op(os.path.abspath(path), db_type))
    blobs = _tensors(_run(net))
    raw = blobs.pop(predictor_constants.META_NET_DEF, None)
    if raw is None:
        raise ExportError(f"{path}: no blob {predictor_constants.META_NET_DEF!r}; it is not a "
                          "predictor DB (for a DB of parameters use --predict with --init-db)")
    if not isinstance(raw, bytes):
        raw = bytes(raw.reshape(-1)[0]) if hasattr(raw, "reshape") else bytes(raw)
    meta = metanet_pb2.MetaNetDef()
    meta.ParseFromString(raw)
    return meta, blobs


def from_predictor_db(path, db_type="minidb", inputs=None, outputs=None):
    """A NetModule from a predictor DB; inputs and outputs default to the ones it was saved with."""
    meta, params = read_predictor(path, db_type)
    predict_net = GetNet(meta, predictor_constants.PREDICT_NET_TYPE)
    if predict_net is None:
        raise ExportError(f"{path}: its MetaNetDef has no {predictor_constants.PREDICT_NET_TYPE!r} "
                          "net")
    wanted = GetBlobs(meta, predictor_constants.PARAMETERS_BLOB_TYPE)
    missing = [p for p in wanted if p not in params]
    if missing:
        raise ExportError(f"{path}: parameters {missing[:3]} are listed but not stored in the DB")
    inputs = inputs or GetBlobs(meta, predictor_constants.INPUTS_BLOB_TYPE) or None
    outputs = outputs or GetBlobs(meta, predictor_constants.OUTPUTS_BLOB_TYPE) or None
    module = NetModule(predict_net, params, inputs, outputs)
    # The predict-init net zero-fills each input with the shape it was exported with.
    init = GetNet(meta, predictor_constants.PREDICT_INIT_NET_TYPE)
    fills = {}
    for op in init.op if init is not None else ():
        shape = [a.ints for a in op.arg if a.name == "shape"]
        if op.type == "ConstantFill" and shape and len(op.output) == 1:
            fills[op.output[0]] = torch.zeros(list(shape[0]))
    module.input_examples = {n: fills[n] for n in module.input_names if n in fills}
    return module
