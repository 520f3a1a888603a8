"""The history of runs: ``runs.jsonl`` (one line per finished run or resumption), ``latest`` and
``index.html`` (one row per run id, from ``templates/index.html.j2``).

Every read of runs.jsonl goes through ``read_runs``; every write through ``record``.
"""
import errno
import io
import json
import os
import sys
from pathlib import Path

from filelock import FileLock

TEMPLATE_DIR = Path(__file__).with_name("templates")


def read_runs(outputs):
    """One record per run id (the last line of a resumed run replaces the earlier ones), in the
    order the runs first appeared; unreadable or odd lines are skipped with a warning."""
    runs = {}
    try:
        lines = (Path(outputs) / "runs.jsonl").read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return []
    for number, text in enumerate(lines, 1):
        try:
            line = json.loads(text)
        except (ValueError, RecursionError):
            line = None
        odd = "not a run record" if not isinstance(line, dict) else odd_field(line)
        if odd:
            if text.strip():
                print(f"run_all.py: warning: skipping line {number} of "
                      f"{Path(outputs) / 'runs.jsonl'}: {odd}", file=sys.stderr)
            continue
        runs[line["run_id"]] = line  # dicts keep the first insertion's position
    return list(runs.values())


NUMBER = (int, float)
FIELDS = {"run_id": (str,), "status": (str,), "started": (str,), "finished": (str,),
          "seconds": NUMBER, "device": (str,), "params": (dict,), "params_files": (list,),
          "overrides": (list,), "metrics": (dict,), "git_commit": (str,), "steps": (list,)}


def odd_field(line):
    """Why a parsed runs.jsonl line is not a run record the page can show, or None."""
    if not isinstance(line.get("run_id"), str):
        return "no run_id"
    for name, kinds in FIELDS.items():
        value = line.get(name)
        if value is not None and (not isinstance(value, kinds) or isinstance(value, bool)):
            return f"{name} is {type(value).__name__}, not {kinds[0].__name__}"
    for name in ("params_files", "overrides"):
        if not all(isinstance(v, str) for v in line.get(name) or []):
            return f"{name} holds a non-string"
    steps = line.get("steps") or []
    if not all(isinstance(s, dict) and isinstance(s.get("name", ""), str)
               and isinstance(s.get("status", ""), str)
               and isinstance(s.get("seconds") or 0, NUMBER)
               and isinstance(s.get("html") or "", str) for s in steps):
        return "a step is not a step record"
    return None


def history_line(run):
    """What runs.jsonl keeps of a run.json: enough for the history page."""
    keep = ("run_id", "status", "started", "finished", "seconds", "device", "params",
            "params_files", "overrides", "metrics", "git_commit")
    steps = [{k: s.get(k) for k in ("name", "status", "seconds", "html")} for s in run["steps"]]
    return {**{k: run.get(k) for k in keep}, "steps": steps}


def record(outputs, run, key_params):
    """Append the run to runs.jsonl, point ``latest`` at it and regenerate index.html."""
    outputs = Path(outputs)
    with FileLock(str(outputs / ".history.lock")):
        with open(outputs / "runs.jsonl", "a+b", buffering=0) as f:
            f.seek(0, os.SEEK_END)  # a cut-off last line must not swallow this record
            size = f.tell()
            newline = b"\n" if size and (f.seek(-1, os.SEEK_END), f.read(1))[1] != b"\n" \
                else b""
            line = newline + json.dumps(history_line(run)).encode() + b"\n"
            try:
                if f.write(line) != len(line):
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            except OSError as e:  # a full disk: no half record (the next append would skip it)
                f.truncate(size)
                raise OSError(e.errno, e.strerror, str(outputs / "runs.jsonl")) from None
        tmp_link = outputs / f".latest.tmp-{os.getpid()}"
        tmp_link.unlink(missing_ok=True)
        try:
            os.symlink(run["run_id"], tmp_link)
            os.replace(tmp_link, outputs / "latest")
        except OSError as e:  # a volume without symlinks: the history still gets written
            print(f"run_all.py: cannot point {outputs / 'latest'} at {run['run_id']}: {e}",
                  file=sys.stderr)
        write_atomic(outputs / "index.html", index_html(read_runs(outputs), key_params))


def write_atomic(path, text):
    """Write ``text`` through a temporary file in the same folder: ``path`` is complete or as it
    was (a full disk leaves no half file and no temporary one); an OSError names ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise OSError(e.errno, e.strerror, str(path)) from None


def accuracy(run):
    """A run's test accuracy, or None."""
    value = (run.get("metrics") or {}).get("test_accuracy")
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def accuracy_chart(runs):
    """An SVG of test accuracy over the runs (x: the row number), or None without any accuracy."""
    points = [(i, accuracy(r)) for i, r in enumerate(runs, 1) if accuracy(r) is not None]
    if not points:
        return None
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator
    fig = Figure(figsize=(8, 3))
    ax = fig.add_subplot()
    ax.plot(*zip(*points), "o-", label="test accuracy")
    ax.set_xlim(0.5, len(runs) + 0.5)  # whole run numbers only, also for one or two runs
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    ax.set(title="Test accuracy over runs", xlabel="run (# in the table)", ylabel="test accuracy")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right")
    buffer = io.StringIO()
    fig.savefig(buffer, format="svg", bbox_inches="tight", metadata={"Date": None})
    svg = buffer.getvalue()
    return svg[svg.index("<svg"):]


def _short(value):
    return "(empty)" if value == "" else f"{value:g}" if isinstance(value, float) else str(value)


def rows(runs, key_params):
    """The table's rows, oldest first: key parameters and what changed since the previous run."""
    out, previous = [], None
    for number, run in enumerate(runs, 1):
        params = run.get("params") if isinstance(run.get("params"), dict) else {}
        changed = []
        if previous is not None:
            old = previous.get("params") if isinstance(previous.get("params"), dict) else {}
            changed = [f"{k} {_short(old.get(k))} → {_short(v)}" for k, v in params.items()
                       if k in old and old[k] != v]
            if previous.get("params_files") != run.get("params_files"):
                changed.insert(0, "params files")
        steps = [s for s in run.get("steps") or [] if isinstance(s, dict)]
        out.append({"number": number, "run": run, "accuracy": accuracy(run), "steps": steps,
                    "key": [(k, _short(params[k])) for k in key_params if k in params],
                    "changed": changed, "first": previous is None})
        previous = run
    return out


def index_html(runs, key_params):
    """outputs/index.html: the accuracy chart and one row per run, newest first."""
    import jinja2
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATE_DIR), autoescape=True)
    return env.get_template("index.html.j2").render(
        chart=accuracy_chart(runs), rows=list(reversed(rows(runs, key_params))))
