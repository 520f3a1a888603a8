"""Fillers (Caffe2's FillerOp family): ConstantFill, the random fills and the GivenTensor*Fill ops.

The output shape comes from argument ``shape`` (a list), or from the input's shape (+
``extra_shape``), or from the input's values with ``input_as_shape=1``. Random fills draw from
``ctx.generator`` when the op's DeviceOption has a random_seed, else from torch's global RNG.
No filler has a gradient. Outputs are created on the op's device.
"""
import math

import numpy as np
import torch

from caffe2torch import limits
from caffe2torch.ops.registry import NO_GRADIENT, register_op
from caffe2torch.ops.utility import data_type, torch_dtype
from caffe2torch.proto import caffe2_pb2

_TP = caffe2_pb2.TensorProto


def alloc(ctx, shape, dtype=torch.float32):
    """The output tensor of a fill op: every filler allocates here, within caffe2torch.limits."""
    _check_size(ctx, shape, dtype.itemsize)
    return torch.empty(tuple(shape), dtype=dtype, device=ctx.device)


def _check_size(ctx, shape, itemsize):
    # A fill's shape comes from the model file: bound it before allocating (untrusted files).
    # A symbolic size (torch.export's dynamic batch) comes from an input tensor, not the file,
    # and int() on it would fix the batch size.
    if any(isinstance(d, torch.SymInt) for d in shape):
        return
    limits.check_blob_size(shape, itemsize,
                           f"operator {ctx.op.type} (output {ctx.output_names[0]!r})")


def _shape_setup(ctx):
    """Check the shape arguments once; keep the static shape when there is no input."""
    shape = ctx.arg("shape", [])
    if isinstance(shape, int):
        raise ValueError(f"operator {ctx.op.type}: argument 'shape' was a scalar ({shape}); "
                         f"a list is expected, e.g. shape=[{shape}]")
    extra = list(ctx.arg("extra_shape", []))
    as_shape = bool(ctx.arg("input_as_shape", 0))
    if ctx.input_names:
        if shape:
            raise ValueError(f"operator {ctx.op.type}: cannot set argument 'shape' and pass an "
                             "input at the same time (the input gives the shape)")
    elif extra or as_shape:
        raise ValueError(f"operator {ctx.op.type}: extra_shape and input_as_shape need an input")
    ctx.state["shape"] = (tuple(int(d) for d in shape), tuple(int(d) for d in extra), as_shape)


def fill_shape(ctx, inputs):
    """The output shape for this run."""
    shape, extra, as_shape = ctx.state["shape"]
    if not inputs:
        return shape
    source = inputs[0]
    if as_shape:
        values = source.tolist() if isinstance(source, torch.Tensor) else np.asarray(source).tolist()
        if not isinstance(values, list):
            raise ValueError(f"operator {ctx.op.type}: with input_as_shape=1 the input must be a "
                             "1-D tensor of dimensions")
        return tuple(int(d) for d in values) + extra
    return tuple(source.shape) + extra


# --- ConstantFill -------------------------------------------------------------------------------

def _constant_setup(ctx):
    _shape_setup(ctx)
    value = ctx.arg("value", 0.0)
    if "dtype" in ctx.args:
        dtype = data_type(ctx.args["dtype"])
    elif isinstance(value, float):
        dtype = _TP.FLOAT
    elif isinstance(value, int):
        dtype = _TP.INT64  # Caffe2 infers INT64 from an integer 'value'
    else:
        raise ValueError(f"operator ConstantFill: argument 'value' {value!r} needs a 'dtype' "
                         "(e.g. dtype=core.DataType.STRING)")
    if dtype == _TP.UNDEFINED:
        raise ValueError("operator ConstantFill cannot have dtype UNDEFINED")
    if dtype == _TP.STRING:
        ctx.state["fill"] = (None, value.encode("utf-8") if isinstance(value, str) else value)
    else:
        torch_type = torch_dtype(dtype)
        ctx.state["fill"] = (torch_type, bool(value) if torch_type == torch.bool else value)
    _, extra, as_shape = ctx.state["shape"]
    ctx.state["like_input"] = bool(ctx.input_names and not extra and not as_shape
                                   and ctx.state["fill"][0] is not None)


@register_op("ConstantFill", gradient=NO_GRADIENT, setup=_constant_setup, cpu_only_inputs=True)
def constant_fill(ctx, inputs):
    """Y = ``value`` everywhere; dtype from ``dtype``, else inferred (float → FLOAT, int → INT64)."""
    dtype, value = ctx.state["fill"]
    if ctx.state["like_input"]:
        # The shape of a blob already in memory (ones_like), not of the model file: one call.
        return [torch.full(tuple(inputs[0].shape), value, dtype=dtype, device=ctx.device)]
    shape = fill_shape(ctx, inputs)
    if dtype is None:
        _check_size(ctx, shape, 8)
        out = np.empty(shape, dtype=object)
        out.fill(value)
        return [out]
    return [alloc(ctx, shape, dtype).fill_(value)]


# --- Random fills -------------------------------------------------------------------------------

def _random_setup(ctx):
    _shape_setup(ctx)


def _empty(ctx, inputs):
    return alloc(ctx, fill_shape(ctx, inputs))


@register_op("XavierFill", gradient=NO_GRADIENT, setup=_random_setup, cpu_only_inputs=True)
def xavier_fill(ctx, inputs):
    """Uniform(−s, s) with s = sqrt(3 / fan_in), fan_in = numel / shape[0]."""
    out = _empty(ctx, inputs)
    if out.dim() == 0 or out.numel() == 0:
        raise ValueError(f"operator XavierFill needs a non-empty shape with a first dimension, "
                         f"got {tuple(out.shape)}")
    scale = math.sqrt(3.0 / (out.numel() / out.shape[0]))
    return [out.uniform_(-scale, scale, generator=ctx.generator)]


@register_op("MSRAFill", gradient=NO_GRADIENT, setup=_random_setup, cpu_only_inputs=True)
def msra_fill(ctx, inputs):
    """Gaussian(0, sqrt(2 / fan_out)), fan_out = numel / shape[1]."""
    out = _empty(ctx, inputs)
    if out.dim() < 2 or out.numel() == 0:
        raise ValueError(f"operator MSRAFill needs a non-empty shape of at least 2 dimensions, "
                         f"got {tuple(out.shape)}")
    std = math.sqrt(2.0 / (out.numel() / out.shape[1]))
    return [out.normal_(0.0, std, generator=ctx.generator)]


@register_op("GaussianFill", gradient=NO_GRADIENT, setup=_random_setup, cpu_only_inputs=True)
def gaussian_fill(ctx, inputs):
    """Gaussian(``mean``, ``std``), defaults 0 and 1."""
    out = _empty(ctx, inputs)
    return [out.normal_(float(ctx.arg("mean", 0.0)), float(ctx.arg("std", 1.0)),
                        generator=ctx.generator)]


def _bounds(ctx, inputs, cast):
    """(min, max): from inputs 2 and 3 when the op has three inputs (shape, min, max)."""
    if len(inputs) == 3:
        low, high = (cast(t.reshape(-1)[0].item()) for t in inputs[1:])
    else:
        low, high = cast(ctx.arg("min", 0)), cast(ctx.arg("max", 1))
    if low > high:
        raise ValueError(f"operator {ctx.op.type}: min {low} is greater than max {high}")
    return low, high


def _bounded_setup(ctx):
    if len(ctx.input_names) not in (0, 1, 3):
        raise ValueError(f"operator {ctx.op.type} takes no input, a shape input, or three inputs "
                         f"(shape, min, max); got {len(ctx.input_names)}")
    _shape_setup(ctx)


@register_op("UniformFill", gradient=NO_GRADIENT, setup=_bounded_setup, cpu_only_inputs=True)
def uniform_fill(ctx, inputs):
    """Uniform(``min``, ``max``), defaults 0 and 1; inputs (shape, min, max) override them."""
    low, high = _bounds(ctx, inputs, float)
    return [_empty(ctx, inputs[:1]).uniform_(low, high, generator=ctx.generator)]


@register_op("UniformIntFill", gradient=NO_GRADIENT, setup=_bounded_setup, cpu_only_inputs=True)
def uniform_int_fill(ctx, inputs):
    """int32 uniform in [``min``, ``max``] (both included), defaults 0 and 1."""
    low, high = _bounds(ctx, inputs, int)
    out = alloc(ctx, fill_shape(ctx, inputs[:1]), torch.int32)
    return [out.random_(low, high + 1, generator=ctx.generator)]


# --- RangeFill, DiagonalFill, LengthsRangeFill --------------------------------------------------

@register_op("RangeFill", gradient=NO_GRADIENT, setup=_random_setup, cpu_only_inputs=True)
def range_fill(ctx, inputs):
    """Y.flat[i] = i (float32)."""
    out = alloc(ctx, fill_shape(ctx, inputs))
    out.view(-1).copy_(torch.arange(out.numel(), dtype=out.dtype, device=out.device))
    return [out]


def _diagonal_setup(ctx):
    _shape_setup(ctx)
    value = ctx.arg("value", 0.0)
    if "dtype" in ctx.args:
        dtype = torch_dtype(ctx.args["dtype"])
    else:
        dtype = torch.int64 if isinstance(value, int) else torch.float32
    ctx.state["diagonal"] = (value, dtype)


@register_op("DiagonalFill", gradient=NO_GRADIENT, setup=_diagonal_setup, cpu_only_inputs=True)
def diagonal_fill(ctx, inputs):
    """Zeros with ``value`` on the diagonal Y[i, i, ..., i]; ≥ 2-D, all dims equal above 2-D."""
    value, dtype = ctx.state["diagonal"]
    shape = fill_shape(ctx, inputs)
    if len(shape) < 2 or (len(shape) > 2 and len(set(shape)) != 1):
        raise ValueError(f"operator DiagonalFill needs a 2-D shape, or an N-D one with all "
                         f"dimensions equal; got {list(shape)}")
    out = alloc(ctx, shape, dtype).zero_()
    n = min(shape)
    index = torch.arange(n, device=out.device)
    out[(index,) * len(shape)] = value
    return [out]


@register_op("LengthsRangeFill", gradient=NO_GRADIENT, cpu_only_inputs=True, data_dependent=True)
def lengths_range_fill(ctx, inputs):
    """lengths [a, b, ...] -> [0..a−1, 0..b−1, ...] (int32)."""
    lengths = inputs[0].reshape(-1).long()
    if lengths.numel() and int(lengths.min()) < 0:
        raise ValueError("operator LengthsRangeFill: lengths must not be negative")
    total = int(lengths.sum()) if lengths.numel() else 0
    out = alloc(ctx, (total,), torch.int32)
    starts = torch.cumsum(lengths, 0) - lengths
    flat = torch.arange(total, device=lengths.device) - torch.repeat_interleave(starts, lengths)
    return [out.copy_(flat)]


# --- GivenTensor*Fill ---------------------------------------------------------------------------

def _given_setup(dtype):
    """Parse ``values`` once into a tensor (or a numpy bytes array for strings) on the op's device."""

    def setup(ctx):
        _shape_setup(ctx)
        values = ctx.arg("values", [])
        if not isinstance(values, list):
            values = [values]
        if dtype is None:
            ctx.state["values"] = np.array(
                [v.encode("utf-8") if isinstance(v, str) else v for v in values] or [], dtype=object)
        else:
            ctx.state["values"] = torch.tensor(values, dtype=dtype).to(ctx.device)

    return setup


def _given_fill(ctx, inputs):
    values = ctx.state["values"]
    shape = fill_shape(ctx, inputs)
    if math.prod(shape) != len(values):
        raise ValueError(f"operator {ctx.op.type}: shape {list(shape)} holds {math.prod(shape)} "
                         f"values but argument 'values' has {len(values)}")
    if isinstance(values, np.ndarray):
        return [values.reshape(shape).copy()]
    # A fresh tensor per run: blobs never share storage.
    return [alloc(ctx, shape, values.dtype).copy_(values.reshape(shape))]


def _register_given(op_type, dtype, what):
    def forward(ctx, inputs):
        return _given_fill(ctx, inputs)

    forward.__doc__ = f"Y = argument ``values`` ({what}) reshaped to ``shape``."
    forward.__name__ = op_type
    register_op(op_type, gradient=NO_GRADIENT, setup=_given_setup(dtype),
                cpu_only_inputs=True)(forward)


_register_given("GivenTensorFill", torch.float32, "float32")
_register_given("GivenTensorDoubleFill", torch.float64, "float64")
_register_given("GivenTensorIntFill", torch.int32, "int32")
_register_given("GivenTensorInt16Fill", torch.int16, "int16")
_register_given("GivenTensorInt64Fill", torch.int64, "int64")
_register_given("GivenTensorBoolFill", torch.bool, "bool")
_register_given("GivenTensorStringFill", None, "bytes in a numpy object array")


def _byte_string_setup(ctx):
    _shape_setup(ctx)
    # The raw bytes of the argument (its strings need not be text).
    arg = next((a for a in ctx.op.arg if a.name == "values"), None)
    data = b"" if arg is None else (b"".join(arg.strings) if arg.strings else arg.s)
    ctx.state["values"] = torch.tensor(list(data), dtype=torch.uint8).to(ctx.device)


@register_op("GivenTensorByteStringToUInt8Fill", gradient=NO_GRADIENT, setup=_byte_string_setup,
             cpu_only_inputs=True)
def given_tensor_byte_string_to_uint8_fill(ctx, inputs):
    """Y = the bytes of argument ``values`` (one string) as uint8, reshaped to ``shape``."""
    return _given_fill(ctx, inputs)
