"""Caffe2's ``workspace``: the blobs (torch tensors on their op's device) and the created nets."""
import os
from typing import TYPE_CHECKING, Any

import numpy as np
from caffe2torch.ops.registry import Deferred
from caffe2torch.proto import caffe2_pb2
from caffe2torch.python import scope

if TYPE_CHECKING:
    from caffe2torch.python.core import BlobReference, Net

# torch and the executor load on first use: ResetWorkspace and friends stay light to import.


class Workspace:
    """A set of named blobs, created nets and a root folder."""

    def __init__(self, root_folder: str | os.PathLike | None = None) -> None:
        self.blobs = {}
        self.nets = {}
        self.root_folder = os.path.abspath(root_folder or os.getcwd())


_workspaces = {"default": Workspace()}
_current = ["default"]


def C() -> Workspace:
    """The current Workspace object."""
    return _workspaces[_current[0]]


def SwitchWorkspace(name: str, create_if_missing: bool = False) -> None:
    """Make workspace ``name`` current (created when ``create_if_missing``)."""
    if name not in _workspaces:
        if not create_if_missing:
            raise KeyError(f"no workspace named {name!r}; pass create_if_missing=True to create it")
        _workspaces[name] = Workspace()
    _current[0] = name


def CurrentWorkspace() -> str:
    """The name of the current workspace."""
    return _current[0]


def Workspaces() -> list[str]:
    """Names of all workspaces."""
    return list(_workspaces)


def ResetWorkspace(root_folder: str | os.PathLike | None = None) -> bool:
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


def RootFolder() -> str:
    """The root folder of the current workspace."""
    return C().root_folder


def Blobs() -> list[str]:
    """Names of the blobs in the current workspace, sorted."""
    return sorted(C().blobs)


def HasBlob(name: "str | BlobReference") -> bool:
    """True when blob ``name`` exists."""
    return str(name) in C().blobs


def _proto(net):
    if isinstance(net, caffe2_pb2.NetDef):
        return net
    if hasattr(net, "Proto"):
        return net.Proto()
    raise TypeError(f"expected a core.Net or a NetDef, got {type(net).__name__}")


def FeedBlob(name: "str | BlobReference", arr: Any,
             device_option: caffe2_pb2.DeviceOption | None = None) -> bool:
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


def FetchBlob(name: "str | BlobReference") -> Any:
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


def FetchTorch(name: "str | BlobReference") -> Any:
    """The torch tensor behind blob ``name`` (no copy): caffe2torch's own addition."""
    blobs = C().blobs
    value = blobs[str(name)]
    if type(value) is Deferred:
        value = blobs[str(name)] = value.resolve()
    return value


def RunOperatorOnce(operator: caffe2_pb2.OperatorDef) -> bool:
    """Run one OperatorDef."""
    net = caffe2_pb2.NetDef(name="operator_once")
    net.op.append(operator)
    return RunNetOnce(net)


def RunOperatorsOnce(operators: list[caffe2_pb2.OperatorDef]) -> bool:
    """Run OperatorDefs in order."""
    net = caffe2_pb2.NetDef(name="operators_once")
    net.op.extend(operators)
    return RunNetOnce(net)


def RunNetOnce(net: "Net | caffe2_pb2.NetDef") -> bool:
    """Run a net once without keeping it."""
    from caffe2torch.python.executor import PreparedNet
    prepared = PreparedNet(_proto(net), C())
    try:
        return prepared.run(1)
    finally:
        prepared.close()


def CreateNet(net: "Net | caffe2_pb2.NetDef", overwrite: bool = False,
              input_blobs: list[str] | None = None) -> bool:
    """Prepare ``net`` for repeated RunNet calls; its output blobs are created empty."""
    proto = _proto(net)
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


def RunNet(name: "str | Net | caffe2_pb2.NetDef", num_iter: int = 1,
           allow_fail: bool = False) -> bool:
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


def Nets() -> list[str]:
    """Names of the created nets."""
    return list(C().nets)


def GetNameScope() -> str:
    """The current name scope (Caffe2 API)."""
    return scope.CurrentNameScope()
