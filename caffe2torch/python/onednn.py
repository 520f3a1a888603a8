"""oneDNN's blocked layout kept between a compiled CPU net's convolutions and max-pools.

PyTorch's CPU convolution (oneDNN) computes in a blocked layout (``nChw16c`` with AVX-512, 16
channels per block, zero-padded) and reorders its NCHW input into it and its output back on every
call; on the tutorial's LeNet those reorders are ~3 ms of a ~24 ms training iteration, and the
max-pools between the convolutions copy to channels-last and back. A "compiled" net that sees a
convolution → max-pool → convolution chain keeps the blobs between them in oneDNN's layout
(mkldnn tensors): each convolution, its gradient and each max-pool run on blocked memory, and a
blob becomes NCHW only where an op outside the chain reads it (or someone fetches it: a
``Deferred`` blob). The oneDNN primitives are the ones the NCHW call runs (their results are the
same bits); a max-pool and its gradient run on a view of the blocked memory (``[N·C/16, 16, H,
W]`` is channels-last): over non-overlapping windows (LeNet's 2x2, stride 2) an inductor-compiled
kernel with ATen's argmax rule (``_window_max``), otherwise ATen's channels-last kernels, which
equal its NCHW kernels' values and argmax. A chain's first run (a warm-up on the values of the
net's first, eager run; and its first for new input shapes) checks that, blob by blob, against
the eager ops on the same inputs; a difference keeps the chain on the eager ops (logged).

NetDef argument ``compile_onednn_layout`` (default 1) turns it off with 0.
"""
import ctypes
import itertools
import logging
import weakref

import torch
import torch.nn.functional as F

from caffe2torch.ops import nn as nn_ops
from caffe2torch.ops.registry import Deferred

log = logging.getLogger("caffe2torch")
aten = torch.ops.aten

# Convolutions with fewer output channels gain nothing from the blocked layout's padding.
_MIN_CHANNELS = 8
_BLOCKS = (16, 8)


def available():
    """True when this torch has oneDNN and the mkldnn tensor helpers the chain uses."""
    return (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "data_ptr")
            and hasattr(torch.ops.mkldnn, "_nbytes"))


class _Value:
    """A blob held as a mkldnn tensor: its NCHW shape, channel block and channels-last view of
    the blocked memory (None: a layout the chain does not view), where a max-pool's output found
    each maximum (``indices``: ATen's argmax indices, or with ``window`` set, each maximum's
    position in its window: see _window_max) and the value it pooled; ``stored``: what the
    workspace blob holds for it."""

    __slots__ = ("mk", "shape", "block", "view", "indices", "window", "pooled", "stored", "dense",
                 "version", "serial", "__weakref__")
    _serials = itertools.count()

    def __init__(self, mk, block=None, view=None, indices=None, pooled=None, window=None):
        self.mk, self.shape, self.block, self.view = mk, tuple(mk.shape), block, view
        # pooled: the serial number of the value a max-pool's output pooled (not the value
        # itself, which would keep the previous run's tensors alive)
        self.indices, self.pooled, self.window = indices, pooled, window
        self.stored = self.dense = self.version = None
        self.serial = next(self._serials)

    def to_dense(self):
        """The NCHW tensor (oneDNN's reorder), computed once."""
        if self.dense is None:
            self.dense = self.mk.to_dense()
        return self.dense


def _dense_of(value):
    """The function a Deferred blob of ``value`` computes: ``value``'s NCHW tensor, shared with
    the chain's own reads while the chain keeps ``value``. It holds ``value`` weakly: the _Value
    holds the Deferred, and a cycle between them would keep every run's mkldnn tensors (MBs each)
    alive until the cyclic garbage collector ran, growing the heap and its page faults."""
    ref, mk = weakref.ref(value), value.mk

    def dense(_token):
        held = ref()
        return held.to_dense() if held is not None else mk.to_dense()
    return dense


def _memory_view(mk, block):
    """The blocked memory of ``mk`` ([N, C, H, W], C padded to blocks of ``block``) as a dense
    channels-last tensor [N·C/block, block, H, W], or None when its size says another layout."""
    n, c, h, w = mk.shape
    cb = -(-c // block)
    nbytes = torch.ops.mkldnn._nbytes(mk)
    if mk.dtype != torch.float32 or nbytes != n * cb * block * h * w * 4:
        return None
    memory = (ctypes.c_char * nbytes).from_address(torch.ops.mkldnn.data_ptr(mk))
    memory.owner = mk  # the view keeps the mkldnn tensor (and so its memory) alive
    flat = torch.frombuffer(memory, dtype=torch.float32)
    return flat.view(n * cb, h, w, block).permute(0, 3, 1, 2)


def _window_max(x, y, offsets, kernel):
    """Max-pool over non-overlapping windows (stride = ``kernel``, no padding) of ``x``, the
    blocked memory [M, H, W, block], into ``y`` [M, OH, OW, block], and each maximum's position in
    its window (row-major) into ``offsets`` (int32, like ``y``).

    The rule is ATen's max-pool kernels': a window is scanned row by row and an element replaces
    the maximum so far when it is greater or NaN, so the first maximum (or the last NaN) wins, and
    ``y`` is that element (the same bits: a selection, no arithmetic). Inductor compiles this into
    one pass over ``x``; ATen's kernel on the same memory also writes 64-bit argmax indices and
    takes ~3x as long (LeNet's first pool: 75 against 250 us)."""
    kh, kw = kernel
    oh, ow = y.shape[1], y.shape[2]
    best = x[:, 0:oh * kh:kh, 0:ow * kw:kw]
    at = torch.zeros(best.shape, dtype=torch.int32)
    for i, j in itertools.product(range(kh), range(kw)):
        if i or j:
            candidate = x[:, i:oh * kh:kh, j:ow * kw:kw]
            # candidate != candidate: NaN (inductor does not vectorize isnan)
            better = (candidate > best) | (candidate != candidate)
            best = torch.where(better, candidate, best)
            at = torch.where(better, i * kw + j, at)
    y.copy_(best)
    offsets.copy_(at)


def _window_max_gradient(dy, offsets, dx, kernel):
    """dX of _window_max from ``dy`` [M, OH, OW, block] into ``dx`` [M, H, W, block] (blocked
    memory): each window's dY at its maximum, zero elsewhere (rows and columns past the last
    window too). The values are ATen's backward kernel's, which adds dY to a zeroed dX: a -0.0
    becomes 0.0, as here. One pass, writing dX once (ATen's zeroes it first)."""
    kh, kw = kernel
    oh, ow = dy.shape[1], dy.shape[2]
    h, w = dx.shape[1], dx.shape[2]
    rows, cols = torch.arange(h), torch.arange(w)
    src_rows, src_cols = (rows // kh).clamp(max=oh - 1)[:, None], (cols // kw).clamp(max=ow - 1)
    g = dy[:, src_rows, src_cols]
    at = offsets[:, src_rows, src_cols]
    position = ((rows % kh)[:, None] * kw + cols % kw)[..., None]
    inside = ((rows < oh * kh)[:, None] & (cols < ow * kw))[..., None]
    dx.copy_(torch.where((at == position) & (g != 0) & inside, g, 0.0))


def _window(args, shape):
    """The window of a max-pool with these ATen arguments when _window_max computes it (stride =
    kernel, no padding or dilation, no partial window), else None."""
    kernel, stride, padding, dilation, ceil_mode = args
    if (len(kernel) != 2 or list(stride) != list(kernel) or any(padding) or any(d != 1 for d in dilation)
            or (ceil_mode and (shape[2] % kernel[0] or shape[3] % kernel[1]))):
        return None
    return tuple(kernel)


def _write_dense(view, x, block):
    """Copy NCHW ``x`` into a blocked view (padding channels zero)."""
    n, c = x.shape[:2]
    cb = view.shape[0] // n
    padded = F.pad(x, (0, 0, 0, 0, 0, cb * block - c)) if cb * block != c else x
    view.unflatten(0, (n, cb)).copy_(padded.reshape(n, cb, block, *x.shape[2:]))


def _block_of(mk):
    """The channel block of ``mk``'s layout, proven by a probe: a pattern written through the
    view must come back from oneDNN's own reorder to NCHW. None: a layout the chain cannot view."""
    if mk.dim() != 4 or mk.numel() >= 1 << 24:
        return None
    pattern = torch.arange(mk.numel(), dtype=torch.float32).reshape(mk.shape)
    for block in _BLOCKS:
        probe = mk.clone()
        view = _memory_view(probe, block)
        if view is None:
            continue
        _write_dense(view, pattern, block)
        if torch.equal(probe.to_dense(), pattern):
            return block
    return None


class Chain:
    """Conv, ConvGradient, MaxPool and MaxPoolGradient steps run on oneDNN's layout (see the
    module doc); a step whose inputs do not suit it runs the eager op."""

    def __init__(self, net, steps, values, dense_names):
        self.net = net
        self.steps = steps
        self.values = values  # blob name -> _Value, shared by the net's chains
        self.dense_names = dense_names  # blobs read outside the chains: stored as NCHW tensors
        self.verified = set()  # input-shape keys checked against the eager ops
        self.enabled = True
        self.blocks = {}  # (step index, output, shape) -> block of that output's layout
        self.buffers = {}  # (step index, role) -> persistent mkldnn tensor, its view, indices
        self.kernels = {}  # (function, its inputs' shapes) -> the inductor-compiled function
        self.scratch = None  # the blobs of a warm-up run (see warm_up), else None
        written, inputs = set(), []
        for step in steps:
            inputs.extend(n for n in step.inputs if n not in written and n not in inputs)
            written.update(step.outputs)
        self.inputs = inputs
        # A chain that overwrites one of its own inputs cannot be run twice for the check.
        if written & set(inputs):
            self.enabled = False
        self._handlers = {"Conv": self._conv, "ConvGradient": self._conv_gradient,
                          "MaxPool": self._max_pool, "MaxPoolGradient": self._max_pool_gradient}

    @property
    def blobs(self):
        """The blobs the chain reads and writes: the workspace's, or a warm-up's copy."""
        return self.net.prepared.workspace.blobs if self.scratch is None else self.scratch

    def run(self):
        """One run of the chain's steps."""
        if not self.enabled:
            for step in self.steps:
                self._eager(step)
            return
        blobs = self.blobs
        key = tuple(getattr(blobs.get(n), "shape", None) for n in self.inputs)
        if key not in self.verified:
            self._check(key)
            return
        error = self.net.prepared._error
        for step in self.steps:
            try:
                self._handlers[step.ctx.op.type](step)
            except Exception as exc:
                raise error(step, exc) from exc

    def _check(self, key):
        """Run the eager ops on NCHW copies of the inputs, then the chain on oneDNN's layout;
        keep the layout (and its results) only if every output is the same bits."""
        blobs = self.blobs
        want = {}
        error = self.net.prepared._error
        for step in self.steps:
            inputs = [want[n] if n in want else self._dense(n) for n in step.inputs]
            try:
                outputs = step.fn(step.ctx, inputs)
            except Exception as exc:
                raise error(step, exc) from exc
            want.update(zip(step.outputs, outputs))
        bad = None
        try:
            for step in self.steps:
                self._handlers[step.ctx.op.type](step)
        except Exception as exc:  # a layout or size oneDNN refuses: the eager results stand
            bad = f"{type(exc).__name__}: {exc}"
        for name in want if bad is None else ():
            got, expected = _resolved(blobs, name), _resolved(want, name)
            if not (isinstance(got, torch.Tensor) and isinstance(expected, torch.Tensor)
                    and got.dtype == expected.dtype and torch.equal(got, expected)):
                bad = f"blob {name!r} differs from the eager op's"
                break
        if bad is None:
            self.verified.add(key)
            return
        log.info("net %r: ops %s stay on NCHW tensors (%s)", self.net.name,
                 [s.index for s in self.steps], bad)
        self.enabled = False
        for name, value in want.items():
            blobs[name] = value
            self.values.pop(name, None)

    # --- blob access ----------------------------------------------------------------------------

    def _get(self, name):
        """The chain's _Value for blob ``name`` if the blob still holds it, else the tensor."""
        blobs = self.blobs
        x = blobs[name]
        value = self.values.get(name)
        if value is not None and (x is value.stored or x is value.dense) and (
                value.version is None or x._version == value.version):
            return value
        if type(x) is Deferred:
            x = blobs[name] = x.resolve()
        return x

    def _dense(self, name):
        x = self._get(name)
        return x.to_dense() if type(x) is _Value else x

    def _put(self, name, value):
        blobs = self.blobs
        if name in self.dense_names:
            value.stored = value.to_dense()
        else:
            # the view (or the fresh mkldnn tensor) is the Deferred's input: a later run that
            # rewrites a persistent buffer bumps its version, and a stale fetch is refused
            value.stored = Deferred(_dense_of(value),
                                    [value.view if value.view is not None else value.mk])
        self.values[name] = value
        blobs[name] = value.stored

    def _eager(self, step):
        """``step`` on NCHW tensors (the "simple" net's op)."""
        outputs = step.fn(step.ctx, [self._dense(n) for n in step.inputs])
        blobs = self.blobs
        for name, y in zip(step.outputs, outputs):
            blobs[name] = y
            self.values.pop(name, None)

    def _value(self, step, k, mk, **extra):
        """A _Value for output ``k`` of ``step``, its layout's block found once per shape."""
        where = (step.index, k, tuple(mk.shape))
        if where not in self.blocks:
            self.blocks[where] = _block_of(mk)
        block = self.blocks[where]
        view = _memory_view(mk, block) if block else None
        return _Value(mk, block, view, **extra)

    def _buffer(self, step, role, like):
        """A persistent mkldnn tensor in ``like``'s layout (shape and block), with its view."""
        buffer = self.buffers.get((step.index, role))
        if buffer is None or buffer[0].shape != like.mk.shape:
            mk = like.mk.clone()
            buffer = self.buffers[step.index, role] = (mk, _memory_view(mk, like.block),
                                                       torch.empty(0, dtype=torch.int64))
        return buffer

    # --- the ops ----------------------------------------------------------------------------------

    def _conv_plan(self, step, x_shape, w):
        """The conv's plan when it may run on oneDNN's layout, else None."""
        sp = step.ctx.state["spatial"]
        if sp.nhwc or len(x_shape) != 4:
            return None
        plan = sp.plan(tuple(x_shape[2:]), tuple(w.shape[2:]))
        return None if plan.explicit is not None else plan

    def _mk_input(self, name, step, w, bias):
        """Blob ``name`` as a mkldnn tensor for a oneDNN convolution, or None."""
        x = self._get(name)
        if type(x) is _Value:
            return x
        self.values.pop(name, None)  # a stale copy of an earlier tensor: free before the new one
        if (type(x) is not torch.Tensor or not x.is_cpu or x.dtype != torch.float32
                or x.dim() != 4 or not x.is_contiguous() or not x.numel()
                or w.dtype != torch.float32):
            return None
        plan = self._conv_plan(step, x.shape, w)
        if plan is None:
            return None
        backend = torch._C._select_conv_backend(
            x, w, bias, plan.stride, plan.padding, plan.dilation, False, [0, 0],
            step.ctx.state["group"], None)
        if backend != torch._C._ConvBackend.Mkldnn:
            return None
        value = _Value(x.to_mkldnn())
        value.stored = value.dense = x  # the blob keeps its tensor; the chain its mkldnn copy
        value.version = x._version
        self.values[name] = value
        return value

    def _conv(self, step):
        w = self._dense(step.inputs[1])
        bias = self._dense(step.inputs[2]) if len(step.inputs) > 2 else None
        x = self._mk_input(step.inputs[0], step, w, bias)
        plan = None if x is None else self._conv_plan(step, x.shape, w)
        if plan is None or type(w) is not torch.Tensor or w.shape[0] < _MIN_CHANNELS:
            return self._eager(step)
        y = torch.mkldnn_convolution(x.mk, w, bias, plan.padding, plan.stride, plan.dilation,
                                     step.ctx.state["group"])
        self._put(step.outputs[0], self._value(step, 0, y))

    def _conv_gradient(self, step):
        ctx = step.ctx
        w = self._dense(step.inputs[1])
        x, dy = self._get(step.inputs[0]), self._get(step.inputs[2])
        mask = ctx.state["mask"]
        lazy_dx = mask[0] and (len(ctx.output_names) - 1) in ctx.lazy_outputs
        plan = None if type(x) is not _Value else self._conv_plan(step, x.shape, w)
        if (plan is None or type(dy) is not _Value
                or (mask[0] and not lazy_dx and nn_ops._native_dx_faster(x.mk, w))):
            return self._eager(step)
        fused_dx = mask[0] and not lazy_dx
        dx, dw, db = aten.convolution_backward(
            dy.mk, x.mk, w, [w.shape[0]] if mask[2] else None, *nn_ops._conv_args(ctx, plan),
            [fused_dx, True, mask[2]])
        blobs = self.blobs
        names = list(step.outputs)
        blobs[names[0]] = dw
        self.values.pop(names[0], None)
        if mask[2]:
            blobs[names[1]] = db
            self.values.pop(names[1], None)
        if fused_dx:
            self._put(names[-1], self._value(step, len(names) - 1, dx))
        elif lazy_dx:
            x_in = x.stored if type(x.stored) is torch.Tensor else x.to_dense()
            token = dy.view if dy.view is not None else dy.mk
            blobs[names[-1]] = ctx.defer(
                lambda x, w, _t, dy=dy: nn_ops._conv_dx(ctx, x, w, dy.to_dense()), [x_in, w, token])
            self.values.pop(names[-1], None)

    def _pool_args(self, step, value):
        """(kernel, stride, padding, dilation, ceil_mode) for a 2-D NCHW pool of ``value``."""
        sp = step.ctx.state["spatial"]
        if sp.nhwc or len(value.shape) != 4 or value.view is None or sp.global_pooling:
            return None
        plan = sp.plan(tuple(value.shape[2:]))
        if plan.explicit is not None:
            return None
        return (list(plan.kernel), list(plan.stride), list(plan.padding), list(plan.dilation),
                bool(plan.ceil_mode))

    def _kernel(self, function, tensors, *constants):
        """Run ``function(*tensors, *constants)`` compiled by inductor (once per input shapes)."""
        key = (function, constants) + tuple(t.shape for t in tensors)
        compiled = self.kernels.get(key)
        if compiled is None:
            compiled = self.kernels[key] = self.net.compile_kernel(
                lambda *ts: function(*ts, *constants), tensors)
        compiled(*tensors)

    def _max_pool(self, step):
        x = self._get(step.inputs[0])
        args = self._pool_args(step, x) if type(x) is _Value else None
        if args is None:
            return self._eager(step)
        window = _window(args, x.shape)
        buffer = self.buffers.get((step.index, "y"))
        if buffer is None or buffer[3] != x.shape:
            # oneDNN's own pool gives a tensor of Y's shape in X's layout, to write into
            mk = torch.mkldnn_max_pool2d(x.mk, *args)
            if _block_of(mk) != x.block:
                raise RuntimeError("oneDNN's max-pool changed the layout")
            view = _memory_view(mk, x.block)
            indices = (torch.empty(_rows(view).shape, dtype=torch.int32) if window
                       else torch.empty(0, dtype=torch.int64))
            buffer = self.buffers[step.index, "y"] = (mk, view, indices, x.shape)
        mk, view, indices, _ = buffer
        if window:
            self._kernel(_window_max, (_rows(x.view), _rows(view), indices), window)
        else:
            aten.max_pool2d_with_indices.out(x.view, *args, out=view, indices=indices)
            if view.shape != indices.shape:  # a size oneDNN and ATen round differently
                raise RuntimeError("max-pool output sizes of oneDNN and ATen differ")
        self._put(step.outputs[0], _Value(mk, x.block, view, indices, pooled=x.serial,
                                          window=window))

    def _max_pool_gradient(self, step):
        x, y, dy = (self._get(n) for n in step.inputs)
        args = self._pool_args(step, x) if type(x) is _Value else None
        if args is None or type(y) is not _Value or y.pooled != x.serial or y.indices is None:
            return self._eager(step)
        if type(dy) is _Value and dy.block == y.block and dy.view is not None:
            dy_view = dy.view
        elif type(dy) is torch.Tensor and tuple(dy.shape) == y.shape and dy.dtype == torch.float32:
            dy_view = self._buffer(step, "dy", y)[1]  # NCHW (from a region): copied in
            _write_dense(dy_view, dy, y.block)
        else:
            return self._eager(step)
        mk, view, _ = self._buffer(step, "dx", x)
        if y.window:
            self._kernel(_window_max_gradient, (_rows(dy_view), y.indices, _rows(view)), y.window)
        else:
            aten.max_pool2d_with_indices_backward.grad_input(dy_view, x.view, *args, y.indices,
                                                             grad_input=view)
        self._put(step.outputs[0], _Value(mk, x.block, view))


def _rows(view):
    """A blocked memory's channels-last view [M, block, H, W] as the dense [M, H, W, block]."""
    return view.permute(0, 2, 3, 1)


def warm_up(chains, blobs, values):
    """Run ``chains`` (in net order) once on a shallow copy of ``blobs`` (the values the net's
    eager first run left), so that the net's second run finds them checked against the eager ops
    and their kernels compiled; ``blobs`` stay as they are, and ``values`` (the chains' _Value
    of each blob) is emptied of what the warm-up held."""
    scratch = dict(blobs)
    try:
        for chain in chains:
            chain.scratch = scratch
            chain.run()
    except Exception as exc:  # noqa: BLE001 (the chain's first real run checks it again)
        log.info("oneDNN chains: the warm-up failed (%s: %s)", type(exc).__name__, exc)
        for chain in chains:
            chain.verified.clear()
    finally:
        for chain in chains:
            chain.scratch = None
        values.clear()


def _resolved(blobs, name):
    x = blobs.get(name)
    return x.resolve() if type(x) is Deferred else x


def plan(steps, blobs):
    """Which of a region's ``steps`` (after its eager run, ``blobs`` hold their values) to run
    on oneDNN's layout: the Conv ops worth it, the max-pools of their outputs and the gradients
    of both. A Conv is worth it when a max-pool or another Conv of the chain reads its output, or
    its input comes from one: a lone Conv (its input and output NCHW anyway) would only add a
    copy. Returns a set of step ids, empty when there is no such convolution."""
    convs = {id(s) for s in steps if s.ctx.op.type == "Conv" and _eligible(s, blobs)}
    while True:
        forward, produced, readers = _forward_chain(steps, convs)
        useful = {id(s) for s in steps if id(s) in convs and (
            s.inputs[0] in produced or readers.get(s.outputs[0], False))}
        if useful == convs:
            break
        convs = useful
    if not convs:
        return set()
    chosen = set(forward)
    conv_inputs = {(s.inputs[0], s.inputs[1]) for s in steps if id(s) in convs}
    for step in steps:
        kind = step.ctx.op.type
        if ((kind == "MaxPoolGradient" and step.inputs[0] in produced)
                or (kind == "ConvGradient" and (step.inputs[0], step.inputs[1]) in conv_inputs)):
            chosen.add(id(step))
    return chosen


def _eligible(step, blobs):
    """A Conv whose input and filter (this run's values) suit oneDNN's layout."""
    x, w = blobs.get(step.inputs[0]), blobs.get(step.inputs[1])
    return (torch._C._get_mkldnn_enabled() and type(x) is torch.Tensor
            and type(w) is torch.Tensor and x.dim() == 4 and x.is_cpu
            and x.dtype == torch.float32 and x.numel() > 0 and w.shape[0] >= _MIN_CHANNELS)


def _forward_chain(steps, convs):
    """(ids of the convs and the max-pools of chain blobs, the chain's blobs, blob -> read by a
    max-pool or conv of the chain)."""
    forward, produced, readers = set(), set(), {}
    for step in steps:
        kind = step.ctx.op.type
        if id(step) in convs or (kind == "MaxPool" and step.inputs[0] in produced):
            forward.add(id(step))
            if step.inputs[0] in produced:
                readers[step.inputs[0]] = True
            produced.update(step.outputs)
    return forward, produced, readers
