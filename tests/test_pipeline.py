"""The pipeline end to end: run_all.py with real kernels, forked by the fork provisioner, on small
real-MNIST LMDBs (640 train / 500 test images) under params/smoke.yaml."""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from mnist_idx import load_mnist_test
from test_kernelfork import fork_kernelspec

from caffe2torch.binaries.make_mnist_db import write_mnist_db
from pipeline import history, params
from tutorial import NET_FILES

REPO = Path(__file__).resolve().parents[1]
FIGURES = ["train_curves.png", "sample_batch.png", "first_prediction.png", "test_accuracy.png",
           "confusion_matrix.png", "misclassified.png", "predictions.png",
           "train_net_graph.svg", "train_net_graph_minimal.svg"]


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    """The tutorial's two LMDBs, small: real MNIST test images (the offline package's)."""
    data_dir = tmp_path_factory.mktemp("data")
    images, labels = load_mnist_test()
    for split, (lo, hi) in (("train", (0, 640)), ("test", (640, 1140))):
        write_mnist_db(images[lo:hi], labels[lo:hi], str(data_dir / f"mnist-{split}-nchw-lmdb"),
                       "lmdb", channel_first=True)
    return data_dir


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """The environment of a run_all.py whose ``caffe2torch`` kernelspec names the provisioner."""
    tmp = tmp_path_factory.mktemp("kernels")
    with pytest.MonkeyPatch.context() as mp:
        fork_kernelspec(tmp, mp, "caffe2torch")  # the project's, as `make kernel` installs it
        site = [str(tmp / "site")] if (tmp / "site").exists() else []  # the entry point
        yield {**os.environ, "JUPYTER_PATH": os.environ["JUPYTER_PATH"], "PYTHONPATH": os.pathsep
               .join([str(REPO), *site, *filter(None, [os.environ.get("PYTHONPATH")])])}


def _run_all(env, *args):
    return subprocess.run([sys.executable, "run_all.py", *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def smoke_run(small_data, env, tmp_path_factory):
    outputs = tmp_path_factory.mktemp("outputs")
    result = _run_all(env, "-f", "params/smoke.yaml", "-p", "data_dir", small_data,
                      "-p", "data_source=existing", "--run-id", "smoke", "--outputs", outputs)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return outputs, result


def test_smoke_run_json(smoke_run):
    outputs, _ = smoke_run
    run = json.loads((outputs / "smoke" / "run.json").read_text())
    assert run["status"] == "succeeded" and run["device"] == "cpu"
    assert run["params"]["train_iters"] == 20 and run["params_files"] == ["params/smoke.yaml"]
    assert [s["name"] for s in run["steps"]] == list(params.STEPS)
    for step in run["steps"]:
        assert step["status"] == "succeeded" and step["seconds"] > 0
        assert step["kernel"] == "forked"  # by the provisioner the kernelspec names
        assert (outputs / "smoke" / step["notebook"]).exists()
        assert (outputs / "smoke" / step["html"]).exists()
    assert 0 <= run["metrics"]["test_accuracy"] <= 1
    assert run["git_commit"] and run["started"] <= run["finished"]


def test_smoke_run_artifacts(smoke_run):
    outputs, _ = smoke_run
    ws = outputs / "smoke" / "workspace"
    for name in NET_FILES:
        assert (ws / f"{name}.pbtxt").exists() and (ws / f"{name}.pb").exists()
    for name in ["mnist_params.minidb", "mnist_model.minidb", "mnist_model.onnx",
                 "mnist_model.pt2", "accuracy.log", "loss.log", "conv1_w.summary",
                 "pred_b_grad.summary"] + FIGURES:
        assert (ws / name).stat().st_size > 0, name
    assert (ws / "accuracy.log").read_text().count("\n") == 20


def test_smoke_run_notebooks_html_and_console(smoke_run):
    outputs, result = smoke_run
    for step in params.STEPS:
        name = params.notebook_path(step).name
        nb = nbformat.read(str(outputs / "smoke" / name), as_version=4)
        injected = [c for c in nb.cells if "injected-parameters" in c.metadata.get("tags", [])]
        assert len(injected) == 1 and str(outputs / "smoke") in injected[0].source
        errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
                  if o.output_type == "error"]
        assert not errors, step
        page = (outputs / "smoke" / name).with_suffix(".html").read_text()
        assert "<script src=" not in page and "cdnjs" not in page  # renders offline
        assert re.search(rf"^\[{params.STEPS.index(step) + 1}/5\] {step} \.\.\. \d+\.\d s$",
                         result.stdout, re.M), step
    assert "Executing" not in result.stdout + result.stderr  # papermill's own lines: not shown
    assert re.search(r"^\[train\] .*\S", result.stdout, re.M)  # the cells' own output
    # the tutorial's init-net printout (its first 400 characters, as the tutorial prints them)
    assert "[build] *******train_model.param_init_net.Proto()*******" in result.stdout
    assert "not forked" not in result.stderr and "without encryption" not in result.stderr


def test_smoke_run_history(smoke_run):
    outputs, _ = smoke_run
    (row,) = history.read_runs(outputs)
    assert row["run_id"] == "smoke" and row["status"] == "succeeded"
    assert (outputs / "latest").resolve() == (outputs / "smoke").resolve()
    page = (outputs / "index.html").read_text()
    assert "smoke/03_train.html" in page and "<svg" in page and "train_iters = 20" in page


def _texts(notebook, run_dir):
    """The text each code cell printed, its run folder's path written as RUN, timings removed."""
    nb = nbformat.read(str(notebook), as_version=4)
    timing = re.compile(r"\d+\.\d+ s\b|\d+(\.\d+)? (images|iterations)/s")
    return [timing.sub("", "".join(o.get("text", "") for o in c.outputs)
                       .replace(str(run_dir), "RUN")) for c in nb.cells if c.cell_type == "code"]


def test_failing_step_resume_and_fresh_kernels(smoke_run, env, tmp_path):
    outputs, _ = smoke_run
    shutil.copytree(outputs / "smoke", tmp_path / "smoke")
    failed = _run_all(env, "--run-id", "smoke", "--from", "test", "-p", "min_test_accuracy=1.0",
                      "--outputs", tmp_path)
    assert failed.returncode == 1
    notebook = tmp_path / "smoke" / params.notebook_path("test").name
    assert "step test failed at cell" in failed.stderr and str(notebook) in failed.stderr
    run = json.loads((tmp_path / "smoke/run.json").read_text())
    assert run["status"] == "failed" and run["steps"][3]["status"] == "failed"
    assert run["steps"][4]["status"] == "not_run" and run["steps"][2]["status"] == "succeeded"
    refused = _run_all(env, "--run-id", "smoke", "--from", "export", "--outputs", tmp_path)
    assert refused.returncode == 2 and "step test has not succeeded" in refused.stderr
    # resumed with new kernels as new processes: the same outputs as the forked ones
    resumed = _run_all(env, "--run-id", "smoke", "--from", "test", "-p", "min_test_accuracy=0",
                       "--fresh-kernels", "--outputs", tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    run = json.loads((tmp_path / "smoke/run.json").read_text())
    assert run["status"] == "succeeded" and run["params"]["train_iters"] == 20
    assert [s["kernel"] for s in run["steps"][3:]] == ["new process"] * 2
    for step in ("test", "export"):
        name = params.notebook_path(step).name
        assert _texts(outputs / "smoke" / name, outputs / "smoke") == \
            _texts(tmp_path / "smoke" / name, tmp_path / "smoke"), step
    (row,) = history.read_runs(tmp_path)  # one row per run id
    assert row["status"] == "succeeded"
