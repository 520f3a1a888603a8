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
        # What RootFolder() answers: Caffe2 keeps the string it was given ("." by default).
        self.root_folder_name = root_folder or "."


_workspaces = {"default": Workspace()}
_current = ["default"]


def C() -> Workspace:
    """The current Workspace object."""
    return _workspaces[_current[0]]


def SwitchWorkspace(name: str, create_if_missing: bool = False) -> None:
    """Make workspace ``name`` current (created when ``create_if_missing``)."""
    if name not in _workspaces:
        if not create_if_missing:
            raise MissingWorkspaceError(f"no workspace named {name!r}; pass "
                                        "create_if_missing=True to create it")
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
        ws.root_folder_name = root_folder
    return True


def RootFolder() -> str:
    """The root folder of the current workspace, as given to ResetWorkspace ("." by default)."""
    return C().root_folder_name


def Blobs() -> list[str]:
    """Names of the blobs in the current workspace, sorted."""
    return sorted(C().blobs)


def HasBlob(name: "str | BlobReference") -> bool:
    """True when blob ``name`` exists."""
    return str(name) in C().blobs


def _proto(net):
    if isinstance(net, caffe2_pb2.NetDef):
        return net
    if isinstance(net, (bytes, bytearray)):  # a serialized NetDef, as Caffe2 accepted
        return _parse(caffe2_pb2.NetDef, net)
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
        raise MissingBlobError(f"blob {name!r} does not exist in the workspace; FeedBlob it or "
                               "run the net that writes it")
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


def RunOperatorOnce(operator: "caffe2_pb2.OperatorDef | bytes") -> bool:
    """Run one OperatorDef (or a serialized one)."""
    if isinstance(operator, (bytes, bytearray)):
        operator = _parse(caffe2_pb2.OperatorDef, operator)
    net = caffe2_pb2.NetDef(name="operator_once")
    net.op.append(operator)
    return RunNetOnce(net)


def RunOperatorsOnce(operators: "list[caffe2_pb2.OperatorDef | bytes]") -> bool:
    """Run OperatorDefs (or serialized ones) in order."""
    net = caffe2_pb2.NetDef(name="operators_once")
    net.op.extend(_parse(caffe2_pb2.OperatorDef, op) if isinstance(op, (bytes, bytearray)) else op
                  for op in operators)
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


def RunNetOnce(net: "Net | caffe2_pb2.NetDef | bytes",
               device_option: "caffe2_pb2.DeviceOption | None" = None) -> bool:
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


def CreateNet(net: "Net | caffe2_pb2.NetDef | bytes", overwrite: bool = False,
              input_blobs: "list[str] | None" = None,
              device_option: "caffe2_pb2.DeviceOption | None" = None) -> bool:
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


# --- Caffe2's workspace API beyond the tutorial's ------------------------------------------------

class MissingWorkspaceError(RuntimeError, KeyError):
    """SwitchWorkspace to a workspace that does not exist: Caffe2's RuntimeError (a KeyError)."""

    def __str__(self):
        return self.args[0]


class MissingBlobError(RuntimeError, KeyError):
    """FetchBlob of a blob that does not exist: a RuntimeError as in Caffe2 (and a KeyError)."""

    def __str__(self):
        return self.args[0]


def _parse(message_type, data):
    message = message_type()
    message.ParseFromString(bytes(data))
    return message


def GlobalInit(args: list[str]) -> bool:
    """Accept Caffe2's command-line flags (the same as core.GlobalInit)."""
    from caffe2torch.python import core
    return core.GlobalInit(args)


def FetchBlobs(names: "list[str | BlobReference]") -> list:
    """FetchBlob of each name, as a list."""
    return [FetchBlob(name) for name in names]


class _BlobDict:
    """``workspace.blobs``: the current workspace's blobs as a dict (FetchBlob / FeedBlob)."""

    def __getitem__(self, key):
        return FetchBlob(key)

    def __setitem__(self, key, value):
        FeedBlob(key, value)

    def __delitem__(self, key):
        if str(key) not in C().blobs:
            raise KeyError(f"blob {str(key)!r} does not exist in the workspace")
        del C().blobs[str(key)]

    def __len__(self):
        return len(C().blobs)

    def __iter__(self):
        return iter(Blobs())

    def __contains__(self, key):
        return HasBlob(key)

    def keys(self):
        """The blob names, sorted."""
        return Blobs()

    def items(self):
        """(name, FetchBlob(name)) pairs of the blobs that hold a value."""
        return [(n, FetchBlob(n)) for n in Blobs() if C().blobs[n] is not None]

    def values(self):
        """FetchBlob of each blob that holds a value."""
        return [v for _, v in self.items()]

    def get(self, key, default=None):
        """FetchBlob(key), or ``default`` when the blob does not exist."""
        return FetchBlob(key) if HasBlob(key) else default

    def __repr__(self):
        return f"<workspace blobs {Blobs()}>"


blobs = _BlobDict()


def NumCudaDevices() -> int:
    """How many CUDA devices PyTorch sees (0 without CUDA)."""
    import torch
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


NumGpuDevices = NumCudaDevices
GpuDeviceType = caffe2_pb2.CUDA  # Caffe2's name for the GPU DeviceOption type (HIP on ROCm)


def NumHipDevices() -> int:
    """How many ROCm devices PyTorch sees (0 unless torch is a ROCm build)."""
    import torch
    return NumCudaDevices() if torch.version.hip else 0


def GetCUDAVersion() -> int:
    """CUDA runtime version as Caffe2's CUDA_VERSION (12.1 -> 12010); 0 without CUDA."""
    import torch
    if not torch.version.cuda:
        return 0
    major, minor = (int(p) for p in torch.version.cuda.split(".")[:2])
    return major * 1000 + minor * 10


def GetCuDNNVersion() -> int:
    """cuDNN version as its CUDNN_VERSION macro (torch.backends.cudnn.version()); 0 without it."""
    import torch
    if not torch.cuda.is_available():
        return 0
    return torch.backends.cudnn.version() or 0


def GetDeviceProperties(device_id: int) -> dict:
    """Caffe2's dict for GPU ``device_id``: name, major, minor, totalGlobalMem."""
    import torch
    if device_id >= NumCudaDevices():
        raise RuntimeError(f"GetDeviceProperties: no CUDA device {device_id} "
                           f"({NumCudaDevices()} visible)")
    p = torch.cuda.get_device_properties(device_id)
    return {"name": p.name, "major": p.major, "minor": p.minor,
            "totalGlobalMem": p.total_memory, "multiProcessorCount": p.multi_processor_count}


def GetGpuPeerAccessPattern() -> np.ndarray:
    """A numpy bool matrix: can GPU i access GPU j's memory."""
    import torch
    n = NumCudaDevices()
    return np.array([[i == j or torch.cuda.can_device_access_peer(i, j) for j in range(n)]
                     for i in range(n)], dtype=bool).reshape(n, n)


def GetGPUMemoryInfo() -> dict:
    """{'total_by_gpu': [...], 'max_by_gpu': [...]} bytes allocated by PyTorch on each GPU."""
    import torch
    n = NumCudaDevices()
    total = [torch.cuda.memory_allocated(i) for i in range(n)]
    peak = [torch.cuda.max_memory_allocated(i) for i in range(n)]
    return {"total_by_gpu": total, "max_by_gpu": peak, "total": sum(total), "max_total": sum(peak)}


def _gpu_flag(name):
    import torch
    if name == "has_hip_support":
        return bool(torch.version.hip)
    if name == "has_cuda_support":
        return torch.cuda.is_available() and not torch.version.hip
    return torch.cuda.is_available()


_LAZY_FLAGS = ("has_gpu_support", "has_cuda_support", "has_hip_support")
# Caffe2 builds without these libraries answered False; so do we (always).
has_mkldnn = False
has_fbgemm = False
is_asan = False


def __getattr__(name):
    # The GPU flags need torch: computed on first access so importing workspace stays light.
    if name in _LAZY_FLAGS:
        value = _gpu_flag(name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'workspace' has no attribute {name!r}")


def StringifyProto(obj: Any) -> bytes:
    """A proto (or anything with Proto()) serialized, as Caffe2 gives it; strings pass through."""
    if isinstance(obj, (str, bytes)):
        return obj
    return (obj.Proto() if hasattr(obj, "Proto") else obj).SerializeToString()


def StringifyBlobName(name: Any) -> str:
    """The blob name of a string or BlobReference."""
    return str(name)


def StringifyNetName(name: Any) -> str:
    """The net name of a string, core.Net or NetDef."""
    return name if isinstance(name, str) else _proto(name).name


def GetNetName(net: Any) -> str:
    """The name of a core.Net or NetDef."""
    return _proto(net).name


def RunPlan(plan_or_step: Any) -> bool:
    """Run a PlanDef, core.Plan, ExecutionStep or core.ExecutionStep (or a serialized PlanDef)."""
    from caffe2torch.python import plan_runner
    return plan_runner.run_plan(plan_or_step, C())


from caffe2torch.python.workspace_extras import (  # noqa: E402,F401
    BackgroundPlan, CreateBlob, DeserializeBlob, GetBlobSizeBytes, RunPlanInBackground,
    SerializeBlob)


def InferShapesAndTypes(nets: list, blob_dimensions: dict | None = None, nets_proto: bool = False,
                        blob_types: dict | None = None) -> tuple[dict, dict]:
    """({blob: shape}, {blob: DataType}) of the nets' blobs, found by running them on a copy."""
    from caffe2torch.python import shape_inference
    return shape_inference.infer_shapes_and_types(nets, C(), blob_dimensions, blob_types)


def Predictor(init_net: Any, predict_net: Any) -> Any:
    """Caffe2's Predictor: runs ``init_net`` once, then ``predict_net`` on each run()."""
    from caffe2torch.python.predictor.eager_predictor import Predictor as impl
    return impl(init_net, predict_net)


# workspace.C is both the function above (the current Workspace) and Caffe2's binding namespace.
from caffe2torch.python import workspace_c as _workspace_c  # noqa: E402  (needs C defined)

C = _workspace_c.Namespace(C)
