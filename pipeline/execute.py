"""The ordered steps: each notebook executed by papermill into ``<outputs>/<run-id>/``.

A run folder holds the executed notebooks and their HTML, ``run.json`` (``status`` is
``running`` while a batch run executes: the notebooks use it to tell a batch run from
exploration) and ``workspace/``, where the steps write; ``workspace/metrics_<step>.json`` are the
numbers a step reports (merged into run.json's ``metrics``).
"""
import concurrent.futures
import datetime
import errno
import importlib.metadata
import json
import os
import platform
import re
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pipeline import history, params
from pipeline.params import STEPS, UsageError, notebook_path

RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
# Names the history uses in <outputs>/, and the notebooks' own run_dir (outputs/jupyter) and
# exploration folder; compared without case (case-insensitive volumes: macOS, Windows shares)
RESERVED = {"latest", "index.html", "runs.jsonl", "jupyter", "explore"}
# Kernels talk over TCP on 127.0.0.1: CurveZMQ-encrypted where the kernel supports it
KERNEL_CONFIG = {"KernelManager": {"transport_encryption": "auto"}}
CONSOLE_LINES = 40  # per cell; the rest (e.g. the protobuf printouts) stays in the notebook


def check_run_id(run_id):
    """A run id given by the user, or a UsageError (the one place run ids are checked)."""
    if not RUN_ID.fullmatch(run_id) or run_id.lower() in RESERVED:
        raise UsageError(f"--run-id {run_id!r}: use letters, digits, '.', '_' and '-' (up to 100, "
                         f"starting with a letter or digit; not {', '.join(sorted(RESERVED))})")
    return run_id


def check_outputs(outputs):
    """``outputs`` when it is (or can be made) a writable folder, else a UsageError.

    Writability is probed by creating and removing a file: permission bits alone say nothing to
    root, read-only mounts and ACLs; the probe is the only write a dry run makes.
    """
    outputs = Path(outputs)
    existing = next(p for p in (outputs, *outputs.parents) if p.exists() or p == p.parent)
    if not existing.is_dir():
        what = "is a file" if existing == outputs else f"is under {existing}, a file"
        raise UsageError(f"--outputs {outputs} {what}; name a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-probe-", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UsageError(f"--outputs {outputs}: cannot write in {existing} "
                         f"({e.strerror or e}); name a writable folder") from None
    return outputs


def new_run_id():
    """UTC time plus a short random suffix, e.g. 20250101T120000Z-3fa9."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return f"{stamp}-{secrets.token_hex(2)}"


def utc_now():
    """The current UTC time in ISO 8601, to the second."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def read_json(path):
    """A JSON object from a file, or None when it is missing or unreadable."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


# --- checks before any kernel --------------------------------------------------------------------

def probe_cuda():
    """Ask torch in a child process whether it sees a GPU (the pipeline never imports torch)."""
    code = "import torch; print(torch.cuda.is_available())"
    return subprocess.Popen([sys.executable, "-c", code],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def cpu_only_torch():
    """True when the installed torch is a CPU-only build (version "+cpu"): no GPU to look for."""
    try:
        return importlib.metadata.version("torch").endswith("+cpu")
    except importlib.metadata.PackageNotFoundError:
        return False


def resolve_device(device, probe):
    """The device the steps will use (``probe``: a probe_cuda() process or None)."""
    if device == "cpu":
        return "cpu"
    if probe is not None:
        out, err = probe.communicate(timeout=600)
        if probe.returncode != 0:
            last = (err.strip().splitlines() or ["no message"])[-1]
            raise UsageError(f"cannot import torch to look for a GPU ({last}); check the venv")
        if out.strip() == "True":
            return "cuda"
    if device == "cuda":
        why = "this torch is a CPU-only build" if probe is None else \
            "torch.cuda.is_available() is False"
        raise UsageError(f"parameter 'device' is cuda but PyTorch sees no GPU ({why}); "
                         "use device=cpu or device=auto")
    return "cpu"


def kernel_spec(step):
    """The kernelspec the step's notebook names (papermill starts its kernel from it)."""
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel
    path = notebook_path(step)
    name = (((read_json(path) or {}).get("metadata") or {}).get("kernelspec") or {}).get("name")
    if not name:
        raise UsageError(f"notebook {path} names no kernel (metadata.kernelspec.name)")
    try:
        return name, KernelSpecManager().get_kernel_spec(name)
    except NoSuchKernel:
        raise UsageError(f"Jupyter kernel {name!r} (named by {path.name}) is not installed, or "
                         "the kernel provisioner it names is not (the caffe2torch-fork entry "
                         "point): run `make kernel` (pip install -e . and python -m "
                         "pipeline.kernelspec)") from None


def select_steps(from_step=None, only=None):
    """The steps to run, in order."""
    if from_step:
        return list(STEPS[STEPS.index(from_step):])
    if only:
        names = [s.strip() for s in only.split(",") if s.strip()]
        unknown = [s for s in names if s not in STEPS] or ([""] if not names else [])
        if unknown:
            raise UsageError(f"--only {only!r}: unknown step {unknown[0]!r}; steps are "
                             f"{', '.join(STEPS)}")
        return [s for s in STEPS if s in names]
    return list(STEPS)


def check_order(steps, previous, run_id):
    """Every earlier step has succeeded in this run or runs now."""
    done = {s.get("name") for s in (previous or {}).get("steps", [])
            if s.get("status") == "succeeded"}
    for step in steps:
        missing = [s for s in STEPS[:STEPS.index(step)] if s not in steps and s not in done]
        if missing:
            raise UsageError(f"cannot run step {step}: step {missing[0]} has not succeeded in run "
                             f"{run_id} (resume an earlier run with --run-id ID --from STEP)")


def check_resumed(steps, previous, values):
    """A resumed run changes no parameter of a step it keeps (run.json then tells what every kept
    step used) and re-runs no step with a value run.json keeps redacted."""
    if not previous:
        return
    old = previous.get("params") if isinstance(previous.get("params"), dict) else {}
    kept = [s.get("name") for s in previous.get("steps", []) if isinstance(s, dict)
            and s.get("status") == "succeeded" and s.get("name") not in steps]
    for name, spec in params.schema().items():
        used = [s for s in spec.steps if s in kept]
        if used and name in old and old[name] != params.redact(values[name]):
            raise UsageError(f"parameter {name!r} changed ({old[name]!r} -> {values[name]!r}) but "
                             f"step {used[0]}, which used it, does not re-run: add --from "
                             f"{used[0]} or leave {name} as it was")
        rerun = [s for s in spec.steps if s in steps]
        if rerun and isinstance(values[name], str) and params.REDACTED in values[name] \
                and old.get(name) == values[name]:
            raise UsageError(f"parameter {name!r} is kept redacted in run.json and step "
                             f"{rerun[0]} re-runs: pass -p {name}=... again")


# --- the console ---------------------------------------------------------------------------------

class CellOutput:
    """papermill's ``stdout_file``/``stderr_file``: each line of a cell's output as ``[step] line``.

    After CONSOLE_LINES lines of one cell the rest is counted, not shown (``new_cell`` says how
    many lines stayed in the notebook).
    """

    def __init__(self, stream, enabled=True):
        self.stream, self.enabled = stream, enabled
        self.step, self.shown, self.hidden, self.at_start = "-", 0, 0, True

    def write(self, text):
        """Show ``text`` (part of a cell's stream output), line by line."""
        if not self.enabled:
            return
        for line in text.splitlines(keepends=True):
            if self.at_start and self.shown >= CONSOLE_LINES:
                self.hidden += 1
                continue
            if self.at_start:
                self.stream.write(f"[{self.step}] ")
                self.shown += 1
            self.stream.write(params.redact(line))  # a printed signed URL keeps its token out
            self.at_start = line.endswith("\n")

    def flush(self):
        """Flush the console."""
        self.stream.flush()

    def new_cell(self, notebook=None):
        """Start counting a new cell's lines; report what the last one kept in the notebook."""
        if not self.at_start:
            self.write("\n")
        if self.hidden and self.enabled:
            self.stream.write(f"[{self.step}] ... {self.hidden} more lines in "
                              f"{notebook or 'the notebook'}\n")
        self.shown = self.hidden = 0


# --- HTML ----------------------------------------------------------------------------------------

# The lab template minus its scripts from CDNs (require.js, MathJax, mermaid): the pages are
# static (outputs are HTML, text and embedded images) and must render the same offline.
OFFLINE_TEMPLATE = """{%- extends 'index.html.j2' -%}
{%- block html_head_js -%}{%- endblock html_head_js -%}
{%- block html_head_js_mathjax -%}{%- endblock html_head_js_mathjax -%}
{%- block html_head_js_mermaidjs -%}{%- endblock html_head_js_mermaidjs -%}
"""


_ATOMIC_HANDLER = []  # registered once per process


def atomic_notebook_writes():
    """papermill writes the notebooks under absolute paths through a temporary file (its own
    LocalHandler truncates the notebook in place: a full disk left invalid JSON), with URLs'
    tokens redacted (the kernel got the real parameters; the file and its HTML do not keep them)."""
    if _ATOMIC_HANDLER:
        return
    from papermill.iorw import LocalHandler, papermill_io

    class AtomicLocalHandler(LocalHandler):
        def write(self, buf, path):
            """The notebook through a temporary file beside it."""
            history.write_atomic(Path(path), params.redact(buf))
    _ATOMIC_HANDLER.append(AtomicLocalHandler())
    # papermill picks the first registered prefix a path starts with; the run folder is absolute
    papermill_io.register("/", _ATOMIC_HANDLER[0])


def no_space(e):
    """"no space left on <path>" for a full disk's OSError, else None."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"no space left on {e.filename or 'the outputs volume'}"
    return None


def _import_renderers():
    import matplotlib.figure  # noqa: F401  (index.html's chart)
    import nbconvert  # noqa: F401


def render_html(notebook, html_path):
    """A self-contained HTML page of an executed notebook: images embedded, no remote scripts."""
    import jinja2
    import nbformat
    from nbconvert import HTMLExporter
    loader = jinja2.DictLoader({"offline.html.j2": OFFLINE_TEMPLATE})
    exporter = HTMLExporter(template_name="lab", template_file="offline.html.j2",
                            extra_loaders=[loader])
    body, _ = exporter.from_notebook_node(nbformat.read(str(notebook), as_version=4))
    history.write_atomic(html_path, body)


# --- the run -----------------------------------------------------------------------------------

def versions():
    """Versions of Python and of the installed torch, caffe2torch and papermill."""
    found = {"python": platform.python_version()}
    for name in ("torch", "caffe2torch", "papermill"):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def git_commit():
    """The repository's HEAD commit (with "-dirty" when tracked files changed), or None."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=params.REPO_ROOT,
                              capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=params.REPO_ROOT, capture_output=True, text=True,
                               timeout=10).stdout
        return head + ("-dirty" if dirty.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def collect_metrics(workspace):
    """The numbers in the steps' ``metrics_<step>.json`` files, merged."""
    metrics = {}
    for step in STEPS:
        for key, value in (read_json(workspace / f"metrics_{step}.json") or {}).items():
            if isinstance(value, (int, float, bool)):
                metrics[key] = value
    return metrics


class Terminated(KeyboardInterrupt):
    """SIGTERM (Kubernetes stopping the Job), raised like SIGINT's KeyboardInterrupt: papermill
    and nbclient then stop the kernel as they do for Ctrl-C."""


class Run:
    """One batch run: ``plan`` maps each step to run to its notebook's parameters."""

    def __init__(self, outputs, run_id, values, plan, device, previous=None, params_files=(),
                 overrides=(), quiet=False, launches=None):
        self.outputs, self.run_id, self.run_dir = Path(outputs), run_id, Path(outputs) / run_id
        self.values, self.plan, self.quiet = values, plan, quiet
        self.console, self.errors = CellOutput(sys.stdout, not quiet), CellOutput(sys.stderr,
                                                                                 not quiet)
        self.launches = launches  # callable: how the last kernel was started, or None
        self.terminated = self.in_step = False
        self.unsaved = None  # why run.json could not be written, if it could not
        self.records = {s["name"]: s for s in (previous or {}).get("steps", []) if "name" in s}
        self.run = {"run_id": run_id, "status": "running",  # URLs' tokens redacted: a test
                    "params": {k: params.redact(v) for k, v in values.items()},
                    "params_files": [str(p) for p in params_files],
                    "overrides": [params.redact(o) for o in overrides],
                    "device": device, "versions": versions(), "git_commit": git_commit(),
                    "started": utc_now(), "finished": None, "seconds": None, "metrics": {}}

    def steps(self):
        """The step records in pipeline order."""
        return [self.records[s] for s in STEPS if s in self.records]

    def write_run_json(self):
        """run.json (written through a temporary file); a failure is kept for the exit code."""
        path, record = self.run_dir / "run.json", {**self.run, "steps": self.steps()}
        try:
            history.write_atomic(path, json.dumps(record, indent=2) + "\n")
        except OSError as e:
            if no_space(e) and self._overwrite_in_place(path, record):
                return
            self.unsaved = no_space(e) or f"cannot write {e.filename}: {e.strerror}"
            print(f"run_all.py: warning: {self.unsaved}", file=sys.stderr)

    @staticmethod
    def _overwrite_in_place(path, record):
        """On a full disk: run.json, compact, in the blocks it already has (a temporary copy
        needs space there is not), so that it says "failed" rather than "running"."""
        text = (json.dumps(record, separators=(",", ":")) + "\n").encode()
        try:
            with open(path, "r+b") as f:
                if len(text) > os.fstat(f.fileno()).st_size:
                    return False
                f.write(text)
                f.truncate()
            return True
        except OSError:
            return False

    def say(self, text):
        """A line of the pipeline's own (not a cell's) on the console."""
        if not self.quiet:
            print(text, flush=True)

    def on_sigterm(self, signum, frame):
        """SIGTERM: stop the running step now (once), or run no further step."""
        self.terminated = True
        if self.in_step:
            self.in_step = False  # a second SIGTERM must not break the kernel's shutdown
            raise Terminated()

    def execute(self):
        """Run the planned steps; the exit code (0, 1 a step failed, 130 SIGINT, 143 SIGTERM).

        As PID 1 of a container an unhandled SIGTERM is ignored until SIGKILL: handle it here.
        """
        import threading
        if threading.current_thread() is not threading.main_thread():
            return self._execute()
        before = signal.signal(signal.SIGTERM, self.on_sigterm)
        try:
            return self._execute()
        finally:
            signal.signal(signal.SIGTERM, before)

    def _execute(self):
        workspace = self.run_dir / "workspace"
        workspace.mkdir(parents=True, exist_ok=True)
        started, code, failure = time.perf_counter(), 0, None
        renderer, pages = concurrent.futures.ThreadPoolExecutor(max_workers=1), []
        renderer.submit(_import_renderers)  # while the first kernel boots
        self.say(f"run {self.run_id}: {self.run_dir} (device {self.run['device']})")
        for step, values in self.plan.items():
            if self.terminated and failure is None:  # between steps
                code, failure = 143, f"terminated (SIGTERM) before step {step}"
            if failure is not None:
                self.records[step] = {"name": step, "status": "not_run", "seconds": None,
                                      "notebook": None, "html": None}
                continue
            (workspace / f"metrics_{step}.json").unlink(missing_ok=True)  # no stale metrics
            code, failure, notebook = self.execute_step(step, values)
            if notebook.exists():  # rendered while the next step runs
                html = notebook.with_suffix(".html")
                pages.append((self.records[step], renderer.submit(render_html, notebook, html)))
        for record, page in pages:
            try:
                page.result()
            except Exception as e:  # a rendering problem must not hide the step's result
                print(f"run_all.py: could not render {record['html']}: {no_space(e) or e}",
                      file=sys.stderr)
                record["html"] = None
                if no_space(e) and failure is None:  # a full disk fails the run, not a page
                    code, failure = 1, no_space(e)
        renderer.shutdown()
        status = "interrupted" if code in (130, 143) else "failed" if failure else "succeeded"
        self.run.update(status=status, finished=utc_now(),
                        seconds=round(time.perf_counter() - started, 2),
                        metrics=collect_metrics(workspace))
        self.write_run_json()
        if self.unsaved and not failure:  # the steps ran, but their record is lost
            code, failure = 1, f"{self.unsaved}; the run's record {self.run_dir / 'run.json'} " \
                "is incomplete"
        key = [name for name, p in params.schema().items() if p.key]
        try:  # the run's result is run.json's and the exit code's; the history only shows it
            history.record(self.outputs, {**self.run, "steps": self.steps()}, key)
        except Exception as e:
            print(f"run_all.py: warning: could not update the history in {self.outputs}: "
                  f"{type(e).__name__}: {' '.join(str(e).split())}", file=sys.stderr)
        acc = self.run["metrics"].get("test_accuracy")
        print(f"run_all.py: {failure}" if failure else
              f"run {self.run_id} succeeded in {self.run['seconds']:.1f} s"
              + (f"; test accuracy {acc:.4f}" if isinstance(acc, (int, float)) else "")
              + f"; see {self.run_dir / 'run.json'}", file=sys.stderr if failure else sys.stdout,
              flush=True)
        return code

    def execute_step(self, step, values):
        """Execute one notebook with papermill: (exit code, failure message or None, notebook)."""
        import papermill
        from traitlets.config import Config
        atomic_notebook_writes()
        counter = f"[{STEPS.index(step) + 1}/{len(STEPS)}] {step}"
        notebook = self.run_dir / notebook_path(step).name
        record = self.records[step] = {"name": step, "status": "running", "seconds": None,
                                       "notebook": notebook.name,
                                       "html": notebook.with_suffix(".html").name}
        self.write_run_json()
        self.say(f"{counter} ... notebooks/{notebook.name}")
        self.console.step = self.errors.step = step
        code, failure, t0 = 0, None, time.perf_counter()
        self.in_step = True
        try:
            papermill.execute_notebook(
                str(notebook_path(step)), str(notebook), cwd=str(self.run_dir),
                parameters={**values, "run_dir": str(self.run_dir)}, progress_bar=False,
                stdout_file=self.console, stderr_file=self.errors,
                request_save_on_cell_execute=True, execution_timeout=self.values["cell_timeout"],
                start_timeout=self.values["start_timeout"], config=Config(KERNEL_CONFIG),
                on_cell_execute=lambda **_: self.new_cell(notebook))
            record["status"] = "succeeded"
        except papermill.PapermillExecutionError as e:
            full = "[Errno 28]" in str(e.evalue)  # a cell's OSError: ENOSPC, with its path
            error = params.redact(("no space left: " if full else "") + f"{e.ename}: {e.evalue}")
            record.update(status="failed", cell=e.exec_count, error=error)
            code, failure = 1, (f"step {step} failed at cell {e.exec_count}: {error}\n"
                                f"failed notebook saved: {notebook}")
        except KeyboardInterrupt as e:
            how = "SIGTERM" if isinstance(e, Terminated) else "SIGINT"
            record.update(status="interrupted", error=f"interrupted ({how})")
            code = 143 if isinstance(e, Terminated) else 130
            failure = f"step {step} interrupted ({how}); partial notebook: {notebook}"
        except Exception as e:  # kernel start timeout, dead kernel, unreadable notebook
            message = params.redact(no_space(e)
                                    or f"{type(e).__name__}: {' '.join(str(e).split())}")
            record.update(status="failed", error=message)
            code, failure = 1, f"step {step} failed: {message}\nnotebook (as far as it ran): " \
                f"{notebook}"
        self.in_step = False
        self.new_cell(notebook)
        if self.launches is not None:
            record["kernel"] = self.launches() or "new process"
        record["seconds"] = round(time.perf_counter() - t0, 2)
        if not notebook.exists():
            record["notebook"] = record["html"] = None
        outcome = "" if record["status"] == "succeeded" else f" {record['status']} after"
        self.say(f"{counter} ...{outcome} {record['seconds']:.1f} s")
        return code, failure, notebook

    def new_cell(self, notebook):
        """A cell starts (or the notebook ends): reset the console's line budgets."""
        self.console.new_cell(notebook)
        self.errors.new_cell(notebook)
