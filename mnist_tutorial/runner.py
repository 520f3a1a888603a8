"""run_all.py's engine: parameters, the papermill loop over the steps, run.json and the history.

A run lives in ``<outputs>/<run-id>/``: the executed notebooks and their HTML, ``run.json`` and
``workspace/`` (what the steps write). ``<outputs>/runs.jsonl`` gets one line per run,
``<outputs>/latest`` points at the last run and ``<outputs>/index.html`` shows the history.

Exit codes: 0 success; 1 a step failed (or the test accuracy is below ``min_test_accuracy``);
2 bad usage or parameters, or the run folder is locked by another run; 130 interrupted.
Everything that can be checked without a kernel is checked before the first kernel starts.
"""
import argparse
import base64
import concurrent.futures
import contextlib
import datetime
import fcntl
import html
import io
import json
import logging
import os
import platform
import re
import secrets
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = REPO_ROOT / "notebooks"
KERNEL_NAME = "caffe2torch"
STEPS = ("download", "build", "train", "test", "export")
NOTEBOOKS = {step: f"{i:02d}_{step}.ipynb" for i, step in enumerate(STEPS, 1)}
METRICS_FILES = {"train": "metrics_train.json", "test": "metrics_test.json",
                 "export": "metrics_export.json"}
INJECTED = ("run_dir",)  # parameters the runner sets itself; notebooks declare them
RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
SECRET_WORDS = {"key", "keys", "apikey", "token", "tokens", "password", "passwd", "pwd", "secret",
                "secrets", "credential", "credentials", "auth", "private", "privatekey"}
SECRET_PARTS = ("passw", "secret", "token", "credential", "apikey", "api_key", "privatekey")


class UsageError(Exception):
    """Bad usage or parameters: run_all.py prints the one-line message and exits with 2."""


@dataclass(frozen=True)
class Param:
    """One pipeline parameter: its type, default, allowed values and help."""

    type: type
    default: object
    help: str
    choices: tuple = None
    ge: float = None  # inclusive lower bound
    gt: float = None  # exclusive lower bound
    lt: float = None  # exclusive upper bound
    le: float = None  # inclusive upper bound
    runner_only: bool = False  # used by run_all.py, not passed to any notebook
    may_be_empty: bool = False  # a str whose empty value means "the default"


SCHEMA = {
    "data_dir": Param(str, "data", "folder of the MNIST LMDBs, reused across runs (relative: the "
                      "repository root)"),
    "data_source": Param(str, "auto", "where MNIST comes from; existing = use the LMDBs already in "
                         "data_dir as they are", choices=("auto", "package", "caffe2-zip", "idx",
                                                          "existing")),
    "data_url": Param(str, "", "caffe2-zip: URL or path of the tutorial's mnist-lmdb.zip; idx: base "
                      "URL or folder of the four .gz IDX files; auto: replaces the download "
                      "locations; empty = the defaults", may_be_empty=True),
    "device": Param(str, "auto", "auto = cuda when PyTorch sees a GPU, else cpu",
                    choices=("auto", "cpu", "cuda")),
    "seed": Param(int, 0, "seeds Python, numpy and torch in every step", ge=0, le=2 ** 32 - 1),
    "train_batch_size": Param(int, 64, "images per training iteration", ge=1, le=60000),
    "test_batch_size": Param(int, 100, "images per test batch", ge=1, le=10000),
    "train_iters": Param(int, 200, "training iterations", ge=1, le=10_000_000),
    "test_iters": Param(int, 100, "test batches", ge=1, le=1_000_000),
    "base_lr": Param(float, -0.1, "base learning rate; negative (Caffe2 adds LR * gradient)",
                     ge=-10.0, lt=0.0),
    "lr_policy": Param(str, "step", "LearningRate policy", choices=("fixed", "step", "exp", "inv")),
    "stepsize": Param(int, 1, "step policy: iterations per decay step", ge=1),
    "gamma": Param(float, 0.999, "step/exp/inv policies: decay factor", gt=0.0, le=1.0),
    "power": Param(float, 0.75, "inv policy: LR = base_lr * (1 + gamma * iter) ^ -power", gt=0.0,
                   le=10.0),
    "print_every": Param(int, 25, "print loss and accuracy every N iterations (0: never)", ge=0),
    "min_test_accuracy": Param(float, 0.945, "the test step fails below this mean accuracy",
                               ge=0.0, le=1.0),
    "cell_timeout": Param(int, 3600, "seconds one notebook cell may run", ge=1,
                          runner_only=True),
    "start_timeout": Param(int, 120, "seconds a kernel may take to start", ge=1,
                           runner_only=True),
}


# --- parameters --------------------------------------------------------------------------------

def looks_secret(name):
    """True for names like api_key, token, db_password: papermill writes values into notebooks."""
    lowered = name.lower()
    words = set(re.split(r"[^a-z0-9]+", lowered))
    return bool(words & SECRET_WORDS) or any(part in lowered for part in SECRET_PARTS)


def _describe_range(spec):
    if spec.choices:
        return "one of " + ", ".join(map(str, spec.choices))
    bounds = ((">=", spec.ge), (">", spec.gt), ("<", spec.lt), ("<=", spec.le))
    return " and ".join(f"{op} {bound:,}" if isinstance(bound, int) else f"{op} {bound:g}"
                        for op, bound in bounds if bound is not None)


def check_param(name, value, origin):
    """The value of parameter ``name`` converted to its type, or a UsageError naming it."""
    if looks_secret(name):
        raise UsageError(f"parameter {name!r} ({origin}) looks like a secret; papermill writes "
                         "parameters into the output notebooks: pass secrets through the "
                         "environment instead")
    spec = SCHEMA.get(name)
    if spec is None:
        import difflib
        close = difflib.get_close_matches(name, SCHEMA, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else "; see run_all.py --list"
        raise UsageError(f"unknown parameter {name!r} ({origin}){hint}")
    kind = {int: "an integer", float: "a number", str: "a string"}[spec.type]
    if spec.type is float and isinstance(value, str):
        # YAML 1.1 reads 1e-4 (no dot) as a string; accept any float literal
        with contextlib.suppress(ValueError):
            value = float(value)
    ok = (isinstance(value, str) if spec.type is str else
          isinstance(value, int) and not isinstance(value, bool) if spec.type is int else
          isinstance(value, (int, float)) and not isinstance(value, bool))
    if not ok:
        raise UsageError(f"parameter {name!r} ({origin}) must be {kind}, got {value!r}")
    value = spec.type(value)
    if spec.type is float and value != value:
        raise UsageError(f"parameter {name!r} ({origin}) must be a number, got nan")
    bad = ((spec.choices and value not in spec.choices)
           or (spec.ge is not None and value < spec.ge) or (spec.gt is not None and value <= spec.gt)
           or (spec.lt is not None and value >= spec.lt) or (spec.le is not None and value > spec.le))
    if bad:
        raise UsageError(f"parameter {name!r} ({origin}) must be {_describe_range(spec)}, "
                         f"got {value!r}")
    if spec.type is str and not value and not spec.may_be_empty:
        raise UsageError(f"parameter {name!r} ({origin}) must not be empty")
    return value


def load_params_file(path):
    """The mapping in a YAML params file (no checks on its keys yet)."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise UsageError(f"params file {path} does not exist") from None
    except (OSError, yaml.YAMLError) as e:
        raise UsageError(f"params file {path} is not readable YAML: "
                         f"{' '.join(str(e).split())}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(f"params file {path} must hold a mapping of parameter: value")
    return data


def parse_override(text):
    """``KEY=VALUE`` → (key, value); the value is read as a YAML scalar (strings stay raw)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise UsageError(f"-p {text!r}: expected KEY=VALUE, e.g. -p train_iters=500")
    spec = SCHEMA.get(key)
    if spec is not None and spec.type is str:
        return key, raw
    try:
        value = yaml.safe_load(raw) if raw.strip() else raw
    except yaml.YAMLError:
        value = raw
    if isinstance(value, (dict, list)):
        raise UsageError(f"-p {key}: expected a single value, got {raw!r}")
    return key, value


def resolve_params(files=(), overrides=(), base=None):
    """Defaults ← ``base`` (a resumed run's params) ← each file ← each -p, all checked."""
    params = {name: spec.default for name, spec in SCHEMA.items()}
    layers = [("resumed run.json", base or {})]
    layers += [(f"in {path}", load_params_file(path)) for path in files]
    layers += [("from -p", dict([parse_override(text)])) for text in overrides]
    for origin, layer in layers:
        for name, value in layer.items():
            params[str(name)] = check_param(str(name), value, origin)
    return params


def probe_cuda():
    """Ask PyTorch in a child process whether it sees a GPU; returns the running process.

    The runner itself never imports torch (a second of a run's start): the child answers while
    the runner imports papermill.
    """
    return subprocess.Popen([sys.executable, "-c", "import torch; print(torch.cuda.is_available())"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def cuda_available(probe):
    """The answer of a probe_cuda() process."""
    out, err = probe.communicate(timeout=600)
    if probe.returncode != 0:
        last = (err.strip().splitlines() or ["no message"])[-1]
        raise UsageError(f"cannot import torch to look for a GPU ({last}); check the venv")
    return out.strip() == "True"


def cpu_only_torch():
    """True when the installed torch is a CPU-only build (version "+cpu"): no GPU to look for."""
    import importlib.metadata
    try:
        return importlib.metadata.version("torch").endswith("+cpu")
    except importlib.metadata.PackageNotFoundError:
        return False


def resolve_device(device, probe=None):
    """The device the steps will use; "cuda" without a GPU is a UsageError."""
    if device == "cpu":
        return "cpu"
    if probe is not None and cuda_available(probe):
        return "cuda"
    if device == "cuda":
        why = "this torch is a CPU-only build" if probe is None else \
            "torch.cuda.is_available() is False"
        raise UsageError(f"parameter 'device' is cuda but PyTorch sees no GPU ({why}); "
                         "use device=cpu or device=auto")
    return "cpu"


def _lighter_imports():
    """Skip jsonschema's optional rfc3987_syntax: building its grammars at import costs about a
    second of every run; nbformat's schemas never use the IRI formats it checks."""
    if "jsonschema" not in sys.modules:
        sys.modules.setdefault("rfc3987_syntax", None)


def notebook_parameters(step):
    """The parameters declared in the step's notebook (papermill.inspect_notebook)."""
    import papermill
    path = NOTEBOOK_DIR / NOTEBOOKS[step]
    if not path.exists():
        raise UsageError(f"notebook {path} is missing")
    declared = papermill.inspect_notebook(str(path))
    if not declared:
        raise UsageError(f"notebook {path} has no cell tagged 'parameters'")
    for name in declared:
        if name not in SCHEMA and name not in INJECTED:
            raise UsageError(f"notebook {path.name} declares parameter {name!r}, which "
                             "mnist_tutorial/runner.py's SCHEMA does not know")
    return declared


def check_kernel():
    """The caffe2torch kernelspec must be installed (``make kernel``) before a run starts."""
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel
    try:
        spec = KernelSpecManager().get_kernel_spec(KERNEL_NAME)
    except NoSuchKernel:
        raise UsageError(f"Jupyter kernel {KERNEL_NAME!r} is not installed: run `make kernel` (or "
                         f"python -m ipykernel install --sys-prefix --name {KERNEL_NAME})") from None
    return spec


def step_params(step, params, run_dir, device):
    """What the step's notebook gets: only the parameters it declares, run_dir injected."""
    values = {name: params[name] for name in notebook_parameters(step) if name in SCHEMA}
    if "device" in values:
        values["device"] = device
    values["run_dir"] = str(run_dir)
    return values


# --- the command line --------------------------------------------------------------------------

def parse_args(argv):
    """run_all.py's options (argparse exits 2 on bad usage)."""
    parser = argparse.ArgumentParser(
        prog="run_all.py", description="Run the MNIST notebooks (" + " → ".join(STEPS) +
        ") with papermill into <outputs>/<run-id>/.")
    parser.add_argument("-f", "--params-file", action="append", default=[], metavar="PARAMS.yaml",
                        help="YAML file of parameters (repeatable; later files win)")
    parser.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE",
                        help="override one parameter (repeatable)")
    parser.add_argument("--run-id", help="name of the run folder (default: UTC time + suffix); "
                        "an existing run is resumed in place")
    order = parser.add_mutually_exclusive_group()
    order.add_argument("--from", dest="from_step", metavar="STEP", choices=STEPS,
                       help="run STEP and the steps after it (with --run-id: resume that run)")
    order.add_argument("--only", metavar="STEP[,STEP...]", help="run only these steps")
    parser.add_argument("--outputs", metavar="DIR", help="folder of runs and history (default: "
                        "outputs/ in the repository)")
    parser.add_argument("--list", action="store_true", help="list steps and parameters, then exit")
    parser.add_argument("--dry-run", action="store_true",
                        help="check everything and print the plan, run no kernel")
    parser.add_argument("--fresh-kernels", action="store_true",
                        help="start each kernel as a new Python process instead of forking it "
                        "from a server that has imported torch already (slower, same results)")
    return parser.parse_args(argv)


def select_steps(args):
    """The steps to run, in pipeline order."""
    if args.from_step:
        return list(STEPS[STEPS.index(args.from_step):])
    if args.only:
        names = [s.strip() for s in args.only.split(",") if s.strip()]
        unknown = [s for s in names if s not in STEPS]
        if unknown or not names:
            raise UsageError(f"--only {args.only!r}: unknown step {unknown[0] if unknown else ''!r}; "
                             f"steps are {', '.join(STEPS)}")
        return [s for s in STEPS if s in names]
    return list(STEPS)


def list_text():
    """The --list output: steps with their notebooks, then the parameters."""
    lines = ["steps:"]
    for step in STEPS:
        lines.append(f"  {step:9s} notebooks/{NOTEBOOKS[step]}")
    lines.append("parameters (name, type, default, allowed: help):")
    for name, spec in SCHEMA.items():
        allowed = _describe_range(spec)
        lines.append(f"  {name:18s} {spec.type.__name__:5s} {spec.default!r:10} "
                     f"{allowed + ': ' if allowed else ''}{spec.help}")
    return "\n".join(lines)


def new_run_id():
    """UTC time plus a short random suffix, e.g. 20250101T120000Z-3fa9."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return f"{stamp}-{secrets.token_hex(2)}"


def utc_now():
    """The current UTC time in ISO 8601, to the second."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


# --- files -------------------------------------------------------------------------------------

def write_atomic(path, text):
    """Write ``text`` through a temporary file in the same folder."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def read_json(path):
    """A JSON file, or None when it does not exist or is unreadable."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def run_lock(run_dir):
    """Create ``run_dir`` if needed and hold ``<run_dir>/.lock``; a second run on the same folder
    gets a UsageError. A folder created here is removed again if a UsageError ends the run
    before anything else was written into it."""
    created = [p for p in (run_dir, *run_dir.parents) if not p.exists()]  # innermost first
    run_dir.mkdir(parents=True, exist_ok=True)
    handle = open(run_dir / ".lock", "a")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UsageError(f"run folder {run_dir} is in use by another run_all.py (lock "
                             f"{run_dir / '.lock'} is held); wait for it or pick another "
                             "--run-id") from None
        yield
    except UsageError:
        if created and [p.name for p in run_dir.iterdir()] == [".lock"]:
            (run_dir / ".lock").unlink()
            for folder in created:
                with contextlib.suppress(OSError):
                    folder.rmdir()
        raise
    finally:
        handle.close()


def git_commit():
    """The repository's HEAD commit (with "-dirty" when tracked files changed), or None."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=REPO_ROOT, capture_output=True, text=True, timeout=10).stdout
        return head + ("-dirty" if dirty.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def versions():
    """Versions of Python, torch, caffe2torch and papermill (torch's from its metadata)."""
    import importlib.metadata

    import caffe2torch
    return {"python": platform.python_version(), "torch": importlib.metadata.version("torch"),
            "caffe2torch": getattr(caffe2torch, "__version__", "unknown"),
            "papermill": importlib.metadata.version("papermill")}


def collect_metrics(workspace):
    """The numbers in the steps' metrics files, merged (lists and paths stay in the files)."""
    metrics = {}
    for name in METRICS_FILES.values():
        for key, value in (read_json(workspace / name) or {}).items():
            if isinstance(value, (int, float, bool)):
                metrics[key] = value
    return metrics


# --- running the notebooks ---------------------------------------------------------------------

class _LineFormatter(logging.Formatter):
    """``[step] line`` for every line of a (multi-line) log message: greppable logs."""

    def __init__(self):
        super().__init__()
        self.step = "-"

    def format(self, record):
        """Prefix every line of the message with the current step."""
        text = record.getMessage().rstrip("\n")
        return "\n".join(f"[{self.step}] {line}" for line in text.split("\n"))


def _papermill_logging():
    handler = logging.StreamHandler(sys.stdout)
    formatter = _LineFormatter()
    handler.setFormatter(formatter)
    logger = logging.getLogger("papermill")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO)
    logger.propagate = False
    return formatter


# The lab template minus its scripts from CDNs (require.js, MathJax, mermaid): the pages are
# static (outputs are HTML, text and embedded PNGs) and must render the same offline.
OFFLINE_TEMPLATE = """{%- extends 'index.html.j2' -%}
{%- block html_head_js -%}{%- endblock html_head_js -%}
{%- block html_head_js_mathjax -%}{%- endblock html_head_js_mathjax -%}
{%- block html_head_js_mermaidjs -%}{%- endblock html_head_js_mermaidjs -%}
"""


def _import_renderers():
    import matplotlib.figure  # noqa: F401  (index.html's plot)
    import nbconvert  # noqa: F401


def render_html(notebook_path, html_path):
    """A self-contained HTML page of the executed notebook: images embedded, no remote scripts."""
    import jinja2
    import nbformat
    from nbconvert import HTMLExporter
    exporter = HTMLExporter(template_name="lab", template_file="offline.html.j2",
                            extra_loaders=[jinja2.DictLoader({"offline.html.j2": OFFLINE_TEMPLATE})])
    body, _ = exporter.from_notebook_node(nbformat.read(str(notebook_path), as_version=4))
    write_atomic(html_path, body)


class KernelStarter:
    """Starts the kernels of all the run's steps together, so that their boot overlaps the steps.

    A fresh kernel per notebook, as with papermill alone; the only thing it runs before its
    notebook is its ``PRELOAD`` (IPython's exec_lines): imports that its notebook makes anyway.
    Kernels talk over Unix sockets in a private temporary folder, not TCP ports.

    By default each kernel is forked from a fork server (mnist_tutorial.kernelfork) that has
    already imported what the kernels need, in two stages: ``light`` (ipykernel, caffe2torch's
    core; the download step's kernel is forked from it first) and ``torch`` (torch, the ops,
    matplotlib; the other steps). A new Python importing torch costs about 2 CPU seconds; five of
    them were most of the pipeline's overhead on 2 cores. ``run_all.py --fresh-kernels`` starts
    every kernel as a new process instead; so does any failure of the fork server.
    """

    LIGHT = ("import ipykernel.kernelapp, IPython, caffe2torch.python.workspace, "
             "mnist_tutorial.data, mnist_tutorial.run_folder")
    # as ipykernel does before it runs user code: matplotlib reads MPLBACKEND when imported
    TORCH = ("import os; os.environ.setdefault('MPLBACKEND', "
             "'module://matplotlib_inline.backend_inline'); "
             "import mnist_tutorial.run_folder, torch, caffe2torch.ops; "
             "caffe2torch.ops.load_families(); import matplotlib.pyplot")
    STAGE = {"download": "light"}  # the others: "torch"
    PRELOAD = {"light": "import mnist_tutorial.data", "torch": TORCH}

    def __init__(self, run_dir, steps, fork=True):
        self.run_dir = run_dir
        self.steps = list(steps)
        self.fork = fork
        self.server = None
        self.stopper = None  # the thread that shuts used kernels down
        self.kernels = {}  # step -> kernel manager, started and not yet taken
        self.sockets = None
        self.count = 0
        self.launched = False

    def prepare(self, spec):
        """Start the fork server (the kernelspec must be ``python -m ipykernel_launcher``)."""
        from mnist_tutorial import kernelfork
        split = kernelfork.launcher_command(spec.argv) if self.fork else None
        if split is None or self.server is not None:
            return
        needed = {self.STAGE.get(step, "torch") for step in self.steps}
        stages = [name for name in ("light", "torch") if name in needed]
        code = {"light": self.LIGHT, "torch": self.TORCH}
        first = self.STAGE.get(self.steps[0], "torch") if self.steps else None
        # hold after "light" only when its kernel is the first one wanted
        plan = [[name, code[name], name == "light" and first == "light" and len(stages) > 1]
                for name in stages]
        try:
            self.server = kernelfork.ForkServer(split[0], plan, cwd=str(REPO_ROOT))
        except OSError as e:
            print(f"run_all.py: cannot start the kernel fork server ({e}); starting kernels "
                  "as new processes", file=sys.stderr, flush=True)

    def _start(self, step):
        import tempfile
        import uuid

        from jupyter_client.manager import AsyncKernelManager
        from jupyter_core.utils import run_sync
        if self.sockets is None:  # short: a Unix socket path has at most ~100 characters
            self.sockets = tempfile.mkdtemp(prefix="c2t-kernels-")
        self.count += 1
        km = AsyncKernelManager(kernel_name=KERNEL_NAME, transport="ipc",
                                ip=os.path.join(self.sockets, f"k{self.count}"))
        stage = self.STAGE.get(step, "torch")
        if self.server is not None:
            from mnist_tutorial import kernelfork
            km.kernel_id = str(uuid.uuid4())
            provisioner = kernelfork.provisioner_class()(
                kernel_id=km.kernel_id, kernel_spec=km.kernel_spec, parent=km)
            provisioner.server, provisioner.stage = self.server, stage
            km.provisioner = provisioner
        # history in memory, as nbclient does: five kernels at once must not share one sqlite file
        run_sync(km.start_kernel)(cwd=str(self.run_dir), extra_arguments=[
            f"--InteractiveShellApp.exec_lines={self.PRELOAD[stage]}",
            "--HistoryManager.hist_file=:memory:"])
        return km

    @staticmethod
    def describe(km):
        """How the kernel was started: "forked" (from the fork server) or "new process"; a kernel
        that could not be forked says why on stderr."""
        process = getattr(getattr(km, "provisioner", None), "process", None)
        if not hasattr(process, "wait_started"):
            return "new process"
        with contextlib.suppress(TimeoutError):
            process.wait_started(timeout=60)
        if process.forked:
            return "forked"
        print(f"run_all.py: the kernel was started as a new process, not forked: "
              f"{process.why_not_forked}", file=sys.stderr, flush=True)
        return "new process"

    def take(self, step):
        """The kernel for ``step``; the first call starts the kernels of all the steps, in order."""
        if not self.launched:
            self.launched = True
            for name in self.steps:
                self.kernels[name] = self._start(name)
        return self.kernels.pop(step)

    @staticmethod
    def stop(km):
        """Shut a kernel down (it may already be gone)."""
        from jupyter_core.utils import run_sync
        with contextlib.suppress(Exception):
            run_sync(km.shutdown_kernel)(now=True)

    def retire(self, km):
        """Shut a used kernel down in the background: the next step need not wait for it."""
        if self.stopper is None:
            self.stopper = concurrent.futures.ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="kernel-stop")
        self.stopper.submit(self.stop, km)

    def close(self):
        """Shut down the kernels started ahead for steps that did not run, then the fork server."""
        if self.stopper is not None:
            self.stopper.shutdown(wait=True)
            self.stopper = None
        for km in self.kernels.values():
            self.stop(km)
        self.kernels.clear()
        if self.server is not None:
            self.server.close()
            self.server = None
        if self.sockets is not None:
            import shutil
            shutil.rmtree(self.sockets, ignore_errors=True)


def run_step(step, values, run_dir, params, formatter, km=None):
    """Execute one notebook with papermill (on ``km``'s kernel when given); raises on failure."""
    import papermill
    formatter.step = step
    output = run_dir / NOTEBOOKS[step]
    extra = {} if km is None else {"km": km}
    papermill.execute_notebook(
        str(NOTEBOOK_DIR / NOTEBOOKS[step]), str(output), parameters=values,
        kernel_name=KERNEL_NAME, log_output=True, progress_bar=False,
        request_save_on_cell_execute=True, execution_timeout=params["cell_timeout"],
        start_timeout=params["start_timeout"], cwd=str(run_dir), **extra)


def _kernel_env():
    """Kernels import mnist_tutorial and caffe2torch from this repository."""
    path = os.environ.get("PYTHONPATH", "")
    if str(REPO_ROOT) not in path.split(os.pathsep):
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), path) if p)


# --- history -----------------------------------------------------------------------------------

def record_history(outputs, run):
    """Append the run to runs.jsonl, point ``latest`` at it and regenerate index.html."""
    line = {"run_id": run["run_id"], "status": run["status"],
            "test_accuracy": run["metrics"].get("test_accuracy"), "seconds": run["seconds"],
            "started": run["started"], "finished": run["finished"],
            "steps": [s["name"] for s in run["steps"] if s.get("ran_now")],
            "device": run["device"], "git_commit": run["git_commit"]}
    with open(outputs / ".history.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        # one write of one line with O_APPEND: concurrent runs never interleave inside a line
        fd = os.open(outputs / "runs.jsonl", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (json.dumps(line) + "\n").encode())
        finally:
            os.close(fd)
        tmp_link = outputs / f".latest.tmp-{os.getpid()}"
        with contextlib.suppress(FileNotFoundError):
            tmp_link.unlink()
        try:
            os.symlink(run["run_id"], tmp_link)
            os.replace(tmp_link, outputs / "latest")
        except OSError as e:  # a volume without symlinks: the history still gets written
            print(f"run_all.py: cannot point {outputs / 'latest'} at {run['run_id']}: {e}",
                  file=sys.stderr)
        write_atomic(outputs / "index.html", index_html(read_history(outputs)))


def read_history(outputs):
    """The lines of runs.jsonl (unreadable lines skipped)."""
    runs = []
    with contextlib.suppress(FileNotFoundError):
        for text in (outputs / "runs.jsonl").read_text().splitlines():
            with contextlib.suppress(ValueError):
                runs.append(json.loads(text))
    return runs


def accuracy_plot_png(runs):
    """A PNG of test accuracy over the runs (bytes), or None when no run has one."""
    points = [(i, r["test_accuracy"]) for i, r in enumerate(runs)
              if isinstance(r.get("test_accuracy"), (int, float))]
    if not points:
        return None
    from matplotlib.figure import Figure
    fig = Figure(figsize=(7, 3))
    ax = fig.add_subplot()
    ax.plot([p[0] for p in points], [p[1] for p in points], "o-")
    ax.set_xlabel("run (in order of runs.jsonl)")
    ax.set_ylabel("test accuracy")
    ax.grid(True, alpha=0.3)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80, bbox_inches="tight")
    return buffer.getvalue()


def index_html(runs):
    """outputs/index.html: the accuracy-over-runs plot and a table of runs, newest first."""
    png = accuracy_plot_png(runs)
    plot = (f'<img alt="test accuracy over runs" src="data:image/png;base64,'
            f'{base64.b64encode(png).decode()}">' if png else "<p>No test accuracy yet.</p>")
    rows = []
    for r in reversed(runs):
        rid = html.escape(str(r.get("run_id")))
        acc = r.get("test_accuracy")
        seconds = r.get("seconds")
        rows.append(
            f'<tr><td><a href="{rid}/run.json">{rid}</a></td>'
            f'<td class="{html.escape(str(r.get("status")))}">{html.escape(str(r.get("status")))}</td>'
            f"<td>{'' if acc is None else f'{acc:.4f}'}</td>"
            f"<td>{'' if seconds is None else f'{seconds:.1f}'}</td>"
            f"<td>{html.escape(str(r.get('started', '')))}</td>"
            f"<td>{html.escape(', '.join(r.get('steps', [])))}</td>"
            f"<td>{html.escape(str(r.get('device', '')))}</td></tr>")
    return f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>MNIST runs</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px}}.failed{{color:#b00}}.succeeded{{color:#070}}</style>
</head><body><h1>MNIST pipeline runs</h1>{plot}
<table><tr><th>run</th><th>status</th><th>test accuracy</th><th>seconds</th><th>started (UTC)</th>
<th>steps run</th><th>device</th></tr>
{chr(10).join(rows)}
</table></body></html>
"""


# --- main --------------------------------------------------------------------------------------

def main(argv=None):
    """run_all.py's entry point; returns the exit code."""
    args = parse_args(argv)
    if args.list:
        print(list_text())
        return 0
    try:
        return _run(args)
    except UsageError as e:
        print(f"run_all.py: error: {e}", file=sys.stderr)
        return 2


def _run(args):
    outputs = Path(args.outputs).resolve() if args.outputs else REPO_ROOT / "outputs"
    if args.run_id is not None and (not RUN_ID.match(args.run_id) or args.run_id == "latest"):
        raise UsageError(f"--run-id {args.run_id!r}: use letters, digits, '.', '_' and '-' "
                         "(not 'latest')")
    run_id = args.run_id or new_run_id()
    run_dir = outputs / run_id
    previous = read_json(run_dir / "run.json") if run_dir.exists() else None
    params = resolve_params(args.params_file, args.param,
                            base=(previous or {}).get("params"))
    steps = select_steps(args)
    probe = probe_cuda() if params["device"] != "cpu" and not cpu_only_torch() else None
    try:
        return _check_and_execute(args, outputs, run_id, run_dir, previous, params, steps, probe)
    finally:
        if probe is not None and probe.poll() is None:
            probe.kill()
            probe.communicate()


def _check_and_execute(args, outputs, run_id, run_dir, previous, params, steps, probe):
    done = {s["name"] for s in (previous or {}).get("steps", []) if s.get("status") == "succeeded"}
    for step in steps:
        missing = [s for s in STEPS[:STEPS.index(step)] if s not in steps and s not in done]
        if missing:
            raise UsageError(f"cannot run step {step}: step {missing[0]} has not succeeded in run "
                             f"{run_id} (resume an earlier run with --run-id ID --from STEP)")
    _lighter_imports()
    spec = check_kernel()
    # only device=cuda can be refused: check it before anything starts; auto may resolve later
    device = resolve_device(params["device"], probe) if (
        probe is None or params["device"] == "cuda") else None
    kernels = KernelStarter(run_dir, steps, fork=not args.fresh_kernels)
    with contextlib.ExitStack() as stack:
        if not args.dry_run:  # the fork server imports torch while papermill gets imported
            stack.enter_context(run_lock(run_dir))
            stack.callback(kernels.close)  # before the lock is let go
            _kernel_env()
            kernels.prepare(spec)
        for step in steps:
            notebook_parameters(step)  # imports papermill while the probe imports torch
        device = device or resolve_device(params["device"], probe)
        plan = {step: step_params(step, params, run_dir, device) for step in steps}
        if args.dry_run:
            print(f"run {run_id} in {run_dir} on {device}")
            for step, values in plan.items():
                print(f"  {step}: notebooks/{NOTEBOOKS[step]} with {values}")
            return 0
        return _execute_steps(outputs, run_dir, run_id, params, device, plan, previous, args,
                              kernels)


def _execute_steps(outputs, run_dir, run_id, params, device, plan, previous, args, kernels):
    import papermill
    formatter = _papermill_logging()
    workspace = run_dir / "workspace"
    workspace.mkdir(exist_ok=True)
    records = {s["name"]: s for s in (previous or {}).get("steps", [])}
    run = {"run_id": run_id, "status": "running", "params": params,
           "params_files": [str(p) for p in args.params_file], "overrides": list(args.param),
           "device": device, "versions": versions(), "git_commit": git_commit(),
           "started": utc_now(), "finished": None, "seconds": None, "metrics": {}}
    started = time.perf_counter()
    code, failure = 0, None
    renderer, pages = concurrent.futures.ThreadPoolExecutor(max_workers=1), []
    renderer.submit(_import_renderers)  # while kernels boot, not after the last step
    print(f"run {run_id}: {run_dir} (device {device})", flush=True)
    for step, values in plan.items():
        if failure is not None:
            records[step] = {"name": step, "status": "not_run", "seconds": None,
                             "notebook": None, "html": None}
            continue
        metrics_file = METRICS_FILES.get(step)
        if metrics_file:
            (workspace / metrics_file).unlink(missing_ok=True)  # no stale metrics on failure
        notebook = run_dir / NOTEBOOKS[step]
        html_path = notebook.with_suffix(".html")
        record = {"name": step, "status": "running", "seconds": None,
                  "notebook": notebook.name, "html": html_path.name, "ran_now": True}
        records[step] = record
        _write_run(run_dir, run, records)
        print(f"== step {step}: notebooks/{NOTEBOOKS[step]} -> {notebook}", flush=True)
        t0 = time.perf_counter()
        km = None
        try:
            km = kernels.take(step)
            record["kernel"] = kernels.describe(km)
            run_step(step, values, run_dir, params, formatter, km)
            record["status"] = "succeeded"
        except papermill.PapermillExecutionError as e:
            record.update(status="failed", cell=e.exec_count, error=f"{e.ename}: {e.evalue}")
            failure = (f"step {step} failed at cell {e.exec_count}: {e.ename}: {e.evalue}\n"
                       f"failed notebook saved: {notebook}")
            code = 1
        except KeyboardInterrupt:
            record.update(status="failed", error="interrupted")
            failure, code = f"step {step} interrupted; partial notebook: {notebook}", 130
        except Exception as e:  # kernel start timeout, dead kernel, unreadable notebook
            record.update(status="failed", error=f"{type(e).__name__}: {e}")
            failure = (f"step {step} failed: {type(e).__name__}: {' '.join(str(e).split())}\n"
                       f"notebook (as far as it ran): {notebook}")
            code = 1
        finally:
            if km is not None:
                kernels.retire(km)
        record["seconds"] = round(time.perf_counter() - t0, 2)
        if notebook.exists():  # rendered while the next step runs
            pages.append((record, renderer.submit(render_html, notebook, html_path)))
        else:
            record["notebook"] = record["html"] = None
        print(f"== step {step}: {record['status']} in {record['seconds']:.1f} s", flush=True)
    for record, page in pages:
        try:
            page.result()
        except Exception as e:  # a rendering problem must not hide the step's result
            print(f"[{record['name']}] could not render {record['html']}: {e}", flush=True)
            record["html"] = None
    renderer.shutdown()
    run.update(status="failed" if failure else "succeeded", finished=utc_now(),
               seconds=round(time.perf_counter() - started, 2),
               metrics=collect_metrics(workspace))
    _write_run(run_dir, run, records)
    run["steps"] = [dict(records[s]) for s in STEPS if s in records]
    record_history(outputs, run)
    if failure:
        print(f"run_all.py: {failure}", file=sys.stderr, flush=True)
    else:
        acc = run["metrics"].get("test_accuracy")
        print(f"run {run_id} succeeded in {run['seconds']:.1f} s"
              + (f"; test accuracy {acc:.4f}" if acc is not None else "")
              + f"; see {run_dir / 'run.json'}", flush=True)
    return code


def _write_run(run_dir, run, records):
    """run.json with the steps in pipeline order (``ran_now`` is only for the history line)."""
    steps = [{k: v for k, v in records[s].items() if k != "ran_now"} for s in STEPS if s in records]
    write_atomic(run_dir / "run.json", json.dumps({**run, "steps": steps}, indent=2) + "\n")
