"""The notebooks are the tutorial: committed clean, linted, and run by papermill on small MNIST.

The five notebooks run in order on one run folder (640 training / 500 test images of the real
MNIST); what each leaves there, in Caffe2's formats, is what the next one reads.
"""
import ast
import hashlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import numpy as np
import papermill
import pytest
from google.protobuf import text_format

from caffe2torch.db import open_db
from caffe2torch.proto import caffe2_pb2
from caffe2torch.python import core, workspace
from caffe2torch.python.predictor import predictor_exporter as pe
from pipeline import params
from tutorial import NET_FILES, NOTEBOOKS, PARAMS, cell_texts, run_notebook, write_small_mnist

TYPES = {int: "int", float: "float", str: "str"}
PNG = b"\x89PNG\r\n\x1a\n"
FIGURES = ["train_curves.png", "sample_batch.png", "first_prediction.png", "test_accuracy.png",
           "confusion_matrix.png", "misclassified.png", "predictions.png"]
MODEL_FUNCTIONS = ["AddInput", "AddLeNetModel", "AddAccuracy", "AddTrainingOperators",
                   "AddBookkeepingOperators"]
# the tutorial's Caffe2 calls that each notebook's cells make themselves
CAFFE2_CALLS = {
    "download": ["core.GlobalInit(", "workspace.ResetWorkspace("],
    "build": ["model_helper.ModelHelper(name=\"mnist_train\"", "init_params=False",
              "net_drawer.GetPydotGraph(", "net_drawer.GetPydotGraphMinimal(",
              "param_init_net.Proto()", ".SerializeToString()", "core.DeviceScope("],
    "train": ["workspace.RunNetOnce(train_init_net)", "workspace.CreateNet(train_net",
              "workspace.RunNet(", "workspace.FetchBlob(\"loss\")", "\"Save\"",
              "visualize.NCHW.ShowMultiple("],
    "test": ["\"Load\"", "workspace.RunNetOnce(test_init_net)", "workspace.CreateNet(test_net",
             "workspace.FetchBlob(\"accuracy\")", "\"Save\""],
    "export": ["pe.PredictorExportMeta(", "pe.save_to_db(\"minidb\"", "workspace.ResetWorkspace(",
               "pe.prepare_prediction_net(", "workspace.FeedBlob(\"data\"",
               "workspace.RunNetOnce(predict_net)", "workspace.FetchBlob(\"softmax\")"],
}


def _notebook(step):
    return nbformat.read(str(NOTEBOOKS / params.notebook_path(step).name), as_version=4)


def _code(step):
    return [cell.source for cell in _notebook(step).cells[2:] if cell.cell_type == "code"]


# --- the committed notebooks -------------------------------------------------------------------

def test_the_notebooks_are_exactly_the_steps():
    names = sorted(params.notebook_path(s).name for s in params.STEPS)
    assert sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")) == names


@pytest.mark.parametrize("step", params.STEPS)
def test_committed_without_outputs(step):
    nb = _notebook(step)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [], f"{step}: a code cell carries outputs"
            assert cell.execution_count is None, f"{step}: a code cell carries an execution count"


@pytest.mark.parametrize("step", params.STEPS)
def test_layout_markdown_then_parameters_then_the_tutorials_cells(step):
    nb = _notebook(step)
    assert nb.metadata.kernelspec.name == "caffe2torch"
    assert nb.cells[0].cell_type == "markdown"
    assert nb.cells[1].cell_type == "code" and "parameters" in nb.cells[1].metadata.get("tags", [])
    assert len([c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]) == 1
    code = "\n".join(_code(step))
    for call in CAFFE2_CALLS[step]:
        assert call in code, f"{step}: its cells do not call {call}"
    # library code only for what is not the lesson: the data module and the run folder
    imported = set(re.findall(r"^from (mnist_tutorial\S*) import", code, re.M))
    assert imported <= {"mnist_tutorial", "mnist_tutorial.run_folder"}, imported
    assert set(re.findall(r"^from mnist_tutorial import (.+)$", code, re.M)) <= {"data"}


def test_the_model_is_defined_once_in_the_build_notebook():
    defined = {}
    for step in params.STEPS:
        for source in _code(step):
            # IPython magics (%matplotlib inline) are not Python
            tree = ast.parse(re.sub(r"^%.*$", "", source, flags=re.M))
            for node in tree.body:
                if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                    defined[node.name] = step
    assert defined == dict.fromkeys(MODEL_FUNCTIONS, "build")


@pytest.mark.parametrize("step", params.STEPS)
def test_parameters_are_typed_literals_with_help(step):
    declared = papermill.inspect_notebook(str(NOTEBOOKS / params.notebook_path(step).name))
    assert "run_dir" in declared
    schema = params.schema()  # the pipeline's schema is read from these cells
    for name, info in declared.items():
        if name in params.INJECTED:
            continue
        assert info["inferred_type_name"] == schema[name].type.__name__, name
        assert ast.literal_eval(info["default"]) == schema[name].default, name
        assert info["help"], f"{step}: {name} has no comment"


def test_a_parameter_has_one_default_and_help_in_every_notebook():
    seen = {}
    for step in params.STEPS:
        for name, info in papermill.inspect_notebook(
                str(params.notebook_path(step))).items():
            entry = (info["inferred_type_name"], info["default"], info["help"])
            assert seen.setdefault(name, entry) == entry, f"{name} differs in {step}"
    wanted = {name for name, spec in params.schema().items() if spec.steps}
    assert wanted <= set(seen), wanted - set(seen)


def test_the_defaults_run_as_is_in_jupyter():
    namespace = {}
    exec(_notebook("build").cells[1].source, namespace)
    assert namespace["device"] == "auto" and not Path(namespace["run_dir"]).is_absolute()


def test_the_notebooks_pass_the_linter():
    result = subprocess.run(
        [sys.executable, "-m", "nbqa", "ruff", str(NOTEBOOKS), "--line-length", "100",
         "--extend-select", "E501", "--output-format", "concise"],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


# --- the five notebooks run in order on one run folder -----------------------------------------

@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("data")
    write_small_mnist(data_dir)
    return data_dir


@pytest.fixture(scope="module")
def tutorial_run(small_data, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    notebooks = {
        "download": run_notebook("01_download", run_dir, data_dir=str(small_data),
                                 data_source="existing"),
        "build": run_notebook("02_build", run_dir, device="cpu"),
        "train": run_notebook("03_train", run_dir, seed=3, train_iters=15, print_every=5),
        "test": run_notebook("04_test", run_dir, test_iters=3, min_test_accuracy=0.0),
        "export": run_notebook("05_export", run_dir),
    }
    return run_dir, notebooks


def _keys(path):
    with open_db("minidb", str(path), "read") as db:
        cursor = db.cursor()
        keys = [key.decode() for key, _ in cursor]
        cursor.close()
    return keys


def test_each_notebook_prints_the_tutorials_output(tutorial_run):
    _, notebooks = tutorial_run
    for step, nb in notebooks.items():
        assert not [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
                    if o.output_type == "error"], step
    texts = {step: "\n".join(cell_texts(nb)) for step, nb in notebooks.items()}
    assert "Necessities imported!" in texts["download"]
    assert "training data:" in texts["download"] and "(640 records)" in texts["download"]
    assert "*******train_model.param_init_net.Proto()*******" in texts["build"]
    assert "Protocol buffers files have been created in your root folder" in texts["build"]
    assert re.search(r"iteration    10: loss \d\.\d{4}", texts["train"])
    assert re.search(r"test_accuracy: 0\.\d{6}", texts["test"])
    assert "The blobs in the workspace after reset: []" in texts["export"]
    assert re.search(r"image 10: prediction \d, confidence [\d.]+, onnxruntime \d \(true label \d\)",
                     texts["export"])


def test_the_steps_leave_the_tutorials_files(tutorial_run):
    run_dir, _ = tutorial_run
    ws = run_dir / "workspace"
    assert json.loads((ws / "data.json").read_text())["train_records"] == 640
    for name in NET_FILES:
        binary = caffe2_pb2.NetDef.FromString((ws / f"{name}.pb").read_bytes())
        text = text_format.Parse((ws / f"{name}.pbtxt").read_text(), caffe2_pb2.NetDef())
        assert binary == text and binary.name.startswith("mnist_")
    assert (ws / "accuracy.log").read_text().count("\n") == 15
    assert (ws / "loss.log").read_text().splitlines()[0].startswith("Tensor loss of type float")
    assert sorted(p.name for p in ws.glob("*.summary")) == sorted(
        [f"{p}.summary" for p in PARAMS] + [f"{p}_grad.summary" for p in PARAMS])
    assert _keys(ws / "mnist_params.minidb") == [f"{p}#%0" for p in PARAMS]
    assert _keys(ws / "test_last_batch.minidb") == ["data#%0", "label#%0"]
    assert _keys(ws / "mnist_model.minidb")[0] == "!!META_NET_DEF"
    for figure in FIGURES:
        assert (ws / figure).read_bytes()[:8] == PNG, figure
    for graph in ("train_net_graph.svg", "train_net_graph_minimal.svg"):
        assert "<svg" in (ws / graph).read_text() and "Conv" in (ws / graph).read_text()
    train = json.loads((ws / "metrics_train.json").read_text())
    assert train["train_iters"] == 15 and 0 < train["final_train_loss"] < 5
    test = json.loads((ws / "metrics_test.json").read_text())
    assert test["test_images"] == 300 and test["test_batches"] == 3
    assert 0.3 < test["test_accuracy"] <= 1  # 15 iterations: well above chance
    export = json.loads((ws / "metrics_export.json").read_text())
    assert export["reload_matches_deploy_net"] is True
    assert [p["image"] for p in export["predictions"]] == [1, 2, 10]


def test_the_exported_predictor_reloads_and_predicts(tutorial_run):
    run_dir, _ = tutorial_run
    ws = run_dir / "workspace"
    workspace.ResetWorkspace(str(ws))
    workspace.RunOperatorOnce(core.CreateOperator(
        "Load", [], ["data", "label"], db=str(ws / "test_last_batch.minidb"), db_type="minidb",
        absolute_path=1))
    batch, labels = workspace.FetchBlob("data"), workspace.FetchBlob("label")
    workspace.ResetWorkspace(str(ws))
    net = pe.prepare_prediction_net(str(ws / "mnist_model.minidb"), "minidb")
    workspace.FeedBlob("data", batch)
    workspace.RunNetOnce(net)
    softmax = workspace.FetchBlob("softmax")
    workspace.ResetWorkspace()
    for p in json.loads((ws / "metrics_export.json").read_text())["predictions"]:
        assert int(softmax[p["image"] - 1].argmax()) == p["prediction"]
        assert float(softmax[p["image"] - 1].max()) == pytest.approx(p["confidence"], rel=1e-5)
        assert labels[p["image"] - 1] == p["label"]


def test_a_missing_earlier_step_is_named(tmp_path):
    with pytest.raises(papermill.PapermillExecutionError,
                       match=r"train_init_net\.pb is missing: run notebooks/02_build\.ipynb first"):
        run_notebook("03_train", tmp_path / "empty", output=tmp_path / "out" / "03.ipynb",
                     train_iters=1)


def _snapshot(folder):
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_exploring_a_finished_run_never_rewrites_it(tutorial_run, tmp_path):
    recorded, _ = tutorial_run
    outputs = tmp_path / "outputs"
    run_dir = outputs / "finished"
    shutil.copytree(recorded, run_dir)
    (run_dir / "run.json").write_text(json.dumps({"run_id": "finished", "status": "succeeded"}))
    before = _snapshot(run_dir)
    scratch = outputs / "explore" / "finished" / "workspace"

    # the same training again, opened from the run folder as a person would in Jupyter
    nb = run_notebook("03_train", run_dir, output=run_dir / "03_train.explore.ipynb", seed=3,
                      train_iters=15, print_every=0)
    (run_dir / "03_train.explore.ipynb").unlink()
    assert _snapshot(run_dir) == before
    assert f"reading {run_dir / 'workspace'}, writing {scratch}" in "\n".join(cell_texts(nb))
    # seeded: the scratch run repeats the recorded one exactly
    assert (scratch / "loss.log").read_text() == (run_dir / "workspace/loss.log").read_text()
    assert _keys(scratch / "mnist_params.minidb") == [f"{p}#%0" for p in PARAMS]

    # a failing check while exploring: the recorded metrics stay those of the run
    with pytest.raises(papermill.PapermillExecutionError, match="below min_test_accuracy 1.0"):
        run_notebook("04_test", run_dir, output=tmp_path / "04_test.ipynb", test_iters=2,
                     min_test_accuracy=1.0)
    assert _snapshot(run_dir) == before
    assert json.loads((scratch / "metrics_test.json").read_text())["test_batches"] == 2


def test_a_running_batch_run_is_written_in_place(tutorial_run, tmp_path):
    recorded, _ = tutorial_run
    run_dir = tmp_path / "running"
    shutil.copytree(recorded / "workspace", run_dir / "workspace")
    (run_dir / "run.json").write_text(json.dumps({"run_id": "running", "status": "running"}))
    old = (run_dir / "workspace/metrics_export.json").read_text()
    (run_dir / "workspace/metrics_export.json").unlink()
    run_notebook("05_export", run_dir)
    again = json.loads((run_dir / "workspace/metrics_export.json").read_text())
    assert again["predictions"] == json.loads(old)["predictions"]
    assert again["exported_model"] == str(run_dir / "workspace/mnist_model.minidb")
    assert not (tmp_path / "explore").exists()
    np.testing.assert_array_equal(  # the predictor the batch run exported again, in place
        _keys(run_dir / "workspace/mnist_model.minidb"),
        _keys(recorded / "workspace/mnist_model.minidb"))
