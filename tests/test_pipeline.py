"""The pipeline: step functions in one process, then run_all.py with real kernels (smoke params).

Small real-MNIST LMDBs (640 train / 500 test images) keep it fast; one test builds the full
databases from the offline package source.
"""
import json
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import nbformat
import numpy as np
import pytest
from google.protobuf import text_format

from caffe2torch.db import open_db
from caffe2torch.proto import caffe2_pb2
from caffe2torch.python import core, workspace
from caffe2torch.python.predictor import predictor_exporter as pe
from mnist_tutorial import runner, steps
from test_lenet import PARAMS, write_small_mnist

REPO = Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"
FIGURES = ["train_net_graph.png", "train_net_graph_minimal.png", "train_curves.png",
           "sample_batch.png", "first_prediction.png", "test_accuracy.png", "predictions.png"]


def _keys(path):
    with open_db("minidb", str(path), "read") as db:
        cursor = db.cursor()
        keys = [key.decode() for key, _ in cursor]
        cursor.close()
    return keys


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("data")
    write_small_mnist(data_dir)
    return data_dir


# --- the step functions, in process ------------------------------------------------------------

@pytest.fixture(scope="module")
def direct_run(small_data, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("direct")
    steps.download_step(run_dir, data_dir=small_data, data_source="existing")
    steps.build_step(run_dir, device="cpu", seed=3)
    history = steps.train_step(run_dir, seed=3, train_iters=15, print_every=5)
    steps.test_step(run_dir, test_iters=3)
    predictions = steps.export_step(run_dir)
    return run_dir, history, predictions


def test_steps_write_the_tutorials_artifacts(direct_run):
    run_dir, history, _ = direct_run
    ws = run_dir / "workspace"
    assert json.loads((ws / "data.json").read_text())["train_records"] == 640
    for name in steps.NET_FILES:
        binary = caffe2_pb2.NetDef.FromString((ws / f"{name}.pb").read_bytes())
        text = text_format.Parse((ws / f"{name}.pbtxt").read_text(), caffe2_pb2.NetDef())
        assert binary == text and binary.name.startswith("mnist_")
    assert (ws / "accuracy.log").read_text().count("\n") == 15
    assert (ws / "loss.log").read_text().splitlines()[0].startswith("Tensor loss of type float")
    summaries = sorted(p.name for p in ws.glob("*.summary"))
    assert summaries == sorted([f"{p}.summary" for p in PARAMS] +
                               [f"{p}_grad.summary" for p in PARAMS])
    assert _keys(ws / steps.PARAMS_DB) == [f"{p}#%0" for p in PARAMS]
    assert _keys(ws / steps.MODEL_DB)[0] == "!!META_NET_DEF"
    for figure in FIGURES:
        assert (ws / figure).read_bytes()[:8] == PNG, figure
    train = json.loads((ws / "metrics_train.json").read_text())
    assert train["final_train_loss"] == pytest.approx(history["loss"][-1])
    assert json.loads((ws / "metrics_test.json").read_text())["test_images"] == 300


def test_a_seeded_training_is_reproducible(direct_run, tmp_path):
    run_dir, history, _ = direct_run
    again = tmp_path / "again"
    shutil.copytree(run_dir / "workspace", again / "workspace")
    repeat = steps.train(again, seed=3, train_iters=15, print_every=0)
    np.testing.assert_array_equal(repeat["loss"], history["loss"])


def test_the_exported_predictor_reloads_and_predicts(direct_run):
    run_dir, _, predictions = direct_run
    ws = run_dir / "workspace"
    workspace.ResetWorkspace(str(ws))
    workspace.RunOperatorOnce(  # the test step's last batch
        core.CreateOperator("Load", [], ["data", "label"], db=str(ws / steps.LAST_BATCH_DB),
                                  db_type="minidb", absolute_path=1))
    batch = workspace.FetchBlob("data")
    workspace.ResetWorkspace(str(ws))
    net = pe.prepare_prediction_net(str(ws / steps.MODEL_DB), "minidb")
    workspace.FeedBlob("data", batch)
    workspace.RunNet(net, 1)
    softmax = workspace.FetchBlob("softmax")
    assert [p["image"] for p in predictions] == [1, 2, 10]
    for p in predictions:
        assert int(softmax[p["image"] - 1].argmax()) == p["prediction"]
        assert float(softmax[p["image"] - 1].max()) == pytest.approx(p["confidence"], rel=1e-5)


def test_steps_say_which_earlier_step_is_missing(tmp_path, small_data):
    with pytest.raises(steps.StepError, match="run the download step first"):
        steps.build_models(tmp_path, device="cpu")
    with pytest.raises(steps.StepError, match="run the build step first"):
        steps.train(tmp_path, train_iters=1)
    with pytest.raises(steps.StepError, match="does not exist"):
        steps.download_step(tmp_path, data_dir=tmp_path / "empty", data_source="existing")


def test_accuracy_check_and_devices(monkeypatch):
    result = {"metrics": {"test_accuracy": 0.9}}
    steps.check_test_accuracy(result, 0.9)
    with pytest.raises(steps.AccuracyTooLow, match="0.9000 is below min_test_accuracy 0.95"):
        steps.check_test_accuracy(result, 0.95)
    monkeypatch.setattr(steps.torch.cuda, "is_available", lambda: False)
    assert steps.resolve_device("auto") == "cpu"
    with pytest.raises(steps.StepError, match="no GPU"):
        steps.resolve_device("cuda")
    assert steps.device_option("cpu") is None
    assert steps.device_option("cuda").device_type == caffe2_pb2.CUDA
    assert steps.resolve("data") == REPO / "data"


def test_download_builds_the_full_databases_from_the_package(tmp_path):
    info = steps.download_step(tmp_path / "run", data_dir=tmp_path / "data", data_source="package")
    assert (info["train_records"], info["test_records"]) == (60000, 10000)
    assert Path(info["train_db"]) == tmp_path / "data" / "mnist-train-nchw-lmdb"

    # a user's copy of the tutorial's mnist-lmdb.zip, given as data_url (here: a local path)
    archive = tmp_path / "mnist-lmdb.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as zf:
        for db in ("mnist-train-nchw-lmdb", "mnist-test-nchw-lmdb"):
            zf.write(tmp_path / "data" / db / "data.mdb", f"{db}/data.mdb")
    info = steps.download_step(tmp_path / "run2", data_dir=tmp_path / "from-zip",
                               data_source="caffe2-zip", data_url=str(archive))
    assert (info["train_records"], info["test_records"]) == (60000, 10000)
    with pytest.raises(steps.StepError, match="data_url is used with data_source caffe2-zip"):
        steps.download_step(tmp_path / "run3", data_dir=tmp_path / "x", data_source="package",
                            data_url=str(archive))


# --- run_all.py with kernels -------------------------------------------------------------------

def _run_all(*args):
    return subprocess.run([sys.executable, "run_all.py", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def smoke_run(small_data, tmp_path_factory):
    outputs = tmp_path_factory.mktemp("outputs")
    result = _run_all("-f", "params/smoke.yaml", "-p", f"data_dir={small_data}",
                      "-p", "data_source=existing", "--run-id", "smoke", "--outputs", outputs)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return outputs, result


def test_smoke_run_json(smoke_run):
    outputs, _ = smoke_run
    run = json.loads((outputs / "smoke/run.json").read_text())
    assert run["run_id"] == "smoke" and run["status"] == "succeeded" and run["device"] == "cpu"
    assert run["params"]["train_iters"] == 20 and run["params"]["data_source"] == "existing"
    assert [s["name"] for s in run["steps"]] == list(runner.STEPS)
    for step in run["steps"]:
        assert step["status"] == "succeeded" and step["seconds"] > 0
        assert step["kernel"] == "forked"  # from the kernel fork server
        assert (outputs / "smoke" / step["notebook"]).exists()
        assert (outputs / "smoke" / step["html"]).exists()
    metrics = run["metrics"]
    assert 0 <= metrics["test_accuracy"] <= 1 and metrics["final_train_loss"] > 0
    assert 0 <= metrics["final_train_accuracy"] <= 1 and metrics["train_iters"] == 20
    assert set(run["versions"]) >= {"python", "torch", "caffe2torch"}
    assert run["git_commit"] and run["started"] <= run["finished"]


def test_smoke_run_artifacts(smoke_run):
    outputs, _ = smoke_run
    ws = outputs / "smoke" / "workspace"
    for name in steps.NET_FILES:
        assert (ws / f"{name}.pbtxt").exists() and (ws / f"{name}.pb").exists()
    for name in [steps.PARAMS_DB, steps.MODEL_DB, "accuracy.log", "loss.log",
                 "conv1_w.summary", "pred_b_grad.summary"] + FIGURES:
        assert (ws / name).stat().st_size > 0, name
    assert (ws / "accuracy.log").read_text().count("\n") == 20


def test_smoke_run_notebooks_and_html(smoke_run):
    outputs, _ = smoke_run
    for step, name in runner.NOTEBOOKS.items():
        nb = nbformat.read(str(outputs / "smoke" / name), as_version=4)
        injected = [c for c in nb.cells if "injected-parameters" in c.metadata.get("tags", [])]
        assert len(injected) == 1 and str(outputs / "smoke") in injected[0].source
        outputs_of = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
        assert not [o for o in outputs_of if o.output_type == "error"], step
        page = (outputs / "smoke" / name).with_suffix(".html").read_text()
        assert "<script src=" not in page and "cdnjs" not in page  # renders offline
    train_html = (outputs / "smoke" / runner.NOTEBOOKS["train"]).with_suffix(".html").read_text()
    assert train_html.count("data:image/png;base64,") >= 3 and "iteration" in train_html


def test_smoke_run_history_and_live_log(smoke_run):
    outputs, result = smoke_run
    lines = [json.loads(line) for line in (outputs / "runs.jsonl").read_text().splitlines()]
    assert lines[0]["run_id"] == "smoke" and lines[0]["status"] == "succeeded"
    assert lines[0]["test_accuracy"] is not None and lines[0]["seconds"] > 0
    assert (outputs / "latest").resolve() == (outputs / "smoke").resolve()
    page = (outputs / "index.html").read_text()
    assert "smoke" in page and "data:image/png;base64," in page
    assert "[train] iteration     0: loss" in result.stdout  # cell output streamed as it ran
    assert "[export] image 1: prediction" in result.stdout
    assert "[train] [figure train_curves.png]" in result.stdout


def test_failing_step_then_resume(smoke_run, tmp_path):
    outputs, _ = smoke_run
    shutil.copytree(outputs / "smoke", tmp_path / "smoke")
    # the test step fails: the accuracy of 20 iterations is below 1.0
    failed = _run_all("--run-id", "smoke", "--from", "test", "-p", "min_test_accuracy=1.0",
                      "--outputs", tmp_path)
    assert failed.returncode == 1
    notebook = tmp_path / "smoke" / runner.NOTEBOOKS["test"]
    assert "step test failed at cell" in failed.stderr and "AccuracyTooLow" in failed.stderr
    assert str(notebook) in failed.stderr
    nb = nbformat.read(str(notebook), as_version=4)
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
              if o.output_type == "error"]
    assert errors and errors[0].ename == "AccuracyTooLow"
    assert any("test_accuracy:" in o.get("text", "") for c in nb.cells if c.cell_type == "code"
               for o in c.outputs)  # everything up to the failure is kept
    run = json.loads((tmp_path / "smoke/run.json").read_text())
    assert run["status"] == "failed" and run["steps"][3]["status"] == "failed"
    assert run["steps"][4]["status"] == "not_run" and run["steps"][2]["status"] == "succeeded"
    assert (tmp_path / "smoke" / "04_test.html").exists()

    # export cannot start before test succeeded; resuming from test (threshold back to 0) can
    refused = _run_all("--run-id", "smoke", "--from", "export", "--outputs", tmp_path)
    assert refused.returncode == 2 and "step test has not succeeded" in refused.stderr
    resumed = _run_all("--run-id", "smoke", "--from", "test", "-p", "min_test_accuracy=0",
                       "--outputs", tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    run = json.loads((tmp_path / "smoke/run.json").read_text())
    assert run["status"] == "succeeded" and all(s["status"] == "succeeded" for s in run["steps"])
    assert run["params"]["train_iters"] == 20  # the resumed run keeps its parameters
    history = [json.loads(line) for line in (tmp_path / "runs.jsonl").read_text().splitlines()]
    assert [(h["status"], h["steps"]) for h in history] == [
        ("failed", ["test"]), ("succeeded", ["test", "export"])]


def _texts(notebook, run_dir):
    """The text each code cell printed or displayed, its run folder's path written as RUN (how
    a cell's stream is cut into outputs depends on timing: joined here)."""
    nb = nbformat.read(str(notebook), as_version=4)
    return ["".join(o.get("text", "") or o.get("data", {}).get("text/plain", "")
                    for o in c.outputs).replace(str(run_dir), "RUN")
            for c in nb.cells if c.cell_type == "code"]


def test_fresh_kernels_give_the_same_notebooks(smoke_run, small_data, tmp_path):
    """--fresh-kernels (a new Python per kernel) and forked kernels print the same things."""
    outputs, forked = smoke_run
    fresh = _run_all("-f", "params/smoke.yaml", "-p", f"data_dir={small_data}",
                     "-p", "data_source=existing", "--run-id", "fresh", "--outputs", tmp_path,
                     "--fresh-kernels")
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    run = json.loads((tmp_path / "fresh/run.json").read_text())
    assert [s["kernel"] for s in run["steps"]] == ["new process"] * len(runner.STEPS)
    assert "not forked" not in forked.stderr
    for name in runner.NOTEBOOKS.values():
        a = _texts(outputs / "smoke" / name, outputs / "smoke")
        b = _texts(tmp_path / "fresh" / name, tmp_path / "fresh")
        timing = re.compile(r"in \d+\.\d+ s")  # training reports its wall time
        assert [timing.sub("", t) for t in a] == [timing.sub("", t) for t in b], name
