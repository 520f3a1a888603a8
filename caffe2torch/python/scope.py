"""Name and device scopes (Caffe2's ``scope``): context managers with thread-local state."""
import contextlib
import threading

from caffe2torch.proto import caffe2_pb2

_SEPARATOR = "/"
_NAMESCOPE_SEPARATOR = _SEPARATOR  # Caffe2's name, which user code reaches for
_local = threading.local()


def CurrentNameScope():
    """The active name-scope prefix, ending in '/' unless empty."""
    return getattr(_local, "namescope", "")


def CurrentDeviceScope():
    """The active DeviceOption, or None."""
    return getattr(_local, "devicescope", None)


@contextlib.contextmanager
def NameScope(prefix, reset=False):
    """Prefix blob names created inside the block with ``prefix/`` (nested scopes join)."""
    if prefix is not None and not isinstance(prefix, str):
        raise TypeError("NameScope takes a string prefix")
    old = CurrentNameScope()
    prefix = prefix + _SEPARATOR if prefix else ""
    _local.namescope = prefix if reset else old + prefix
    try:
        yield
    finally:
        _local.namescope = old


@contextlib.contextmanager
def DeviceScope(scope, node_name=None):
    """Run ops created inside the block on the DeviceOption ``scope`` (None clears it)."""
    if scope is not None and not isinstance(scope, caffe2_pb2.DeviceOption):
        raise TypeError("DeviceScope expects a caffe2_pb2.DeviceOption, e.g. core.DeviceOption(caffe2_pb2.CUDA, 0)")
    new = None
    if scope is not None:
        new = caffe2_pb2.DeviceOption()
        new.CopyFrom(scope)
        if node_name:
            new.node_name = node_name
    old = CurrentDeviceScope()
    _local.devicescope = new
    try:
        yield
    finally:
        _local.devicescope = old
