"""Runs a NetDef: a plain loop over its ops, prepared once per CreateNet.

Preparation resolves each op's forward function, parses its arguments, picks its device and runs
the op's setup; the loop then only reads input blobs, calls, and stores outputs.
"""
import operator

import torch

from caffe2torch.ops import registry
from caffe2torch.ops.registry import Deferred
from caffe2torch.proto import caffe2_pb2
from caffe2torch.python import utils

_CPU = torch.device("cpu")
_Tensor = torch.Tensor


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


def _no_inputs(blobs):
    return ()


class _Step:
    __slots__ = ("index", "fn", "ctx", "inputs", "outputs", "move", "schema", "checks", "on_cpu",
                 "read", "single_input", "single_output", "internal_checks")

    def __init__(self, index, fn, ctx, move, schema):
        self.index = index
        self.fn = fn
        self.ctx = ctx
        self.inputs = ctx.input_names
        self.outputs = ctx.output_names
        self.move = move
        self.schema = schema
        self.on_cpu = ctx.device.type == "cpu"
        # Indices of inputs that may be Deferred or on another device (set by PreparedNet), and
        # those of them that an earlier op of the run wrote (the rest come from outside).
        self.checks = ()
        self.internal_checks = ()
        # The input blobs in one C call (an itemgetter: a list comprehension costs ~3x more);
        # with one input it returns the value itself, with several a tuple.
        self.read = operator.itemgetter(*self.inputs) if self.inputs else _no_inputs
        self.single_input = len(self.inputs) == 1
        self.single_output = self.outputs[0] if len(self.outputs) == 1 else None


class PreparedNet:
    """A NetDef bound to a workspace, ready to run many times."""

    def __init__(self, netdef, workspace):
        self.proto = netdef
        self.name = netdef.name
        self.workspace = workspace
        net_option = netdef.device_option if netdef.HasField("device_option") else None
        available = set(workspace.blobs)
        self.steps = []
        self._buffered = []
        self._external = None
        self._straight = None  # the straight-line run: built at the second run (not for RunNetOnce)
        self._runs = 0
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
            self.steps.append(_Step(i, schema.forward, ctx, move, schema))
        read = {n for op in netdef.op for n in op.input}
        mutated = frozenset(n for step in self.steps for n in step.ctx.output_names
                            if n in step.ctx.input_names)
        for step in self.steps:
            step.ctx.lazy_outputs = frozenset(
                k for k, n in enumerate(step.outputs) if n not in read)
            step.ctx.mutated_blobs = mutated
        self._plan_checks()
        self._buffered = [item for step in self.steps for item in step.ctx.state.values()
                          if callable(getattr(item, "flush", None))]
        for name in (n for op in netdef.op for n in op.output):
            workspace.blobs.setdefault(name, None)
        self.compiled = None
        if netdef.type == "compiled":
            from caffe2torch.python.compiled import CompiledNet
            self.compiled = CompiledNet(self)

    @property
    def compile_seconds(self):
        """Seconds spent compiling (torch.compile) so far; 0.0 for an eager net."""
        return self.compiled.compile_seconds if self.compiled is not None else 0.0

    def _plan_checks(self):
        """Find the inputs the loop must check for a Deferred value or a device move.

        A blob an earlier op of this run wrote on the same device, with an op that keeps its
        outputs on its device, is already right: only the others (blobs from outside the net or
        from the previous run, CPU-only ops' outputs) are checked, which saves the per-input
        ``isinstance``/``device`` tests that dominate the loop on small tensors.
        """
        written = {}  # blob -> device of the op that last wrote it in this run, or None: unsure
        external = {}  # (blob, device, move) for blobs read before any op of the run writes them
        for step in self.steps:
            checks, internal = [], []
            for k, name in enumerate(step.inputs):
                if written.get(name) != step.ctx.device:
                    checks.append(k)
                    if name in written:
                        internal.append(k)
                    else:
                        external[name, step.ctx.device, step.move] = None
            step.checks = tuple(checks)
            step.internal_checks = tuple(internal)
            # CPU-only ops (the counter) and DB/Load ops may leave outputs off the op's device.
            keeps = not (step.schema.cpu_only_inputs or step.schema.side_effects)
            sure = step.ctx.device if keeps else None
            for k, name in enumerate(step.outputs):
                written[name] = None if k in step.ctx.lazy_outputs else sure
        # A run whose outside blobs are all fine (checked once, before it) checks only the
        # others; an op with side effects might write blobs it does not name: not for such nets.
        side_effects = any(step.schema.side_effects for step in self.steps)
        self._external = None if side_effects else [
            (name, device.type == "cpu", device, move) for name, device, move in external]

    def _straight_line(self):
        """The whole run as one generated function of the blobs, or None.

        For a net that checks its outside blobs once per run (``_external``): a line per op,
        ``r = fn_k(ctx_k, [blobs[in], ...])`` and its stores, which spares the loop's per-op
        attribute reads and branches (~0.2 us an op on the HEMT net); an op with inputs to check
        goes through the loop. A failing op is found by its line (``_failed_step``).
        """
        if self._external is None or not self.steps:
            return None
        lines, namespace, self._line_steps = ["def run(blobs):"], {}, {}
        for k, step in enumerate(self.steps):
            namespace[f"f{k}"], namespace[f"c{k}"] = step.fn, step.ctx
            self._line_steps[len(lines) + 1] = self._line_steps[len(lines) + 2] = step
            call = f"f{k}(c{k}, [{', '.join(f'blobs[{n!r}]' for n in step.inputs)}])"
            if step.internal_checks:  # e.g. a CPU-only op's output: the loop checks it
                namespace[f"s{k}"], namespace["run_steps"] = (step,), self.run_steps
                lines.append(f"    run_steps(s{k}, True)")
            elif step.single_output is not None:
                lines.append(f"    r = {call}")
                lines.append(f"    if r: blobs[{step.single_output!r}] = r[0]")
            elif step.outputs:
                lines.append(f"    blobs.update(zip({tuple(step.outputs)!r}, {call}))")
            else:
                lines.append(f"    {call}")
        self._source = f"<caffe2torch net {self.name!r} {id(self):x}>"
        exec(compile("\n".join(lines) + "\n", self._source, "exec"), namespace)
        return namespace["run"]

    def _failed_step(self, exc):
        """The step on whose line of the straight-line function ``exc`` was raised."""
        tb, line = exc.__traceback__, None
        while tb is not None:
            if tb.tb_frame.f_code.co_filename == self._source:
                line = tb.tb_lineno
            tb = tb.tb_next
        return self._line_steps.get(line, self.steps[0])

    def _external_ready(self):
        """True when every blob the run reads from outside is what its readers take as is."""
        if self._external is None:
            return False
        blobs = self.workspace.blobs
        for name, on_cpu, device, move in self._external:
            x = blobs.get(name)  # a missing blob: the loop reports it
            if type(x) is _Tensor:
                if move and not (x.is_cpu if on_cpu else x.device == device):
                    return False
            elif type(x) is Deferred or (move and isinstance(x, torch.Tensor)):
                return False
        return True

    def run(self, num_iter=1):
        """Run all ops ``num_iter`` times."""
        try:
            if self.compiled is not None:
                return self.compiled.run(num_iter)
            if self._straight is None and (self._runs or num_iter > 1):
                self._straight = self._straight_line() or False
            self._runs += 1
            with torch.no_grad():
                for _ in range(num_iter):
                    ready = self._external_ready()
                    if ready and self._straight:
                        try:
                            self._straight(self.workspace.blobs)
                        except OperatorError:  # from an op the loop ran (run_steps)
                            raise
                        except Exception as exc:
                            raise self._error(self._failed_step(exc), exc) from exc
                    else:
                        self.run_steps(self.steps, ready)
            return True
        finally:
            # Print/Summarize buffer their lines: the files are complete when RunNet returns.
            for output in self._buffered:
                output.flush()

    def run_steps(self, steps, external_ready=False):
        """Run ``steps`` once, in order, eagerly (grad mode is the caller's).

        ``external_ready``: the whole net, its outside blobs checked (``_external_ready``).
        """
        blobs = self.workspace.blobs
        step = None
        try:
            for step in steps:
                inputs = [step.read(blobs)] if step.single_input else list(step.read(blobs))
                checks = step.internal_checks if external_ready else step.checks
                if checks:
                    on_cpu = step.on_cpu
                    for k in checks:
                        x = inputs[k]
                        # the usual case, cheaply: a plain tensor already on the op's device
                        if type(x) is _Tensor and (x.is_cpu if on_cpu else x.device == step.ctx.device):
                            continue
                        self.check_inputs(step, inputs, (k,))
                outputs = step.fn(step.ctx, inputs)
                if step.single_output is not None and outputs:
                    blobs[step.single_output] = outputs[0]
                else:
                    for name, value in zip(step.outputs, outputs):
                        blobs[name] = value
        except Exception as exc:
            raise self._error(step, exc) from exc

    def check_inputs(self, step, inputs, checks):
        """Resolve Deferred inputs and move tensors to the step's device, in ``inputs``."""
        device = step.ctx.device
        for k in checks:
            x = inputs[k]
            if type(x) is Deferred:
                x = self.workspace.blobs[step.inputs[k]] = x.resolve()
            if step.move and isinstance(x, torch.Tensor) and x.device != device:
                x = x.to(device)
            inputs[k] = x

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
        """Release what the ops' setup opened (files, prefetch threads); pending lines are written."""
        if self.compiled is not None:
            self.compiled.close()
        for step in self.steps:
            for item in step.ctx.state.values():
                closer = getattr(item, "close", None)
                if callable(closer):
                    closer()
        self.steps = []
        self._buffered = []
        self._external = None
        self._straight = False
