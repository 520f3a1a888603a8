"""The pipeline's parameters: read from the notebooks' ``parameters`` cells, plus a small table.

Each notebook's ``parameters`` cell is the one home of its parameters' names, types, defaults and
help (``name: type = default  # help``, read with ``papermill.inspect_notebook``). ``RULES`` adds
only what a cell cannot say: bounds, choices, whether an empty string is allowed, which step owns
a key that several notebooks declare, and which keys the history page shows. ``OPTIONS`` are the
pipeline's own settings (no notebook sees them). ``params/*.yaml`` and ``-p`` only override.
"""
import ast
import contextlib
import dataclasses
import difflib
import functools
import json
import math
import os
import re
from pathlib import Path

import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = REPO_ROOT / "notebooks"
STEPS = ("download", "build", "train", "test", "export")  # in order; notebooks/NN_<step>.ipynb
INJECTED = ("run_dir",)  # set by the pipeline itself; the notebooks declare it for Jupyter
TYPES = {"int": int, "float": float, "str": str, "bool": bool}

# What a parameters cell cannot say. ge/gt/lt/le: inclusive/exclusive bounds; owner: the step
# whose default counts when several notebooks declare the key; key: shown on the history page.
RULES = {
    "data_dir": {},
    "data_source": {"choices": ("auto", "package", "caffe2-zip", "idx", "existing")},
    "data_url": {"may_be_empty": True},
    "device": {"choices": ("auto", "cpu", "cuda")},  # the history shows the resolved device
    "seed": {"ge": 0, "le": 2 ** 32 - 1, "key": True},
    # Batch bounds fit the Job's 8 GiB memory limit (deploy/base/cronjob.yaml) with room for the
    # runner and the fork server: bench/train_memory.py measures a train iteration at ~290 KiB
    # of peak RSS per image over a ~335 MiB base (60,000 needed ~17 GiB), a test one at ~230
    # KiB: 20,000 train images peak near 6 GiB, 10,000 test images (the whole set) near 2.5 GiB.
    "train_batch_size": {"ge": 1, "le": 20000, "key": True},
    "test_batch_size": {"ge": 1, "le": 10000, "key": True},
    "train_iters": {"ge": 1, "le": 10_000_000, "key": True},
    "test_iters": {"ge": 1, "le": 1_000_000, "key": True},
    "base_lr": {"ge": -10.0, "lt": 0.0, "key": True},
    "lr_policy": {"choices": ("fixed", "step", "exp", "inv"), "key": True},
    "stepsize": {"ge": 1, "le": 10_000_000},  # every int has both bounds: a test
    "gamma": {"gt": 0.0, "le": 1.0},
    "power": {"gt": 0.0, "le": 10.0},
    "print_every": {"ge": 0, "le": 10_000_000},
    "net_type": {"choices": ("simple", "compiled"), "key": True},
    "min_test_accuracy": {"ge": 0.0, "le": 1.0},
}
# The pipeline's own settings: these lines are their one home.
OPTIONS = {
    "cell_timeout": (3600, "seconds one notebook cell may run", {"ge": 1, "le": 7 * 86400}),
    "start_timeout": (120, "seconds a kernel may take to start", {"ge": 1, "le": 3600}),
}
SECRET_WORDS = {"key", "keys", "apikey", "token", "tokens", "password", "passwd", "pwd", "secret",
                "secrets", "credential", "credentials", "auth", "private", "privatekey"}
SECRET_PARTS = ("passw", "secret", "token", "credential", "apikey", "api_key", "privatekey")


URL = re.compile(r"\b[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>\\]+")  # stops at a JSON escape too
REDACTED = "REDACTED"


class UsageError(Exception):
    """Bad usage or parameters: the command prints the one-line message and exits with 2."""


@dataclasses.dataclass(frozen=True)
class Param:
    """One parameter: type, default and help from a notebook (or OPTIONS), rules from RULES."""

    name: str
    type: type
    default: object
    help: str
    steps: tuple  # the steps whose notebooks declare it; () for a pipeline option
    choices: tuple = None
    ge: float = None
    gt: float = None
    lt: float = None
    le: float = None
    may_be_empty: bool = False
    owner: str = None
    key: bool = False

    def allowed(self):
        """The allowed values in words, e.g. ">= 1 and <= 60,000" (empty: any of its type)."""
        if self.choices:
            return "one of " + ", ".join(map(str, self.choices))
        bounds = ((">=", self.ge), (">", self.gt), ("<", self.lt), ("<=", self.le))
        return " and ".join(f"{op} {b:,}" if isinstance(b, int) else f"{op} {b:g}"
                            for op, b in bounds if b is not None)


def notebook_path(step, notebook_dir=None):
    """notebooks/NN_<step>.ipynb."""
    return Path(notebook_dir or NOTEBOOK_DIR) / f"{STEPS.index(step) + 1:02d}_{step}.ipynb"


def _cache_file(data):
    """Where papermill.inspect_notebook's answer for a notebook's bytes is kept (or None)."""
    import hashlib
    import importlib.metadata
    try:
        version = importlib.metadata.version("papermill")
    except importlib.metadata.PackageNotFoundError:
        return None
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    digest = hashlib.sha256(data + version.encode()).hexdigest()
    return Path(base) / "caffe2torch" / "notebook-parameters" / f"{digest}.json"


def _declared(path):
    """papermill.inspect_notebook(path), cached by the notebook's bytes.

    Importing papermill takes about 2 s, which every check of a parameter (exit 2) would wait
    for; the answer depends only on the notebook's contents and papermill's version.
    """
    if not path.exists():
        raise UsageError(f"notebook {path} is missing")
    cache = _cache_file(path.read_bytes())
    try:
        return json.loads(cache.read_text())
    except (AttributeError, OSError, ValueError):
        pass  # no cache yet (or none possible): ask papermill
    import papermill
    try:
        declared = papermill.inspect_notebook(str(path))
    except Exception as e:  # a notebook that is not valid JSON or has a broken cell
        raise UsageError(f"notebook {path} cannot be read: {' '.join(str(e).split())}") from None
    if not declared:
        raise UsageError(f"notebook {path} has no cell tagged 'parameters'")
    if cache is not None:
        try:  # best effort: a read-only home (a pod's root file system) just skips the cache
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(declared))
            os.replace(tmp, cache)
        except OSError:
            pass
    return declared


def _typed_default(path, info):
    """(type, default) of one inspected parameter: its annotation, else its literal's type."""
    where = f"notebook {path.name}: parameter {info['name']!r}"
    try:
        default = ast.literal_eval(info["default"])
    except (ValueError, SyntaxError):
        raise UsageError(f"{where} must default to a literal, got {info['default']}") from None
    kind = TYPES.get(info["inferred_type_name"]) or type(default)
    if kind not in TYPES.values() or not isinstance(default, kind) or (
            kind is int and isinstance(default, bool)):
        if not (kind is float and type(default) is int):
            raise UsageError(f"{where} = {info['default']}: use an int, float, str or bool "
                             "literal that matches its annotation")
        default = float(default)
    return kind, default


@functools.lru_cache(maxsize=8)
def _schema(notebook_dir, stamps):
    seen = {}
    for step in STEPS:
        path = notebook_path(step, notebook_dir)
        for name, info in _declared(path).items():
            if name in INJECTED:
                continue
            if name in OPTIONS:
                raise UsageError(f"notebook {path.name} declares {name!r}, a pipeline option")
            seen.setdefault(name, []).append((step, path, *_typed_default(path, info),
                                              info["help"].strip()))
    params = {}
    for name, declarations in seen.items():
        rules = RULES.get(name, {})
        owner = rules.get("owner") or declarations[0][0]
        # a test keeps RULES' owners among the declaring steps
        _, path, kind, default, help_ = ([d for d in declarations if d[0] == owner]
                                         or declarations)[0]
        for _step, other, other_kind, other_default, _ in declarations:
            if (other_kind, other_default) != (kind, default):
                raise UsageError(f"notebooks {path.name} and {other.name} disagree on {name!r}: "
                                 f"{kind.__name__} {default!r} vs {other_kind.__name__} "
                                 f"{other_default!r}; {owner} owns it: make them agree")
        params[name] = Param(name, kind, default, help_, tuple(d[0] for d in declarations),
                             **{k: v for k, v in rules.items() if k != "owner"}, owner=owner)
    for name, (default, help_, rules) in OPTIONS.items():
        params[name] = Param(name, type(default), default, help_, (), **rules)
    return params


def schema():
    """Every parameter by name: the notebooks' (in step order), then the pipeline's options."""
    folder = Path(NOTEBOOK_DIR)
    stamps = tuple(notebook_path(s, folder).stat().st_mtime_ns
                   if notebook_path(s, folder).exists() else None for s in STEPS)
    return _schema(folder, stamps)


def defaults():
    """Every parameter's default."""
    return {name: p.default for name, p in schema().items()}


def looks_secret(name):
    """True for names like api_key, token, db_password: papermill writes values into notebooks."""
    lowered = name.lower()
    return bool(set(re.split(r"[^a-z0-9]+", lowered)) & SECRET_WORDS) or any(
        part in lowered for part in SECRET_PARTS)


def check_param(params, name, value, origin):
    """``value`` converted to ``name``'s type, or a UsageError naming it and ``origin``."""
    if looks_secret(name):
        raise UsageError(f"parameter {name!r} ({origin}) looks like a secret; papermill writes "
                         "parameters into the output notebooks: pass secrets through the "
                         "environment instead")
    spec = params.get(name)
    if spec is None:
        close = difflib.get_close_matches(name, params, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else "; see run_all.py --list"
        raise UsageError(f"unknown parameter {name!r} ({origin}){hint}")
    if spec.type is float and isinstance(value, str):
        with contextlib.suppress(ValueError):  # YAML 1.1 reads 1e-4 (no dot) as a string
            value = float(value)
    ok = (isinstance(value, spec.type) and not (spec.type is int and isinstance(value, bool))
          or spec.type is float and isinstance(value, int) and not isinstance(value, bool))
    if not ok:
        kind = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
        raise UsageError(f"parameter {name!r} ({origin}) must be {kind[spec.type]}, got {value!r}")
    value = spec.type(value)
    if spec.type is float and not math.isfinite(value):
        raise UsageError(f"parameter {name!r} ({origin}) must be a finite number, got {value!r}")
    if ((spec.choices and value not in spec.choices)
            or (spec.ge is not None and value < spec.ge)
            or (spec.gt is not None and value <= spec.gt)
            or (spec.lt is not None and value >= spec.lt)
            or (spec.le is not None and value > spec.le)):
        raise UsageError(f"parameter {name!r} ({origin}) must be {spec.allowed()}, got {value!r}")
    if spec.type is str and not value and not spec.may_be_empty:
        raise UsageError(f"parameter {name!r} ({origin}) must not be empty")
    if spec.type is str and "://" in value:
        check_url(name, value, origin)
    return value


def check_url(name, value, origin):
    """Refuse a URL with a user name or password: the pipeline writes parameters in its records."""
    import urllib.parse
    try:
        parts = urllib.parse.urlsplit(value)
        has_credentials = parts.username is not None or parts.password is not None
    except ValueError:  # e.g. a bad port or IPv6 literal
        raise UsageError(f"parameter {name!r} ({origin}) is not a valid URL") from None
    if has_credentials:
        raise UsageError(f"parameter {name!r} ({origin}) holds credentials (user:password@); "
                         "they would be written into run.json and the notebooks: put them in "
                         "~/.netrc (a Kubernetes Secret mounted as it) and pass the URL without")


def redact(value):
    """``value`` with each URL's query values and user info replaced by REDACTED (signed URLs
    carry tokens there); other values unchanged. Applied to everything the pipeline records."""
    if not isinstance(value, str) or "://" not in value:
        return value
    import urllib.parse

    def one(match):
        try:
            parts = urllib.parse.urlsplit(match.group(0))
        except ValueError:
            return REDACTED
        netloc = parts.netloc
        if "@" in netloc:
            netloc = f"{REDACTED}@{netloc.rsplit('@', 1)[1]}"
        query = re.sub(r"=[^&;]*", f"={REDACTED}", parts.query)
        return urllib.parse.urlunsplit(parts._replace(netloc=netloc, query=query))
    return URL.sub(one, value)


MAX_PARAMS_BYTES = 1 << 20  # a params file is a few lines; /dev/zero is not one
MAX_YAML_DEPTH = 8  # a mapping of scalars is 2 deep; 5,000 nested lists overflow the stack


class StrictLoader(yaml.SafeLoader):
    """SafeLoader without YAML 1.1's surprises: no anchors or aliases (a "billion laughs" is
    refused at once), no duplicate keys, no deep nesting, integers in plain decimal only (0x10,
    010, 1_000 and 1:20 stay strings, so an int parameter refuses them) and booleans only as
    true/false (yes, no, on, off stay strings)."""

    yaml_implicit_resolvers = {
        first: [(tag, rx) for tag, rx in resolvers
                if tag not in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:bool")]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}

    def compose_node(self, parent, index):
        """A node, refusing aliases, anchors and nesting deeper than MAX_YAML_DEPTH."""
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
            raise yaml.composer.ComposerError(None, None, "anchors and aliases (&, *) are not "
                                              "allowed in parameters", event.start_mark)
        self._depth = getattr(self, "_depth", 0) + 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                raise yaml.composer.ComposerError(None, None, f"nested deeper than "
                                                  f"{MAX_YAML_DEPTH} levels", event.start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node, deep=False):
        """A mapping, refusing a key given twice (YAML would keep the last silently)."""
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, (str, int, float, bool)) and key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} is given twice",
                                                        key_node.start_mark)
            if isinstance(key, (str, int, float, bool)):
                seen.add(key)
        return super().construct_mapping(node, deep)

    def construct_yaml_int(self, node):
        """An integer written in plain decimal (an explicit !!int 0x10 is refused too)."""
        text = self.construct_scalar(node)
        if not re.fullmatch(r"[-+]?(0|[1-9][0-9]*)", text):
            raise yaml.constructor.ConstructorError(None, None, f"integer {text!r}: write it in "
                                                    "plain decimal", node.start_mark)
        return int(text)


StrictLoader.add_implicit_resolver("tag:yaml.org,2002:bool",
                                   re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                   list("tTfF"))
StrictLoader.add_implicit_resolver("tag:yaml.org,2002:int", re.compile(r"^[-+]?(?:0|[1-9][0-9]*)$"),
                                   list("-+0123456789"))
StrictLoader.add_constructor("tag:yaml.org,2002:int", StrictLoader.construct_yaml_int)


def strict_yaml(text):
    """``text`` read by StrictLoader (a yaml.YAMLError or RecursionError on what it refuses)."""
    return yaml.load(text, Loader=StrictLoader)  # noqa: S506 (a SafeLoader subclass)


def load_yaml(text, origin):
    """The mapping in a YAML document (no checks on its keys yet)."""
    try:
        data = strict_yaml(text)
    except yaml.YAMLError as e:
        raise UsageError(f"{origin} is not readable YAML: {' '.join(str(e).split())}") from None
    except RecursionError:  # a deep flow collection, before the composer counts its depth
        raise UsageError(f"{origin} is not readable YAML: nested too deeply") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(f"{origin} must hold a mapping of parameter: value")
    return data


def load_file(path):
    """The mapping in a YAML params file."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_PARAMS_BYTES + 1)
    except FileNotFoundError:
        raise UsageError(f"params file {path} does not exist") from None
    except OSError as e:
        raise UsageError(f"params file {path} is not readable: {e.strerror or e}") from None
    if len(raw) > MAX_PARAMS_BYTES:
        raise UsageError(f"params file {path} is larger than {MAX_PARAMS_BYTES:,} bytes; "
                         "a params file holds a few overrides")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(f"params file {path} is not UTF-8 text (byte {e.start}); save it as "
                         "UTF-8") from None
    return load_yaml(text, f"params file {path}")


def parse_value(params, key, raw):
    """A -p value: read as a YAML scalar, except for string parameters (a data_dir named 2024)."""
    spec = params.get(key)
    if spec is not None and spec.type is str:
        return raw
    try:
        value = strict_yaml(raw) if raw.strip() else raw
    except (yaml.YAMLError, RecursionError):
        value = raw
    if isinstance(value, (dict, list)):
        raise UsageError(f"-p {key}: expected a single value, got {raw!r}")
    return value


def resolve(layers):
    """Defaults, then each (origin, mapping) layer in order, every value checked."""
    params = schema()
    values = {name: p.default for name, p in params.items()}
    for origin, layer in layers:
        for name, value in layer.items():
            values[str(name)] = check_param(params, str(name), value, origin)
    return values


def for_step(step, values):
    """What the step's notebook gets: the parameters it declares (the caller adds run_dir)."""
    return {name: values[name] for name, p in schema().items() if step in p.steps}


def list_text():
    """``run_all.py --list``: the steps with their notebooks, then every parameter."""
    lines = ["steps:"] + [f"  {s:9s} notebooks/{notebook_path(s).name}" for s in STEPS]
    lines.append("parameters (name, type, default, steps, allowed: help):")
    for p in schema().values():
        allowed = p.allowed()
        lines.append(f"  {p.name:18s} {p.type.__name__:5s} {p.default!r:10} "
                     f"{','.join(p.steps) or 'pipeline':15s} {allowed + ': ' if allowed else ''}"
                     f"{p.help}")
    return "\n".join(lines)


def markdown_table():
    """README's parameters table, generated from the same source as --list."""
    rows = ["| parameter | type | default | step | allowed | meaning |",
            "| --- | --- | --- | --- | --- | --- |"]
    for p in schema().values():
        default = "(empty)" if p.default == "" else f"`{p.default!r}`".replace("'", "")
        rows.append(f"| `{p.name}` | {p.type.__name__} | {default} | "
                    f"{', '.join(p.steps) or '(pipeline)'} | {p.allowed()} | "
                    f"{p.help.replace('|', '/')} |")
    return "\n".join(rows)


README_BEGIN = "<!-- parameters table: generated by python -m pipeline.params --readme -->"
README_END = "<!-- end of the parameters table -->"


def readme_with_table(text):
    """README text with the generated table between its two marker lines."""
    start, end = text.index(README_BEGIN) + len(README_BEGIN), text.index(README_END)
    return text[:start] + "\n" + markdown_table() + "\n" + text[end:]


if __name__ == "__main__":  # python -m pipeline.params --readme: regenerate README's table
    import sys
    readme = REPO_ROOT / "README.md"
    if sys.argv[1:] != ["--readme"]:
        sys.exit("usage: python -m pipeline.params --readme")
    readme.write_text(readme_with_table(readme.read_text()))
