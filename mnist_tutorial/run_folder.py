"""Where a notebook reads and writes: a run folder's ``workspace/``, or a scratch copy of it.

Three cases, told apart by ``<run_dir>/run.json`` (written by run_all.py):

- ``"status": "running"``: run_all.py is executing this run; the notebook reads and writes
  ``<run_dir>/workspace``.
- another status (``succeeded``, ``failed``, ...), or an unreadable file: a finished run, opened
  in Jupyter to explore it. The notebook reads the run's files but writes into
  ``<run_dir>/../explore/<run-id>/workspace``, so the run stays as run_all.py recorded it.
  A file written there earlier (say, nets rebuilt by 02_build while exploring) is read first.
- no ``run.json``: the notebooks' own folder (``outputs/jupyter`` by default), read and written
  in place.

Example::

    run = RunFolder(run_dir)
    workspace.ResetWorkspace(str(run.root))
    train_net = caffe2_pb2.NetDef.FromString(run.find("train_net.pb").read_bytes())
"""
import base64
import json
import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
EXPLORE = "explore"  # the folder beside the runs that holds what exploring them writes
# which notebook writes each file the later ones read, for the error when one is missing
MADE_BY = {"data.json": "01_download", ".pb": "02_build", "mnist_params.minidb": "03_train",
           "test_last_batch.minidb": "04_test"}


def resolve(path):
    """``path`` as an absolute Path; a relative one is taken from the repository root."""
    path = Path(path).expanduser()
    return path if path.is_absolute() else REPO_ROOT / path


def run_status(run_dir):
    """The ``status`` in ``<run_dir>/run.json``; None without one, "unreadable" for a bad one."""
    try:
        return json.loads((Path(run_dir) / "run.json").read_text()).get("status", "unreadable")
    except FileNotFoundError:
        return None
    except (OSError, ValueError, AttributeError):
        return "unreadable"


class RunFolder:
    """A run's recorded workspace (``recorded``) and the folder a notebook writes (``root``)."""

    def __init__(self, run_dir):
        self.run_dir = resolve(run_dir)
        self.recorded = self.run_dir / "workspace"
        self.exploring = run_status(self.run_dir) not in (None, "running")
        if self.exploring:
            self.root = self.run_dir.parent / EXPLORE / self.run_dir.name / "workspace"
            print(f"exploring the finished run {self.run_dir.name}: reading {self.recorded}, "
                  f"writing {self.root}")
        else:
            self.root = self.recorded
        self.root.mkdir(parents=True, exist_ok=True)

    def find(self, name):
        """The file ``name`` to read: this notebook's own if written, else the recorded run's."""
        for folder in (self.root, self.recorded):
            if (folder / name).exists():
                return folder / name
        step = MADE_BY.get(name) or MADE_BY.get(Path(name).suffix, "an earlier")
        raise FileNotFoundError(f"{self.recorded / name} is missing: run notebooks/{step}.ipynb "
                                "first, with the same run_dir")

    def read_json(self, name):
        """The JSON file ``name`` (see find)."""
        return json.loads(self.find(name).read_text())

    def write(self, name, data):
        """Write bytes or text to ``root/name`` through a temporary file beside it."""
        path = self.root / name
        tmp = path.with_name(f".{name}.tmp-{os.getpid()}")
        try:
            tmp.write_bytes(data.encode() if isinstance(data, str) else data)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    def write_json(self, name, obj):
        """Write ``obj`` as indented JSON to ``root/name``."""
        self.write(name, json.dumps(obj, indent=2, sort_keys=True) + "\n")

    def savefig(self, fig, name, dpi=100):
        """Save a matplotlib figure as the PNG ``root/name``, close it and show the file below."""
        from matplotlib import pyplot
        path = self.root / name
        tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
        try:
            fig.savefig(tmp, dpi=dpi, bbox_inches="tight")
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        pyplot.close(fig)  # shown once, as the file: Jupyter would draw it again at the cell's end
        _display_png(path)

    def svg_box(self, name):
        """HTML showing the SVG ``root/name`` as wide as the page in a scrolling box, linked."""
        path = self.root / name
        href = os.path.relpath(path, Path.cwd())
        image = base64.b64encode(path.read_bytes()).decode()
        return (f'<p><a href="{href}" target="_blank">{name}</a> (open at full size)</p>'
                '<div style="overflow:auto; max-height:600px; border:1px solid #ccc">'
                f'<img src="data:image/svg+xml;base64,{image}" style="max-width:100%"></div>')


def _display_png(path):
    """Show a PNG file in Jupyter; in plain Python (tests, scripts) the file is enough."""
    try:
        from IPython import get_ipython
        from IPython.display import display
    except ImportError:
        return
    if get_ipython() is not None:
        # the text is what a log of the run shows (papermill's log_output)
        display({"image/png": path.read_bytes(), "text/plain": f"[figure {path.name}]"}, raw=True)
