"""Bounds that keep untrusted model files (NetDefs, minidb predictors) from harming the process.

A model file is data a user downloads, yet running its nets runs its ops. Two promises hold:

- **Files stay in the workspace.** Every file an op writes (Save, Print/Summarize with
  ``to_file=1``, ...) must resolve inside the workspace root folder (``workspace.RootFolder()``)
  or inside a folder the caller allowed with :func:`allow_writes_under` (or the environment
  variable ``CAFFE2TORCH_WRITABLE_DIRS``, folders separated by ``os.pathsep``). ``..`` and
  absolute paths that leave those folders are refused, ``absolute_path=1`` included.
- **Allocations from a file's numbers are bounded.** A blob whose size comes from a file (a
  fill op's ``shape``, a TensorProto's ``dims``) may take at most :data:`MAX_BLOB_BYTES`
  (default 1 GiB; ``CAFFE2TORCH_MAX_BLOB_BYTES`` or :func:`set_max_blob_bytes` changes it).

Both raise ``ValueError`` with a message that names the op or blob and says how to allow more.
"""
import contextlib
import math
import os

GIB = 1 << 30


def _env_bytes():
    raw = os.environ.get("CAFFE2TORCH_MAX_BLOB_BYTES", "")
    try:
        return int(raw) if raw else GIB
    except ValueError:
        raise ValueError(f"CAFFE2TORCH_MAX_BLOB_BYTES={raw!r} is not a whole number of bytes") \
            from None


MAX_BLOB_BYTES = _env_bytes()
_allowed = [os.path.realpath(p) for p in
            os.environ.get("CAFFE2TORCH_WRITABLE_DIRS", "").split(os.pathsep) if p]


def set_max_blob_bytes(n):
    """Set the most bytes one blob sized by a file's numbers may take; returns the old value."""
    global MAX_BLOB_BYTES
    old, MAX_BLOB_BYTES = MAX_BLOB_BYTES, int(n)
    return old


def _size(n):
    return f"{n / GIB:.1f} GiB" if n >= GIB / 10 else f"{n:,} bytes"


def check_blob_size(dims, itemsize, what):
    """Raise ValueError unless ``dims`` are non-negative and fit MAX_BLOB_BYTES; returns numel."""
    dims = [int(d) for d in dims]
    if any(d < 0 for d in dims):
        raise ValueError(f"{what}: dims {dims} hold a negative size")
    numel = math.prod(dims)
    if numel * itemsize > MAX_BLOB_BYTES:
        raise ValueError(
            f"{what}: dims {dims} need {_size(numel * itemsize)}, over caffe2torch's limit of "
            f"{_size(MAX_BLOB_BYTES)} per blob for sizes read from model files (raise it with "
            "CAFFE2TORCH_MAX_BLOB_BYTES or caffe2torch.limits.set_max_blob_bytes if you trust "
            "the file)")
    return numel


def _inside(path, folder):
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def writable_path(root_folder, path, what):
    """``path`` (relative to the workspace root, or absolute) if an op may write it, else raise."""
    full = os.path.realpath(os.path.join(root_folder, os.fspath(path)))
    folders = [os.path.realpath(root_folder)] + _allowed
    if not any(_inside(full, f) for f in folders):
        raise ValueError(
            f"{what} would write {full!r}, outside the workspace root {folders[0]!r}: ops may "
            "only write inside it (model files are untrusted). Allow a folder with "
            "caffe2torch.limits.allow_writes_under(folder) or CAFFE2TORCH_WRITABLE_DIRS")
    return full


@contextlib.contextmanager
def _undo(folder):
    try:
        yield folder
    finally:
        if folder in _allowed:
            _allowed.remove(folder)


def allow_writes_under(folder):
    """Let ops write files under ``folder`` too; use as a call, or ``with`` for a while only."""
    folder = os.path.realpath(os.fspath(folder))
    _allowed.append(folder)
    return _undo(folder)
