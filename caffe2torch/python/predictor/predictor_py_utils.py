"""Helpers of the predictor exporter: the constants, MetaNetDef map access, and the nets it builds
(Caffe2's ``predictor_py_utils`` and ``predictor_constants``)."""
from caffe2torch.proto import predictor_consts_pb2
from caffe2torch.python import core, scope, workspace

# The constants are the default values of PredictorConsts' fields ("!!META_NET_DEF", ...).
predictor_constants = predictor_consts_pb2.PredictorConsts()


def get_comp_name(string, name):
    """``string`` or ``string_<name>`` when ``name`` is non-empty."""
    return f"{string}_{name}" if name else string


def _proto_map_get(field, key):
    # MetaNetDef stores maps as repeated {key, value} messages.
    for entry in field:
        if entry.key == key:
            return entry.value
    return None


def GetNet(meta_net_def, key):
    """The NetDef stored under ``key`` (e.g. predictor_constants.PREDICT_NET_TYPE), or None."""
    return _proto_map_get(meta_net_def.nets, key)


def GetPlan(meta_net_def, key):
    """The PlanDef stored under ``key``, or None."""
    return _proto_map_get(meta_net_def.plans, key)


def GetBlobs(meta_net_def, key):
    """The blob names stored under ``key`` (e.g. PARAMETERS_BLOB_TYPE), or []."""
    blobs = _proto_map_get(meta_net_def.blobs, key)
    return [] if blobs is None else list(blobs)


def GetApplicationSpecificInfo(meta_net_def, key):
    """The string stored under ``key`` in applicationSpecificInfo, or None."""
    return _proto_map_get(meta_net_def.applicationSpecificInfo, key)


def AddBlobs(meta_net_def, blob_name, blob_def):
    """Append blob names under ``blob_name``."""
    blobs = _proto_map_get(meta_net_def.blobs, blob_name)
    if blobs is None:
        entry = meta_net_def.blobs.add()
        entry.key = blob_name
        blobs = entry.value
    blobs.extend(str(b) for b in blob_def)


def AddNet(meta_net_def, net_name, net_def):
    """Store ``net_def`` under ``net_name``."""
    meta_net_def.nets.add(key=net_name, value=net_def)


def AddPlan(meta_net_def, plan_name, plan_def):
    """Store ``plan_def`` under ``plan_name``."""
    meta_net_def.plans.add(key=plan_name, value=plan_def)


def create_predict_net(predictor_export_meta):
    """A copy of the predict net: external inputs = inputs + parameters, outputs = outputs."""
    meta = predictor_export_meta
    net = core.Net(meta.predict_net.name or "predict")
    net.Proto().op.extend(meta.predict_net.op)
    net.Proto().arg.extend(meta.predict_net.arg)
    net.Proto().external_input.extend(meta.inputs + meta.parameters)
    net.Proto().external_output.extend(meta.outputs)
    if meta.net_type is not None:
        net.Proto().type = meta.net_type
    if meta.num_workers is not None:
        net.Proto().num_workers = meta.num_workers
    return net.Proto()


def create_predict_init_net(predictor_export_meta):
    """A net that zero-fills every input and output blob (their shapes from the workspace).

    Caffe2 has no shape inference, so this is how a predictor gets its blobs allocated.
    """
    meta = predictor_export_meta
    with scope.DeviceScope(None):
        net = core.Net("predict-init")
        external_blobs = meta.inputs + meta.outputs
        for blob in external_blobs:
            shape = meta.shapes.get(blob)
            if shape is None:
                if not workspace.HasBlob(blob):
                    raise ValueError(f"predictor blob {blob!r} is not in the workspace, so its "
                                     "shape is unknown: run the net once first, or pass "
                                     "shapes={name: shape} to PredictorExportMeta")
                shape = workspace.FetchBlob(blob).shape
            net.ConstantFill([], blob, shape=list(shape), value=0.0)
        net.Proto().external_input.extend(external_blobs)
        if meta.extra_init_net is not None:
            extra = meta.extra_init_net.Proto() if hasattr(meta.extra_init_net, "Proto") \
                else meta.extra_init_net
            net.Proto().op.extend(extra.op)
            net.Proto().external_input.extend(extra.external_input)
            net.Proto().external_output.extend(extra.external_output)
    return net.Proto()
