"""``run_all.py`` / ``caffe2torch-pipeline``: run the notebooks in order with papermill.

Exit codes: 0 success; 1 a step failed (or the test accuracy is below ``min_test_accuracy``);
2 bad usage or parameters, or the run folder is locked by another run; 130 interrupted (SIGINT),
143 terminated (SIGTERM).
Everything that can be checked without a kernel is checked before the first kernel starts.
"""
import argparse
import logging
import os
import sys
import unittest.mock
from pathlib import Path

from pipeline import execute, params
from pipeline.params import STEPS, UsageError

PROG = "run_all.py"


class _Param(argparse.Action):
    """-p KEY VALUE (papermill's form) or -p KEY=VALUE."""

    def __call__(self, parser, namespace, values, option_string=None):
        if len(values) == 1 and "=" in values[0]:
            values = values[0].split("=", 1)
        if len(values) != 2 or not values[0].strip() or "=" in values[0]:
            parser.error(f"-p {' '.join(values)}: expected -p KEY VALUE or -p KEY=VALUE, "
                         "e.g. -p train_iters 500")
        getattr(namespace, self.dest).append(("-p", values[0].strip(), values[1]))


class _Layer(argparse.Action):
    """-f FILE and -y YAML keep their order with -p: later ones win."""

    def __call__(self, parser, namespace, values, option_string=None):
        getattr(namespace, self.dest).append((option_string, values))


def version():
    """This pipeline's version line (the installed caffe2torch distribution's and papermill's)."""
    found = execute.versions()
    return (f"{PROG} {found['caffe2torch'] or '(caffe2torch not installed)'} "
            f"(papermill {found['papermill']}, Python {found['python']})")


def parse_args(argv):
    """The command line (argparse exits 2 on bad usage)."""
    parser = argparse.ArgumentParser(
        prog=PROG, description="Run the MNIST notebooks (" + " → ".join(STEPS) + ") with "
        "papermill into <outputs>/<run-id>/. Parameters: defaults from the notebooks' "
        "parameters cells, then -f, -y and -p in the order given.")
    parser.add_argument("-f", "--parameters-file", "--params-file", dest="layers", default=[],
                        action=_Layer, metavar="FILE", help="YAML file of parameters (repeatable)")
    parser.add_argument("-y", "--parameters-yaml", dest="layers", action=_Layer, metavar="YAML",
                        help="YAML string of parameters, e.g. -y 'train_iters: 500'")
    parser.add_argument("-p", "--parameters", dest="layers", action=_Param, nargs="+",
                        metavar=("KEY", "VALUE"), help="-p KEY VALUE or -p KEY=VALUE")
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
    parser.add_argument("--fresh-kernels", action="store_true", help="start every kernel as a new "
                        "Python process, not a fork of the kernel fork server")
    parser.add_argument("--log-level", default="WARNING", type=str.upper,
                        choices=("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"),
                        help="papermill's own messages at this level (INFO: its 'Executing Cell' "
                        "lines); default WARNING")
    parser.add_argument("-q", "--quiet", action="store_true",
                        help="show neither the step counters nor the cells' output")
    parser.add_argument("--version", action="version", version=version())
    return parser.parse_args(argv)


def main(argv=None):
    """The command's entry point; returns the exit code."""
    args = parse_args(argv)
    try:
        if args.list:
            print(params.list_text())
            return 0
        _read_documents(args)
        return _run(args)
    except UsageError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2


FILE_OPTIONS = ("-f", "--parameters-file", "--params-file")


def _read_documents(args):
    """Read every -f and -y once before anything imports papermill (~1.4 s): a params file that
    is not strict YAML (aliases, duplicate keys, deep nesting, not UTF-8) is refused at once."""
    for kind, *rest in args.layers:
        if kind in FILE_OPTIONS:
            params.load_file(rest[0])
        elif kind != "-p":
            params.load_yaml(rest[0], "-y")


def _layers(args):
    """(origin, mapping) for each -f, -y and -p, in the order given."""
    schema = params.schema()
    for kind, *rest in args.layers:
        if kind in FILE_OPTIONS:
            yield f"in {rest[0]}", params.load_file(rest[0])
        elif kind == "-p":
            yield "from -p", {rest[0]: params.parse_value(schema, *rest)}
        else:
            yield "from -y", params.load_yaml(rest[0], "-y")


def _run(args):
    outputs = execute.check_outputs(Path(args.outputs).resolve() if args.outputs
                                    else params.REPO_ROOT / "outputs")
    run_id = execute.check_run_id(args.run_id) if args.run_id is not None else \
        execute.new_run_id()
    run_dir = outputs / run_id
    steps = execute.select_steps(args.from_step, args.only)
    if not args.dry_run and not args.fresh_kernels:
        from pipeline import kernelfork  # its imports run while papermill's do, below
        kernelfork.warm(execute.kernel_spec(steps[0])[1])
    previous = execute.read_json(run_dir / "run.json")
    layers = [("resumed run.json", (previous or {}).get("params") or {})] if previous else []
    values = params.resolve(layers + list(_layers(args)))
    execute.check_order(steps, previous, run_id)
    execute.check_resumed(steps, previous, values)
    wants_gpu = values.get("device", "cpu") != "cpu"
    probe = execute.probe_cuda() if wants_gpu and not execute.cpu_only_torch() else None
    try:
        for step in steps:
            execute.kernel_spec(step)
        device = execute.resolve_device(values.get("device", "cpu"), probe)
    finally:
        if probe is not None and probe.poll() is None:
            probe.kill()
            probe.communicate()
    plan = {step: params.for_step(step, {**values, "device": device}) for step in steps}
    if args.dry_run:
        print(f"run {run_id} in {run_dir} on {device}")
        for step, step_values in plan.items():
            shown = {k: params.redact(v) for k, v in step_values.items()}
            print(f"  {step}: notebooks/{params.notebook_path(step).name} with {shown}")
        return 0
    _logging(args.log_level)
    return _execute(args, outputs, run_id, run_dir, values, plan, device, previous)


def _logging(level):
    """papermill's logger at ``level`` (its cell output comes through stdout_file instead)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("papermill: %(message)s"))
    logger = logging.getLogger("papermill")
    logger.handlers[:] = [handler]
    logger.setLevel(level)
    logger.propagate = False


def _execute(args, outputs, run_id, run_dir, values, plan, device, previous):
    from filelock import FileLock, Timeout

    from pipeline import kernelfork
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(run_dir / ".lock"), timeout=0).acquire()
    except Timeout:  # an OSError too
        raise UsageError(f"run folder {run_dir} is in use by another run (lock {run_dir}/.lock "
                         "is held); wait for it or pick another --run-id") from None
    except OSError as e:
        raise UsageError(f"cannot create the run folder {run_dir}: {e.strerror}") from None
    fresh = {kernelfork.DISABLE: "0"} if args.fresh_kernels else {}
    with lock, unittest.mock.patch.dict(os.environ, fresh):
        return execute.Run(
            outputs, run_id, values, plan, device, previous,
            params_files=[rest[0] for kind, *rest in args.layers if kind in FILE_OPTIONS],
            overrides=[f"{rest[0]}={rest[1]}" if kind == "-p" else f"-y {rest[0]}"
                       for kind, *rest in args.layers if kind not in FILE_OPTIONS],
            quiet=args.quiet, launches=kernelfork.last_launch).execute()
