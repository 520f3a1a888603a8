"""Caffe2's ``core``: nets, blob references and operator creation, building NetDef protos.

Example::

    net = core.Net("my_net")
    y = net.Relu(["x"], "y")        # adds a Relu op; returns BlobReference("y")
    print(net.Proto())              # protobuf text format
"""
import collections
import difflib
import logging

from caffe2torch.ops import registry
from caffe2torch.proto import caffe2_pb2
from caffe2torch.python import gradients, scope, utils
from caffe2torch.python.scope import DeviceScope, NameScope  # noqa: F401  (Caffe2 re-exports)

DataType = caffe2_pb2.TensorProto.DataType
log = logging.getLogger("caffe2torch")

_flags = {}


def GlobalInit(args: list[str]) -> bool:
    """Accept Caffe2's command-line flags (``['caffe2', '--caffe2_log_level=0', ...]``)."""
    it = iter(args[1:] if args and not str(args[0]).startswith("-") else args)
    for raw in it:
        raw = str(raw)
        if not raw.startswith("--"):
            raise ValueError(f"GlobalInit: {raw!r} is not a flag; pass flags like --caffe2_log_level=0")
        name, sep, value = raw[2:].partition("=")
        if not sep:
            value = "true"
        _flags[name] = value
    level = _flags.get("caffe2_log_level")
    if level is not None:
        # Caffe2: 0 = INFO, 1 = WARNING, 2 = ERROR, 3 = FATAL; negative = verbose.
        num = int(level)
        log.setLevel({0: logging.INFO, 1: logging.WARNING, 2: logging.ERROR}.get(
            num, logging.DEBUG if num < 0 else logging.CRITICAL))
    return True


def GetFlag(name: str, default: str | None = None) -> str | None:
    """The value of a flag given to GlobalInit, or ``default``."""
    return _flags.get(name, default)


def IsGPUDeviceType(device_type: int) -> bool:
    """True for CUDA and HIP (ROCm) device types."""
    return device_type in (caffe2_pb2.CUDA, caffe2_pb2.HIP)


def IsOperator(op_type: str) -> bool:
    """True when ``op_type`` is a registered operator."""
    return registry.is_registered(op_type)


def DeviceOption(device_type: int, device_id: int = 0, random_seed: int | None = None,
                 node_name: str | None = None, numa_node_id: int | None = None,
                 extra_info: list[str] | None = None) -> caffe2_pb2.DeviceOption:
    """A DeviceOption proto, e.g. ``DeviceOption(caffe2_pb2.CUDA, 0)``."""
    option = caffe2_pb2.DeviceOption()
    option.device_type = device_type
    option.cuda_gpu_id = device_id
    if node_name is not None:
        option.node_name = node_name
    if random_seed is not None:
        option.random_seed = random_seed
    if numa_node_id is not None:
        option.numa_node_id = numa_node_id
    if extra_info is not None:
        option.extra_info.extend(extra_info)
    return option


def ScopedName(name: str) -> str:
    """``name`` prefixed with the current name scope."""
    return scope.CurrentNameScope() + name


class BlobReference:
    """A named blob, optionally tied to the net that created it; calls ops as methods."""

    def __init__(self, name, net=None):
        self._name = str(name)
        self._from_net = net

    def __hash__(self):
        return hash(self._name)

    def __eq__(self, other):
        if isinstance(other, str):
            return self._name == other
        if isinstance(other, BlobReference):
            return self._name == other._name
        return NotImplemented

    def __ne__(self, other):
        return not self == other

    def __str__(self):
        return self._name

    def __repr__(self):
        return f'BlobReference("{self._name}")'

    def __add__(self, other):
        if not isinstance(other, str):
            raise RuntimeError("Cannot add BlobReference to a non-string.")
        return BlobReference(self._name + other, self._from_net)

    def __radd__(self, other):
        if not isinstance(other, str):
            raise RuntimeError("Cannot add a non-string to BlobReference.")
        return BlobReference(other + self._name, self._from_net)

    def Net(self):
        """The net that created this blob, or None."""
        return self._from_net

    def GetNameScope(self) -> str:
        """The name-scope prefix of this blob's name."""
        return self._name[: self._name.rfind("/") + 1]

    def GetUnscopedName(self) -> str:
        """The name without its name scope."""
        return self._name[self._name.rfind("/") + 1:]

    def __getattr__(self, op_type):
        if op_type.startswith("__") or self._from_net is None:
            raise AttributeError(op_type)

        def call(inputs=None, *args, **kwargs):
            inputs = [] if inputs is None else _rectify(inputs)
            return getattr(self._from_net, op_type)([self] + inputs, *args, **kwargs)

        return call


def ScopedBlobReference(name: str, *args, **kwargs) -> "BlobReference":
    """A BlobReference whose name gets the current name scope."""
    return BlobReference(ScopedName(name), *args, **kwargs)


def _rectify(blobs, net=None):
    """Inputs/outputs as a list of BlobReferences; strings get the current name scope."""
    if isinstance(blobs, str):
        return [ScopedBlobReference(blobs, net=net)]
    if isinstance(blobs, BlobReference):
        return [blobs]
    if isinstance(blobs, (list, tuple)):
        out = []
        for b in blobs:
            if isinstance(b, str):
                out.append(ScopedBlobReference(b, net=net))
            elif isinstance(b, BlobReference):
                out.append(b)
            else:
                raise TypeError(f"a blob must be a string or BlobReference, not {type(b).__name__}: {b!r}")
        return out
    raise TypeError(f"blobs must be a string, BlobReference or list of them, not {type(blobs).__name__}")


def CreateOperator(operator_type, inputs, outputs, name="", control_input=None,
                   device_option=None, arg=None, engine=None, debug_info=None,
                   **kwargs) -> caffe2_pb2.OperatorDef:
    """An OperatorDef of ``operator_type``; kwargs become its Arguments."""
    op = caffe2_pb2.OperatorDef()
    op.type = operator_type
    op.name = name
    op.input.extend(str(i) for i in _rectify(inputs))
    op.output.extend(str(o) for o in _rectify(outputs))
    if control_input:
        op.control_input.extend(str(i) for i in _rectify(control_input))
    if device_option is not None:
        op.device_option.CopyFrom(device_option)
    elif scope.CurrentDeviceScope() is not None:
        op.device_option.CopyFrom(scope.CurrentDeviceScope())
    if engine is not None:
        op.engine = engine
    if debug_info is not None:
        op.debug_info = debug_info
    if "random_seed" in kwargs:
        op.device_option.random_seed = kwargs.pop("random_seed")
    if arg is not None:
        op.arg.extend(arg)
    for key, value in kwargs.items():
        if value is None:
            raise ValueError(f"CreateOperator({operator_type!r}): argument {key!r} is None; as in "
                             "Caffe2 an argument needs a value (leave it out instead)")
        op.arg.add().CopyFrom(utils.MakeArgument(key, value))
    return op


class Net:
    """A NetDef under construction; ``net.SomeOp(inputs, outputs, **args)`` adds an op."""

    _net_names_used = set()

    @staticmethod
    def current_prefix():
        """The current name scope (Caffe2 API)."""
        return scope.CurrentNameScope()

    @staticmethod
    def _get_next_net_name(basename):
        name = basename
        index = 1
        while name in Net._net_names_used:
            name = f"{basename}_{index}"
            index += 1
        Net._net_names_used.add(name)
        return name

    def __init__(self, name_or_proto):
        self._op_outputs = set()
        self._registered_blob_names = set()  # names NextBlob gave out
        self._external_input_map = set()
        if isinstance(name_or_proto, caffe2_pb2.NetDef):
            self._net = caffe2_pb2.NetDef()
            self._net.CopyFrom(name_or_proto)
            for op in self._net.op:
                self._op_outputs.update(op.output)
            self._external_input_map.update(self._net.external_input)
            name = self._net.name
            prefix = name + "_blob_"
            indices = [int(s[len(prefix):]) for op in self._net.op for s in list(op.input) + list(op.output)
                       if s.startswith(prefix) and s[len(prefix):].isdigit()]
            self._next_name_index = max(indices) + 1 if indices else 0
        elif isinstance(name_or_proto, str) or name_or_proto is None:
            self._net = caffe2_pb2.NetDef()
            name = name_or_proto or ""  # Caffe2: core.Net(None) is a net named ""
            self._next_name_index = 0
        else:
            raise TypeError("Net() takes a name or a caffe2_pb2.NetDef")
        self._net.name = Net._get_next_net_name(name)

    def __str__(self):
        return self.Name()

    def Name(self) -> str:
        """The (unique) net name."""
        return self._net.name

    def Proto(self) -> caffe2_pb2.NetDef:
        """The NetDef being built (print it for protobuf text format)."""
        return self._net

    def BlobIsDefined(self, blob: "str | BlobReference") -> bool:
        """True when ``blob`` is produced by an op of this net or is an external input."""
        name = str(blob)
        return name in self._op_outputs or name in self._external_input_map

    def NextName(self, prefix: str | None = None, output_id: int | None = None) -> str:
        """A fresh blob name, ``<net>/<prefix>`` or ``<net>_blob_<n>``."""
        if prefix:
            base = self._net.name + "/" + prefix
            name = base + (f":{output_id}" if output_id is not None else "")
            index = 2
            while self.BlobIsDefined(ScopedName(name)):
                name = f"{base}_{index}" + (f":{output_id}" if output_id is not None else "")
                index += 1
            return name
        name = f"{self._net.name}_blob_{self._next_name_index}"
        self._next_name_index += 1
        return name

    def NextBlob(self, prefix: str = "unnamed") -> "BlobReference":
        """``prefix``, else ``prefix_auto_<n>``: a name no op of this net defines (Caffe2)."""
        registered = self._registered_blob_names
        name, index = str(prefix), 0
        while name in registered or self.BlobIsDefined(name):
            name = f"{prefix}_auto_{index}"
            index += 1
        registered.add(name)
        return BlobReference(name, self)

    def NextScopedBlob(self, prefix: str = "unnamed") -> "BlobReference":
        """NextBlob of the name-scoped ``prefix``."""
        return self.NextBlob(ScopedName(prefix))

    def AddExternalInput(self, *inputs):
        """Declare blobs that the net reads but does not produce; returns their references."""
        if len(inputs) == 1 and isinstance(inputs[0], (list, tuple)):
            inputs = inputs[0]
        refs = []
        for blob in inputs:
            name = str(blob)
            if name in self._external_input_map:
                raise ValueError(f"net {self.Name()} already has an external input named {name!r}")
            self._external_input_map.add(name)
            self._net.external_input.append(name)
            refs.append(BlobReference(name, self))
        return refs[0] if len(refs) == 1 else refs

    AddExternalInputs = AddExternalInput

    def AddExternalOutput(self, *outputs):
        """Declare blobs that the net produces for its caller."""
        if len(outputs) == 1 and isinstance(outputs[0], (list, tuple)):
            outputs = outputs[0]
        for blob in outputs:
            self._net.external_output.append(str(blob))
        return outputs[0] if len(outputs) == 1 else outputs

    AddExternalOutputs = AddExternalOutput

    @property
    def external_inputs(self) -> "list[BlobReference]":
        """External inputs as BlobReferences."""
        return [BlobReference(n, self) for n in self._net.external_input]

    @property
    def external_outputs(self) -> "list[BlobReference]":
        """External outputs as BlobReferences."""
        return [BlobReference(n, self) for n in self._net.external_output]

    def RunAllOnGPU(self, gpu_id: int = 0, use_cudnn: bool = False) -> None:
        """Run every op on CUDA device ``gpu_id`` (sets the net's DeviceOption)."""
        self._net.device_option.CopyFrom(DeviceOption(caffe2_pb2.CUDA, gpu_id))
        if use_cudnn:
            for op in self._net.op:
                op.engine = "CUDNN"

    def Clone(self, name: str, blob_remap: dict[str, str] | None = None, op_id_mask=None,
              remap_funcs=None, keep_schema: bool = True,
              update_external_list: bool = False) -> "Net":
        """A copy of this net under ``name``, with blobs renamed by ``blob_remap``.

        ``update_external_list``: the external inputs/outputs are recomputed from the kept ops
        (blobs read before any kept op writes them / written and never read after).
        """
        proto = caffe2_pb2.NetDef()
        proto.CopyFrom(self._net)
        proto.name = name
        remap = {str(k): str(v) for k, v in (blob_remap or {}).items()}
        if op_id_mask is not None:
            kept = [proto.op[i] for i in op_id_mask]
            del proto.op[:]
            proto.op.extend(kept)
        for op in proto.op:
            op.input[:] = [remap.get(n, n) for n in op.input]
            op.output[:] = [remap.get(n, n) for n in op.output]
        proto.external_input[:] = [remap.get(n, n) for n in proto.external_input]
        proto.external_output[:] = [remap.get(n, n) for n in proto.external_output]
        if update_external_list:
            written, read = set(), set()
            inputs, outputs = [], []
            for op in proto.op:
                inputs += [n for n in op.input if n not in written and n not in inputs]
                written.update(op.output)
            for op in reversed(proto.op):
                outputs += [n for n in op.output if n not in read and n not in outputs]
                read.update(op.input)
            proto.external_input[:] = inputs
            proto.external_output[:] = outputs[::-1]
        return Net(proto)

    def AddGradientOperators(self, ys, skip: int = 0) -> "dict[str, BlobReference]":
        """Append the backward pass of the net's ops for ``ys``; returns {blob: gradient blob}."""
        if isinstance(ys, (list, tuple)):
            ys = {y: None for y in ys}  # BlobReferences kept: their names are already scoped
        elif isinstance(ys, (str, BlobReference)):
            ys = {ys: None}
        elif not isinstance(ys, dict):
            raise TypeError("ys should be a list or a dict of blob names")
        grad_ops, grad_map = gradients.backward_pass(list(self._net.op[skip:]), ys, CreateOperator)
        self._extend_ops(grad_ops)
        return {k: (GradientSlice(BlobReference(str(v.indices), self),
                                  BlobReference(str(v.values), self))
                    if isinstance(v, tuple) else BlobReference(v, self))
                for k, v in grad_map.items()}

    def _extend_ops(self, ops):
        self._net.op.extend(ops)
        for op in ops:
            self._op_outputs.update(op.output)

    def _CreateAndAddToSelf(self, op_type, inputs, outputs=None, **kwargs):
        inputs = _rectify(inputs)
        for blob in inputs:
            if not self.BlobIsDefined(blob):
                self.AddExternalInput(blob)
        if outputs is None:
            outputs = self.NextName(prefix=op_type)
        elif isinstance(outputs, int):
            outputs = [self.NextName(prefix=op_type, output_id=i) for i in range(outputs)]
        outputs = _rectify(outputs, net=self)
        op = CreateOperator(op_type, inputs, outputs, **kwargs)
        self._extend_ops([op])
        self.__dict__.setdefault("_op_sources", {})[len(self._net.op) - 1] = _caller_line()
        if len(op.output) == 0:
            return None
        if len(op.output) == 1:
            return BlobReference(op.output[0], self)
        return tuple(BlobReference(o, self) for o in op.output)

    def __getattr__(self, op_type):
        if op_type.startswith("__"):
            raise AttributeError(op_type)
        if not registry.is_registered(op_type):
            close = difflib.get_close_matches(op_type, registry.registered_ops(), n=3)
            hint = f" Did you mean: {close}?" if close else ""
            raise AttributeError(f"Method {op_type} is not a registered operator.{hint}")
        return lambda *args, **kwargs: self._CreateAndAddToSelf(op_type, *args, **kwargs)

    def __dir__(self):
        return sorted(set(super().__dir__()) | set(registry.registered_ops()))

    # -- Caffe2's Net API beyond building ops ---------------------------------------------------
    def GetBlobRef(self, blob_name):
        """A BlobReference to a blob this net defines; KeyError otherwise."""
        if not self.BlobIsDefined(blob_name):
            raise KeyError(f"Net does not define blob {blob_name}")
        return BlobReference(str(blob_name), self)

    def UsesBlob(self, blob):
        """True when an op of this net reads ``blob`` or it is an external input."""
        name = str(blob)
        return any(name in op.input for op in self._net.op) or name in self._external_input_map

    def UsedBlobNames(self):
        """Every blob name the net's ops and external lists mention."""
        names = {n for op in self._net.op for n in list(op.input) + list(op.output)}
        return names | set(self._net.external_input) | set(self._net.external_output)

    def AppendNet(self, net, device_option=None):
        """Append ``net``'s ops (on ``device_option`` if given) and its external blobs."""
        if not isinstance(net, Net):
            raise TypeError("AppendNet takes a core.Net")
        for name in net.Proto().external_input:
            if name not in self._net.external_input and name not in self._op_outputs:
                self._net.external_input.append(name)
                self._external_input_map.add(name)
        self._net.external_output.extend(
            o for o in net.Proto().external_output if o not in self._net.external_output)
        ops = list(net.Proto().op)
        if device_option is not None:
            ops = [caffe2_pb2.OperatorDef.FromString(op.SerializeToString()) for op in ops]
            for op in ops:
                op.device_option.CopyFrom(device_option)
        self._extend_ops(ops)
        return self

    def Const(self, array, blob_out=None, dtype=None):
        """A constant blob holding ``array`` (a Given*Fill op; a bool is a BOOL ConstantFill)."""
        import numpy as np
        if isinstance(array, bool):
            return self.ConstantFill([], blob_out or 1, dtype=DataType.BOOL, value=array)
        array = np.array(array, dtype=dtype)
        fills = {np.dtype(np.int32): "GivenTensorIntFill",
                 np.dtype(np.int64): "GivenTensorInt64Fill",
                 np.dtype(np.bool_): "GivenTensorBoolFill"}
        fill = fills.get(array.dtype, "GivenTensorStringFill" if array.dtype.kind in "SUO"
                         else "GivenTensorFill")
        values = array.flatten().tolist()
        if fill == "GivenTensorFill":
            values = [float(v) for v in values]
        return getattr(self, fill)([], blob_out or 1, shape=list(array.shape), values=values)

    def PopulateProtoWithFileName(self):
        """Name each op built through this Net after the source line that created it
        (``file:line``, the first frame outside caffe2torch), as Caffe2's op tracebacks do."""
        for index, source in self.__dict__.get("_op_sources", {}).items():
            if index < len(self._net.op):
                self._net.op[index].name = f"{source[0]}:{source[1]}"

    def _CheckLookupTables(self):
        """Check the net's blob bookkeeping against its proto (Caffe2's self-test)."""
        outputs = {o for op in self._net.op for o in op.output}
        missing = outputs - self._op_outputs
        if missing or set(self._net.external_input) - self._external_input_map:
            raise AssertionError(f"net {self.Name()!r}: lookup tables out of step with the "
                                 f"proto (missing outputs {sorted(missing)})")

    def LogInfo(self, *msg_or_blobs):
        """Print each message (a string becomes a constant blob) or blob to the log (Print)."""
        for item in msg_or_blobs:
            if not isinstance(item, BlobReference):
                item = self.Const(str(item))
            self.Print(item, [])

    def ClonePartial(self, name, inputs, outputs, remap_funcs=None):
        """(net, output refs): a copy holding only the ops that compute ``outputs`` from
        ``inputs`` (a list, pairs or a dict renaming them); other internal blobs get the prefix
        ``name/``, blobs read from outside keep their names."""
        import collections as _c
        if isinstance(inputs, dict):
            pairs = _c.OrderedDict((str(k), str(v)) for k, v in inputs.items())
        elif inputs and all(isinstance(i, tuple) and len(i) == 2 for i in inputs):
            pairs = _c.OrderedDict((str(k), str(v)) for k, v in inputs)
        else:
            pairs = _c.OrderedDict((str(i), str(i)) for i in inputs)
        output_names = [str(o) for o in outputs]
        for o in output_names:
            if not self.BlobIsDefined(o):
                raise ClonePartialError(f"ClonePartial: net {self.Name()!r} does not produce "
                                        f"{o!r}")
        versions = {i: 0 for i in pairs}
        ssa, versions = get_ssa(self._net, versions)
        used = get_op_ids_in_path(ssa, versions, list(pairs), output_names)
        producing_inputs = get_op_ids_in_path(ssa, versions, [], list(pairs))
        if set(used) & set(producing_inputs):
            raise ClonePartialError("ClonePartial: some ops needed for the outputs also produce "
                                    "the given inputs; choose inputs that no needed op writes")
        sub_ssa = [ssa[i] for i in used]
        undefined = _undefined_blobs(sub_ssa) - set(pairs)
        prefix = name + "/" if name else ""

        def remap(blob):
            if blob in pairs:
                return pairs[blob]
            return blob if blob in undefined else prefix + blob
        mapping = {b: remap(b) for b in versions}
        new_net = self.Clone(name, mapping, used, remap_funcs)
        new_in = [mapping[i] for i in pairs] + sorted(undefined)
        new_out = [mapping[o] for o in output_names]
        new_net.Proto().external_input[:] = new_in
        new_net._external_input_map = set(new_in)
        new_net.Proto().external_output[:] = new_out
        return new_net, [new_net.GetBlobRef(o) for o in new_out]

    def add_attribute(self, name, obj):
        """Attach ``obj`` to the net under ``name`` (Task setup builders, report steps)."""
        self.__dict__.setdefault("_attr_dict", collections.defaultdict(list))[name].append(obj)

    def get_attributes(self, name):
        """The objects attached under ``name``, in the order added."""
        return list(self.__dict__.get("_attr_dict", {}).get(name, []))

    def Python(self, f, grad_f=None, python_func_type=None, pass_workspace=False,
               grad_output_indices=None, grad_input_indices=None):
        """A builder ``(inputs, outputs, **kwargs)`` adding a Python op that calls ``f``.

        Example: ``net.Python(lambda ins, outs: outs[0].feed(2 * ins[0].data))(["x"], ["y"])``.
        """
        from caffe2torch.python import python_op
        token = python_op.register(f, grad_f, python_func_type, pass_workspace)
        return lambda *args, **kwargs: self._CreateAndAddToSelf(
            "Python", *args, token=token, grad_output_indices=list(grad_output_indices or []),
            grad_input_indices=list(grad_input_indices or []), **kwargs)


# Plans and execution steps live in their own module; core re-exports them as Caffe2 does.
from caffe2torch.python.plan import (  # noqa: E402,F401
    ExecutionStep, Plan, add_nets_in_order, execution_step, scoped_execution_step,
    to_execution_step)


def __getattr__(name):
    # core.C is workspace.C (Caffe2's tutorials call core.C.create_db); loaded on first use.
    if name == "C":
        from caffe2torch.python import workspace
        return workspace.C
    if name == "_REGISTERED_OPERATORS":  # Caffe2's set of op type names (tests check it)
        return set(registry.registered_ops())
    raise AttributeError(f"module 'core' has no attribute {name!r}")


# --- Caffe2's core API beyond nets: gradients, Python ops, SSA, devices, engines ---------------

from caffe2torch.python.gradient_registry import (  # noqa: E402,F401
    GradientRegistry, GradientSlice)


def CreatePythonOperator(f, inputs, outputs, grad_f=None, pass_workspace=False,
                         python_func_type=None, *args, **kwargs):
    """A ``Python`` OperatorDef that calls ``f(inputs, outputs)`` (see Net.Python)."""
    from caffe2torch.python import python_op
    kwargs["token"] = python_op.register(f, grad_f, python_func_type, pass_workspace)
    return CreateOperator("Python", inputs, outputs, *args, **kwargs)


def get_ssa(net, blob_versions=None):
    """Caffe2's SSA form: ([(inputs, outputs)] with (name, version) pairs per op, versions)."""
    if isinstance(net, list):
        blob_versions = {} if blob_versions is None else blob_versions
        return [get_ssa(n, blob_versions)[0] for n in net], blob_versions
    proto = net.Proto() if isinstance(net, Net) else net
    if not isinstance(proto, caffe2_pb2.NetDef):
        raise TypeError("get_ssa takes a core.Net or a NetDef")
    blob_versions = {} if blob_versions is None else blob_versions
    for name in proto.external_input:
        blob_versions.setdefault(str(name), 0)
    ssa = []
    for op in proto.op:
        if not proto.external_input:
            for name in op.input:
                blob_versions.setdefault(str(name), 0)
        inputs = [(str(n), blob_versions.get(str(n), 0)) for n in op.input]
        for name in op.output:
            blob_versions[str(name)] = blob_versions.get(str(name), 0) + 1
        ssa.append((inputs, [(str(n), blob_versions[str(n)]) for n in op.output]))
    return ssa, blob_versions


_PACKAGE_DIR = __file__.rsplit("/python/", 1)[0]


def _caller_line():
    """(file, line) of the first frame outside caffe2torch (where user code built the op)."""
    import sys
    frame = sys._getframe(2)
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE_DIR):
        frame = frame.f_back
    return (frame.f_code.co_filename, frame.f_lineno) if frame is not None else ("", 0)


def IsOperatorWithEngine(op_type, engine):
    """True when ``op_type`` runs with ``engine``: caffe2torch has one, the DEFAULT one."""
    return IsOperator(op_type) and engine in ("", "DEFAULT")


class ClonePartialError(ValueError, AssertionError):
    """ClonePartial cannot cut the net there (Caffe2 asserts: an AssertionError too)."""


def _undefined_blobs(ssa):
    """Blob names an SSA op list reads at version 0 (produced outside of it)."""
    return {name for inputs, _ in ssa for name, version in inputs if version == 0}


def get_op_ids_in_path(ssa, blob_versions, inputs, outputs):
    """Indices of the ops needed to compute ``outputs`` given ``inputs`` (both at the versions
    in ``blob_versions``, their last ones), as Caffe2 walks the SSA producers back."""
    given = {(str(i), blob_versions[str(i)]) for i in inputs}
    producers = {out: k for k, (_, outs) in enumerate(ssa) for out in outs}
    pending = [(str(o), blob_versions[str(o)]) for o in outputs]
    used = set()
    while pending:
        blob = pending.pop()
        op_id = producers.get(blob)
        if blob in given or op_id is None or op_id in used:
            continue
        used.add(op_id)
        pending.extend(ssa[op_id][0])
    return sorted(used)


def remap_input(op, blob_name_remapping):
    """A copy of OperatorDef ``op`` with its inputs renamed by the mapping."""
    new_op = caffe2_pb2.OperatorDef()
    new_op.CopyFrom(op)
    new_op.input[:] = [blob_name_remapping.get(str(n), str(n)) for n in op.input]
    return new_op


def InferBlobDevices(net):
    """{blob: DeviceOption of the op that writes it} (Caffe2 ignores the net's own option)."""
    mapping = {}
    for op in (net.Proto() if isinstance(net, Net) else net).op:
        for name in op.output:
            mapping[name] = op.device_option
    return mapping


def device_option_equal(opt1, opt2, ignore_node_name=True, ignore_random_seed=True):
    """True when two DeviceOptions name the same device (CPU options are all equal)."""
    if opt1 is None or opt2 is None:
        return opt1 is opt2
    if not ignore_node_name and opt1.node_name != opt2.node_name:
        return False
    if not ignore_random_seed and opt1.random_seed != opt2.random_seed:
        return False
    if not opt1.device_type or not opt2.device_type:
        return not opt1.device_type and not opt2.device_type
    return opt1.cuda_gpu_id == opt2.cuda_gpu_id


# Engine preferences choose among an op's engines in Caffe2. caffe2torch has one implementation
# per op (PyTorch picks cuDNN itself), so the preferences are recorded and have no effect.
_engine_prefs = {"global": {}, "per_op": {}}


def SetGlobalEnginePref(global_engine_pref):
    """Record {device_type: [engines]} (no effect: one implementation per op)."""
    _engine_prefs["global"] = dict(global_engine_pref)


def SetOpEnginePref(op_type, op_pref):
    """Record {device_type: [engines]} for ``op_type`` (no effect)."""
    _engine_prefs["per_op"][op_type] = dict(op_pref)


def SetEnginePref(per_op_engine_pref, global_engine_pref):
    """Record both preferences (no effect)."""
    _engine_prefs["per_op"] = {k: dict(v) for k, v in per_op_engine_pref.items()}
    SetGlobalEnginePref(global_engine_pref)


def GetEnginePref():
    """The recorded engine preferences: {"global": ..., "per_op": ...}."""
    return {"global": dict(_engine_prefs["global"]), "per_op": dict(_engine_prefs["per_op"])}
