"""Caffe2's ``workspace``: the blobs (torch tensors on their op's device) and the created nets."""
import os

import numpy as np
from caffe2torch.ops.registry import Deferred
from caffe2torch.proto import caffe2_pb2
from caffe2torch.python import scope

# torch and the executor load on first use: ResetWorkspace and friends stay light to import.


class Workspace:
    """A set of named blobs, created nets and a root folder."""

    def __init__(self, root_folder=None):
        self.blobs = {}
        self.nets = {}
        self.root_folder = os.path.abspath(root_folder or os.getcwd())


_workspaces = {"default": Workspace()}
_current = ["default"]


def C():
    """The current Workspace object."""
    return _workspaces[_current[0]]


def SwitchWorkspace(name, create_if_missing=False):
    """Make workspace ``name`` current (created when ``create_if_missing``)."""
    if name not in _workspaces:
        if not create_if_missing:
            raise KeyError(f"no workspace named {name!r}; pass create_if_missing=True to create it")
        _workspaces[name] = Workspace()
    _current[0] = name


def CurrentWorkspace():
    """The name of the current workspace."""
    return _current[0]


def Workspaces():
    """Names of all workspaces."""
    return list(_workspaces)


def ResetWorkspace(root_folder=None):
    """Drop all blobs and nets; ``root_folder`` (created if missing) becomes the root."""
    ws = C()
    for net in ws.nets.values():
        net.close()
    ws.blobs.clear()
    ws.nets.clear()
    if root_folder is not None:
        os.makedirs(root_folder, exist_ok=True)
        ws.root_folder = os.path.abspath(root_folder)
    return True


def RootFolder():
    """The root folder of the current workspace."""
    return C().root_folder


def Blobs():
    """Names of the blobs in the current workspace, sorted."""
    return sorted(C().blobs)


def HasBlob(name):
    """True when blob ``name`` exists."""
    return str(name) in C().blobs


def _proto(net):
    if isinstance(net, caffe2_pb2.NetDef):
        return net
    if hasattr(net, "Proto"):
        return net.Proto()
    raise TypeError(f"expected a core.Net or a NetDef, got {type(net).__name__}")


def FeedBlob(name, arr, device_option=None):
    """Store ``arr`` (numpy array, tensor, scalar, bytes or str) as blob ``name``."""
    import torch

    from caffe2torch.python.executor import torch_device
    option = device_option if device_option is not None else scope.CurrentDeviceScope()
    device = torch_device(option)
    if isinstance(arr, (bytes, str)):
        value = arr.encode("utf-8") if isinstance(arr, str) else arr
    elif isinstance(arr, torch.Tensor):
        value = arr.detach().clone().to(device)
    else:
        array = np.asarray(arr)
        if array.dtype == np.float64 and not isinstance(arr, np.ndarray):
            array = array.astype(np.float32)  # Python floats → Caffe2's default float
        if array.dtype.kind in "OSU":
            value = array  # string tensors stay numpy object arrays
        else:
            value = torch.tensor(array, device=device)
    C().blobs[str(name)] = value
    return True


def FetchBlob(name):
    """The value of blob ``name``: a numpy array for tensors, bytes for strings."""
    name = str(name)
    blobs = C().blobs
    if name not in blobs:
        raise KeyError(f"blob {name!r} does not exist in the workspace")
    value = blobs[name]
    if type(value) is Deferred:
        value = blobs[name] = value.resolve()
    if value is None:
        raise RuntimeError(f"blob {name!r} exists but has no value yet: run the net that writes it")
    if hasattr(value, "detach"):  # a torch tensor
        return value.detach().cpu().numpy().copy()
    return value


def FetchTorch(name):
    """The torch tensor behind blob ``name`` (no copy): caffe2torch's own addition."""
    blobs = C().blobs
    value = blobs[str(name)]
    if type(value) is Deferred:
        value = blobs[str(name)] = value.resolve()
    return value


def RunOperatorOnce(operator):
    """Run one OperatorDef."""
    net = caffe2_pb2.NetDef(name="operator_once")
    net.op.append(operator)
    return RunNetOnce(net)


def RunOperatorsOnce(operators):
    """Run OperatorDefs in order."""
    net = caffe2_pb2.NetDef(name="operators_once")
    net.op.extend(operators)
    return RunNetOnce(net)


def _with_device_option(proto, device_option):
    """A copy of ``proto`` whose net and ops all use ``device_option`` (None: ``proto`` itself)."""
    if device_option is None:
        return proto
    out = caffe2_pb2.NetDef()
    out.CopyFrom(proto)
    for option in [out.device_option] + [op.device_option for op in out.op]:
        seed = option.random_seed if option.HasField("random_seed") else None
        option.CopyFrom(device_option)
        if seed is not None and not device_option.HasField("random_seed"):
            option.random_seed = seed  # a seeded op keeps its seed on the new device
    return out


def RunNetOnce(net, device_option=None):
    """Run a net once without keeping it.

    ``device_option`` (caffe2torch's addition) replaces the device of the net and of every op,
    e.g. ``core.DeviceOption(caffe2_pb2.CPU)`` to run a net saved with CUDA options on the CPU.
    """
    from caffe2torch.python.executor import PreparedNet
    prepared = PreparedNet(_with_device_option(_proto(net), device_option), C())
    try:
        return prepared.run(1)
    finally:
        prepared.close()


def CreateNet(net, overwrite=False, input_blobs=None, device_option=None):
    """Prepare ``net`` for repeated RunNet calls; its output blobs are created empty.

    ``device_option`` replaces every op's device, as for :func:`RunNetOnce`.
    """
    proto = _with_device_option(_proto(net), device_option)
    ws = C()
    for name in input_blobs or ():
        ws.blobs.setdefault(str(name), None)
    if proto.name in ws.nets:
        if not overwrite:
            raise RuntimeError(f"a net named {proto.name!r} already exists; pass overwrite=True")
        ws.nets.pop(proto.name).close()
    from caffe2torch.python.executor import PreparedNet
    ws.nets[proto.name] = PreparedNet(proto, ws)
    return True


def RunNet(name, num_iter=1, allow_fail=False):
    """Run the created net ``name`` (a name, core.Net or NetDef) ``num_iter`` times."""
    key = name if isinstance(name, str) else _proto(name).name
    try:
        prepared = C().nets[key]
    except KeyError:
        raise KeyError(f"net {key!r} was not created; call workspace.CreateNet(net) first") from None
    if allow_fail:
        try:
            return prepared.run(num_iter)
        except Exception:
            return False
    return prepared.run(num_iter)


def Nets():
    """Names of the created nets."""
    return list(C().nets)


def GetNameScope():
    """The current name scope (Caffe2 API)."""
    return scope.CurrentNameScope()
