"""Files written by real Caffe2 (../shared/caffe2-artifacts): they parse, and the ones we can run, run.

Also a predictor DB laid out byte for byte the way Caffe2 on a GPU writes one (CUDA device
options, ``engine: "CUDNN"``, cuDNN arguments, ``device_detail`` in the tensors), loaded and run
on the CPU.
"""
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from caffe2torch.ops import registry
from caffe2torch.proto import caffe2_pb2, metanet_pb2
from caffe2torch.python import core, workspace
from caffe2torch.python.predictor import predictor_exporter as pe

ARTIFACTS = Path(__file__).resolve().parents[1] / ".." / "shared" / "caffe2-artifacts"
NETDEFS = {  # file: (net name, op count)
    "squeeze_predict_net.pb": ("", 66),
    "cifar_resnet_predict_net.pb": ("deploy_net", 113),
    "hemt_init_net.pb": ("", 16),
    "hemt_predict_net.pb": ("predict_net", 36),
}


pytestmark = pytest.mark.usefixtures("fresh_workspace")


def load_netdef(name):
    return caffe2_pb2.NetDef.FromString((ARTIFACTS / name).read_bytes())


def read_minidb(path):
    """(key, value) records of a minidb file, parsed here from the spec's layout."""
    data = Path(path).read_bytes()
    records, offset = [], 0
    while offset < len(data):
        key_len, value_len = struct.unpack_from("<ii", data, offset)
        offset += 8
        records.append((data[offset:offset + key_len], data[offset + key_len:
                                                            offset + key_len + value_len]))
        offset += key_len + value_len
    return records


def write_minidb(path, records):
    """A minidb file written here from the spec's layout (not with caffe2torch's writer)."""
    with open(path, "wb") as f:
        for key, value in records:
            f.write(struct.pack("<ii", len(key), len(value)) + key + value)


def not_yet_runnable(netdef):
    """Op types of ``netdef`` that caffe2torch's registry does not implement, sorted."""
    return sorted({op.type for op in netdef.op if not registry.is_registered(op.type)})


@pytest.mark.parametrize("name", sorted(NETDEFS))
def test_every_netdef_parses(name):
    net = load_netdef(name)
    assert (net.name, len(net.op)) == NETDEFS[name]
    assert all(op.type for op in net.op)
    # Binary and text forms round-trip.
    from google.protobuf import text_format
    assert caffe2_pb2.NetDef.FromString(net.SerializeToString()) == net
    assert text_format.Parse(str(net), caffe2_pb2.NetDef()) == net


@pytest.mark.parametrize("name,expected_types", [
    ("squeeze_predict_net.pb", {"AveragePool", "Concat", "Conv", "Dropout", "MaxPool", "Relu",
                                "Softmax"}),
    ("cifar_resnet_predict_net.pb", {"AveragePool", "Conv", "FC", "Relu", "Softmax", "SpatialBN",
                                     "Sum"}),
])
def test_op_types_and_what_we_do_not_run_yet(name, expected_types, monkeypatch):
    net = load_netdef(name)
    types = {op.type for op in net.op}
    assert types == expected_types
    missing = not_yet_runnable(net)
    print(f"{name}: op types {sorted(types)}; not run by caffe2torch yet: {missing or 'none'}")
    assert set(missing) <= types
    assert all(not core.IsOperator(t) for t in missing)
    assert all(core.IsOperator(t) for t in types - set(missing))
    # The listing comes from the registry: take SpatialBN (or Conv) out and it is listed.
    dropped = "SpatialBN" if "SpatialBN" in types else "Conv"
    monkeypatch.delitem(registry._REGISTRY, dropped, raising=False)
    assert dropped in not_yet_runnable(net)


def test_real_files_carry_cuda_and_cudnn_details():
    cifar = load_netdef("cifar_resnet_predict_net.pb")
    assert all(op.device_option.device_type == caffe2_pb2.CUDA for op in cifar.op)
    squeeze = load_netdef("squeeze_predict_net.pb")
    legacy = [a.i for op in squeeze.op if op.type == "MaxPool" for a in op.arg
              if a.name == "legacy_pad"]
    assert legacy == [3, 3, 3]


# -- the HEMT model: init net + predict net + its eval DB --------------------------------------
def hemt_eval_records():
    """The eval DB's records as a [100, 3] float array (sig input, tanh input, target)."""
    rows = []
    for _key, value in read_minidb(ARTIFACTS / "hemt_eval.minidb"):
        protos = caffe2_pb2.TensorProtos.FromString(value).protos
        assert [list(p.dims) for p in protos] == [[1], [1], [1]]
        assert all(p.data_type == caffe2_pb2.TensorProto.FLOAT for p in protos)
        rows.append([p.float_data[0] for p in protos])
    return np.array(rows, np.float32)


def hemt_reference(params, sig, tanh):
    """The HEMT predict net's first output written by hand in torch."""
    p = {k: torch.from_numpy(v) for k, v in params.items()}
    sig, tanh = torch.from_numpy(sig), torch.from_numpy(tanh)
    t0 = tanh @ p["adjoint/tanh_fc_layer_0/w"].T
    s0 = sig @ p["adjoint/sig_fc_layer_0/w"].T + p["adjoint/sig_fc_layer_0/b"]
    e0 = t0 @ p["adjoint/inter_embed_layer_0/w"].T + p["adjoint/inter_embed_layer_0/b"]
    t1 = torch.tanh(t0) @ p["adjoint/tanh_fc_layer_1/w"].T
    s1 = torch.sigmoid(e0 + s0) @ p["adjoint/sig_fc_layer_1/w"].T + p["adjoint/sig_fc_layer_1/b"]
    e1 = t1 @ p["adjoint/inter_embed_layer_1/w"].T + p["adjoint/inter_embed_layer_1/b"]
    return (torch.sigmoid(e1 + s1) * torch.tanh(t1)).numpy()


def test_hemt_model_predicts_its_eval_db():
    init, predict = load_netdef("hemt_init_net.pb"), load_netdef("hemt_predict_net.pb")
    missing = not_yet_runnable(init) + not_yet_runnable(predict)
    assert not missing, f"ops the HEMT nets need are not implemented: {missing}"
    records = hemt_eval_records()
    # Which tensor is which: the predict net reads two external data inputs. Its output is
    # sigmoid(...) * tanh(f(tanh_input)) with no bias on the tanh branch, so it is 0 wherever
    # tanh_input is 0; column 0 is 0 in rows with a clearly non-zero target, so column 0 is the
    # sig input, column 1 the tanh input, and column 2 the target.
    data_inputs = [n for n in predict.external_input if n.startswith("DBInput_train/")]
    assert data_inputs == ["DBInput_train/tanh_input", "DBInput_train/sig_input"]
    assert (records[records[:, 0] == 0, 2] > 0.1).any()
    sig, tanh, target = records[:, 0:1], records[:, 1:2], records[:, 2]

    workspace.RunNetOnce(init)
    params = {name: workspace.FetchBlob(name) for op in init.op for name in op.output}
    assert params["adjoint/inter_embed_layer_0/w"].shape == (16, 16)
    workspace.FeedBlob("DBInput_train/sig_input", sig)
    workspace.FeedBlob("DBInput_train/tanh_input", tanh)
    workspace.RunNetOnce(predict)
    pred = workspace.FetchBlob("origin/Mul/origin_pred")
    assert pred.shape == (100, 1) and np.isfinite(pred).all()
    np.testing.assert_allclose(pred, hemt_reference(params, sig, tanh), rtol=1e-5, atol=1e-6)
    # The third tensor is the measured value the model was trained on: it fits within 0.01.
    assert np.abs(pred[:, 0] - target).max() < 0.01
    for name in ("adjoint/tanh_fc_layer_0/output", "adjoint/sig_fc_layer_0/output"):
        assert np.isfinite(workspace.FetchBlob(name)).all()


# -- a predictor DB as Caffe2 on a GPU writes it ------------------------------------------------
def _arg(name, value):
    from caffe2torch.python.utils import MakeArgument
    return MakeArgument(name, value)


def _gpu_op(op_type, inputs, outputs, engine="", **args):
    op = caffe2_pb2.OperatorDef(type=op_type, input=inputs, output=outputs, name="")
    op.arg.extend(_arg(k, v) for k, v in args.items())
    op.device_option.device_type = caffe2_pb2.CUDA
    op.device_option.cuda_gpu_id = 0
    if engine:
        op.engine = engine
    return op


def _tensor_record(name, arr):
    blob = caffe2_pb2.BlobProto(name=name, type="Tensor")
    t = blob.tensor
    t.dims.extend(arr.shape)
    t.data_type = caffe2_pb2.TensorProto.FLOAT
    t.float_data.extend(arr.ravel().tolist())
    t.name = name
    t.device_detail.device_type = caffe2_pb2.CUDA  # a CUDA tensor, saved on the GPU
    t.device_detail.cuda_gpu_id = 0
    t.segment.begin, t.segment.end = 0, arr.size
    return (name + "#%0").encode(), blob.SerializeToString()


def test_caffe2_gpu_written_predictor_loads_and_predicts_on_cpu(tmp_path):
    rng = np.random.default_rng(3)
    params = {"conv1_w": rng.standard_normal((2, 1, 3, 3)).astype(np.float32),
              "conv1_b": rng.standard_normal(2).astype(np.float32),
              "pred_w": rng.standard_normal((3, 8)).astype(np.float32),
              "pred_b": rng.standard_normal(3).astype(np.float32)}
    names = list(params)
    cudnn = {"order": "NCHW", "cudnn_exhaustive_search": 0}

    predict = caffe2_pb2.NetDef(name="mnist_deploy")
    predict.op.extend([
        _gpu_op("Conv", ["data", "conv1_w", "conv1_b"], ["conv1"], engine="CUDNN", kernel=3,
                order="NCHW", exhaustive_search=0),
        _gpu_op("Relu", ["conv1"], ["conv1"], engine="CUDNN", **cudnn),
        _gpu_op("FC", ["conv1", "pred_w", "pred_b"], ["pred"], order="NCHW", use_cudnn=1,
                cudnn_exhaustive_search=0),
        _gpu_op("Softmax", ["pred"], ["softmax"], engine="CUDNN", **cudnn),
    ])
    predict.external_input.extend(["data"] + names)
    predict.external_output.append("softmax")
    predict.device_option.device_type = caffe2_pb2.CUDA
    predict_init = caffe2_pb2.NetDef(name="predict-init")
    predict_init.op.extend([
        _gpu_op("ConstantFill", [], ["data"], shape=[1, 1, 4, 4], value=0.0),
        _gpu_op("ConstantFill", [], ["softmax"], shape=[1, 3], value=0.0)])
    predict_init.external_input.extend(["data", "softmax"])
    global_init = caffe2_pb2.NetDef(name="global-init")
    global_init.op.append(_gpu_op("Load", ["!!PREDICTOR_DBREADER"], names))
    global_init.external_input.extend(["!!PREDICTOR_DBREADER"] * 2)
    global_init.external_output.extend(names)

    meta = metanet_pb2.MetaNetDef()
    for key, value in (("PARAMETERS_BLOB_TYPE", names), ("INPUTS_BLOB_TYPE", ["data"]),
                       ("OUTPUTS_BLOB_TYPE", ["softmax"])):
        meta.blobs.add(key=key, value=value)
    for key, net in (("PREDICT_INIT_NET_TYPE", predict_init), ("GLOBAL_INIT_NET_TYPE", global_init),
                     ("PREDICT_NET_TYPE", predict)):
        meta.nets.add(key=key, value=net)
    meta_blob = caffe2_pb2.BlobProto(name="!!META_NET_DEF", type="std::string",
                                     content=meta.SerializeToString())
    path = tmp_path / "gpu_predictor.minidb"
    write_minidb(path, [(b"!!META_NET_DEF", meta_blob.SerializeToString())] +
                 [_tensor_record(n, v) for n, v in params.items()])

    predict_net = pe.prepare_prediction_net(str(path), "minidb",
                                            device_option=core.DeviceOption(caffe2_pb2.CPU))
    for name, value in params.items():
        np.testing.assert_array_equal(workspace.FetchBlob(name), value)
    x = rng.standard_normal((2, 1, 4, 4)).astype(np.float32)
    workspace.FeedBlob("data", x)
    workspace.RunNet(predict_net)
    conv = torch.relu(torch.nn.functional.conv2d(
        torch.from_numpy(x), torch.from_numpy(params["conv1_w"]), torch.from_numpy(params["conv1_b"])))
    logits = conv.reshape(2, 8) @ torch.from_numpy(params["pred_w"]).T + torch.from_numpy(
        params["pred_b"])
    np.testing.assert_allclose(workspace.FetchBlob("softmax"), torch.softmax(logits, 1).numpy(),
                               rtol=1e-5, atol=1e-6)
