"""A Caffe2 predict net as a ``torch.nn.Module``: parameters named after their blobs, forward =
the net's ops in order, each op's own PyTorch forward from the registry.

Example::

    module = NetModule(predict_net, {"conv1_w": w, "conv1_b": b, ...})
    probs = module(images)                     # the external inputs, in module.input_names order
    module.blob_names["conv1_w"]               # torch name -> Caffe2 blob name
"""
import re

import torch

from caffe2torch.ops import registry
from caffe2torch.proto import caffe2_pb2
from caffe2torch.python import utils
from caffe2torch.python.workspace import Workspace

_CPU = torch.device("cpu")


class ExportError(ValueError):
    """A net that cannot be converted or exported; the message names the op and the reason."""


def cpu_net(netdef):
    """A copy of ``netdef`` with every device option (net and ops) set to the CPU."""
    out = caffe2_pb2.NetDef()
    out.CopyFrom(netdef)
    cpu = caffe2_pb2.DeviceOption(device_type=caffe2_pb2.CPU)
    if out.HasField("device_option"):
        out.device_option.CopyFrom(cpu)
    for op in out.op:
        if op.HasField("device_option"):
            op.device_option.CopyFrom(cpu)
    return out


def describe(index, op):
    """``op #3 Conv (['x', 'w'] -> ['y'])``: how messages name an op."""
    return f"op #{index} {op.type} ({list(op.input)} -> {list(op.output)})"


def training_reason(netdef, parameters=()):
    """Why ``netdef`` is a training net (gradient ops, is_test=0, parameter updates), or None."""
    params = set(parameters)
    read = set()  # parameters that ops read before any op writes them
    produced = set()
    for i, op in enumerate(netdef.op):
        read.update(n for n in op.input if n in params and n not in produced)
        args = utils.ArgsToDict(op.arg)
        schema = registry.get_schema(op.type) if registry.is_registered(op.type) else None
        if op.is_gradient_op or (schema is not None and schema.is_gradient_op):
            return f"{describe(i, op)} computes gradients"
        if op.type in ("SpatialBN", "Dropout") and not args.get("is_test", 0):
            return f"{describe(i, op)} runs in training mode (is_test=0)"
        # Writing a parameter that the net reads is an update (an SGD step, a running mean);
        # writing a blob that an init net merely pre-filled (an output) is not.
        written = [n for n in op.output if n in read]
        if written:
            return f"{describe(i, op)} overwrites parameter {written[0]!r}"
        produced.update(op.output)
    return None


def sanitize(name, taken):
    """A torch attribute name for blob ``name`` (letters, digits, _), unique among ``taken``."""
    base = re.sub(r"\W", "_", name, flags=re.ASCII) or "blob"
    if base[0].isdigit():
        base = "blob_" + base
    candidate, k = base, 1
    while candidate in taken:
        candidate, k = f"{base}_{k}", k + 1
    return candidate


class OpError(RuntimeError):
    """An op failed inside NetModule.forward (also while tracing); the message names the op."""


class _Step:
    __slots__ = ("index", "fn", "ctx", "inputs", "outputs")

    def __init__(self, index, fn, ctx):
        self.index = index
        self.fn = fn
        self.ctx = ctx
        self.inputs = ctx.input_names
        self.outputs = ctx.output_names


class NetModule(torch.nn.Module):
    """A Caffe2 predict NetDef with its parameters, as a torch module (CPU).

    ``parameters``: {blob name: tensor} for every blob the net reads that is not an input.
    ``inputs`` / ``outputs``: blob names; default: the net's external inputs that are not
    parameters (else the first external input, as Caffe2's Predictor feeds it), and its external
    outputs (else the last op's outputs). ``forward(*inputs)``
    returns one tensor for one output, else a tuple in ``output_names`` order. Float tensors are
    ``nn.Parameter`` s (``requires_grad=False``), others buffers; ``blob_names`` maps each torch
    name to its Caffe2 blob name.
    """

    def __init__(self, predict_net, parameters, inputs=None, outputs=None):
        super().__init__()
        net = cpu_net(predict_net)
        self.net = net
        if inputs is None:
            inputs = [n for n in net.external_input if n not in parameters]
            if not inputs and net.external_input:
                # Deploy init nets often fill the data blob too; Caffe2's Predictor feeds the
                # first external inputs, so the first one is the data.
                inputs = [net.external_input[0]]
        if outputs is None:
            outputs = list(net.external_output) or (list(net.op[-1].output) if net.op else [])
        self.input_names = [str(n) for n in inputs]
        self.output_names = [str(n) for n in outputs]
        reason = training_reason(net, [p for p in parameters if p not in self.input_names])
        if reason is not None:
            raise ExportError(f"net {net.name!r} is a training net: {reason}; convert the predict "
                              "net (e.g. the deploy model built with is_test=True, or the "
                              "predict net of predictor_exporter)")
        self.blob_names = {}
        # {input name: example tensor} where the files say an input's shape (loaders fill it).
        self.input_examples = {}
        self._param_blobs = []  # (torch name, blob name)
        self.steps = []
        available = set(self.input_names)
        context = Workspace()
        for i, op in enumerate(net.op):
            schema = registry.get_schema(op.type)
            if schema.side_effects:
                raise ExportError(f"cannot convert {describe(i, op)}: it has side effects (reads "
                                  "or writes files, DBs, counters or the log); remove it from the "
                                  "predict net")
            for name in op.input:
                if name in available:
                    continue
                if name not in parameters:
                    raise ExportError(
                        f"{describe(i, op)} reads blob {name!r}, which is neither an input, a "
                        "parameter nor written by an earlier op; pass its value with the "
                        "parameters (init net or DB)")
                self._add_parameter(name, parameters[name])
                available.add(name)
            available.update(op.output)
            ctx = registry.OpContext(op, utils.ArgsToDict(op.arg), _CPU, context)
            if schema.setup is not None:
                schema.setup(ctx)
            self.steps.append(_Step(i, schema.forward, ctx))
        if not self.output_names:
            raise ExportError(f"net {net.name!r} has no outputs: its last op writes no blob and "
                              "it lists no external outputs (name them with outputs=/--output)")
        missing = [n for n in self.output_names if n not in available]
        if missing:
            raise ExportError(f"net {net.name!r}: output blob {missing[0]!r} is written by no op")
        # Each blob leaves forward's dict after the last op that touches it, so that memory is
        # reused from op to op instead of holding every activation until the end.
        last = {}
        for k, step in enumerate(self.steps):
            last.update((n, k) for n in list(step.inputs) + list(step.outputs))
        keep = set(self.output_names)
        self._drops = [[] for _ in self.steps]
        for name, k in last.items():
            if name not in keep:
                self._drops[k].append(name)

    def _add_parameter(self, blob, value):
        if not isinstance(value, torch.Tensor):
            raise ExportError(f"parameter {blob!r} is a {type(value).__name__}, not a tensor "
                              "(string blobs cannot be module parameters)")
        name = sanitize(blob, set(self.blob_names) | set(dir(self)))
        value = value.detach().to(_CPU)
        if value.is_floating_point():
            self.register_parameter(name, torch.nn.Parameter(value.clone(), requires_grad=False))
        else:
            self.register_buffer(name, value.clone())
        self.blob_names[name] = blob
        self._param_blobs.append((name, blob))

    def torch_name(self, blob):
        """The torch parameter/buffer name of Caffe2 blob ``blob``."""
        for name, b in self._param_blobs:
            if b == blob:
                return name
        raise KeyError(f"blob {blob!r} is not a parameter of this module")

    def forward(self, *inputs):
        """Run the net's ops on ``inputs`` (tensors in ``input_names`` order)."""
        if len(inputs) != len(self.input_names):
            raise TypeError(f"expected {len(self.input_names)} inputs {self.input_names}, "
                            f"got {len(inputs)}")
        blobs = {blob: getattr(self, name) for name, blob in self._param_blobs}
        blobs.update(zip(self.input_names, inputs))
        for step, drops in zip(self.steps, self._drops):
            try:
                outputs = step.fn(step.ctx, [blobs[n] for n in step.inputs])
            except Exception as exc:
                shapes = [list(blobs[n].shape) if hasattr(blobs[n], "shape") else None
                          for n in step.inputs]
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                error = OpError(f"{describe(step.index, step.ctx.op)} failed on input shapes "
                                f"{shapes}: {type(exc).__name__}: {first}")
                error.op_text = describe(step.index, step.ctx.op)
                raise error from exc
            for name in drops:
                blobs.pop(name, None)  # an op may leave an output unwritten
            blobs.update(zip(step.outputs, outputs))
        result = tuple(blobs[n] for n in self.output_names)
        return result[0] if len(result) == 1 else result
