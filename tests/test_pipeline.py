"""The pipeline: run_all.py with real kernels (smoke params) on small real-MNIST LMDBs.

(The notebooks themselves are tested in test_notebooks.py, their functions in test_lenet.py.)
"""
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from mnist_tutorial import runner
from tutorial import NET_FILES, write_small_mnist

REPO = Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"
FIGURES = ["train_curves.png", "sample_batch.png", "first_prediction.png", "test_accuracy.png",
           "confusion_matrix.png", "misclassified.png", "predictions.png",
           "train_net_graph.svg", "train_net_graph_minimal.svg"]


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("data")
    write_small_mnist(data_dir)
    return data_dir


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
    for name in NET_FILES:
        assert (ws / f"{name}.pbtxt").exists() and (ws / f"{name}.pb").exists()
    for name in ["mnist_params.minidb", "mnist_model.minidb", "accuracy.log", "loss.log",
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
    assert "step test failed at cell" in failed.stderr and "RuntimeError: test accuracy" in failed.stderr
    assert str(notebook) in failed.stderr
    nb = nbformat.read(str(notebook), as_version=4)
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
              if o.output_type == "error"]
    assert errors and errors[0].ename == "RuntimeError"
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
