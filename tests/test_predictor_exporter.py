"""predictor_exporter: save -> load -> predict round trips and Caffe2's exact file layout."""
import struct

import numpy as np
import pytest

from caffe2torch.proto import caffe2_pb2, metanet_pb2
from caffe2torch.python import brew, core, workspace
from caffe2torch.python.model_helper import ModelHelper
from caffe2torch.python.predictor import predictor_exporter as pe
from caffe2torch.python.predictor import predictor_py_utils as pred_utils
from caffe2torch.python.predictor.predictor_py_utils import predictor_constants as pc


pytestmark = pytest.mark.usefixtures("fresh_workspace")


def read_minidb(path):
    """(key, value) records of a minidb file, parsed here byte by byte (spec section 2)."""
    data = open(path, "rb").read()
    records, offset = [], 0
    while offset < len(data):
        key_len, value_len = struct.unpack_from("<ii", data, offset)
        offset += 8
        key = data[offset:offset + key_len]
        value = data[offset + key_len:offset + key_len + value_len]
        offset += key_len + value_len
        records.append((key.decode(), value))
    return records


def build_deploy_model(name):
    """A small classifier; returns (model, input batch, its softmax) after one run."""
    model = ModelHelper(name=name, init_params=True)
    fc1 = brew.fc(model, "data", "fc1", dim_in=6, dim_out=5)
    relu = brew.relu(model, fc1, "relu1")
    pred = brew.fc(model, relu, "pred", dim_in=5, dim_out=3)
    brew.softmax(model, pred, "softmax")
    x = np.random.default_rng(7).standard_normal((4, 6)).astype(np.float32)
    workspace.FeedBlob("data", x)
    workspace.RunNetOnce(model.param_init_net)
    workspace.RunNetOnce(model.net)
    return model, x, workspace.FetchBlob("softmax")


def export(model, path, **kwargs):
    meta = pe.PredictorExportMeta(predict_net=model.net.Proto(), parameters=model.params,
                                  inputs=["data"], outputs=["softmax"], **kwargs)
    pe.save_to_db("minidb", str(path), meta)
    return meta


def test_round_trip_predicts_the_same(tmp_path):
    model, x, expected = build_deploy_model("pe_round_trip")
    params = {str(p): workspace.FetchBlob(str(p)) for p in model.params}
    path = tmp_path / "model.minidb"
    export(model, path)

    workspace.ResetWorkspace()
    predict_net = pe.prepare_prediction_net(str(path), "minidb")
    assert isinstance(predict_net, core.Net)
    assert predict_net.Name() in workspace.Nets()
    for name, value in params.items():
        np.testing.assert_array_equal(workspace.FetchBlob(name), value)
    # predict-init zero-filled the input and output with their saved shapes.
    assert workspace.FetchBlob("data").shape == (4, 6) and not workspace.FetchBlob("data").any()
    assert set(workspace.Blobs()) >= {pc.META_NET_DEF, pc.PREDICTOR_DBREADER, "data", "softmax",
                                      "fc1", "relu1", "pred", *params}
    workspace.FeedBlob("data", x)
    workspace.RunNet(predict_net)
    np.testing.assert_allclose(workspace.FetchBlob("softmax"), expected, rtol=1e-6)
    workspace.RunNet(predict_net.Proto().name)
    np.testing.assert_allclose(workspace.FetchBlob("softmax"), expected, rtol=1e-6)


def test_file_layout_is_caffe2s(tmp_path):
    model, _, _ = build_deploy_model("pe_layout")
    path = tmp_path / "model.minidb"
    export(model, path)
    records = read_minidb(path)
    assert [k for k, _ in records] == ["!!META_NET_DEF", "fc1_w#%0", "fc1_b#%0", "pred_w#%0",
                                       "pred_b#%0"]
    meta_blob = caffe2_pb2.BlobProto.FromString(records[0][1])
    assert meta_blob.name == "!!META_NET_DEF" and meta_blob.type == "std::string"
    weight = caffe2_pb2.BlobProto.FromString(records[1][1])
    assert weight.type == "Tensor" and list(weight.tensor.dims) == [5, 6]
    assert (weight.tensor.segment.begin, weight.tensor.segment.end) == (0, 30)

    content = meta_blob.content
    assert content[0] == 0x0A, "blobs (field 1) are serialized before nets (field 2)"
    meta = metanet_pb2.MetaNetDef.FromString(content)
    assert [(b.key, list(b.value)) for b in meta.blobs] == [
        ("PARAMETERS_BLOB_TYPE", ["fc1_w", "fc1_b", "pred_w", "pred_b"]),
        ("INPUTS_BLOB_TYPE", ["data"]), ("OUTPUTS_BLOB_TYPE", ["softmax"])]
    assert [n.key for n in meta.nets] == ["PREDICT_INIT_NET_TYPE", "GLOBAL_INIT_NET_TYPE",
                                          "PREDICT_NET_TYPE"]
    predict_init, global_init, predict = (n.value for n in meta.nets)

    assert predict_init.name.startswith("predict-init")
    assert [(op.type, list(op.output)) for op in predict_init.op] == [
        ("ConstantFill", ["data"]), ("ConstantFill", ["softmax"])]
    fill_args = {a.name: a for a in predict_init.op[0].arg}
    assert list(fill_args["shape"].ints) == [4, 6] and fill_args["value"].f == 0.0
    assert list(predict_init.external_input) == ["data", "softmax"]
    assert not any(op.HasField("device_option") for op in predict_init.op)

    assert global_init.name.startswith("global-init")
    (load,) = global_init.op
    assert load.type == "Load" and list(load.input) == ["!!PREDICTOR_DBREADER"]
    assert list(load.output) == ["fc1_w", "fc1_b", "pred_w", "pred_b"] and list(load.arg) == []
    assert list(global_init.external_input) == ["!!PREDICTOR_DBREADER", "!!PREDICTOR_DBREADER"]
    assert list(global_init.external_output) == ["fc1_w", "fc1_b", "pred_w", "pred_b"]

    assert predict.name.startswith("pe_layout")
    assert [op.type for op in predict.op] == ["FC", "Relu", "FC", "Softmax"]
    assert list(predict.op) == list(model.net.Proto().op)
    assert list(predict.external_input) == ["data", "fc1_w", "fc1_b", "pred_w", "pred_b"]
    assert list(predict.external_output) == ["softmax"]


def test_shapes_name_net_type_and_model_id(tmp_path):
    model, _, _ = build_deploy_model("pe_options")
    model.net.Proto().arg.add(name="model_id", s=b"m123")
    path = tmp_path / "named.minidb"
    meta = export(model, path, shapes={"data": (1, 6), "softmax": [1, 3]}, name="mnist",
                  net_type="simple", num_workers=2)
    assert meta.predict_net_name() == "PREDICT_NET_TYPE_mnist"
    workspace.ResetWorkspace()
    meta_net_def = pe.load_from_db(str(path), "minidb")
    assert [n.key for n in meta_net_def.nets] == [
        "PREDICT_INIT_NET_TYPE_mnist", "GLOBAL_INIT_NET_TYPE_mnist", "PREDICT_NET_TYPE_mnist"]
    assert pred_utils.GetBlobs(meta_net_def, "INPUTS_BLOB_TYPE_mnist") == ["data"]
    predict = pred_utils.GetNet(meta_net_def, "PREDICT_NET_TYPE_mnist")
    assert predict.type == "simple" and predict.num_workers == 2
    predict_init = pred_utils.GetNet(meta_net_def, "PREDICT_INIT_NET_TYPE_mnist")
    assert list(predict_init.op[0].arg[0].ints) == [1, 6]
    for net in (predict_init, pred_utils.GetNet(meta_net_def, "GLOBAL_INIT_NET_TYPE_mnist")):
        assert [(a.name, a.s) for a in net.arg] == [("model_id", b"m123")]
    with pytest.raises(ValueError, match="PredictorExportMeta name"):
        workspace.ResetWorkspace()
        pe.prepare_prediction_net(str(path), "minidb")


def test_load_from_db_copies_device_option_onto_every_op(tmp_path):
    model, _, _ = build_deploy_model("pe_device")
    path = tmp_path / "model.minidb"
    export(model, path)
    workspace.ResetWorkspace()
    meta = pe.load_from_db(str(path), "minidb", core.DeviceOption(caffe2_pb2.CUDA, 1))
    ops = [op for n in meta.nets for op in n.value.op]
    assert ops and all(op.device_option.device_type == caffe2_pb2.CUDA and
                       op.device_option.cuda_gpu_id == 1 for op in ops)
    workspace.ResetWorkspace()
    with core.DeviceScope(core.DeviceOption(caffe2_pb2.CPU)):
        meta = pe.load_from_db(str(path), "minidb")
    assert all(op.HasField("device_option") for n in meta.nets for op in n.value.op)


def test_export_meta_validation():
    net = core.Net("pe_validation")
    with pytest.raises(ValueError, match="unique"):
        pe.PredictorExportMeta(net, [], ["data", "data"], ["out"])
    with pytest.raises(ValueError, match=r"\['w'\].*both as parameters"):
        pe.PredictorExportMeta(net, ["w"], ["w"], ["out"])
    with pytest.raises(TypeError, match="predict_net"):
        pe.PredictorExportMeta("not a net", [], ["data"], ["out"])
    meta = pe.PredictorExportMeta(net, [core.BlobReference("w")], ["data"], ["out"])
    assert meta.parameters == ["w"] and meta.predict_net is net.Proto()
    assert meta.inputs_name() == "INPUTS_BLOB_TYPE"


def test_missing_shape_is_a_clear_error(tmp_path):
    net = core.Net("pe_no_shape")
    net.Relu(["data"], "out")
    meta = pe.PredictorExportMeta(net, [], ["data"], ["out"])
    with pytest.raises(ValueError, match="'data' is not in the workspace.*shapes="):
        pe.save_to_db("minidb", str(tmp_path / "x.minidb"), meta)


def test_constants_are_caffe2s():
    assert (pc.META_NET_DEF, pc.PREDICTOR_DBREADER) == ("!!META_NET_DEF", "!!PREDICTOR_DBREADER")
    assert pc.PREDICT_NET_TYPE == "PREDICT_NET_TYPE"
    assert pc.GLOBAL_INIT_NET_TYPE == "GLOBAL_INIT_NET_TYPE"
