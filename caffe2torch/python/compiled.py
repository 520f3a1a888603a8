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
On the CPU in the default mode a region is instead traced by make_fx and compiled by inductor
directly, guarded only by its inputs' dtypes, shapes and strides (dynamo's per-run guards cost more
than a small net's ops), and the ops whose fused code rounds differently keep ATen's kernels
(``_ATEN_KERNELS``): its results equal the "simple" net's. On CUDA the default mode is
"reduce-overhead" (CUDA graphs); torch may skip the graphs of regions that update their inputs in
place (a training net's WeightedSum; its log says why), which then run as plain inductor code.
Not yet measured on a GPU.

On the CPU, a region's convolutions, the max-pools of their outputs and the gradients of both
are carved out at its first run and run on oneDNN's blocked layout between them, without the
reorders each NCHW call makes (``onednn.py``; the same bits, checked).

NetDef arguments (``net.Proto().arg``) tune it: ``compile_mode`` (torch.compile's mode; default
"reduce-overhead", CUDA graphs, on CUDA and "default" on CPU), ``compile_dynamic`` (0 or 1:
torch.compile's ``dynamic``; default: automatic), ``compile_cpp_wrapper`` (default 1: direct
regions use inductor's C++ wrapper where their graph allows) and ``compile_onednn_layout``
(default 1; 0 keeps convolutions and pools in the regions, on NCHW tensors).
"""
import contextlib
import itertools
import logging
import re
import time

import torch

from caffe2torch.ops.registry import Deferred, tracing_region
from caffe2torch.python import onednn, utils

log = logging.getLogger("caffe2torch")

# Keys (input shapes) one direct region compiles for before it hands over to torch.compile, whose
# automatic dynamic shapes then cover the rest.
_MAX_KEYS = 4
# Ops whose ATen kernel a direct region calls rather than inductor's fused code. Numerics: the
# fused softmax, sums, mean, log and addcmul (SGD's update) round differently from eager in the
# last bit, and training amplifies that (after ~100 LeNet iterations a max-pool picks another
# element); with ATen's kernels the compiled net's results equal the "simple" net's. Speed:
# inductor's max-pool backward (a gather over every window) is ~3x slower than ATen's kernel.
_ATEN_KERNELS = ("_softmax", "_softmax_backward_data", "_log_softmax", "_log_softmax_backward_data",
                 "sum.dim_IntList", "mean.dim", "mean", "log", "addcmul",
                 "max_pool2d_with_indices_backward")
_LINE = re.compile(r'File "<caffe2torch region (\d+)>", line (\d+)')


# Ops that defer their unread outputs in the "simple" net too (ConvGradient's dX: the first
# convolution's data_grad): a region leaves those out of its graph and defers them itself. Other
# unread outputs (a predict net's prediction, the accuracy) are computed in the graph, as the
# simple net computes them: deferring them would only move their cost to the fetch.
_DEFERS = frozenset({"ConvGradient"})
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
        self.lazy = []  # (blob, step, its compute function, per input: blob name or snapshot number)
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
                    self.lazy.append((name, step, _output(step, k), sources))
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
            self.options = {"layout_optimization": False}
            tuning = {"options": self.options}
        else:
            self.options = None
            tuning = {"mode": mode}
        self.compiled = torch.compile(self.function, fullgraph=True, dynamic=dynamic, **tuning)
        self.first = True
        # Direct: traced by make_fx and compiled by inductor without dynamo, whose guards (every
        # input tensor, every op context's cached state: hundreds of checks) cost more per run
        # than a small net's ops. The region's Python depends only on what the NetDef fixes and
        # on its inputs' dtypes, shapes and strides, so those are the one guard (``key``), one
        # compiled function per key. CUDA and the other modes keep torch.compile (CUDA graphs).
        self.direct = self.options is not None and device.type == "cpu" and dynamic is None
        self.variants = {}
        self.last = None  # (guard of the last run's inputs, its function): see _last_guard
        inputs_written = set(self.inputs) & written
        # inputs the region overwrites: their aliasing is part of the key (in-place updates)
        self.mutated = bool(inputs_written)

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

    def key(self, values):
        """What the direct function depends on: each input's dtype, shape and strides (and
        which inputs share storage, for a region that overwrites inputs); None: an input that
        is not a plain CPU tensor."""
        key = []
        for x in values:
            if type(x) is not torch.Tensor or not x.is_cpu:
                return None
            key.append((x.dtype, x.shape, x.stride()))
        if self.mutated:
            storages = [x.untyped_storage().data_ptr() for x in values]
            key.append(tuple(map(storages.index, storages)))
        return tuple(key)

    def build(self, key, values, cpp_wrapper):
        """Trace the region on fake copies of ``values`` and compile it with inductor."""
        from torch.fx.experimental.proxy_tensor import make_fx

        # Tracing runs the ops' Python on fake tensors: whatever they cache in their state then
        # would be fake, so each op's state is put back as the eager run left it.
        # The ops skip their host-side value checks while torch compiles (is_compiling()).
        saved = [dict(step.ctx.state) for step in self.steps]
        try:
            with torch.compiler._compile_session_context(), tracing_region():
                graph = make_fx(self.function, tracing_mode="fake")(*values)
        finally:
            for step, state in zip(self.steps, saved):
                step.ctx.state.clear()
                step.ctx.state.update(state)
        # The ATen-kernel ops have no C shim: under the C++ wrapper they would go through
        # inductor's proxy executor (slower, and a warning each); such graphs keep Python's.
        names = {name.partition(".")[0] for name in _ATEN_KERNELS}
        calls_aten = any(getattr(node.target, "_opname", "").rstrip("_") in names
                         for node in graph.graph.nodes)
        options = dict(self.options, cpp_wrapper=bool(cpp_wrapper) and not calls_aten)
        with _aten_kernels():
            self.variants[key] = _inductor(graph, values, options)

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
        # inductor's C++ wrapper: allocations and kernel calls without Python, for direct regions
        self.cpp_wrapper = bool(args.get("compile_cpp_wrapper", 1))
        # convolutions and max-pools kept in oneDNN's blocked layout (see onednn.py)
        self.onednn = (bool(args.get("compile_onednn_layout", 1)) and self.device.type == "cpu"
                       and onednn.available())
        self._onednn_values, self._chain_steps = {}, set()
        self.compile_seconds = 0.0
        self._timing = False  # inside _timed
        self._regions = 0
        eager = [_eager_only(s, self.device) for s in prepared.steps]
        # An op traced with lazy outputs may return None there (no Deferred can leave a compiled
        # function); the region leaves them out and defers them itself.
        self._lazy = {id(s): s.ctx.lazy_outputs if s.schema.type in _DEFERS else frozenset()
                      for s in prepared.steps}
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
    def onednn_steps(self):
        """Op types that run on oneDNN's layout (see onednn.py), in run order."""
        return [s.ctx.op.type for p in self.parts if type(p) is onednn.Chain for s in p.steps]

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
                    elif type(part) is onednn.Chain:
                        part.run()
                    else:
                        self._run_region(part)
        return True

    def _run_region(self, region):
        """Run one region; its first run is eager, then it compiles (see _compile)."""
        blobs = self.prepared.workspace.blobs
        values = [blobs[n] for n in region.inputs]
        if region.direct:
            last = region.last
            if last is not None and last[0].check(*values):
                function = last[1]
            else:
                key = region.key(values)
                if key is None:  # a Deferred input, or one on another device
                    values = self._inputs(region, values)
                    key = region.key(values)
                function = region.variants.get(key)
                if function is None:
                    self._compile(region, values, key)
                    return
                region.last = _last_guard(region, values, function)
        else:
            values = self._inputs(region, values)
            if region.first:
                self._compile(region, values)
                return
            function = region.compiled
        try:
            outputs = function(*values)
        except Exception as exc:
            raise self.prepared._error(region.steps[0], exc) from exc
        blobs.update(zip(region.outputs, outputs))
        if region.lazy:
            count = len(region.outputs)
            for name, step, compute, sources in region.lazy:
                inputs = [outputs[count + x] if type(x) is int else blobs[x] for x in sources]
                blobs[name] = step.ctx.defer(compute, inputs)

    def _inputs(self, region, values):
        """``values`` with Deferred blobs resolved and tensors moved to the region's device."""
        blobs = self.prepared.workspace.blobs
        for k, x in enumerate(values):
            if type(x) is Deferred:
                x = blobs[region.inputs[k]] = x.resolve()
            if isinstance(x, torch.Tensor) and x.device != region.device:
                x = x.to(region.device)
            values[k] = x
        return values

    def _compile(self, region, values, key=None):
        """The region's first run (for a direct region: the first with this key): eager, then
        compile on copies of its inputs.

        The eager run gives this run's results and fills the caches ops keep in their state
        (e.g. a convolution's padding plan), so the compiled graph's guards see them filled and
        the second run does not compile again. Compiling on copies leaves the blobs alone; an op
        torch.compile cannot trace (``fullgraph=True`` finds it) splits the region around it. A
        direct region that make_fx cannot trace, or that sees too many keys, uses torch.compile.
        """
        copies = _copies(values)
        self.prepared.run_steps(region.steps)
        region.first = False
        with self._timed():
            self._compile_copies(region, copies, key)

    def _compile_copies(self, region, copies, key):
        """Compile ``region`` on ``copies`` of its inputs (see _compile)."""
        try:
            if self.onednn and region.direct and self._carved(region):
                return
            if region.direct:
                if key is not None and len(region.variants) < _MAX_KEYS:
                    try:
                        region.build(key, copies, self.cpp_wrapper)
                        return
                    except Exception as exc:  # torch.compile below finds and names the op
                        log.info("net %r: region %d compiles through torch.compile (%s: %s)",
                                 self.name, region.number, type(exc).__name__, exc)
                region.direct = False
                region.variants = {}
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

    @contextlib.contextmanager
    def _timed(self):
        """Adds the time inside to compile_seconds (once, where these nest)."""
        if self._timing:
            yield
            return
        self._timing = True
        start = time.perf_counter()
        try:
            yield
        finally:
            self._timing = False
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

    def _carved(self, region):
        """Carve the oneDNN runs out of ``region`` (just run eagerly) if it has any, and compile
        the regions left, on the values that run left in the blobs. False: nothing to carve."""
        blobs = self.prepared.workspace.blobs
        chosen = onednn.plan(region.steps, blobs)
        if not chosen:
            return False
        k = self.parts.index(region)
        parts = self._carve(region.steps, chosen)
        self.parts[k:k + 1] = parts
        # the chains check themselves against the eager ops and compile their kernels now
        onednn.warm_up([p for p in parts if type(p) is onednn.Chain], blobs, self._onednn_values)
        for part in parts:
            if type(part) is not _Region:
                continue
            values = self._inputs(part, [blobs[n] for n in part.inputs])
            key = part.key(values)
            if key is None:
                continue  # its first run compiles it
            try:
                part.build(key, _copies(values), self.cpp_wrapper)
                part.first = False
            except Exception as exc:  # its first run compiles it another way, or says why
                log.info("net %r: region %d compiles at its first run (%s: %s)", self.name,
                         part.number, type(exc).__name__, exc)
        return True

    def _carve(self, steps, chosen):
        """Parts replacing a region whose ``chosen`` steps run on oneDNN's layout: the steps
        rescheduled so that the chosen ones form few runs (a Chain each), the rest regions."""
        self._chain_steps.update(chosen)
        dense = {name for step in self.prepared.steps if id(step) not in self._chain_steps
                 for name in step.inputs}
        order = schedule(steps, [id(s) in chosen for s in steps])
        runs = itertools.groupby(order, key=lambda s: id(s) in chosen)
        return [onednn.Chain(self, list(run), self._onednn_values, dense) if in_chain
                else self._region(list(run)) for in_chain, run in runs]

    def compile_kernel(self, function, tensors):
        """compile_kernel for this net: its compile time is the net's."""
        with self._timed():
            return compile_kernel(function, tensors, self.cpp_wrapper)

    def close(self):
        """Drop the compiled functions and the oneDNN buffers."""
        self.parts = []
        self._onednn_values.clear()


def compile_kernel(function, tensors, cpp_wrapper=True):
    """``function(*tensors)`` (tensor code, which may write into its inputs) traced by make_fx and
    compiled by inductor for these tensors' dtypes, shapes and strides."""
    from torch.fx.experimental.proxy_tensor import make_fx

    with torch.compiler._compile_session_context():
        graph = make_fx(function, tracing_mode="fake")(*tensors)
    return _inductor(graph, tensors, {"layout_optimization": False, "cpp_wrapper": cpp_wrapper})


def _inductor(graph, values, options):
    """The make_fx ``graph`` compiled by inductor for ``values`` with config ``options``."""
    from torch._guards import TracingContext, tracing
    from torch._inductor.compile_fx import compile_fx
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    # Inductor's FX graph cache keys a graph by its shape environment, which torch.compile
    # provides through a tracing context; without one every compile would bypass the cache.
    with tracing(TracingContext(FakeTensorMode(shape_env=ShapeEnv()))):
        return compile_fx(graph, list(values), config_patches=options)


def _copies(values):
    """Copies of a region's input tensors to compile on (the blobs themselves stay untouched)."""
    return [x.clone() if isinstance(x, torch.Tensor) else x for x in values]


def _last_guard(region, values, function):
    """(guard, function) for the next run of a direct region that updates no input in place.

    The guard is the C++ tensor check dynamo uses (dtype, device, sizes, strides, grad mode of
    each input: under 1 us for the HEMT net's 12 inputs, where building ``key`` takes ~4 us); it
    passes exactly when the inputs have this run's key. None when it does not apply: a region
    that updates inputs in place also keys on their aliasing, which the check does not see.
    """
    if region.mutated:
        return None
    try:
        from torch._C._dynamo.guards import TensorGuards

        guard = TensorGuards(*values, dynamic_dims_sizes=[list(x.shape) for x in values],
                             dynamic_dims_strides=[list(x.stride()) for x in values])
    except Exception:  # a torch without it: every run builds the key
        return None
    return guard, function


@contextlib.contextmanager
def _aten_kernels():
    """While inductor compiles a direct region, the ops of _ATEN_KERNELS call their ATen kernels.

    For the duration, inductor's decomposition table (``select_decomp_table``, which its caches
    key by name) leaves them out and they lower to ATen fallback calls; the cache key tag says
    so, so that inductor's caches never mix these graphs with ones of the fused lowerings.
    """
    from torch._inductor import compile_fx as compile_fx_module
    from torch._inductor import lowering

    ops = [_overload(name) for name in _ATEN_KERNELS]
    saved = {op: lowering.lowerings.get(op) for op in ops}
    select = compile_fx_module.select_decomp_table
    tag = torch.compiler.config.cache_key_tag
    try:
        compile_fx_module.select_decomp_table = _decomp_table
        for op in ops:
            lowering.lowerings[op] = lowering.fallback_handler(op, add_to_fallback_set=False)
        with torch.compiler.config.patch(cache_key_tag=f"{tag}|caffe2torch aten kernels: "
                                         f"{' '.join(_ATEN_KERNELS)}"):
            yield
    finally:
        compile_fx_module.select_decomp_table = select
        for op, fn in saved.items():
            if fn is None:
                lowering.lowerings.pop(op, None)
            else:
                lowering.lowerings[op] = fn


def _decomp_table():
    """Inductor's decompositions less those of the ops of _ATEN_KERNELS."""
    from torch._inductor.decomposition import select_decomp_table

    ops = {_overload(name) for name in _ATEN_KERNELS}
    return {op: fn for op, fn in select_decomp_table().items() if op not in ops}


def _overload(name):
    """The aten OpOverload ``name`` ("sum.dim_IntList"; a bare name means its .default)."""
    packet, _, overload = name.partition(".")
    return getattr(getattr(torch.ops.aten, packet), overload or "default")


def _output(step, index):
    """A function computing output ``index`` of ``step`` from its inputs (a lazy output)."""
    def compute(*inputs):
        lazy, step.ctx.lazy_outputs = step.ctx.lazy_outputs, frozenset()
        try:
            return step.fn(step.ctx, list(inputs))[index]
        finally:
            step.ctx.lazy_outputs = lazy
    return compute
