"""Caffe2's ``models.download``: fetch a zoo model's init_net.pb and predict_net.pb.

Usage, as in Caffe2::

    python -m caffe2torch.python.models.download squeezenet        # into ./squeezenet/
    python -m caffe2torch.python.models.download -i squeezenet     # install: importable as
                                                                   # caffe2torch.python.models.squeezenet

Files come from Caffe2's ``DOWNLOAD_BASE_URL`` + ``<model>/<file>``; ``--base_url`` (or
``$CAFFE2TORCH_MODELS_URL``) points at a mirror or a local folder (``file:///path/``). ``-i``
installs into :func:`caffe2torch.python.models.install_folder` and writes the package's
``__init__.py`` (Caffe2 symlinked its ``__sym_init__.py``). A Git LFS pointer served instead of
the file is refused, and a failed download leaves no model folder behind.
"""
import argparse
import os
import re
import shutil
import sys
import tempfile
import urllib.error
import urllib.request

from caffe2torch import limits
from caffe2torch.python.models import install_folder

DOWNLOAD_BASE_URL = "https://github.com/caffe2/models/raw/master/"  # Caffe2's
BASE_URL_ENV = "CAFFE2TORCH_MODELS_URL"
MODEL_FILES = ("predict_net.pb", "init_net.pb")
TIMEOUT_S = 60
LFS_POINTER = b"version https://git-lfs.github.com/spec/"

# The installed package's __init__.py: the parsed NetDefs as module attributes (Caffe2's
# __sym_init__.py did the same with caffe2_pb2).
INIT_PY = '''"""Model-zoo model installed by caffe2torch.python.models.download."""
import os

from caffe2torch.proto import caffe2_pb2


def _parseFile(filename):
    out_net = caffe2_pb2.NetDef()
    with open(os.path.join(os.path.dirname(__file__), filename), "rb") as f:
        out_net.ParseFromString(f.read())
    return out_net


init_net = _parseFile("init_net.pb")
predict_net = _parseFile("predict_net.pb")
'''


class DownloadError(Exception):
    """A model file could not be fetched (the message says which and why)."""


def getURLFromName(name, filename, base_url=None):
    """The URL of ``filename`` of model ``name`` under ``base_url`` (default Caffe2's)."""
    base_url = base_url or os.environ.get(BASE_URL_ENV) or DOWNLOAD_BASE_URL
    return "{}{}/{}".format(base_url if base_url.endswith("/") else base_url + "/", name, filename)


def _write_atomic(path, data):
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def downloadFromURLToFile(url, filename, max_bytes=None):
    """Stream ``url`` into ``filename`` (written whole or not at all, at most ``max_bytes``:
    default ``caffe2torch.limits.MAX_BLOB_BYTES``)."""
    max_bytes = limits.MAX_BLOB_BYTES if max_bytes is None else max_bytes
    print("Downloading from {}".format(url))
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(filename) or ".", prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f, urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
            first = response.read(len(LFS_POINTER))
            if first.startswith(LFS_POINTER):
                raise DownloadError("{} is a Git LFS pointer, not the model file: use a mirror "
                                    "that serves the file itself (--base_url)".format(url))
            size, chunk = 0, first
            while chunk:
                size += len(chunk)
                if size > max_bytes:
                    raise DownloadError(
                        "{} is larger than {} bytes, the limit for one model file: raise "
                        "CAFFE2TORCH_MAX_BLOB_BYTES if it is right".format(url, max_bytes))
                f.write(chunk)
                chunk = response.read(1 << 20)
        print("Writing to {}".format(filename))
        os.replace(tmp, filename)
    except BaseException as e:
        os.unlink(tmp)
        if isinstance(e, urllib.error.HTTPError):
            raise DownloadError("Could not download model. [HTTP Error] {}: {}.".format(
                e.code, e.reason)) from e
        if isinstance(e, urllib.error.URLError):
            raise DownloadError("Could not download model. [URL Error] {}.".format(
                e.reason)) from e
        raise


def validModelName(name):
    """A model name is a Python identifier other than ``__init__`` (Caffe2 also refused digits)."""
    return name != "__init__" and re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", name) is not None


def downloadModel(model, args):
    """Download ``model`` into ./<model>, or with ``args.install`` install it (see module doc)."""
    model_folder = os.path.join(install_folder(), model) if args.install else model
    if os.path.exists(model_folder):
        if not args.force:
            raise DownloadError("{} already exists: pass -f to overwrite it".format(model_folder))
        print("Overwriting existing {}".format(model_folder))
        if os.path.isdir(model_folder):
            shutil.rmtree(model_folder)
        else:
            os.remove(model_folder)
    os.makedirs(model_folder)
    try:
        for f in MODEL_FILES:
            downloadFromURLToFile(getURLFromName(model, f, getattr(args, "base_url", None)),
                                  os.path.join(model_folder, f))
        if args.install:
            _write_atomic(os.path.join(model_folder, "__init__.py"), INIT_PY.encode())
    except BaseException:
        print("Cleaning up...")
        shutil.rmtree(model_folder, ignore_errors=True)
        raise


def main(argv=None):
    """Command line: ``download [-i] [-f] [--base_url URL] model [model ...]``; returns 0 or 1."""
    parser = argparse.ArgumentParser(description="Download or install pretrained models.")
    parser.add_argument("model", nargs="+", help="Model to download/install.")
    parser.add_argument("-i", "--install", action="store_true", help="Install the model.")
    parser.add_argument("-f", "--force", action="store_true", help="Force a download/installation.")
    parser.add_argument("--base_url", default=None,
                        help="where <model>/<file> are fetched from (default ${} or Caffe2's {})"
                        .format(BASE_URL_ENV, DOWNLOAD_BASE_URL))
    args = parser.parse_args(argv)
    for model in args.model:
        if not validModelName(model):
            print("'{}' is not a valid model name.".format(model), file=sys.stderr)
            return 1
        try:
            downloadModel(model, args)
        except DownloadError as e:
            print("Abort: {}".format(e), file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
