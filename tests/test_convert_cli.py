"""caffe2torch-convert and the converter's loaders: the formats, the sources, and one-line errors
(exit status 2) for bad input, training nets and ops that cannot be exported."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from caffe2torch import convert
from caffe2torch.convert.cli import main
from caffe2torch.ops import registry
from caffe2torch.proto import caffe2_pb2
from caffe2torch.python import brew, core, workspace
from caffe2torch.python.model_helper import ModelHelper
from caffe2torch.python.predictor import predictor_exporter as pe

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / ".." / "shared" / "caffe2-artifacts"
HEMT = ["--init", str(ARTIFACTS / "hemt_init_net.pb"), "--predict",
        str(ARTIFACTS / "hemt_predict_net.pb")]

pytestmark = pytest.mark.usefixtures("fresh_workspace")


def small_model(name="small"):
    """A brew classifier data[4,6] -> softmax[4,3] with initialised parameters, run once."""
    model = ModelHelper(name=name)
    fc1 = brew.fc(model, "data", "fc1/out", dim_in=6, dim_out=5)
    relu = brew.relu(model, fc1, "relu1")
    pred = brew.fc(model, relu, "pred", dim_in=5, dim_out=3)
    brew.softmax(model, pred, "softmax")
    x = np.random.default_rng(7).standard_normal((4, 6)).astype(np.float32)
    workspace.RunNetOnce(model.param_init_net)
    workspace.FeedBlob("data", x)
    workspace.RunNetOnce(model.net)
    return model, x, workspace.FetchBlob("softmax")


def write_pb(path, net):
    Path(path).write_bytes(net.SerializeToString())
    return str(path)


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_help_and_version(capsys):
    code, out, _ = run_cli(capsys, "--help")
    assert code == 0 and "--dynamic-batch" in out and "--predictor" in out
    code, out, _ = run_cli(capsys, "--version")
    assert code == 0 and out.startswith("caffe2torch-convert ")


def test_runs_as_a_module():
    done = subprocess.run([sys.executable, "-m", "caffe2torch.convert", "--version"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "caffe2torch-convert" in done.stdout


def test_hemt_to_onnx_keeps_caffe2_names(tmp_path, capsys):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")  # torch.onnx.export(dynamo=True) needs it

    out = tmp_path / "hemt.onnx"
    code, line, err = run_cli(capsys, *HEMT, "--input", "DBInput_train/tanh_input:3,1",
                              "--input", "DBInput_train/sig_input:3,1", "-o", out,
                              "--dynamic-batch")
    assert code == 0, err
    assert line.startswith(f"wrote {out} (onnx, checked;")
    assert "onnxruntime matches caffe2torch" in line or "not run in onnxruntime" in line
    model = onnx.load(out)
    assert [i.name for i in model.graph.input] == ["DBInput_train/tanh_input",
                                                  "DBInput_train/sig_input"]
    assert [o.name for o in model.graph.output] == ["origin/Mul/origin_pred"]
    # (weights that ONNX folds into a transpose get new names; the others keep theirs)
    assert "adjoint/sig_fc_layer_0/b" in {i.name for i in model.graph.initializer}
    assert [p.name for p in tmp_path.iterdir()] == ["hemt.onnx"]  # no temporary file left


def test_predictor_db_to_pt2_with_the_saved_shapes(tmp_path, capsys):
    model, x, expected = small_model()
    path = tmp_path / "model.minidb"
    pe.save_to_db("minidb", str(path), pe.PredictorExportMeta(
        predict_net=model.net.Proto(), parameters=[str(p) for p in model.params],
        inputs=["data"], outputs=["softmax"]))
    code, line, err = run_cli(capsys, "--predictor", path, "-o", tmp_path / "m.pt2",
                              "--dynamic-batch")
    assert code == 0, err
    assert "data[4,6] -> softmax" in line
    program = torch.export.load(tmp_path / "m.pt2").module()
    np.testing.assert_allclose(program(torch.from_numpy(x)).numpy(), expected, atol=1e-6)
    np.testing.assert_allclose(program(torch.from_numpy(x[:1])).numpy(), expected[:1], atol=1e-6)
    # The library call the pipeline's export step uses: files beside the predictor.
    written = convert.export_predictor(path, formats=("pt2",))
    assert written["pt2"] == str(tmp_path / "model.pt2")


def test_parameter_db_to_torchscript(tmp_path, capsys):
    model, x, expected = small_model()
    params = [str(p) for p in model.params]
    workspace.RunOperatorOnce(core.CreateOperator(
        "Save", params, [], db=str(tmp_path / "params.minidb"), db_type="minidb",
        absolute_path=1))
    predict = write_pb(tmp_path / "predict.pb", model.net.Proto())
    code, _, err = run_cli(capsys, "--predict", predict, "--init-db", tmp_path / "params.minidb",
                           "--input", "data:4,6", "-o", tmp_path / "m.pt")
    assert code == 0, err
    workspace.RunOperatorOnce(core.CreateOperator(
        "Save", params, [], db=str(tmp_path / "params.lmdb"), db_type="lmdb", absolute_path=1))
    for db, db_type in (("params.minidb", "minidb"), ("params.lmdb", "lmdb")):
        module = convert.from_db(predict, tmp_path / db, db_type)
        assert module.blob_names["fc1_out_w"] == "fc1/out_w"
        np.testing.assert_allclose(module(torch.from_numpy(x)).numpy(), expected, atol=1e-6)


def test_blob_names_are_sanitised_and_mapped():
    net = core.Net("names")
    net.FC(["x", "a/w", "1"], "y/0")
    net.FC(["y/0", "a_w", "b"], "z")
    net.Proto().external_output.extend(["z"])
    params = {n: torch.ones(2, 2) for n in ("a/w", "a_w")}
    params.update({"1": torch.zeros(2), "b": torch.zeros(2)})
    module = convert.NetModule(net.Proto(), params, inputs=["x"])
    assert module.blob_names == {"a_w": "a/w", "blob_1": "1", "a_w_1": "a_w", "b": "b"}
    assert module.torch_name("a_w") == "a_w_1"
    assert [n for n, _ in module.named_parameters()] == list(module.blob_names)
    assert module(torch.ones(3, 2)).shape == (3, 2)


@pytest.mark.parametrize("argv,message", [
    (["-o", "x.onnx"], "give exactly one of --init, --init-db, --predictor"),
    (["--init", "missing.pb", "--predict", "missing.pb", "-o", "x.onnx"],
     "missing.pb: no such file"),
    (HEMT + ["--input", "DBInput_train/tanh_input:1,x", "-o", "x.onnx"],
     "dimensions must be integers"),
    (HEMT + ["-o", "x.bin"], "cannot tell the format from the suffix"),
    (HEMT + ["-o", "x.onnx"], "the shape of input 'DBInput_train/tanh_input' is unknown"),
    (["--format", "zip", "-o", "x"], "invalid choice: 'zip'"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(capsys, *argv)
    assert code == 2 and message in err, err


def test_a_training_net_is_refused(tmp_path, capsys):
    model, _, _ = small_model("train")
    model.net.AveragedLoss("softmax", "loss")
    model.AddGradientOperators(["loss"])
    init = write_pb(tmp_path / "init.pb", model.param_init_net.Proto())
    predict = write_pb(tmp_path / "train.pb", model.net.Proto())
    code, _, err = run_cli(capsys, "--init", init, "--predict", predict, "--input", "data:4,6",
                           "-o", tmp_path / "x.onnx")
    assert code == 2
    assert "is a training net: op #6 AveragedLossGradient" in err and "predict net" in err
    assert len(err.strip().splitlines()) == 1


def test_ops_that_cannot_be_exported_are_named(tmp_path, capsys, monkeypatch):
    model, _, _ = small_model("untraceable")
    init = write_pb(tmp_path / "init.pb", model.param_init_net.Proto())
    predict = write_pb(tmp_path / "predict.pb", model.net.Proto())
    args = ["--init", init, "--predict", predict, "--input", "data:4,6", "-o", tmp_path / "x.pt2"]
    monkeypatch.setattr(registry.get_schema("Relu"), "data_dependent", True)
    code, _, err = run_cli(capsys, *args)
    assert code == 2 and err.strip() == (
        "caffe2torch-convert: error: cannot export op #1 Relu (['fc1/out'] -> ['relu1']): its "
        "output sizes depend on the input values (data-dependent)")
    monkeypatch.setattr(registry.get_schema("Relu"), "data_dependent", False)
    unknown = caffe2_pb2.NetDef()
    unknown.CopyFrom(model.net.Proto())
    unknown.op[1].type = "NoSuchOp"
    code, _, err = run_cli(capsys, *args[:2], "--predict", write_pb(tmp_path / "u.pb", unknown),
                           *args[4:])
    assert code == 2 and "unknown operator type 'NoSuchOp'" in err
    side = caffe2_pb2.NetDef()
    side.CopyFrom(model.net.Proto())
    side.op.add(type="Print", input=["softmax"])
    code, _, err = run_cli(capsys, *args[:2], "--predict", write_pb(tmp_path / "p.pb", side),
                           *args[4:])
    assert code == 2
    assert "cannot convert op #4 Print (['softmax'] -> []): it has side effects" in err


def test_in_place_ops_on_inputs_and_prefilled_outputs_are_not_training():
    net = core.Net("prefilled")
    net.Scale("data", "data", scale=2.0)  # preprocessing in place on the input
    net.Relu("data", "out")
    params = {"data": torch.zeros(1), "out": torch.zeros(1)}  # an init net filled both
    module = convert.NetModule(net.Proto(), params, inputs=["data"], outputs=["out"])
    assert list(module.blob_names) == []
    assert module(torch.tensor([-1.0, 3.0])).tolist() == [0.0, 6.0]
    update = core.Net("update")
    update.Scale("w", "w", scale=0.5)
    with pytest.raises(convert.ExportError, match=r"training net: op #0 Scale .* overwrites "
                       r"parameter 'w'"):
        convert.NetModule(update.Proto(), {"w": torch.ones(1)}, inputs=[], outputs=["w"])
