"""Checks and utilities: NanCheck, EnforceFinite, Assert, AtomicFetchAdd, the counters, Checkpoint,
CopyFromCPUInput, CopyOnDeviceLike, EnsureDense and ATen (one named ``torch.ops.aten`` call)."""
import threading

import torch

from caffe2torch.ops import db, utility
from caffe2torch.ops._helpers import tracing
from caffe2torch.ops.registry import NO_GRADIENT, OpContext, gradient_op, grad_name, register_op


# --- NanCheck -----------------------------------------------------------------------------------

def _nan_check_grad(op, g_output):
    """NanCheck(dY) -> dX: the gradient is checked too."""
    return [gradient_op(op, "NanCheck", [g_output[0]], [grad_name(op.input[0])])], \
        [grad_name(op.input[0])] + [None] * (len(op.input) - 1)


@register_op("NanCheck", gradient=_nan_check_grad)
def nan_check(ctx, inputs):
    """Y = X; raises when any input holds NaN or ±Inf (reading a GPU tensor waits for it)."""
    for name, x in zip(ctx.input_names, inputs):
        if x.dtype.is_floating_point and tracing():
            # An exported program keeps the check as an assert node (ONNX has none: dropped).
            torch._assert_async(torch.isfinite(x).all(),
                                f"NanCheck: blob {name!r} holds NaN or Inf")
        elif x.dtype.is_floating_point and not bool(torch.isfinite(x).all()):
            bad = (~torch.isfinite(x)).nonzero()[0].tolist()
            raise ValueError(f"NanCheck: blob {name!r} of shape {tuple(x.shape)} holds NaN or Inf "
                             f"(first at index {bad}: {x[tuple(bad)].item()})")
    x = inputs[0]
    return [x if ctx.inplace.get(0) == 0 else x.clone()]


# --- AtomicFetchAdd -----------------------------------------------------------------------------

def _fetch_add_setup(ctx):
    if len(ctx.output_names) != 2 or ctx.output_names[0] != ctx.input_names[1]:
        raise ValueError("operator AtomicFetchAdd(mutex, value, increment) -> (value, fetched): "
                         "its first output must be its value input, updated in place")


@register_op("AtomicFetchAdd", gradient=NO_GRADIENT, setup=_fetch_add_setup, cpu_only_inputs=True,
             side_effects=True)
def atomic_fetch_add(ctx, inputs):
    """(mutex, A, B) -> (A, fetched): under the mutex, fetched = A, then A += B (int32 scalars)."""
    mutex, value, increment = inputs
    if not isinstance(mutex, utility._Mutex):
        raise ValueError(f"operator AtomicFetchAdd: blob {ctx.input_names[0]!r} is not a mutex; "
                         "create it with CreateMutex")
    for name, t in zip(ctx.input_names[1:], (value, increment)):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.int32 or t.numel() != 1:
            raise ValueError(f"operator AtomicFetchAdd: blob {name!r} must be an int32 scalar")
    with mutex.lock:
        fetched = value.clone()
        value.add_(increment.reshape(value.shape))
    return [value, fetched]


# --- Checkpoint ---------------------------------------------------------------------------------

def _checkpoint_setup(ctx):
    pattern = ctx.arg("db", "")
    if not pattern:
        raise ValueError("operator Checkpoint needs argument 'db', a file pattern with the "
                         "iteration, e.g. db='checkpoint_%05d.minidb'")
    if len(ctx.input_names) < 2:
        raise ValueError("operator Checkpoint takes the iteration counter and the blobs to save")
    every = int(ctx.arg("every", 1))
    if every < 1:
        raise ValueError(f"operator Checkpoint: every must be >= 1, got {every}")
    ctx.state["checkpoint"] = (pattern, every)


@register_op("Checkpoint", gradient=NO_GRADIENT, setup=_checkpoint_setup, cpu_only_inputs=True,
             side_effects=True)
def checkpoint(ctx, inputs):
    """(iter, blobs...): every ``every`` iterations, Save iter and the blobs to db pattern % iter."""
    pattern, every = ctx.state["checkpoint"]
    it = int(inputs[0].reshape(-1)[0])
    if it % every:
        return []
    try:
        path = pattern % it
    except TypeError:
        path = pattern  # a pattern without a number field: one db, overwritten
    # Caffe2 runs its own OperatorDef as a Save: every input, the counter too, so a Load of the
    # checkpoint restores the iteration that training resumes from.
    save_ctx = OpContext(ctx.op, {**ctx.args, "db": path}, ctx.device, ctx.workspace)
    save_ctx.input_names = list(ctx.input_names)
    return db.save(save_ctx, inputs)


# --- CopyFromCPUInput, CopyOnDeviceLike ---------------------------------------------------------

@register_op("CopyFromCPUInput", gradient=NO_GRADIENT, cpu_only_inputs=True)
def copy_from_cpu_input(ctx, inputs):
    """Y = the CPU input X copied to the op's device."""
    return [inputs[0].to(ctx.device, copy=True)]


@register_op("CopyOnDeviceLike", gradient=NO_GRADIENT, cpu_only_inputs=True)
def copy_on_device_like(ctx, inputs):
    """(X, dst) -> Y = X copied to dst's device."""
    x, dst = inputs
    return [x.to(dst.device, copy=True)]


# --- ATen ---------------------------------------------------------------------------------------

_ATEN_META = {"operator", "overload_name", "order", "engine"}


def _aten_setup(ctx):
    name = ctx.require("operator")
    packet = getattr(torch.ops.aten, name, None)
    if packet is None:
        raise ValueError(f"operator ATen: torch has no aten operator {name!r}")
    overload = ctx.arg("overload_name", "")
    if overload:
        fn = getattr(packet, overload, None)
        if fn is None:
            raise ValueError(f"operator ATen: aten::{name} has no overload {overload!r}; it has "
                             f"{', '.join(packet.overloads())}")
    else:
        fn = packet
    ctx.state["aten"] = (fn, {k: v for k, v in ctx.args.items() if k not in _ATEN_META})


@register_op("ATen", gradient=NO_GRADIENT, setup=_aten_setup)
def aten(ctx, inputs):
    """Y = aten::<operator>(inputs..., other arguments by name), e.g. operator='add', alpha=2."""
    fn, kwargs = ctx.state["aten"]
    out = fn(*inputs, **kwargs)
    outs = list(out) if isinstance(out, (tuple, list)) else [out]
    if len(outs) < len(ctx.output_names):
        raise ValueError(f"operator ATen: aten::{ctx.args['operator']} returned {len(outs)} "
                         f"value(s) for {len(ctx.output_names)} outputs")
    return [t if isinstance(t, torch.Tensor) else torch.tensor(t, device=ctx.device)
            for t in outs[:len(ctx.output_names)]]


# --- EnsureDense --------------------------------------------------------------------------------

def _ensure_dense_grad(op, g_output):
    """No op: the gradient passes through (dense gradients stay dense)."""
    return [], [g_output[0]]


@register_op("EnsureDense", gradient=_ensure_dense_grad)
def ensure_dense(ctx, inputs):
    """Y = X: caffe2torch tensors are always dense (in place allowed)."""
    x = inputs[0]
    return [x if ctx.inplace.get(0) == 0 else x.clone()]


# --- EnforceFinite, Assert ----------------------------------------------------------------------

@register_op("EnforceFinite", gradient=NO_GRADIENT)
def enforce_finite(ctx, inputs):
    """Raise when the input holds NaN or ±Inf; no output."""
    x = inputs[0]
    if x.dtype.is_floating_point and tracing():
        torch._assert_async(torch.isfinite(x).all(),
                            f"EnforceFinite: blob {ctx.input_names[0]!r} holds NaN or Inf")
    elif x.dtype.is_floating_point and not bool(torch.isfinite(x).all()):
        raise ValueError(f"EnforceFinite: blob {ctx.input_names[0]!r} holds NaN or Inf")
    return []


@register_op("Assert", gradient=NO_GRADIENT)
def assert_op(ctx, inputs):
    """Raise (with ``error_msg``) unless every element of the input is true (non-zero)."""
    x = inputs[0]
    if x.dtype.is_floating_point:
        raise ValueError(f"operator Assert: blob {ctx.input_names[0]!r} must be bool or integer, "
                         f"not {x.dtype}")
    if tracing():
        message = ctx.arg("error_msg", "")
        torch._assert_async(x.all(), f"Assert failed for blob {ctx.input_names[0]!r}"
                            + (f": {message}" if message else ""))
    elif not bool(x.all()):
        message = ctx.arg("error_msg", "")
        raise ValueError(f"Assert failed for blob {ctx.input_names[0]!r}"
                         + (f": {message}" if message else ""))
    return []


# --- Counters: CreateCounter, ResetCounter, CountUp, CountDown, CheckCounterDone, RetrieveCount -

class Counter:
    """What CreateCounter stores: an int64 count behind a lock (Caffe2's atomic Counter)."""

    caffe2_blob_type = "std::unique_ptr<Counter<int64_t>>"  # how Save writes it

    def __init__(self, count):
        self.count = count
        self.lock = threading.Lock()

    def __repr__(self):
        return f"<Caffe2 counter {self.count}>"


def _counter(ctx, value):
    if not isinstance(value, Counter):
        raise ValueError(f"operator {ctx.op.type}: blob {ctx.input_names[0]!r} is not a counter; "
                         "create it with CreateCounter")
    return value


def _int64(ctx, value):
    return torch.tensor(value, dtype=torch.int64)


@register_op("CreateCounter", gradient=NO_GRADIENT, side_effects=True)
def create_counter(ctx, inputs):
    """Y = a new counter starting at ``init_count`` (default 0)."""
    return [Counter(int(ctx.arg("init_count", 0)))]


@register_op("ResetCounter", gradient=NO_GRADIENT, side_effects=True)
def reset_counter(ctx, inputs):
    """Set the counter to ``init_count`` (default 0); the optional output is the old count."""
    counter = _counter(ctx, inputs[0])
    with counter.lock:
        old, counter.count = counter.count, int(ctx.arg("init_count", 0))
    return [_int64(ctx, old)] if ctx.output_names else []


@register_op("CountUp", gradient=NO_GRADIENT, side_effects=True)
def count_up(ctx, inputs):
    """Add 1 to the counter; the output is the count before (int64)."""
    counter = _counter(ctx, inputs[0])
    with counter.lock:
        old = counter.count
        counter.count += 1
    return [_int64(ctx, old)]


@register_op("CountDown", gradient=NO_GRADIENT, side_effects=True)
def count_down(ctx, inputs):
    """Subtract 1 from the counter; the output (bool) is true when it was already <= 0."""
    counter = _counter(ctx, inputs[0])
    with counter.lock:
        done = counter.count <= 0
        counter.count -= 1
    return [torch.tensor(done)]


@register_op("CheckCounterDone", gradient=NO_GRADIENT, side_effects=True)
def check_counter_done(ctx, inputs):
    """Y (bool) = the counter is <= 0."""
    counter = _counter(ctx, inputs[0])
    with counter.lock:
        return [torch.tensor(counter.count <= 0)]


@register_op("RetrieveCount", gradient=NO_GRADIENT, side_effects=True)
def retrieve_count(ctx, inputs):
    """Y (int64) = the counter's count."""
    counter = _counter(ctx, inputs[0])
    with counter.lock:
        return [_int64(ctx, counter.count)]
