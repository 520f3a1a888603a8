"""Install the ``caffe2torch`` kernelspec (``pipeline/kernel/kernel.json``) for this Python.

``python -m pipeline.kernelspec [--user | --prefix DIR]`` (default: this environment's
``sys.prefix``, as ``make kernel`` and the image do). The installed kernel.json names this
interpreter by its absolute path, so a Jupyter, papermill or VS Code started from anywhere runs
the kernel in the environment that has caffe2torch, and the fork provisioner named there.
"""
import argparse
import json
import os
import sys
from pathlib import Path

NAME = "caffe2torch"
SOURCE = Path(__file__).resolve().parent / "kernel"


def install(prefix=None, user=False, python=None):
    """Install the kernelspec; returns the folder it went to."""
    from jupyter_client.kernelspec import KernelSpecManager

    folder = KernelSpecManager().install_kernel_spec(
        str(SOURCE), NAME, user=user, prefix=None if user else (prefix or sys.prefix), replace=True)
    path = Path(folder) / "kernel.json"
    spec = json.loads(path.read_text())
    spec["argv"][0] = python or sys.executable
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(spec, indent=1) + "\n")
    os.replace(tmp, path)
    return folder


def main(argv=None):
    """The command line."""
    parser = argparse.ArgumentParser(prog="python -m pipeline.kernelspec", description=__doc__)
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--user", action="store_true", help="install for this user only")
    where.add_argument("--prefix", help="install under DIR/share/jupyter/kernels")
    args = parser.parse_args(argv)
    print(f"installed kernelspec {NAME} in {install(args.prefix, args.user)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
