"""Runs a NetDef: a plain loop over its ops, prepared once per CreateNet.

Preparation resolves each op's forward function, parses its arguments, picks its device and runs
the op's setup; the loop then only reads input blobs, calls, and stores outputs.
"""
import torch

from caffe2torch.ops import registry
from caffe2torch.ops.registry import Deferred
from caffe2torch.proto import caffe2_pb2
from caffe2torch.python import utils

_CPU = torch.device("cpu")


class OperatorError(RuntimeError):
    """An op failed while running; the message names the net, the op and its blobs."""


def torch_device(option):
    """The torch.device for a Caffe2 DeviceOption (None or CPU → cpu, CUDA/HIP → cuda:id)."""
    if option is None or option.device_type not in (caffe2_pb2.CUDA, caffe2_pb2.HIP):
        return _CPU
    if not torch.cuda.is_available():
        raise RuntimeError(
            "a CUDA DeviceOption was given but PyTorch sees no GPU (torch.cuda.is_available() is "
            "False); run on a GPU machine with a CUDA build of torch, or run it on the CPU: "
            "workspace.RunNetOnce(net, device_option=core.DeviceOption(caffe2_pb2.CPU)) (also "
            "CreateNet)")
    return torch.device("cuda", option.cuda_gpu_id)


class _Step:
    __slots__ = ("index", "fn", "ctx", "inputs", "outputs", "move")

    def __init__(self, index, fn, ctx, move):
        self.index = index
        self.fn = fn
        self.ctx = ctx
        self.inputs = ctx.input_names
        self.outputs = ctx.output_names
        self.move = move


class PreparedNet:
    """A NetDef bound to a workspace, ready to run many times."""

    def __init__(self, netdef, workspace):
        self.proto = netdef
        self.name = netdef.name
        self.workspace = workspace
        net_option = netdef.device_option if netdef.HasField("device_option") else None
        available = set(workspace.blobs)
        self.steps = []
        for i, op in enumerate(netdef.op):
            schema = registry.get_schema(op.type)
            for name in op.input:
                if name not in available:
                    raise RuntimeError(
                        f"net {self.name!r}: op #{i} {op.type} reads blob {name!r}, which is not in "
                        "the workspace and not produced by an earlier op; run the init net first or "
                        "FeedBlob it")
            available.update(op.output)
            option = op.device_option if op.HasField("device_option") else net_option
            device = torch_device(option)
            generator = None
            if option is not None and option.HasField("random_seed"):
                generator = torch.Generator(device=device)
                generator.manual_seed(option.random_seed)
            ctx = registry.OpContext(op, utils.ArgsToDict(op.arg), device, workspace, generator)
            if schema.setup is not None:
                schema.setup(ctx)
            move = not schema.cpu_only_inputs
            self.steps.append(_Step(i, schema.forward, ctx, move))
        read = {n for op in netdef.op for n in op.input}
        mutated = frozenset(n for step in self.steps for n in step.ctx.output_names
                            if n in step.ctx.input_names)
        for step in self.steps:
            step.ctx.lazy_outputs = frozenset(
                k for k, n in enumerate(step.outputs) if n not in read)
            step.ctx.mutated_blobs = mutated
        for name in (n for op in netdef.op for n in op.output):
            workspace.blobs.setdefault(name, None)

    def run(self, num_iter=1):
        """Run all ops ``num_iter`` times."""
        blobs = self.workspace.blobs
        with torch.no_grad():
            for _ in range(num_iter):
                for step in self.steps:
                    try:
                        inputs = [blobs[n] for n in step.inputs]
                        if step.move:
                            device = step.ctx.device
                            inputs = [x.to(device) if isinstance(x, torch.Tensor) and x.device != device
                                      else x for x in inputs]
                        if any(type(x) is Deferred for x in inputs):
                            inputs = self._resolve(step, inputs)
                        outputs = step.fn(step.ctx, inputs)
                    except Exception as exc:
                        raise self._error(step, exc) from exc
                    for name, value in zip(step.outputs, outputs):
                        blobs[name] = value
        return True

    def _resolve(self, step, inputs):
        blobs = self.workspace.blobs
        out = []
        for name, x in zip(step.inputs, inputs):
            if type(x) is Deferred:
                x = blobs[name] = x.resolve()
                if step.move and x.device != step.ctx.device:
                    x = x.to(step.ctx.device)
            out.append(x)
        return out

    def _error(self, step, exc):
        op = step.ctx.op
        blobs = self.workspace.blobs
        empty = [n for n in op.input if blobs.get(n) is None]
        if empty:
            why = f"input blob {empty[0]!r} has no value yet (no op has written it)"
        else:
            why = f"{type(exc).__name__}: {exc}"
        return OperatorError(
            f"net {self.name!r}: op #{step.index} {op.type} ({list(op.input)} -> "
            f"{list(op.output)}) failed: {why}")

    def close(self):
        """Release what the ops' setup opened (files, prefetch threads)."""
        for step in self.steps:
            for item in step.ctx.state.values():
                closer = getattr(item, "close", None)
                if callable(closer):
                    closer()
        self.steps = []
