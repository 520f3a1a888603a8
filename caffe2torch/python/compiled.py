"""The "compiled" net type: a prepared net turned into functions over its blobs, torch.compiled.

``net.Proto().type = "compiled"`` before ``workspace.CreateNet`` selects it. The ops are scheduled
into runs of pure tensor ops (compiled: forward, gradient and in-place update ops alike) and the
ops that must run eagerly: side effects (DB input, Print, Summarize, Save, the iteration counter),
CPU-only inputs (LearningRate reads the counter on the host), data-dependent output sizes, and ops
on another device than the net's. An eager op moves ahead of the tensor ops it shares no blob with
(Iter and LearningRate go before the forward pass), so a training net compiles as one region.

Each region is generated as straight-line Python (one line per op, so that an op torch.compile
cannot trace is named by its line). Its first run is eager; then it is compiled with
``fullgraph=True`` on copies of its inputs: an op that breaks the graph is found there and the
region is split around it (the op runs eagerly, a warning names it). Inductor's FX graph cache (on
by default; folder ``TORCHINDUCTOR_CACHE_DIR``) makes a later process compile the same net faster.
On CUDA the default mode is "reduce-overhead" (CUDA graphs); torch may skip the graphs of
regions that update their inputs in place (a training net's WeightedSum; its log says why), which
then run as plain inductor code. Not yet measured on a GPU.

NetDef arguments (``net.Proto().arg``) tune it: ``compile_mode`` (torch.compile's mode; default
"reduce-overhead", CUDA graphs, on CUDA and "default" on CPU) and ``compile_dynamic`` (0 or 1:
torch.compile's ``dynamic``; default: automatic).
"""
import logging
import re
import time

import torch

from caffe2torch.ops.registry import Deferred
from caffe2torch.python import utils

log = logging.getLogger("caffe2torch")

_LINE = re.compile(r'File "<caffe2torch region (\d+)>", line (\d+)')


# CPU-only-input ops that read only their inputs' shapes, never their values: they compile.
_SHAPE_ONLY = frozenset({"ConstantFill"})
# Ops that draw from the global RNG: inductor's random streams differ from eager PyTorch's, so
# they run eagerly to keep results equal to the "simple" net's.
_RANDOM = frozenset({"Dropout", "XavierFill", "MSRAFill", "GaussianFill", "UniformFill"})


def _eager_only(step, device):
    """True when ``step`` must run outside a compiled region."""
    schema, ctx = step.schema, step.ctx
    host_reads = schema.cpu_only_inputs and (ctx.input_names and schema.type not in _SHAPE_ONLY)
    random = schema.type in _RANDOM and not ctx.arg("is_test", 0)
    return bool(schema.side_effects or schema.data_dependent or host_reads or random
                or ctx.device != device or ctx.generator is not None)


def schedule(steps, eager):
    """Reorder ``steps`` (keeping every blob dependency and the eager ops' order) into few runs.

    ``eager[i]`` says step i runs eagerly. List scheduling: emit every ready eager op, then every
    ready compiled op, and repeat; an op is ready when all ops it depends on (it reads what they
    wrote, writes what they read or wrote) are emitted. Returns the new order.
    """
    n = len(steps)
    deps = [set() for _ in range(n)]
    last_write, reads_since = {}, {}
    last_eager = None
    for i, step in enumerate(steps):
        for name in step.inputs:
            if name in last_write:
                deps[i].add(last_write[name])
        for name in step.outputs:
            if name in last_write:
                deps[i].add(last_write[name])
            deps[i].update(reads_since.get(name, ()))
        for name in step.inputs:
            reads_since.setdefault(name, set()).add(i)
        for name in step.outputs:
            last_write[name] = i
            reads_since[name] = set()
        if eager[i]:
            if last_eager is not None:
                deps[i].add(last_eager)  # side effects keep their order
            last_eager = i
        deps[i].discard(i)
    done, order = set(), []
    while len(order) < n:
        progressed = False
        for want_eager in (True, False):
            changed = True
            while changed:
                changed = False
                for i in range(n):
                    if i not in done and eager[i] == want_eager and deps[i] <= done:
                        done.add(i)
                        order.append(i)
                        changed = progressed = True
        if not progressed:  # cannot happen: the original order is a valid schedule
            raise RuntimeError("compiled net: could not schedule the ops")
    return [steps[i] for i in order]


class _Region:
    """A run of steps compiled as one function ``f(*inputs) -> outputs`` over their blobs."""

    def __init__(self, number, steps, device, mode, dynamic, lazy):
        self.number = number
        self.steps = steps
        self.device = device
        written, inputs = set(), []
        for step in steps:
            for name in step.inputs:
                if name not in written and name not in inputs:
                    inputs.append(name)
            written.update(step.outputs)
        self.inputs = inputs
        # Outputs no op of the net reads (a first conv's data_grad) are left out, so inductor
        # drops their computation; they become Deferred blobs computed if someone fetches them,
        # from the op's inputs (copies of those that later ops of the region overwrite).
        self.lazy = []  # (blob, step, output index, per input: blob name or snapshot number)
        self.snapshots = []  # (step position, input name) copied right after that step
        later_writes, lazy_names = set(), set()
        for j in range(len(steps) - 1, -1, -1):
            step = steps[j]
            for k, name in enumerate(step.outputs):
                if k in lazy[id(step)] and name not in lazy_names and name not in later_writes:
                    lazy_names.add(name)
                    sources = []
                    for n in step.inputs:
                        if n in later_writes:
                            sources.append(len(self.snapshots))
                            self.snapshots.append((j, n))
                        else:
                            sources.append(n)
                    self.lazy.append((name, step, k, sources))
            later_writes.update(step.outputs)
        self.outputs = []
        for step in steps:
            for name in step.outputs:
                if name not in self.outputs and name not in lazy_names:
                    self.outputs.append(name)
        self.source, namespace = self._generate()
        self.function = namespace["region"]
        # Inductor's channels-last layout for convolutions changes their rounding; keeping the
        # eager layout keeps results equal to the "simple" net's (and to plain PyTorch's).
        # (torch.compile takes a mode or options, not both: "default" is the empty options.)
        if mode in (None, "default"):
            tuning = {"options": {"layout_optimization": False}}
        else:
            tuning = {"mode": mode}
        self.compiled = torch.compile(self.function, fullgraph=True, dynamic=dynamic, **tuning)
        self.first = True

    def _generate(self):
        """Straight-line source, one line per step, and the namespace it runs in."""
        local = {name: f"b{k}" for k, name in enumerate(self.inputs)}
        namespace = {}
        lines = [f"def region({', '.join(local[n] for n in self.inputs)}):"]
        counter = len(local)
        for j, step in enumerate(self.steps):
            namespace[f"f{j}"], namespace[f"c{j}"] = step.fn, step.ctx
            args = ", ".join(local[n] for n in step.inputs)
            inputs_at = dict(local)
            targets = []
            for name in step.outputs:
                local[name] = f"b{counter}"
                targets.append(f"b{counter}")
                counter += 1
            call = f"f{j}(c{j}, [{args}])"
            line = f"    {', '.join(targets)}, = {call}" if targets else f"    {call}"
            # snapshots on the step's own line: line 2 + j stays step j (see failing_step)
            for number, (at, name) in enumerate(self.snapshots):
                if at == j:
                    line += f"; s{number} = {inputs_at[name]}.clone()"
            lines.append(line)
        returned = [local[n] for n in self.outputs] + [f"s{k}" for k in range(len(self.snapshots))]
        lines.append(f"    return ({''.join(v + ', ' for v in returned)})")
        source = "\n".join(lines) + "\n"
        exec(compile(source, f"<caffe2torch region {self.number}>", "exec"), namespace)
        return source, namespace

    def failing_step(self, exc):
        """The step at the line torch.compile's error points to, or None."""
        for match in _LINE.finditer(str(exc)):
            if int(match.group(1)) == self.number:
                line = int(match.group(2))
                if 2 <= line < 2 + len(self.steps):
                    return self.steps[line - 2]
        return None


class CompiledNet:
    """Runs a PreparedNet's steps as compiled regions and eager ops (see the module doc)."""

    def __init__(self, prepared):
        self.prepared = prepared
        self.name = prepared.name
        args = utils.ArgsToDict(prepared.proto.arg)
        devices = [step.ctx.device for step in prepared.steps]
        self.device = max(set(devices), key=devices.count) if devices else torch.device("cpu")
        default_mode = "reduce-overhead" if self.device.type == "cuda" else "default"
        self.mode = args.get("compile_mode", default_mode)
        dynamic = args.get("compile_dynamic")
        self.dynamic = None if dynamic is None else bool(dynamic)
        self.compile_seconds = 0.0
        self._regions = 0
        eager = [_eager_only(s, self.device) for s in prepared.steps]
        # An op traced with lazy outputs may return None there (no Deferred can leave a compiled
        # function); the region leaves them out and defers them itself.
        self._lazy = {id(s): s.ctx.lazy_outputs for s in prepared.steps}
        order = schedule(prepared.steps, eager)
        flags = {id(s): e for s, e in zip(prepared.steps, eager)}
        self.parts = self._split(order, flags)

    def _split(self, order, flags):
        """Group consecutive steps: eager steps as lists, compiled runs as _Region objects."""
        parts, run = [], []
        for step in order + [None]:
            if step is not None and not flags[id(step)]:
                run.append(step)
                continue
            if run:
                parts.append(self._region(run))
                run = []
            if step is not None:
                if parts and isinstance(parts[-1], list):
                    parts[-1].append(step)
                else:
                    parts.append([step])
        return parts

    def _region(self, steps):
        self._regions += 1
        return _Region(self._regions, steps, self.device, self.mode, self.dynamic, self._lazy)

    @property
    def regions(self):
        """The compiled regions, as lists of op types (for tests and reports)."""
        return [[s.ctx.op.type for s in p.steps] for p in self.parts if isinstance(p, _Region)]

    @property
    def eager_steps(self):
        """Op types that run outside compiled regions, in run order."""
        return [s.ctx.op.type for p in self.parts if isinstance(p, list) for s in p]

    def run(self, num_iter):
        """Run the net ``num_iter`` times."""
        prepared = self.prepared
        cuda_graphs = self.mode == "reduce-overhead" and self.device.type == "cuda"
        with torch.no_grad():
            for _ in range(num_iter):
                if cuda_graphs:
                    torch.compiler.cudagraph_mark_step_begin()
                for part in list(self.parts):
                    if isinstance(part, list):
                        prepared.run_steps(part)
                    else:
                        self._run_region(part)
        return True

    def _run_region(self, region):
        """Run one region; its first run is eager, then it compiles (see _compile)."""
        blobs = self.prepared.workspace.blobs
        values = []
        for name in region.inputs:
            x = blobs[name]
            if type(x) is Deferred:
                x = blobs[name] = x.resolve()
            if isinstance(x, torch.Tensor) and x.device != region.device:
                x = x.to(region.device)
            values.append(x)
        if region.first:
            self._compile(region, values)
            return
        try:
            outputs = region.compiled(*values)
        except Exception as exc:
            raise self.prepared._error(region.steps[0], exc) from exc
        count = len(region.outputs)
        for name, value in zip(region.outputs, outputs):
            blobs[name] = value
        for name, step, index, sources in region.lazy:
            inputs = [outputs[count + x] if type(x) is int else blobs[x] for x in sources]
            blobs[name] = step.ctx.defer(_output(step, index), inputs)

    def _compile(self, region, values):
        """The region's first run: eager, then torch.compile on copies of its inputs.

        The eager run gives this run's results and fills the caches ops keep in their state
        (e.g. a convolution's padding plan), so the compiled graph's guards see them filled and
        the second run does not compile again. Compiling on copies leaves the blobs alone; an op
        torch.compile cannot trace (``fullgraph=True`` finds it) splits the region around it.
        """
        copies = [x.clone() if isinstance(x, torch.Tensor) else x for x in values]
        self.prepared.run_steps(region.steps)
        region.first = False
        start = time.perf_counter()
        try:
            region.compiled(*copies)
        except Exception as exc:
            why = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            bad = region.failing_step(exc)
            k = self.parts.index(region)
            if bad is None:
                log.warning("net %r: torch.compile failed on a region of %d ops, which run "
                            "eagerly (%s)", self.name, len(region.steps), why)
                self.parts[k] = list(region.steps)
            else:
                log.warning("net %r: torch.compile cannot trace op #%d %s, which runs eagerly "
                            "(%s)", self.name, bad.index, bad.ctx.op.type, why)
                self.parts[k:k + 1] = self._split_around(region, bad)
        finally:
            self.compile_seconds += time.perf_counter() - start

    def _split_around(self, region, bad):
        """Parts replacing ``region``: the steps before ``bad``, ``bad`` eagerly, those after."""
        i = region.steps.index(bad)
        parts = []
        if i:
            parts.append(self._region(region.steps[:i]))
        parts.append([bad])
        if i + 1 < len(region.steps):
            parts.append(self._region(region.steps[i + 1:]))
        return parts

    def close(self):
        """Drop the compiled functions."""
        self.parts = []


def _output(step, index):
    """A function computing output ``index`` of ``step`` from its inputs (a lazy output)."""
    def compute(*inputs):
        lazy, step.ctx.lazy_outputs = step.ctx.lazy_outputs, frozenset()
        try:
            return step.fn(step.ctx, list(inputs))[index]
        finally:
            step.ctx.lazy_outputs = lazy
    return compute
