"""run_all.py: parameter checks (exit 2 before any kernel), papermill wiring, history, locks.

The whole pipeline with kernels is in test_pipeline.py; here no test starts a kernel except the
one CLI subprocess, which fails before it would.
"""
import fcntl
import json
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from mnist_tutorial import runner

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def no_kernel(monkeypatch):
    """Fail the test if any notebook would be executed."""
    import papermill

    def refuse(*args, **kwargs):
        raise AssertionError("a kernel was started")
    monkeypatch.setattr(papermill, "execute_notebook", refuse)
    monkeypatch.setattr(runner, "run_step", refuse)
    monkeypatch.setattr(runner.KernelStarter, "_start", refuse)
    monkeypatch.setattr(runner.KernelStarter, "prepare", refuse)  # no kernel fork server either


def _main(capsys, *args):
    try:
        code = runner.main(list(args))
    except SystemExit as e:  # argparse's own usage errors
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


BAD = [
    (["-p", "train_iters=0"], "train_iters"),
    (["-p", "train_iters=abc"], "train_iters"),
    (["-p", "train_iters=1.5"], "train_iters"),
    (["-p", "seed=true"], "seed"),
    (["-p", "base_lr=0.1"], "base_lr"),
    (["-p", "gamma=0"], "gamma"),
    (["-p", "min_test_accuracy=1.5"], "min_test_accuracy"),
    (["-p", "lr_policy=multistep"], "lr_policy"),
    (["-p", "device=tpu"], "device"),
    (["-p", "data_source=s3"], "data_source"),
    (["-p", "cell_timeout=0"], "cell_timeout"),
    (["-p", "start_timeout=-5"], "start_timeout"),
    (["-p", "data_dir="], "data_dir"),
    (["-p", "trian_iters=5"], "trian_iters"),
    (["-p", "api_key=abc123"], "api_key"),
    (["-p", "db_password=hunter2"], "db_password"),
    (["-p", "GITHUB_TOKEN=x"], "GITHUB_TOKEN"),
    (["-p", "aws_secret_access=x"], "aws_secret_access"),
    (["-p", "train_iters"], "train_iters"),
    (["--only", "build,bogus"], "bogus"),
    (["--run-id", "../escape"], "--run-id"),
    (["--run-id", "latest"], "--run-id"),
]


@pytest.mark.parametrize("args,key", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_parameters_exit_2_before_any_kernel(args, key, tmp_path, capsys, no_kernel):
    code, out, err = _main(capsys, *args, "--outputs", str(tmp_path / "out"))
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("run_all.py: error:") and key in lines[0]
    assert not (tmp_path / "out").exists()  # nothing written


@pytest.mark.parametrize("content,key", [
    ("trian_iters: 5\n", "trian_iters"),
    ("train_iters: '200'\n", "train_iters"),
    ("test_batch_size: 0\n", "test_batch_size"),
    ("secret_token: abc\n", "secret_token"),
    ("- train_iters\n", "mapping"),
    ("train_iters: [1\n", "YAML"),
], ids=["unknown", "string-for-int", "range", "secret", "not-a-mapping", "broken-yaml"])
def test_bad_params_files_exit_2(content, key, tmp_path, capsys, no_kernel):
    path = tmp_path / "bad.yaml"
    path.write_text(content)
    code, _, err = _main(capsys, "-f", str(path), "--outputs", str(tmp_path / "out"))
    assert code == 2 and key in err and str(path) in err and len(err.strip().splitlines()) == 1


def test_missing_params_file_and_bad_step_names(tmp_path, capsys, no_kernel):
    code, _, err = _main(capsys, "-f", str(tmp_path / "nope.yaml"))
    assert code == 2 and "nope.yaml" in err
    code, _, err = _main(capsys, "--from", "bogus")
    assert code == 2 and "bogus" in err


def test_cuda_without_a_gpu_exits_2(tmp_path, capsys, monkeypatch, no_kernel):
    monkeypatch.setattr(runner, "cuda_available", lambda probe: False)
    code, _, err = _main(capsys, "-f", str(REPO / "params/gpu.yaml"), "--outputs", str(tmp_path))
    assert code == 2 and "cuda" in err and "no GPU" in err
    code, out, _ = _main(capsys, "-p", "device=auto", "--dry-run", "--outputs", str(tmp_path))
    assert code == 0 and "on cpu" in out
    # a CPU-only torch build ("+cpu") needs no probe at all
    monkeypatch.setattr(runner, "cpu_only_torch", lambda: True)
    monkeypatch.setattr(runner, "probe_cuda", lambda: pytest.fail("probed a CPU-only torch"))
    code, _, err = _main(capsys, "-p", "device=cuda", "--outputs", str(tmp_path))
    assert code == 2 and "CPU-only build" in err


def test_starting_mid_pipeline_needs_the_earlier_steps(tmp_path, capsys, no_kernel):
    code, _, err = _main(capsys, "--from", "train", "--outputs", str(tmp_path))
    assert code == 2 and "step download has not succeeded" in err
    code, _, err = _main(capsys, "--only", "download,test", "--outputs", str(tmp_path))
    assert code == 2 and "step build has not succeeded" in err


def test_the_gpu_probe_asks_torch_in_a_child_process():
    probe = runner.probe_cuda()
    import torch
    assert runner.cuda_available(probe) == torch.cuda.is_available()


def test_cli_exit_code_and_message():
    result = subprocess.run([sys.executable, "run_all.py", "-p", "train_iters=-1"], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == ("run_all.py: error: parameter 'train_iters' (from -p) must be "
                                     ">= 1 and <= 10,000,000, got -1")


def test_overrides_and_files_layer_on_the_defaults(tmp_path):
    smoke = runner.resolve_params([REPO / "params/smoke.yaml"], ["seed=7", "base_lr=-5e-2"])
    assert smoke["train_iters"] == 20 and smoke["seed"] == 7 and smoke["base_lr"] == -0.05
    assert smoke["train_batch_size"] == 64  # schema default
    default = runner.resolve_params([REPO / "params/default.yaml"])
    assert default == {name: spec.default for name, spec in runner.SCHEMA.items()}
    full = runner.resolve_params([REPO / "params/full.yaml"])
    assert full["train_iters"] > default["train_iters"] and full["min_test_accuracy"] >= 0.99
    # strings stay strings: a data_dir named 2024 is not the integer 2024
    assert runner.resolve_params([], ["data_dir=2024"])["data_dir"] == "2024"


def test_list_and_dry_run(tmp_path, capsys, no_kernel):
    code, out, _ = _main(capsys, "--list")
    assert code == 0 and all(step in out for step in runner.STEPS) and "min_test_accuracy" in out
    code, out, _ = _main(capsys, "-f", str(REPO / "params/smoke.yaml"), "--dry-run",
                         "--run-id", "plan", "--outputs", str(tmp_path / "out"))
    assert code == 0 and "train_iters': 20" in out
    # each step gets only what its notebook declares
    assert "export: notebooks/05_export.ipynb with {'run_dir':" in out
    assert not (tmp_path / "out").exists()


@pytest.fixture
def fake_papermill(monkeypatch):
    """Record papermill's arguments; 'execute' by copying the notebook, or fail like papermill."""
    import papermill
    calls = []
    started, stopped = [], []
    monkeypatch.setattr(runner.KernelStarter, "_start", lambda self, step: started.append(step) or
                        f"kernel{len(started)}")
    monkeypatch.setattr(runner.KernelStarter, "stop", staticmethod(stopped.append))
    monkeypatch.setattr(runner.KernelStarter, "prepare", lambda self, spec: None)

    def execute(input_path, output_path, parameters=None, **kwargs):
        calls.append({"input": input_path, "parameters": parameters, **kwargs})
        nb = nbformat.read(input_path, as_version=4)
        nbformat.write(nb, output_path)
        if parameters.get("test_iters") == 13:
            raise papermill.PapermillExecutionError(4, 3, "steps.test()", "StepError",
                                                    "boom", ["Traceback"])
    monkeypatch.setattr(papermill, "execute_notebook", execute)
    yield calls
    assert sorted(stopped) == sorted(f"kernel{i}" for i in range(1, len(started) + 1))  # none left


def test_papermill_gets_the_kernel_timeouts_and_only_declared_parameters(
        tmp_path, capsys, fake_papermill):
    out = tmp_path / "out"
    code, stdout, _ = _main(capsys, "-p", "cell_timeout=77", "-p", "start_timeout=9",
                            "--only", "download", "--run-id", "r1", "--outputs", str(out))
    assert code == 0
    (call,) = fake_papermill
    assert call["km"] == "kernel1"  # the kernel started for it (no next step to start ahead)
    assert call["kernel_name"] == "caffe2torch" and call["log_output"] is True
    assert call["progress_bar"] is False and call["request_save_on_cell_execute"] is True
    assert call["execution_timeout"] == 77 and call["start_timeout"] == 9
    assert call["parameters"] == {"run_dir": str(out / "r1"), "data_dir": "data",
                                  "data_source": "auto", "data_url": ""}
    run = json.loads((out / "r1/run.json").read_text())
    assert run["status"] == "succeeded" and run["params"]["cell_timeout"] == 77
    assert [s["name"] for s in run["steps"]] == ["download"]
    assert (out / "r1/01_download.html").exists()
    assert (out / "latest").resolve() == (out / "r1").resolve()
    history = [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]
    assert history[0]["run_id"] == "r1" and history[0]["status"] == "succeeded"
    assert "r1" in (out / "index.html").read_text()


def test_a_failing_step_exits_1_naming_step_cell_and_notebook(tmp_path, capsys, fake_papermill):
    out = tmp_path / "out"
    for step in runner.STEPS[:3]:  # pretend download, build and train ran in run r2
        code, *_ = _main(capsys, "--only" if step == "download" else "--from", step,
                         "--run-id", "r2", "--outputs", str(out))
    code, _, err = _main(capsys, "--from", "test", "-p", "test_iters=13", "--run-id", "r2",
                         "--outputs", str(out))
    assert code == 1, err
    assert fake_papermill[-1]["km"] == "kernel9"  # kernel10, started for export, is stopped unused
    assert "step test failed at cell 3: StepError: boom" in err
    assert str(out / "r2" / "04_test.ipynb") in err
    run = json.loads((out / "r2/run.json").read_text())
    assert run["status"] == "failed"
    steps = {s["name"]: s for s in run["steps"]}
    assert steps["test"]["status"] == "failed" and steps["test"]["cell"] == 3
    assert steps["export"]["status"] == "not_run" and steps["train"]["status"] == "succeeded"
    lines = (out / "runs.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["status"] == "failed"


def test_a_locked_run_folder_is_refused(tmp_path, capsys, no_kernel):
    run_dir = tmp_path / "out" / "busy"
    run_dir.mkdir(parents=True)
    with open(run_dir / ".lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        code, _, err = _main(capsys, "--only", "download", "--run-id", "busy",
                             "--outputs", str(tmp_path / "out"))
    assert code == 2 and "in use by another run_all.py" in err


def test_history_page_lists_runs_and_plots_accuracy(tmp_path):
    runs = [{"run_id": f"r{i}", "status": "succeeded", "test_accuracy": 0.94 + i / 1000,
             "seconds": 60.0, "started": "2025-01-01T00:00:00+00:00", "steps": list(runner.STEPS),
             "device": "cpu"} for i in range(3)]
    runs.append({"run_id": "bad<x>", "status": "failed", "test_accuracy": None, "seconds": 3.0,
                 "steps": ["download"], "device": "cpu"})
    page = runner.index_html(runs)
    assert page.count("<tr>") == 5 and "0.9420" in page and "bad&lt;x&gt;" in page
    assert 'src="data:image/png;base64,' in page
    assert "http://" not in page and "https://" not in page


def test_a_missing_kernel_exits_2(tmp_path, capsys, monkeypatch, no_kernel):
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    def missing(self, name):
        raise NoSuchKernel(name)
    monkeypatch.setattr(KernelSpecManager, "get_kernel_spec", missing)
    code, _, err = _main(capsys, "--outputs", str(tmp_path / "out"))
    assert code == 2 and "make kernel" in err and not (tmp_path / "out").exists()


def test_a_broken_notebook_exits_2_and_leaves_nothing(tmp_path, capsys, monkeypatch):
    """Checks that need papermill run while the kernel fork server starts (and the run folder is
    locked): a failing one still exits 2, stops the server and removes the folder it made."""
    import papermill
    notebooks = tmp_path / "notebooks"
    shutil.copytree(runner.NOTEBOOK_DIR, notebooks)
    nb = nbformat.read(str(notebooks / runner.NOTEBOOKS["train"]), as_version=4)
    nb.cells[1].source += "\nlearning_rate_typo: float = 0.1"
    nbformat.write(nb, str(notebooks / runner.NOTEBOOKS["train"]))
    monkeypatch.setattr(runner, "NOTEBOOK_DIR", notebooks)
    calls = []
    monkeypatch.setattr(runner.KernelStarter, "prepare", lambda self, spec: calls.append("prepare"))
    monkeypatch.setattr(runner.KernelStarter, "close", lambda self: calls.append("close"))
    monkeypatch.setattr(papermill, "execute_notebook", lambda *a, **k: pytest.fail("executed"))
    code, _, err = _main(capsys, "--run-id", "r", "--outputs", str(tmp_path / "out" / "runs"))
    assert code == 2 and "'learning_rate_typo'" in err and "03_train.ipynb" in err
    assert calls == ["prepare", "close"]
    assert not (tmp_path / "out").exists()


def test_data_url_may_be_empty_or_a_location():
    assert runner.resolve_params(overrides=["data_url="])["data_url"] == ""
    assert runner.resolve_params(overrides=["data_url=/srv/mnist-lmdb.zip"])["data_url"] == \
        "/srv/mnist-lmdb.zip"
    with pytest.raises(runner.UsageError, match="data_dir.*must not be empty"):
        runner.resolve_params(overrides=["data_dir="])
