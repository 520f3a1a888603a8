"""Caffe2's ``predictor_exporter``: save a predict net and its weights to one DB, load it back.

The DB holds a string blob "!!META_NET_DEF" (a serialized MetaNetDef) first, then each parameter
as Save writes it (``<param>#%0``, ...). The MetaNetDef carries three nets: "predict-init"
(zero-fills inputs and outputs), "global-init" (one Load from the "!!PREDICTOR_DBREADER"
reader) and the predict net, plus the blob lists. Files written by real Caffe2 (also on a GPU:
``engine: "CUDNN"``, CUDA device options) load here, and ours load in Caffe2. Example::

    meta = predictor_exporter.PredictorExportMeta(
        predict_net=deploy_model.net.Proto(), parameters=[str(p) for p in deploy_model.params],
        inputs=["data"], outputs=["softmax"], shapes={"data": (1, 1, 28, 28), "softmax": (1, 10)})
    predictor_exporter.save_to_db("minidb", "mnist_model.minidb", meta)
    workspace.ResetWorkspace()
    predict_net = predictor_exporter.prepare_prediction_net("mnist_model.minidb", "minidb")
    workspace.FeedBlob("data", images)
    workspace.RunNet(predict_net)
"""
import collections
import os

from caffe2torch import limits
from caffe2torch.proto import caffe2_pb2, metanet_pb2
from caffe2torch.python import core, scope, workspace
from caffe2torch.python.predictor import predictor_py_utils as utils
from caffe2torch.python.predictor.predictor_py_utils import predictor_constants

_Fields = collections.namedtuple(
    "PredictorExportMeta",
    "predict_net, parameters, inputs, outputs, shapes, name, extra_init_net, net_type, num_workers")


class PredictorExportMeta(_Fields):
    """What to export: the predict net (core.Net or NetDef) and its parameter/input/output names.

    ``shapes`` ({blob: shape}) overrides the workspace shapes used to zero-fill inputs and
    outputs; ``name`` suffixes every MetaNetDef key (``PREDICT_NET_TYPE_<name>``) so several
    predictors can share one file.
    """

    def __new__(cls, predict_net, parameters, inputs, outputs, shapes=None, name="",
                extra_init_net=None, net_type=None, num_workers=None):
        inputs = [str(i) for i in inputs]
        outputs = [str(o) for o in outputs]
        parameters = [str(p) for p in parameters]
        if len(set(inputs)) != len(inputs):
            raise ValueError(f"predictor inputs must be unique, got {inputs}")
        overlap = sorted(set(parameters) & (set(inputs) | set(outputs)))
        if overlap:
            raise ValueError(f"blobs {overlap} are listed both as parameters and as "
                             "inputs/outputs; a blob can be only one of them")
        shapes = {str(k): v for k, v in (shapes or {}).items()}
        if hasattr(predict_net, "Proto"):
            predict_net = predict_net.Proto()
        if not isinstance(predict_net, (caffe2_pb2.NetDef, caffe2_pb2.PlanDef)):
            raise TypeError("predict_net must be a core.Net, NetDef or PlanDef, not "
                            f"{type(predict_net).__name__}")
        return super().__new__(cls, predict_net, parameters, inputs, outputs, shapes, name,
                               extra_init_net, net_type, num_workers)

    def inputs_name(self):
        """MetaNetDef key of the input blob names."""
        return utils.get_comp_name(predictor_constants.INPUTS_BLOB_TYPE, self.name)

    def outputs_name(self):
        """MetaNetDef key of the output blob names."""
        return utils.get_comp_name(predictor_constants.OUTPUTS_BLOB_TYPE, self.name)

    def parameters_name(self):
        """MetaNetDef key of the parameter blob names."""
        return utils.get_comp_name(predictor_constants.PARAMETERS_BLOB_TYPE, self.name)

    def global_init_name(self):
        """MetaNetDef key of the global-init net."""
        return utils.get_comp_name(predictor_constants.GLOBAL_INIT_NET_TYPE, self.name)

    def predict_init_name(self):
        """MetaNetDef key of the predict-init net."""
        return utils.get_comp_name(predictor_constants.PREDICT_INIT_NET_TYPE, self.name)

    def predict_net_name(self):
        """MetaNetDef key of the predict net."""
        return utils.get_comp_name(predictor_constants.PREDICT_NET_TYPE, self.name)

    def train_init_plan_name(self):
        """MetaNetDef key of a training init plan."""
        return utils.get_comp_name(predictor_constants.TRAIN_INIT_PLAN_TYPE, self.name)

    def train_plan_name(self):
        """MetaNetDef key of a training plan."""
        return utils.get_comp_name(predictor_constants.TRAIN_PLAN_TYPE, self.name)


def _global_init_net(predictor_export_meta):
    """One Load op that reads every parameter from the predictor's DB reader."""
    with scope.DeviceScope(None):
        net = core.Net("global-init")
        net.Load([predictor_constants.PREDICTOR_DBREADER], predictor_export_meta.parameters)
    # Load already declared the reader as an external input; Caffe2 adds it a second time,
    # which real files show, and so do we.
    net.Proto().external_input.extend([predictor_constants.PREDICTOR_DBREADER])
    net.Proto().external_output.extend(predictor_export_meta.parameters)
    return net.Proto()


def get_meta_net_def(predictor_export_meta: PredictorExportMeta) -> metanet_pb2.MetaNetDef:
    """The MetaNetDef describing the predictor (nets: predict-init, global-init, predict)."""
    meta = predictor_export_meta
    meta_net_def = metanet_pb2.MetaNetDef()
    predict_init = utils.create_predict_init_net(meta)
    global_init = _global_init_net(meta)
    # late Caffe2 copies a model_id argument of the predict net onto the init nets.
    for arg in meta.predict_net.arg:
        if arg.name == "model_id":
            predict_init.arg.add().CopyFrom(arg)
            global_init.arg.add().CopyFrom(arg)
    utils.AddNet(meta_net_def, meta.predict_init_name(), predict_init)
    utils.AddNet(meta_net_def, meta.global_init_name(), global_init)
    utils.AddNet(meta_net_def, meta.predict_net_name(), utils.create_predict_net(meta))
    utils.AddBlobs(meta_net_def, meta.parameters_name(), meta.parameters)
    utils.AddBlobs(meta_net_def, meta.inputs_name(), meta.inputs)
    utils.AddBlobs(meta_net_def, meta.outputs_name(), meta.outputs)
    return meta_net_def


def set_model_info(meta_net_def: metanet_pb2.MetaNetDef, project_str: str, model_class_str: str,
                   version: int) -> None:
    """Fill the MetaNetDef's modelInfo."""
    meta_net_def.modelInfo.project = project_str
    meta_net_def.modelInfo.modelClass = model_class_str
    meta_net_def.modelInfo.version = version


def save_to_db(db_type: str, db_destination: str,
               predictor_export_meta: PredictorExportMeta) -> None:
    """Write the predictor to ``db_destination``: "!!META_NET_DEF" first, then the parameters."""
    meta_net_def = get_meta_net_def(predictor_export_meta)
    with scope.DeviceScope(core.DeviceOption(caffe2_pb2.CPU)):
        workspace.FeedBlob(predictor_constants.META_NET_DEF, meta_net_def.SerializeToString())
    blobs_to_save = [predictor_constants.META_NET_DEF] + predictor_export_meta.parameters
    op = core.CreateOperator("Save", blobs_to_save, [], absolute_path=True,
                             db=db_destination, db_type=db_type)
    # The caller chose this destination: Save may write there even outside the workspace root.
    with limits.allow_writes_under(os.path.dirname(os.path.abspath(db_destination))):
        workspace.RunOperatorOnce(op)


def load_from_db(filename: str, db_type: str,
                 device_option: caffe2_pb2.DeviceOption | None = None) -> metanet_pb2.MetaNetDef:
    """Open ``filename`` as blob "!!PREDICTOR_DBREADER", read and return its MetaNetDef.

    The reader is left just after the MetaNetDef, where the global-init net's Load continues.
    ``device_option`` (or the active DeviceScope) is copied onto every op of every net, e.g. to
    run a predictor saved on a GPU on the CPU.
    """
    create_db = core.CreateOperator(
        "CreateDB", [], [core.BlobReference(predictor_constants.PREDICTOR_DBREADER)],
        db=filename, db_type=db_type)
    workspace.RunOperatorOnce(create_db)
    load_meta_net_def = core.CreateOperator(
        "Load", [core.BlobReference(predictor_constants.PREDICTOR_DBREADER)],
        [core.BlobReference(predictor_constants.META_NET_DEF)])
    workspace.RunOperatorOnce(load_meta_net_def)
    blob = workspace.FetchBlob(predictor_constants.META_NET_DEF)
    if isinstance(blob, str):
        blob = blob.encode("utf-8")
    meta_net_def = metanet_pb2.MetaNetDef()
    meta_net_def.ParseFromString(bytes(blob))
    if device_option is None:
        device_option = scope.CurrentDeviceScope()
    if device_option is not None:
        for entry in meta_net_def.nets:
            for op in entry.value.op:
                op.device_option.CopyFrom(device_option)
    return meta_net_def


def prepare_prediction_net(filename: str, db_type: str,
                           device_option: caffe2_pb2.DeviceOption | None = None) -> core.Net:
    """Load the predictor in ``filename`` into the workspace; returns the created predict net."""
    metanet_def = load_from_db(filename, db_type, device_option)
    global_init_net = utils.GetNet(metanet_def, predictor_constants.GLOBAL_INIT_NET_TYPE)
    predict_init_net = utils.GetNet(metanet_def, predictor_constants.PREDICT_INIT_NET_TYPE)
    predict_net = utils.GetNet(metanet_def, predictor_constants.PREDICT_NET_TYPE)
    missing = [k for k, n in (("GLOBAL_INIT_NET_TYPE", global_init_net),
                              ("PREDICT_INIT_NET_TYPE", predict_init_net),
                              ("PREDICT_NET_TYPE", predict_net)) if n is None]
    if missing:
        raise ValueError(f"{filename}: its MetaNetDef has no net {missing}; it was saved with a "
                         "PredictorExportMeta name, so use load_from_db and utils.GetNet with "
                         "the suffixed keys")
    # The file is untrusted data: any failure of its nets names the file it came from.
    try:
        workspace.RunNetOnce(global_init_net)
        workspace.RunNetOnce(predict_init_net)
        predict_net = core.Net(predict_net)
        workspace.CreateNet(predict_net)
    except (ValueError, RuntimeError) as e:
        raise type(e)(f"predictor {filename!r}: {e}") from e
    return predict_net
