"""Install the ``caffe2torch`` Jupyter kernelspec: ipykernel's, naming the fork provisioner.

``python -m pipeline.kernelspec [--sys-prefix | --prefix DIR | --user] [--name caffe2torch]``.
Jupyter Lab, papermill and run_all.py then start its kernels through ``ForkProvisioner``
(pipeline/kernelfork.py); ``--no-fork`` installs the plain kernelspec instead.
"""
import argparse
import json
import sys
import tempfile
from pathlib import Path

# What the fork server imports once for all kernels: what every notebook imports anyway.
# As ipykernel does before it runs user code: matplotlib reads MPLBACKEND when imported.
PRELOAD = ("import os\n"
           "os.environ.setdefault('MPLBACKEND', 'module://matplotlib_inline.backend_inline')\n"
           "import numpy, torch, matplotlib.pyplot, caffe2torch.python.core, caffe2torch.ops\n"
           "caffe2torch.ops.load_families()\n")


def install(name="caffe2torch", display_name="Python (caffe2torch)", prefix=None, user=False,
            fork=True, preload=PRELOAD):
    """Write the kernelspec (ipykernel's argv for this Python) and return its folder."""
    from ipykernel.kernelspec import write_kernel_spec
    from jupyter_client.kernelspec import KernelSpecManager

    from pipeline import kernelfork
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(write_kernel_spec(f"{tmp}/{name}", overrides={"display_name": display_name}))
        if fork:  # added to ipykernel's metadata (debugger, ...), which overrides would replace
            spec = json.loads((path / "kernel.json").read_text())
            spec.setdefault("metadata", {})["kernel_provisioner"] = {
                "provisioner_name": kernelfork.NAME, "config": {"preload": preload}}
            (path / "kernel.json").write_text(json.dumps(spec, indent=1) + "\n")
        return KernelSpecManager().install_kernel_spec(str(path), name, user=user, prefix=prefix)


def main(argv=None):
    """The command line."""
    parser = argparse.ArgumentParser(prog="python -m pipeline.kernelspec",
                                     description=__doc__.splitlines()[0])
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--sys-prefix", action="store_true", help="into this Python's prefix")
    where.add_argument("--prefix", help="into this prefix")
    where.add_argument("--user", action="store_true", help="into the user's Jupyter folder")
    parser.add_argument("--name", default="caffe2torch")
    parser.add_argument("--no-fork", action="store_true", help="no fork provisioner")
    args = parser.parse_args(argv)
    prefix = sys.prefix if args.sys_prefix else args.prefix
    print(install(args.name, prefix=prefix, user=args.user, fork=not args.no_fork))
    return 0


if __name__ == "__main__":
    sys.exit(main())
