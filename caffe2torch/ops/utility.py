"""Glue ops: Cast, StopGradient, Copy, the iteration counter, Print and Summarize (LearningRate is
in the optimizer family)."""
import atexit
import logging
import math
import os
import threading
import weakref

import numpy as np
import torch

from caffe2torch import limits
from caffe2torch.ops.registry import NO_GRADIENT, gradient_op, grad_name, register_op
from caffe2torch.proto import caffe2_pb2

log = logging.getLogger("caffe2torch")

_TP = caffe2_pb2.TensorProto
TORCH_DTYPES = {
    _TP.FLOAT: torch.float32, _TP.INT32: torch.int32, _TP.BYTE: torch.uint8, _TP.BOOL: torch.bool,
    _TP.UINT8: torch.uint8, _TP.INT8: torch.int8, _TP.UINT16: torch.uint16, _TP.INT16: torch.int16,
    _TP.INT64: torch.int64, _TP.FLOAT16: torch.float16, _TP.DOUBLE: torch.float64,
}
_NAMES = {name: number for name, number in _TP.DataType.items()}


def data_type(value, what="dtype"):
    """A Caffe2 DataType number from an int or a case-insensitive name ('float', 'INT64')."""
    if isinstance(value, str):
        number = _NAMES.get(value.upper())
        if number is None:
            raise ValueError(f"{what}={value!r} is not a Caffe2 DataType; use one of "
                             f"{', '.join(sorted(_NAMES))}")
        return number
    if int(value) not in _NAMES.values():
        known = sorted(_NAMES.items(), key=lambda kv: kv[1])
        raise ValueError(f"{what}={value} is not a Caffe2 DataType number; use one of "
                         + ", ".join(f"{n}={v}" for n, v in known))
    return int(value)


def torch_dtype(value, what="dtype"):
    """The torch dtype for a Caffe2 DataType given as an int or a name."""
    number = data_type(value, what)
    if number not in TORCH_DTYPES:
        raise ValueError(f"{what}={_TP.DataType.Name(number)} has no torch tensor type "
                         "(STRING tensors are numpy object arrays)")
    return TORCH_DTYPES[number]


# --- Cast, StopGradient, Copy -------------------------------------------------------------------

def _cast_grad(op, g_output):
    """Cast(dY) -> dX with to/from_type swapped; needs argument from_type."""
    args = {a.name: a for a in op.arg}
    if "from_type" not in args:
        raise ValueError(f"the gradient of Cast ({list(op.input)} -> {list(op.output)}) needs "
                         "argument 'from_type' (the input's DataType)")
    from caffe2torch.python.utils import ArgumentValue

    to = data_type(ArgumentValue(args["to"]), "to")
    source = data_type(ArgumentValue(args["from_type"]), "from_type")
    return [gradient_op(op, "Cast", [g_output[0]], [grad_name(op.input[0])], copy_args=False,
                        to=source, from_type=to)], [grad_name(op.input[0])]


def _cast_setup(ctx):
    ctx.state["dtype"] = torch_dtype(ctx.require("to"), "to")


@register_op("Cast", gradient=_cast_grad, setup=_cast_setup)
def cast(ctx, inputs):
    """Y = X converted to DataType ``to`` (int or case-insensitive name); floats truncate to ints."""
    return [inputs[0].to(ctx.state["dtype"], copy=True)]


@register_op("StopGradient", gradient=NO_GRADIENT)
def stop_gradient(ctx, inputs):
    """Y = X; backpropagation stops here (in place allowed)."""
    x = inputs[0]
    if ctx.inplace.get(0) == 0:
        return [x]
    return [x.clone()]  # a different blob name never shares storage


def _copy_grad(op, g_output):
    """Copy(dY) -> dX."""
    return [gradient_op(op, "Copy", [g_output[0]], [grad_name(op.input[0])])], \
        [grad_name(op.input[0])]


@register_op("Copy", gradient=_copy_grad)
def copy(ctx, inputs):
    """Y = a copy of X on the op's device."""
    return [inputs[0].clone()]


def _device_copy_grad(back):
    def maker(op, g_output):
        return [gradient_op(op, back, [g_output[0]], [grad_name(op.input[0])])], \
            [grad_name(op.input[0])]
    maker.__doc__ = f"{back}(dY) -> dX: the gradient goes back to X's device."
    return maker


@register_op("CopyGPUToCPU", gradient=_device_copy_grad("CopyCPUToGPU"), cpu_only_inputs=True)
def copy_gpu_to_cpu(ctx, inputs):
    """Y = X copied to host memory (the op itself is placed on the GPU, as in Caffe2)."""
    return [inputs[0].to("cpu", copy=True)]


@register_op("CopyCPUToGPU", gradient=_device_copy_grad("CopyGPUToCPU"), cpu_only_inputs=True)
def copy_cpu_to_gpu(ctx, inputs):
    """Y = X copied to the op's device (a GPU; the CPU when the op runs there)."""
    return [inputs[0].to(ctx.device, copy=True)]


# --- Iteration counter --------------------------------------------------------------------------

def _check_counter(ctx, it):
    if not isinstance(it, torch.Tensor) or it.dtype != torch.int64 or it.numel() != 1:
        raise ValueError(f"operator {ctx.op.type}: blob {ctx.input_names[-1]!r} must be an int64 "
                         "counter of one element, e.g. ConstantFill([], 'iter', shape=[1], "
                         "value=0, dtype=core.DataType.INT64)")


def _iter_setup(ctx):
    if ctx.input_names and ctx.output_names != ctx.input_names[-1:]:
        raise ValueError(f"operator {ctx.op.type} works in place: its output must be its counter "
                         f"input {ctx.input_names[-1]!r}, e.g. Iter(['iter'], ['iter'])")


@register_op("Iter", gradient=NO_GRADIENT, setup=_iter_setup, cpu_only_inputs=True,
             side_effects=True)
def iter_op(ctx, inputs):
    """Add 1 to the int64 counter in place (so the first run gives 1); the counter stays on CPU."""
    if not inputs:
        # Caffe2's old form Iter([], ['iter']): the op owns a counter that starts at 0.
        counter = ctx.state.get("counter")
        if counter is None:
            counter = ctx.state["counter"] = torch.zeros(1, dtype=torch.int64)
        return [counter.add_(1)]
    counter = inputs[0]
    if isinstance(counter, torch.Tensor) and counter.dtype == torch.int32 and counter.numel() == 1:
        # Caffe2 takes the counter's storage as int64 (mutable_data<int64_t>), so an INT32
        # ConstantFill counter (the Toy_Regression tutorial's) becomes an int64 one; we keep
        # its value rather than Caffe2's uninitialized memory.
        return [counter.to(torch.int64) + 1]
    _check_counter(ctx, counter)
    return [counter.add_(1)]


class _Mutex:
    """What CreateMutex stores: a lock (Caffe2's std::mutex blob)."""

    def __init__(self):
        self.lock = threading.Lock()

    def __repr__(self):
        return "<Caffe2 mutex>"


@register_op("CreateMutex", gradient=NO_GRADIENT)
def create_mutex(ctx, inputs):
    """Y = a new mutex, for AtomicIter."""
    return [_Mutex()]


@register_op("AtomicIter", gradient=NO_GRADIENT, setup=_iter_setup, cpu_only_inputs=True,
             side_effects=True)
def atomic_iter(ctx, inputs):
    """(mutex, iter) -> iter: Iter under the mutex (build_sgd's iteration counter)."""
    mutex, counter = inputs
    if not isinstance(mutex, _Mutex):
        raise ValueError(f"operator AtomicIter: blob {ctx.input_names[0]!r} is not a mutex; "
                         "create it with CreateMutex")
    _check_counter(ctx, counter)
    with mutex.lock:
        counter.add_(1)
    return [counter]


# --- Print and Summarize ------------------------------------------------------------------------

# How Caffe2 (TypeMeta::name) calls each element type in Print's output.
_C_TYPE_NAMES = {
    torch.float32: "float", torch.float64: "double", torch.float16: "caffe2::float16",
    torch.int32: "int", torch.int64: "long", torch.int16: "short", torch.int8: "signed char",
    torch.uint8: "unsigned char", torch.uint16: "unsigned short", torch.bool: "bool",
}


def _g(value):
    """A number as C++'s default ostream prints it (6 significant digits, like printf %g)."""
    return "%g" % value


_OPEN_FILES = weakref.WeakSet()  # every _LineFile not yet closed, flushed at interpreter exit


class _LineFile:
    """An output file opened at CreateNet (truncated); its lines are buffered until the run ends.

    An op adds a line, or a tensor snapshot and the function that formats it; ``flush`` (called
    by the executor when each RunNet returns, at close and at interpreter exit) formats and writes
    them at once, so an iteration pays no host sync and no write per line, and the file is complete
    whenever no net is running.
    """

    LIMIT = 1024  # pending lines written early so that a long RunNet(num_iter) stays small

    def __init__(self, path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        self.path = path
        self.file = open(path, "w", encoding="utf-8")
        self.pending = []
        _OPEN_FILES.add(self)

    def add(self, line, values=None):
        """Append ``line`` (a str), or ``line(values)`` once it is flushed (``values``: a list,
        or a tensor read then)."""
        self.pending.append((line, values))
        if len(self.pending) >= self.LIMIT:
            self.flush()

    def flush(self):
        """Format the pending lines (reading their tensors from the device) and write them."""
        if not self.pending or self.file.closed:
            return
        pending, self.pending = self.pending, []
        text = "".join((line if values is None else line(
            values.tolist() if isinstance(values, torch.Tensor) else values)) + "\n"
            for line, values in pending)
        self.file.write(text)
        self.file.flush()

    def close(self):
        """Write what is pending and close the file (PreparedNet.close calls this)."""
        self.flush()
        self.file.close()
        _OPEN_FILES.discard(self)


@atexit.register
def _flush_open_files():
    for output in list(_OPEN_FILES):
        output.flush()


def _print_setup(ctx):
    limit = int(ctx.arg("limit", 0))
    every_n = int(ctx.arg("every_n", 1))
    if every_n < 1:
        raise ValueError(f"operator Print: every_n must be >= 1, got {every_n}")
    ctx.state["print"] = [limit or 1000, every_n, 0]  # limit, every_n, runs modulo every_n
    if ctx.arg("to_file", 0):
        ctx.state["file"] = _LineFile(limits.writable_path(
            ctx.root_folder, ctx.input_names[0] + ".log", f"operator Print (to_file=1, blob "
            f"{ctx.input_names[0]!r})"))


def _type_name(dtype):
    return _C_TYPE_NAMES.get(dtype, str(dtype).replace("torch.", ""))


def _print_text(name, type_name, shape, values):
    dims = "".join(f"{d}," for d in shape)
    return f"Tensor {name} of type {type_name}. Dims: ({dims}): " + ",".join(values)


def _number_strings(values, floating):
    return [_g(v) for v in values] if floating else [str(int(v)) for v in values]


def format_print_line(name, value, limit=1000):
    """Print's line for ``value``: ``Tensor <name> of type <type>. Dims: (d0,d1,): v0,v1,...``."""
    if isinstance(value, torch.Tensor):
        flat = value.detach().reshape(-1)[:limit].cpu()
        floating = value.dtype.is_floating_point
        values = _number_strings(flat.double().tolist() if floating else flat.tolist(), floating)
        return _print_text(name, _type_name(value.dtype), tuple(value.shape), values)
    array = np.asarray(value, dtype=object)
    values = [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)
              for v in array.reshape(-1)[:limit]]
    return _print_text(name, "std::string", array.shape, values)


def _print_later(name, value, limit):
    """(formatter, snapshot) for a tensor's Print line: the values are read when it is written."""
    floating = value.dtype.is_floating_point
    head = value.detach().reshape(-1)[:limit]
    # A copy: the blob may change in place before the line is written (the iteration counter).
    snapshot = head.to(torch.float64 if floating else head.dtype, copy=True)
    type_name, shape = _type_name(value.dtype), tuple(value.shape)

    def line(values):
        return _print_text(name, type_name, shape, _number_strings(values, floating))
    return line, snapshot


@register_op("Print", gradient=NO_GRADIENT, setup=_print_setup, cpu_only_inputs=True,
             side_effects=True)
def print_op(ctx, inputs):
    """Print the blob (to_file=1: append to <root>/<blob>.log); limit values, every_n runs."""
    state = ctx.state["print"]
    limit, every_n, count = state
    count += 1
    if count > every_n:
        count -= every_n
    state[2] = count
    if count != 1:
        return []
    output = ctx.state.get("file")
    value = inputs[0]
    if output is None:
        print(format_print_line(ctx.input_names[0], value, limit))
    elif isinstance(value, torch.Tensor):
        output.add(*_print_later(ctx.input_names[0], value, limit))
    else:
        output.add(format_print_line(ctx.input_names[0], value, limit))
    return []


def _summarize_setup(ctx):
    if ctx.arg("to_file", 0):
        name = ctx.input_names[0].replace("/", "#") + ".summary"
        ctx.state["file"] = _LineFile(limits.writable_path(
            ctx.root_folder, name, f"operator Summarize (to_file=1, blob {ctx.input_names[0]!r})"))


def _flat_values(x):
    """(element count, the values as a flat floating tensor) of Summarize's non-empty input."""
    n = x.numel()
    if n == 0:
        raise ValueError("operator Summarize: the input tensor is empty")
    flat = x.detach().reshape(-1)
    return n, flat if flat.dtype.is_floating_point else flat.double()


def _stats_tensor(x):
    """[min, max, mean, std] of a tensor as a float64 tensor on its device, std unbiased.

    Nothing is read back to the host (the device path). min/max in one pass (aminmax); the mean
    summed in double as Caffe2 does; the std as the norm of the deviations from that mean, in
    double (Caffe2's two passes; torch.std's Welford pass costs twice as much on the CPU).
    """
    n, flat = _flat_values(x)
    low, high = torch.aminmax(flat)
    mean = torch.sum(flat, dtype=torch.float64) / n
    if n > 1:
        deviations = flat.double() - mean  # in double, as Caffe2's diff
        std = torch.linalg.vector_norm(deviations) / math.sqrt(n - 1)
    else:
        std = mean.new_zeros(())
    return torch.stack([low.double(), high.double(), mean, std])


# The one-pass std, sqrt((Σx² − n·mean²)/(n−1)), loses digits to cancellation when the mean is
# large against the spread: past this mean²/var (2 of its 15 digits left for the 6 printed),
# the two passes run instead.
_ONE_PASS_LIMIT = 1e6


# The CPU path converts its input to double in pieces of at most this many values, through one
# buffer per thread (8 MB), allocated once: a fresh double copy of a large blob costs more in page
# faults than the two reductions over it (LeNet's fc3_w, 400,000 values: ~640 -> ~200 us).
_CHUNK = 1 << 20
_scratch = threading.local()


def _in_double(flat):
    """``flat``'s values as float64 tensors, piece by piece (views of the thread's buffer)."""
    if flat.dtype == torch.float64:
        yield flat
        return
    n = flat.numel()
    buf = getattr(_scratch, "buffer", None)
    if buf is None or buf.numel() < min(n, _CHUNK):
        buf = _scratch.buffer = torch.empty(min(n, _CHUNK), dtype=torch.float64)
    for start in range(0, n, _CHUNK):
        part = flat[start:start + _CHUNK]
        yield buf[:part.numel()].copy_(part)


def _stats_on_cpu(x):
    """[min, max, mean, std] of a CPU tensor as Python floats, the std as Caffe2 defines it.

    aminmax in one pass, then the sum and the sum of squares in double (a float32 square is exact
    in double) over the values converted into a reused buffer; badly conditioned inputs take the
    two passes of ``_stats_tensor``.
    """
    n, flat = _flat_values(x)
    low, high = (v.item() for v in torch.aminmax(flat))
    total = squares = 0.0
    for part in _in_double(flat):
        total += part.sum().item()
        squares += torch.dot(part, part).item()
    mean = total / n
    if n == 1 or low == high:
        return [low, high, mean, 0.0]
    var = max(squares - total * mean, 0.0) / (n - 1)
    if mean * mean > _ONE_PASS_LIMIT * var:
        return _stats_tensor(x).tolist()
    return [low, high, mean, math.sqrt(var)]


def summary_stats(x):
    """(min, max, mean, std) of a tensor as Python floats, std unbiased (0 for one element)."""
    if x.device.type == "cpu":
        return _stats_on_cpu(x)
    return [float(v) for v in _stats_tensor(x).tolist()]


def _summary_line(stats):
    return " ".join(_g(v) for v in stats)


@register_op("Summarize", gradient=NO_GRADIENT, setup=_summarize_setup, side_effects=True)
def summarize(ctx, inputs):
    """Append 'min max mean std' (to_file=1: <root>/<blob, / → #>.summary); optional output [4]."""
    x = inputs[0]
    # On the CPU the four numbers are read at once (no device to wait for); elsewhere they stay
    # on the device until the line is written.
    stats = _stats_on_cpu(x) if x.device.type == "cpu" else _stats_tensor(x)
    output = ctx.state.get("file")
    if output is not None:
        output.add(_summary_line, stats)
    else:
        log.info("Summary of %s: %s", ctx.input_names[0],
                 _summary_line(stats if type(stats) is list else stats.tolist()))
    if ctx.output_names:
        if type(stats) is list:
            return [torch.tensor(stats, dtype=torch.float32, device=x.device)]
        return [stats.to(torch.float32, copy=True)]
    return []
