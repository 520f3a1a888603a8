"""run_all.py: parameters from the notebooks (exit 2 before any kernel), papermill wiring,
run.json, the console, locks. No test here starts a kernel; test_pipeline.py runs real ones."""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from filelock import FileLock

from pipeline import cli, execute, history, kernelfork, params

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def no_kernel(monkeypatch):
    """Fail the test if any notebook would be executed; no fork server is warmed either (a real
    one is warmed before the checks, so that its imports overlap papermill's)."""
    import papermill

    def refuse(*args, **kwargs):
        raise AssertionError("a kernel was started")
    monkeypatch.setattr(papermill, "execute_notebook", refuse)
    monkeypatch.setattr(kernelfork, "warm", lambda spec: None)


def _main(capsys, *args):
    try:
        code = cli.main(list(args))
    except SystemExit as e:  # argparse's own usage errors, --version
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


BAD = [
    (["-p", "train_iters=0"], "train_iters"),
    (["-p", "train_iters", "abc"], "train_iters"),
    (["-p", "train_iters=1.5"], "train_iters"),
    (["-p", "seed=true"], "seed"),
    (["-p", "base_lr=0.1"], "base_lr"),
    (["-p", "base_lr=nan"], "base_lr"),
    (["-p", "gamma=0"], "gamma"),
    (["-p", "min_test_accuracy=1.5"], "min_test_accuracy"),
    (["-p", "lr_policy=multistep"], "lr_policy"),
    (["-p", "device=tpu"], "device"),
    (["-p", "data_source=s3"], "data_source"),
    (["-p", "cell_timeout=0"], "cell_timeout"),
    (["-p", "start_timeout=-5"], "start_timeout"),
    (["-p", "data_dir="], "data_dir"),
    (["-p", "trian_iters=5"], "trian_iters"),
    (["-p", "run_dir=/elsewhere"], "run_dir"),
    (["-p", "api_key=abc123"], "api_key"),
    (["-p", "db_password", "hunter2"], "db_password"),
    (["-p", "GITHUB_TOKEN=x"], "GITHUB_TOKEN"),
    (["-y", "train_iters: -3"], "train_iters"),
    (["-y", "[1, 2]"], "-y"),
    (["--only", "build,bogus"], "bogus"),
    (["--run-id", "../escape"], "--run-id"),
    (["--run-id", "latest"], "--run-id"),
    (["--run-id", "index.html"], "--run-id"),
    (["--run-id", "runs.jsonl"], "--run-id"),
    (["--run-id", "r1\n"], "--run-id"),
]


@pytest.mark.parametrize("args,key", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_parameters_exit_2_before_any_kernel(args, key, tmp_path, capsys, no_kernel):
    code, out, err = _main(capsys, *args, "--outputs", str(tmp_path / "out"))
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("run_all.py: error:") and key in lines[0]
    assert not (tmp_path / "out").exists()  # nothing written


@pytest.mark.parametrize("args", [["-p", "train_iters"], ["-p", "a", "b", "c"], ["-p", "=5"]])
def test_malformed_p_is_a_usage_error(args, capsys, no_kernel):
    code, _, err = _main(capsys, *args)
    assert code == 2 and "expected -p KEY VALUE or -p KEY=VALUE" in err


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


def test_papermill_forms_and_order_of_layers(tmp_path, capsys, no_kernel):
    """-p KEY VALUE, -p KEY=VALUE, -y and -f layer in the order given: the last one wins."""
    code, out, _ = _main(capsys, "-f", str(REPO / "params/smoke.yaml"), "-p", "train_iters", "7",
                         "-y", "seed: 5\ntest_iters: 2", "-p", "test_iters=3", "--dry-run",
                         "--run-id", "plan", "--outputs", str(tmp_path / "out"))
    assert code == 0
    assert "train: notebooks/03_train.ipynb with {'seed': 5, 'train_iters': 7, 'print_every': 5, " \
        in out
    assert "test: notebooks/04_test.ipynb with {'test_iters': 3, 'min_test_accuracy': 0.0}" in out
    assert "export: notebooks/05_export.ipynb with {}" in out  # only what each notebook declares
    assert not (tmp_path / "out").exists()
    code, out, _ = _main(capsys, "-y", "train_iters: 9", "-f", str(REPO / "params/smoke.yaml"),
                         "--dry-run", "--only", "download,build,train")
    assert code == 0 and "'train_iters': 20" in out  # the file came last


def test_version_and_list(capsys, no_kernel):
    code, out, _ = _main(capsys, "--version")
    assert code == 0 and out.startswith("run_all.py 0.") and "papermill 2." in out
    code, out, _ = _main(capsys, "--list")
    assert code == 0 and all(f"notebooks/{params.notebook_path(s).name}" in out
                             for s in params.STEPS)
    assert "train_iters        int   200" in out and "cell_timeout" in out


def test_cuda_without_a_gpu_exits_2(tmp_path, capsys, monkeypatch, no_kernel):
    fake_probe = subprocess.Popen([sys.executable, "-c", "print(False)"], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
    monkeypatch.setattr(execute, "cpu_only_torch", lambda: False)
    monkeypatch.setattr(execute, "probe_cuda", lambda: fake_probe)
    code, _, err = _main(capsys, "-f", str(REPO / "params/gpu.yaml"), "--outputs", str(tmp_path))
    assert code == 2 and "cuda" in err and "no GPU" in err
    # a CPU-only torch build ("+cpu") needs no probe at all
    monkeypatch.setattr(execute, "cpu_only_torch", lambda: True)
    monkeypatch.setattr(execute, "probe_cuda", lambda: pytest.fail("probed a CPU-only torch"))
    code, _, err = _main(capsys, "-p", "device=cuda", "--outputs", str(tmp_path))
    assert code == 2 and "CPU-only build" in err
    code, out, _ = _main(capsys, "-p", "device=auto", "--dry-run", "--outputs", str(tmp_path))
    assert code == 0 and "on cpu" in out and "'device': 'cpu'" in out


def test_the_gpu_probe_asks_torch_in_a_child_process():
    import torch
    assert execute.resolve_device("auto", execute.probe_cuda()) == (
        "cuda" if torch.cuda.is_available() else "cpu")


def test_starting_mid_pipeline_needs_the_earlier_steps(tmp_path, capsys, no_kernel):
    code, _, err = _main(capsys, "--from", "train", "--outputs", str(tmp_path))
    assert code == 2 and "step download has not succeeded" in err
    code, _, err = _main(capsys, "--only", "download,test", "--outputs", str(tmp_path))
    assert code == 2 and "step build has not succeeded" in err


def test_cli_exit_code_and_message():
    result = subprocess.run([sys.executable, "run_all.py", "-p", "train_iters", "-1"], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == ("run_all.py: error: parameter 'train_iters' (from -p) must be "
                                     ">= 1 and <= 10,000,000, got -1")


def test_defaults_are_the_notebooks_and_files_only_override():
    defaults = params.defaults()
    assert params.resolve([("f", params.load_file(REPO / "params/default.yaml"))]) == defaults
    smoke = params.resolve([("f", params.load_file(REPO / "params/smoke.yaml"))])
    assert smoke["train_iters"] == 20 and smoke["train_batch_size"] == defaults["train_batch_size"]
    for path in [*REPO.glob("params/*.yaml"), REPO / "deploy/base/params.yaml"]:
        for name, value in params.load_file(path).items():  # overrides only, each one checked
            assert value != defaults[name], f"{path.name} repeats the default of {name}"
            params.check_param(params.schema(), name, value, path.name)
    # strings stay strings: a data_dir named 2024 is not the integer 2024
    assert params.resolve([("-p", {"data_dir": params.parse_value(params.schema(), "data_dir",
                                                                  "2024")})])["data_dir"] == "2024"


def _edit_parameters_cell(notebook, edit):
    nb = nbformat.read(str(notebook), as_version=4)
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    cell.source = edit(cell.source)
    nbformat.write(nb, str(notebook))


def test_a_notebook_default_is_the_one_home_of_a_parameter(tmp_path, monkeypatch, capsys,
                                                           no_kernel):
    """Change a default (and add a parameter) in a copy of a notebook's parameters cell: --list,
    validation, the plan and the README table follow with no other edit."""
    notebooks = tmp_path / "notebooks"
    shutil.copytree(params.NOTEBOOK_DIR, notebooks)
    train = params.notebook_path("train", notebooks)
    _edit_parameters_cell(train, lambda s: s
                          .replace("train_iters: int = 200", "train_iters: int = 321")
                          .replace("print_every: int = 25", "print_every: float = 2.5")
                          + "\nmomentum: float = 0.9  # SGD momentum, new in this copy")
    assert "train_iters: int = 321" in nbformat.read(str(train), as_version=4).cells[1].source
    monkeypatch.setattr(params, "NOTEBOOK_DIR", notebooks)
    code, out, _ = _main(capsys, "--list")
    assert "train_iters        int   321" in out and "momentum           float 0.9" in out
    assert "SGD momentum, new in this copy" in out
    assert params.defaults()["train_iters"] == 321
    code, out, _ = _main(capsys, "--dry-run", "-p", "momentum=0.5", "-p", "print_every=0.5")
    assert code == 0 and "'train_iters': 321, 'print_every': 0.5, " in out and "'momentum': 0.5" in out
    code, _, err = _main(capsys, "-p", "momentum=fast")
    assert code == 2 and "'momentum' (from -p) must be a number" in err
    table = params.markdown_table()
    assert "| `train_iters` | int | `321` | train |" in table and "| `momentum` | float |" in table
    assert params.readme_with_table((REPO / "README.md").read_text()) != \
        (REPO / "README.md").read_text()  # the README's table would need regenerating


def test_notebooks_that_disagree_on_a_shared_parameter_are_refused(tmp_path, monkeypatch,
                                                                  capsys, no_kernel):
    notebooks = tmp_path / "notebooks"
    shutil.copytree(params.NOTEBOOK_DIR, notebooks)
    # 02_build declares seed too in this copy, with another default than 03_train's
    _edit_parameters_cell(params.notebook_path("build", notebooks),
                          lambda s: s + "\nseed: int = 1  # seeds Python, numpy and torch")
    monkeypatch.setattr(params, "NOTEBOOK_DIR", notebooks)
    code, _, err = _main(capsys, "--list")
    assert code == 2 and "02_build.ipynb and 03_train.ipynb disagree on 'seed'" in err


def test_the_rules_table_names_only_declared_parameters():
    declared = params.schema()
    assert set(params.RULES) <= set(declared), set(params.RULES) - set(declared)
    for name, rules in params.RULES.items():
        assert rules.get("owner") in (None, *declared[name].steps), name
    assert all(declared[name].steps == () for name in params.OPTIONS)  # no notebook's


def test_the_readme_table_is_generated():
    readme = (REPO / "README.md").read_text()
    assert params.readme_with_table(readme) == readme, \
        "README's parameters table is stale: run python -m pipeline.params --readme"


@pytest.fixture
def fake_papermill(monkeypatch):
    """Record papermill's arguments; 'execute' by copying the notebook and printing through
    stdout_file, or fail like papermill when test_iters is 13."""
    import papermill
    calls = []
    monkeypatch.setattr(kernelfork, "warm", lambda spec: None)

    def execute_notebook(input_path, output_path, parameters=None, **kwargs):
        calls.append({"input": input_path, "parameters": parameters, **kwargs})
        nb = nbformat.read(input_path, as_version=4)
        nbformat.write(nb, output_path)
        kwargs["on_cell_execute"](cell=None, cell_index=0)
        kwargs["stdout_file"].write("".join(f"line {i}\n" for i in range(45)))
        kwargs["on_cell_execute"](cell=None, cell_index=1)
        kwargs["stdout_file"].write("a second cell\n")
        step = Path(input_path).stem.split("_", 1)[1]
        ws = Path(parameters["run_dir"]) / "workspace"
        (ws / f"metrics_{step}.json").write_text(json.dumps({f"{step}_number": 1.5}))
        if parameters.get("test_iters") == 13:
            raise papermill.PapermillExecutionError(4, 3, "check()", "AccuracyTooLow", "boom",
                                                    ["Traceback"])
    monkeypatch.setattr(papermill, "execute_notebook", execute_notebook)
    return calls


def test_papermill_gets_timeouts_parameters_and_the_console(tmp_path, capsys, fake_papermill):
    out = tmp_path / "out"
    code, stdout, _ = _main(capsys, "-p", "cell_timeout=77", "-p", "start_timeout", "9",
                            "--only", "download", "--run-id", "r1", "--outputs", str(out))
    assert code == 0
    (call,) = fake_papermill
    assert "km" not in call and "kernel_name" not in call  # papermill starts it from the notebook
    assert call["progress_bar"] is False and call["request_save_on_cell_execute"] is True
    assert call["execution_timeout"] == 77 and call["start_timeout"] == 9
    assert call["cwd"] == str(out / "r1")
    assert call["parameters"] == {"run_dir": str(out / "r1"), "data_dir": "data",
                                  "data_source": "auto", "data_url": ""}
    lines = stdout.splitlines()
    assert lines[1] == "[1/5] download ... notebooks/01_download.ipynb"
    assert lines[2] == "[download] line 0"
    assert f"[download] line {execute.CONSOLE_LINES - 1}" in lines
    assert f"[download] ... {45 - execute.CONSOLE_LINES} more lines in {out}/r1/01_download.ipynb" \
        in lines
    assert "[download] a second cell" in lines and "Executing" not in stdout
    assert lines[-2].startswith("[1/5] download ... ") and lines[-2].endswith(" s")
    run = json.loads((out / "r1/run.json").read_text())
    assert run["status"] == "succeeded" and run["params"]["cell_timeout"] == 77
    assert [s["name"] for s in run["steps"]] == ["download"] and run["metrics"] == {
        "download_number": 1.5}
    assert run["overrides"] == ["cell_timeout=77", "start_timeout=9"]
    assert (out / "r1/01_download.html").exists()
    assert (out / "latest").resolve() == (out / "r1").resolve()
    assert [r["run_id"] for r in history.read_runs(out)] == ["r1"]
    assert "r1/01_download.html" in (out / "index.html").read_text()
    code, stdout, _ = _main(capsys, "-q", "--only", "download", "--run-id", "r0", "--outputs",
                            str(out))
    assert code == 0 and stdout.splitlines() == [stdout.splitlines()[-1]]  # only the result


def test_run_json_says_running_while_a_step_runs(tmp_path, capsys, monkeypatch):
    import papermill
    seen = []
    monkeypatch.setattr(kernelfork, "warm", lambda spec: None)

    def execute_notebook(input_path, output_path, parameters=None, **kwargs):
        seen.append(json.loads((Path(parameters["run_dir"]) / "run.json").read_text()))
        nbformat.write(nbformat.read(input_path, as_version=4), output_path)
    monkeypatch.setattr(papermill, "execute_notebook", execute_notebook)
    code, *_ = _main(capsys, "--only", "download", "--run-id", "r", "--outputs", str(tmp_path))
    assert code == 0 and seen[0]["status"] == "running"
    assert seen[0]["steps"][0] == {"name": "download", "status": "running", "seconds": None,
                                   "notebook": "01_download.ipynb", "html": "01_download.html"}


def test_a_failing_step_exits_1_naming_step_cell_and_notebook(tmp_path, capsys, fake_papermill):
    out = tmp_path / "out"
    code, *_ = _main(capsys, "--only", "download,build,train", "--run-id", "r2",
                     "--outputs", str(out))
    assert code == 0
    code, _, err = _main(capsys, "--from", "test", "-p", "test_iters=13", "--run-id", "r2",
                         "--outputs", str(out))
    assert code == 1, err
    assert "step test failed at cell 3: AccuracyTooLow: boom" in err
    assert str(out / "r2" / "04_test.ipynb") in err
    run = json.loads((out / "r2/run.json").read_text())
    assert run["status"] == "failed" and run["params"]["test_iters"] == 13
    steps = {s["name"]: s for s in run["steps"]}
    assert steps["test"]["status"] == "failed" and steps["test"]["cell"] == 3
    assert steps["export"]["status"] == "not_run" and steps["train"]["status"] == "succeeded"
    (row,) = history.read_runs(out)  # one row per run id: the resumption replaced it
    assert row["status"] == "failed" and [s["name"] for s in row["steps"]] == list(params.STEPS)


def test_a_locked_run_folder_is_refused(tmp_path, capsys, monkeypatch, no_kernel):
    monkeypatch.setattr(kernelfork, "warm", lambda spec: None)
    run_dir = tmp_path / "out" / "busy"
    run_dir.mkdir(parents=True)
    with FileLock(str(run_dir / ".lock")):
        code, _, err = _main(capsys, "--only", "download", "--run-id", "busy",
                             "--outputs", str(tmp_path / "out"))
    assert code == 2 and "in use by another run" in err


def test_a_missing_kernel_exits_2(tmp_path, capsys, monkeypatch, no_kernel):
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    def missing(self, name):
        raise NoSuchKernel(name)
    monkeypatch.setattr(KernelSpecManager, "get_kernel_spec", missing)
    code, _, err = _main(capsys, "--outputs", str(tmp_path / "out"))
    assert code == 2 and "make kernel" in err and not (tmp_path / "out").exists()


def test_a_notebook_without_a_parameters_cell_exits_2(tmp_path, capsys, monkeypatch, no_kernel):
    notebooks = tmp_path / "notebooks"
    shutil.copytree(params.NOTEBOOK_DIR, notebooks)
    nb = nbformat.read(str(params.notebook_path("export", notebooks)), as_version=4)
    for cell in nb.cells:
        cell.metadata.pop("tags", None)
    nbformat.write(nb, str(params.notebook_path("export", notebooks)))
    monkeypatch.setattr(params, "NOTEBOOK_DIR", notebooks)
    code, _, err = _main(capsys, "--dry-run")
    assert code == 2 and "05_export.ipynb has no cell tagged 'parameters'" in err


def test_cell_output_lines_and_budget():
    import io
    stream = io.StringIO()
    console = execute.CellOutput(stream)
    console.step = "train"
    console.write("partial ")
    console.write("line\nnext\n")
    console.new_cell("nb.ipynb")
    for i in range(execute.CONSOLE_LINES + 2):
        console.write(f"{i}\n")
    console.new_cell("nb.ipynb")
    lines = stream.getvalue().splitlines()
    assert lines[:2] == ["[train] partial line", "[train] next"]
    assert lines[-1] == "[train] ... 2 more lines in nb.ipynb"
    assert len(lines) == 2 + execute.CONSOLE_LINES + 1


@pytest.mark.parametrize("count", [1, 2, 7])
def test_the_accuracy_chart_counts_runs_in_whole_numbers(count):
    import matplotlib

    runs = [{"run_id": f"r{i}", "metrics": {"test_accuracy": 0.9 + i / 100}} for i in range(count)]
    with matplotlib.rc_context({"svg.fonttype": "none"}):  # tick labels as <text>, not paths
        svg = history.accuracy_chart(runs)
    x_labels = re.findall(r">([^<>]*)</text>", svg.split('id="matplotlib.axis_2"')[0])
    numbers = [t for t in x_labels if re.fullmatch(r"[\d.−-]+", t.strip())]
    assert numbers and all(re.fullmatch(r"\d+", t.strip()) for t in numbers), numbers
    assert int(numbers[0]) >= 1 and int(numbers[-1]) <= count


def test_checking_parameters_needs_no_papermill_once_a_notebook_was_inspected(tmp_path):
    """Each bad -p exits 2 in a fraction of a second: the notebooks' inspected parameters are
    cached by their bytes (papermill's import alone takes ~2 s)."""
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path)}
    probe = ("import sys; from pipeline import params; params.schema(); "
             "print('papermill' in sys.modules)")
    runs = [subprocess.run([sys.executable, "-c", probe], cwd=REPO, env=env, capture_output=True,
                           text=True, check=True).stdout.split() for _ in range(2)]
    assert runs == [["True"], ["False"]]
    assert len(list(tmp_path.glob("caffe2torch/notebook-parameters/*.json"))) == 5
