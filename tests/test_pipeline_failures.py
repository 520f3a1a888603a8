"""What a hostile user, a full disk or Kubernetes does to run_all.py (issue 11): every case exits
with a one-line message (2: before any kernel), and the run records stay readable and true."""
# ruff: noqa: F811 (fixtures imported from test_run_all are test arguments of the same name)
import json
import os
import time
from pathlib import Path

import pytest
from test_run_all import _main, fake_papermill, no_kernel  # noqa: F401 (fixtures)

from pipeline import execute, history, params


def _one_error_line(code, err, key, expected=2):
    lines = err.strip().splitlines()
    assert code == expected, err
    assert len(lines) == 1 and lines[0].startswith("run_all.py: error:") and key in lines[0], err


# --- case 4: reserved and odd run ids ------------------------------------------------------------

RUN_IDS = ["index.html", "runs.jsonl", "latest", "explore", "jupyter", "LATEST", "Index.HTML",
           "r1\n", "a/b", "a\tb", "a\x1bb", ".hidden", "-rf", "", "x" * 101, "é"]


@pytest.mark.parametrize("run_id", RUN_IDS, ids=map(ascii, RUN_IDS))
def test_reserved_and_odd_run_ids_exit_2(run_id, tmp_path, capsys, no_kernel):
    code, _, err = _main(capsys, "--dry-run", f"--run-id={run_id}", "--outputs", str(tmp_path))
    _one_error_line(code, err, "--run-id")
    assert list(tmp_path.iterdir()) == []


def test_run_ids_are_checked_in_one_place(tmp_path, capsys, monkeypatch, no_kernel):
    seen = []
    monkeypatch.setattr(execute, "check_run_id", lambda r: seen.append(r) or r)
    code, *_ = _main(capsys, "--dry-run", "--run-id", "latest", "--outputs", str(tmp_path))
    assert code == 0 and seen == ["latest"]


# --- case 9: parameter files ---------------------------------------------------------------------

LAUGHS = ("train_iters: &a [1, 1, 1, 1, 1, 1, 1, 1, 1]\n"
          "print_every: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
          + "".join(f"test_iters: &{c} [{', '.join([f'*{p}'] * 9)}]\n"
                    for p, c in zip("bcdefgh", "cdefghi")))
FILES = {
    "billion laughs": (LAUGHS.encode(), "anchors and aliases"),
    "one alias": (b"train_iters: &n 5\ntest_iters: *n\n", "anchors and aliases"),
    "not UTF-8": (b"data_dir: caf\xe9\n", "not UTF-8"),
    "5000 deep": (b"train_iters: " + b"[" * 5000 + b"]" * 5000 + b"\n", "nested"),
    "200 deep block": (("train_iters:\n" + "".join(" " * i + "- \n" for i in range(1, 200)))
                        .encode(), "nested"),
    "duplicate key": (b"train_iters: 5\ntrain_iters: 6\n", "given twice"),
    "hex int": (b"train_iters: 0x10\n", "train_iters"),
    "octal int": (b"train_iters: 010\n", "train_iters"),
    "sexagesimal": (b"train_iters: 1:20\n", "train_iters"),
    "explicit hex": (b"train_iters: !!int 0x10\n", "plain decimal"),
    "yes is no bool": (b"min_test_accuracy: yes\n", "min_test_accuracy"),
    "huge int": (b"stepsize: 100000000000000000000000\n", "stepsize"),
    "python tag": (b"train_iters: !!python/object/apply:os.system [ls]\n", "not readable"),
    "too big": (b"#" * ((1 << 20) + 10), "larger than"),  # params.MAX_PARAMS_BYTES
}


@pytest.mark.parametrize("name", FILES)
def test_bad_params_files_exit_2_at_once(name, tmp_path, capsys, no_kernel):
    content, key = FILES[name]
    path = tmp_path / "p.yaml"
    path.write_bytes(content)
    t0 = time.perf_counter()
    code, _, err = _main(capsys, "--dry-run", "-f", str(path), "--outputs", str(tmp_path / "o"))
    _one_error_line(code, err, key)
    assert time.perf_counter() - t0 < 5  # a billion laughs took 20 s and died of MemoryError


@pytest.mark.parametrize("value", ["stepsize=1e23", "stepsize=100000000000000000000000",
                                   "train_iters=0x10", "train_iters=1_000", "print_every=1e3",
                                   "cell_timeout=1e9", "start_timeout=99999999",
                                   "min_test_accuracy=yes", "base_lr=-1e400"])
def test_out_of_range_and_yaml_1_1_values_exit_2(value, tmp_path, capsys, no_kernel):
    code, _, err = _main(capsys, "--dry-run", "-p", value, "--outputs", str(tmp_path))
    _one_error_line(code, err, value.split("=")[0])


def test_every_number_has_both_bounds():
    for p in params.schema().values():
        if p.type in (int, float):
            assert (p.ge, p.gt) != (None, None) and (p.le, p.lt) != (None, None), p.name


def test_plain_yaml_still_reads():
    assert params.strict_yaml("a: 5\nb: -3\nc: 1.5e-3\nd: true\ne: no\nf: '0x10'\n") == {
        "a": 5, "b": -3, "c": 1.5e-3, "d": True, "e": "no", "f": "0x10"}


# --- case 10: --outputs that cannot hold runs -----------------------------------------------------

@pytest.mark.parametrize("dry", [True, False], ids=["dry-run", "run"])
@pytest.mark.parametrize("where", ["a file", "under a file"])
def test_outputs_naming_a_file_exits_2(where, dry, tmp_path, capsys, no_kernel):
    afile = tmp_path / "afile"
    afile.write_text("x")
    outputs = afile if where == "a file" else afile / "runs"
    code, out, err = _main(capsys, *(["--dry-run"] if dry else []), "--only", "download",
                           "--outputs", str(outputs))
    _one_error_line(code, err, str(outputs))
    assert out == "" and afile.read_text() == "x"


@pytest.mark.parametrize("dry", [True, False], ids=["dry-run", "run"])
def test_outputs_in_a_read_only_folder_exits_2(dry, tmp_path, capsys, monkeypatch, no_kernel):
    """Root ignores permission bits, so the check is a write probe (mkstemp); here the probe
    meets EROFS as on a read-only volume."""
    import tempfile

    def read_only(*args, dir=None, **kwargs):
        raise OSError(30, "Read-only file system")
    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    code, out, err = _main(capsys, *(["--dry-run"] if dry else []), "--only", "download",
                           "--outputs", str(tmp_path / "runs"))
    _one_error_line(code, err, "Read-only file system")
    assert out == "" and list(tmp_path.iterdir()) == []


def test_outputs_on_a_read_only_mount_exits_2(tmpfs, capsys, no_kernel):
    """The same on a real read-only tmpfs (needs root and mount; skipped elsewhere)."""
    ro = tmpfs("ro,size=1m", "ro")
    code, out, err = _main(capsys, "--dry-run", "--outputs", str(ro / "runs"))
    _one_error_line(code, err, "Read-only file system")


# --- case 5: poisoned history --------------------------------------------------------------------

POISON = ["42", '["a"]', '"text"', "null", '{"run_id": 7}', '{"run_id": "p1", "seconds": "slow"}',
          '{"run_id": "p2", "started": 20250101}', '{"run_id": "p3", "metrics": "high"}',
          '{"run_id": "p4", "params_files": 5}', '{"run_id": "p5", "overrides": [1, 2]}',
          '{"run_id": "p6", "steps": ["download"]}',
          '{"run_id": "p7", "steps": [{"seconds": "x"}]}',
          '{"run_id": "p8", "params": [1]}', "[" * 100000 + "]" * 100000, "\xff\xfe garbage",
          '{"run_id": "cut", "status": "succ']


@pytest.mark.parametrize("line", POISON, ids=[p[:30] for p in POISON])
def test_a_poisoned_history_line_is_skipped_and_the_run_succeeds(line, tmp_path, capsys,
                                                                 fake_papermill):
    out = tmp_path / "out"
    out.mkdir()
    good = json.dumps({"run_id": "old", "status": "succeeded", "steps": []})
    (out / "runs.jsonl").write_text(good + "\n" + line + "\n", errors="surrogateescape")
    code, stdout, err = _main(capsys, "--only", "download", "--run-id", "r1", "--outputs",
                              str(out))
    assert code == 0, err
    assert "run r1 succeeded" in stdout and "warning: skipping line 2" in err
    assert [r["run_id"] for r in history.read_runs(out)] == ["old", "r1"]
    assert "r1/01_download.html" in (out / "index.html").read_text()


def test_a_cut_off_last_line_does_not_swallow_the_next_record(tmp_path, capsys, fake_papermill):
    out = tmp_path / "out"
    out.mkdir()
    (out / "runs.jsonl").write_text('{"run_id": "cut", "status": "succ')  # no newline: killed
    code, *_ = _main(capsys, "--only", "download", "--run-id", "r1", "--outputs", str(out))
    assert code == 0
    assert (out / "runs.jsonl").read_text().splitlines()[1].startswith('{"run_id": "r1"')
    assert [r["run_id"] for r in history.read_runs(out)] == ["r1"]


def test_a_history_that_cannot_be_written_does_not_fail_the_run(tmp_path, capsys, monkeypatch,
                                                                fake_papermill):
    out = tmp_path / "out"
    (out / "runs.jsonl").mkdir(parents=True)  # anything: the append fails
    code, stdout, err = _main(capsys, "--only", "download", "--run-id", "r1", "--outputs",
                              str(out))
    assert code == 0 and "run r1 succeeded" in stdout
    assert "warning: could not update the history" in err
    assert json.loads((out / "r1/run.json").read_text())["status"] == "succeeded"


# --- case 11: credentials and tokens in URLs -----------------------------------------------------

@pytest.mark.parametrize("url", ["http://user:password@host/mnist.zip", "https://user@host/x",
                                 "ftp://:pw@host/x"])
@pytest.mark.parametrize("how", ["-p", "-y"])
def test_credentials_in_a_url_exit_2_before_any_kernel(url, how, tmp_path, capsys, no_kernel):
    value = f"data_url={url}" if how == "-p" else f"data_url: {url}"
    code, out, err = _main(capsys, "--dry-run", how, value, "--outputs", str(tmp_path))
    _one_error_line(code, err, "netrc")
    assert url not in err and "@host" not in err  # the message does not repeat the secret
    assert out == ""


def test_url_tokens_are_redacted_in_everything_the_pipeline_writes(tmp_path, capsys,
                                                                  fake_papermill):
    out = tmp_path / "out"
    url = "https://mirror.example/mnist.zip?X-Amz-Signature=s3cr3t&token=t0ken"
    code, stdout, err = _main(capsys, "--only", "download", "--run-id", "r1", "-p",
                              f"data_url={url}", "--outputs", str(out))
    assert code == 0, err
    assert fake_papermill[0]["parameters"]["data_url"] == url  # the notebook gets the real one
    written = [(out / "r1/run.json").read_text(), (out / "runs.jsonl").read_text(),
               (out / "index.html").read_text(), stdout, err]
    assert all("s3cr3t" not in w and "t0ken" not in w for w in written)
    run = json.loads(written[0])
    assert run["params"]["data_url"] == \
        "https://mirror.example/mnist.zip?X-Amz-Signature=REDACTED&token=REDACTED"
    code, stdout, _ = _main(capsys, "--dry-run", "-p", f"data_url={url}", "--outputs", str(out))
    assert code == 0 and "s3cr3t" not in stdout


def test_the_console_redacts_printed_urls(capsys):
    console = execute.CellOutput(__import__("sys").stdout)
    console.write("fetching https://h/x?sig=abc\n")
    assert capsys.readouterr().out == "[-] fetching https://h/x?sig=REDACTED\n"


# --- case 7: resuming with changed parameters ----------------------------------------------------

def test_resuming_refuses_a_changed_parameter_of_a_kept_step(tmp_path, capsys, fake_papermill):
    out = tmp_path / "out"
    code, *_ = _main(capsys, "--only", "download,build,train", "--run-id", "R", "--outputs",
                     str(out))
    assert code == 0
    code, _, err = _main(capsys, "--from", "train", "--run-id", "R", "-p",
                         "train_batch_size=128", "--outputs", str(out))
    _one_error_line(code, err, "'train_batch_size'")
    assert "step build" in err and "--from build" in err
    assert json.loads((out / "R/run.json").read_text())["params"]["train_batch_size"] == 64
    code, *_ = _main(capsys, "--from", "build", "--run-id", "R", "-p", "train_batch_size=128",
                     "--outputs", str(out))
    assert code == 0  # re-running the step that used it is fine, and run.json says so
    assert json.loads((out / "R/run.json").read_text())["params"]["train_batch_size"] == 128
    code, *_ = _main(capsys, "--from", "train", "--run-id", "R", "-p", "train_iters=3",
                     "--outputs", str(out))
    assert code == 0  # a parameter of a step that re-runs may change


def test_resuming_a_redacted_url_asks_for_it_again(tmp_path, capsys, fake_papermill):
    out = tmp_path / "out"
    url = "https://mirror.example/mnist.zip?sig=s3cr3t"
    code, *_ = _main(capsys, "--only", "download", "--run-id", "R", "-p", f"data_url={url}",
                     "--outputs", str(out))
    assert code == 0
    code, _, err = _main(capsys, "--from", "download", "--run-id", "R", "--outputs", str(out))
    _one_error_line(code, err, "pass -p data_url")
    code, *_ = _main(capsys, "--from", "download", "--run-id", "R", "-p", f"data_url={url}",
                     "--outputs", str(out))
    assert code == 0
    code, *_ = _main(capsys, "--from", "build", "--run-id", "R", "--outputs", str(out))
    assert code == 0  # build does not use it


# --- case 13: batch sizes within the Job's memory -------------------------------------------------

@pytest.mark.parametrize("value,ok", [("train_batch_size=60000", False),
                                      ("train_batch_size=20001", False),
                                      ("test_batch_size=10001", False),
                                      ("train_batch_size=20000", True),
                                      ("test_batch_size=10000", True)])
def test_batch_sizes_fit_the_memory_limit(value, ok, tmp_path, capsys, no_kernel):
    """bench/train_memory.py measures the bounds (see RULES); 60,000 was OOMKilled at 8 GiB."""
    code, _, err = _main(capsys, "--dry-run", "-p", value, "--outputs", str(tmp_path))
    if ok:
        assert code == 0, err
    else:
        _one_error_line(code, err, value.split("=")[0])


# --- case 6: a full disk under the outputs -------------------------------------------------------

@pytest.fixture
def tiny_volume(tmpfs):
    """A 256 KiB tmpfs (root and mount needed; skipped elsewhere)."""
    return tmpfs("size=256k", "tiny")


@pytest.fixture
def big_notebook_papermill(monkeypatch):
    """papermill's own notebook save (its I/O layer), of a 1 MiB notebook: fills the volume."""
    import nbformat
    import papermill
    from papermill.iorw import papermill_io

    from pipeline import kernelfork
    monkeypatch.setattr(kernelfork, "warm", lambda spec: None)

    def execute_notebook(input_path, output_path, **kwargs):
        nb = nbformat.read(input_path, as_version=4)
        nb.cells[0].source += "x" * (1 << 20)
        papermill_io.write(nbformat.writes(nb), output_path)
    monkeypatch.setattr(papermill, "execute_notebook", execute_notebook)


def test_a_full_disk_exits_1_leaving_complete_files(tiny_volume, capsys, big_notebook_papermill):
    out = tiny_volume / "out"
    code, _, err = _main(capsys, "--only", "download", "--run-id", "r1", "--outputs", str(out))
    assert code == 1, err
    notebook = out / "r1" / params.notebook_path("download").name
    assert f"no space left on {notebook}" in err and "Traceback" not in err
    assert not notebook.exists()  # complete or absent: no half-written JSON
    assert [p.name for p in tiny_volume.rglob("*tmp*")] == []  # no temporary files left
    run = json.loads((out / "r1/run.json").read_text())
    assert run["status"] == "failed" and "no space left on" in run["steps"][0]["error"]
    for line in (out / "runs.jsonl").read_text().splitlines() if (out / "runs.jsonl").exists() \
            else []:
        json.loads(line)  # whole lines only


def test_run_json_says_failed_on_a_disk_too_full_for_a_temporary_copy(tmp_path, monkeypatch):
    """The final run.json, when even its temporary copy finds no space, is rewritten in place."""
    import errno
    run = execute.Run(tmp_path, "r1", {}, {}, "cpu")
    run.run_dir.mkdir()
    run.write_run_json()

    def full(path, text):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))
    monkeypatch.setattr(history, "write_atomic", full)
    run.run["status"] = "failed"
    run.write_run_json()
    assert json.loads((tmp_path / "r1/run.json").read_text())["status"] == "failed"
    assert run.unsaved is None


def test_a_full_disk_leaves_no_half_history_line(tmp_path, monkeypatch):
    import builtins
    import errno
    (tmp_path / "runs.jsonl").write_text('{"run_id": "old"}\n')
    real_open = builtins.open

    class Full:
        def __init__(self, f):
            self.f = f

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            self.f.write(data[:10])  # a short write, as on a full disk
            return 10
    monkeypatch.setattr(builtins, "open", lambda p, *a, **k: Full(real_open(p, *a, **k))
                        if str(p).endswith("runs.jsonl") and "a" in (a[0] if a else "") else
                        real_open(p, *a, **k))
    run = {"run_id": "r1", "steps": []}
    with pytest.raises(OSError) as raised:
        history.record(tmp_path, run, [])
    assert raised.value.errno == errno.ENOSPC and raised.value.filename.endswith("runs.jsonl")
    monkeypatch.undo()
    assert (tmp_path / "runs.jsonl").read_text() == '{"run_id": "old"}\n'


# --- case 3 (in process; tests/test_pipeline_signals.py sends it to real runs) ------------------

def test_sigterm_during_a_step_exits_143_and_runs_no_further_step(tmp_path, capsys, monkeypatch):
    import signal

    import nbformat
    import papermill

    from pipeline import kernelfork
    monkeypatch.setattr(kernelfork, "warm", lambda spec: None)

    def execute_notebook(input_path, output_path, **kwargs):
        nbformat.write(nbformat.read(input_path, as_version=4), output_path)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises here
        raise AssertionError("SIGTERM did not stop the step")
    monkeypatch.setattr(papermill, "execute_notebook", execute_notebook)
    before = signal.getsignal(signal.SIGTERM)
    code, _, err = _main(capsys, "--only", "download,build", "--run-id", "r", "--outputs",
                         str(tmp_path))
    assert code == 143 and "step download interrupted (SIGTERM)" in err
    run = json.loads((tmp_path / "r/run.json").read_text())
    assert run["status"] == "interrupted"
    assert [s["status"] for s in run["steps"]] == ["interrupted", "not_run"]
    assert signal.getsignal(signal.SIGTERM) == before  # restored


@pytest.mark.parametrize("name", ["billion laughs", "not UTF-8", "5000 deep", "duplicate key",
                                  "too big"])
def test_a_bad_params_document_is_refused_before_papermill_is_imported(name, tmp_path):
    """papermill's import alone takes over a second: documents are read before it."""
    import subprocess
    import sys
    path = tmp_path / "p.yaml"
    path.write_bytes(FILES[name][0])
    code = ("import sys; from pipeline import cli; code = cli.main(['-f', sys.argv[1]]); "
            "assert 'papermill' not in sys.modules; sys.exit(code)")
    result = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True,
                            text=True, cwd=Path(__file__).resolve().parents[1], timeout=60,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and FILES[name][1] in result.stderr
