"""Indexing ops: Gather, BatchGather, BooleanMask, TopK, Unique, Range, lengths and segments.

Indices are int32 or int64; out-of-range indices are errors (Gather's ``wrap_indices=1`` wraps
negative ones). Gradients are dense (caffe2torch has no sparse gradient slices): Gather's is
``BatchGatherGradient`` (SparseToDense and LengthsToSegmentIds live in the sparse family). The ops whose output
sizes depend on tensor values are flagged ``data_dependent``.
"""
import torch

from caffe2torch.ops._helpers import canonical_axis, tracing
from caffe2torch.ops.registry import NO_GRADIENT, gradient_op, grad_name, register_op


def _gather_grad(op, g_output):
    """BatchGatherGradient(DATA, INDICES, dY) -> dDATA, with Gather's ``axis``; Gather on axis 0
    gives the sparse gradient (INDICES, dY) instead (a GradientSlice, no op), unless
    ``dense_gradient=1``."""
    from caffe2torch.python.gradient_registry import GradientSlice
    axis = [a.i for a in op.arg if a.name == "axis"]
    axis = axis[0] if axis else (1 if op.type == "BatchGather" else 0)
    dense = any(a.name == "dense_gradient" and a.i for a in op.arg)
    if op.type == "Gather" and axis == 0 and not dense:
        # Caffe2's: the rows gathered and their gradients, for sparse optimizers (embeddings).
        return [], [GradientSlice(op.input[1], g_output[0]), None]
    g = grad_name(op.input[0])
    # Caffe2 emits SparseToDense for axis 0, which takes 1-D indices only; BatchGatherGradient
    # gives the same dense gradient for indices of any shape (and honours wrap_indices).
    return [gradient_op(op, "BatchGatherGradient", [op.input[0], op.input[1], g_output[0]], [g],
                        axis=axis)], [g, None]


def _gather_setup(ctx):
    default = 1 if ctx.op.type == "BatchGather" else 0
    ctx.state["gather"] = (int(ctx.arg("axis", default)), bool(ctx.arg("wrap_indices", 0)))


def _gather_indices(ctx, indices, n):
    """Indices as int64, negative ones wrapped (wrap_indices=1) or rejected."""
    _, wrap = ctx.state["gather"]
    if indices.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"operator {ctx.op.type}: indices must be int32 or int64, got "
                         f"{indices.dtype}")
    idx = indices.long()
    if wrap:
        idx = torch.where(idx < 0, idx + n, idx)
    if not tracing() and idx.numel() and (bool((idx < 0).any()) or bool((idx >= n).any())):
        raise ValueError(f"operator {ctx.op.type}: indices out of range [0, {n})")
    return idx


@register_op("Gather", gradient=_gather_grad, setup=_gather_setup)
def gather(ctx, inputs):
    """(DATA, INDICES) -> DATA's slices at INDICES along ``axis`` (default 0)."""
    data, indices = inputs
    axis = canonical_axis(ctx, ctx.state["gather"][0], data.dim())
    idx = _gather_indices(ctx, indices, data.shape[axis])
    out = torch.index_select(data, axis, idx.reshape(-1))
    return [out.reshape(data.shape[:axis] + indices.shape + data.shape[axis + 1:])]


@register_op("BatchGather", gradient=_gather_grad, setup=_gather_setup)
def batch_gather(ctx, inputs):
    """(DATA, INDICES) -> Gather along axis 1: the same INDICES for every row of DATA."""
    return gather(ctx, inputs)


@register_op("BatchGatherGradient", setup=_gather_setup)
def batch_gather_gradient(ctx, inputs):
    """(DATA, INDICES, dY) -> dDATA: dY summed into the gathered slices along ``axis``."""
    data, indices, dy = inputs
    axis = canonical_axis(ctx, ctx.state["gather"][0], data.dim())
    idx = _gather_indices(ctx, indices, data.shape[axis]).reshape(-1)
    flat = dy.reshape(data.shape[:axis] + (idx.numel(),) + data.shape[axis + 1:])
    return [dy.new_zeros(data.shape).index_add_(axis, idx, flat)]


# --- TopK, Range, LengthsToRanges ---------------------------------------------------------------

def _top_k_grad(op, g_output):
    """TopKGradient(dValues, Indices, X) -> dX."""
    if len(op.output) < 2:
        raise ValueError("the gradient of TopK needs its Indices output: give TopK two outputs")
    g = grad_name(op.input[0])
    return [gradient_op(op, "TopKGradient", [g_output[0], op.output[1], op.input[0]], [g])], [g]


def _top_k_setup(ctx):
    k = int(ctx.require("k"))
    if k < 1:
        raise ValueError(f"operator {ctx.op.type}: k must be >= 1, got {k}")
    ctx.state["top_k"] = (k, int(ctx.arg("axis", -1)))


@register_op("TopK", gradient=_top_k_grad, setup=_top_k_setup)
def top_k(ctx, inputs):
    """(X) -> (Values, Indices int64[, FlattenIndices]): the k largest along ``axis``, ties by index."""
    x = inputs[0]
    k, axis = ctx.state["top_k"]
    axis = canonical_axis(ctx, axis, x.dim())
    if k > x.shape[axis]:
        raise ValueError(f"operator TopK: k={k} exceeds dim {axis} of size {x.shape[axis]}")
    # A stable descending sort: among equal values the smaller index comes first, as in Caffe2.
    values, indices = torch.sort(x, dim=axis, descending=True, stable=True)
    values, indices = values.narrow(axis, 0, k).contiguous(), indices.narrow(axis, 0, k).contiguous()
    outputs = [values, indices]
    if len(ctx.output_names) > 2:
        positions = torch.arange(x.numel(), device=x.device).reshape(x.shape)
        outputs.append(positions.gather(axis, indices).reshape(-1))
    return outputs


@register_op("TopKGradient", setup=_top_k_setup)
def top_k_gradient(ctx, inputs):
    """(dValues, Indices, X) -> dX: each value's gradient back at its position, 0 elsewhere."""
    dv, indices, x = inputs
    axis = canonical_axis(ctx, ctx.state["top_k"][1], x.dim())
    return [dv.new_zeros(x.shape).scatter_(axis, indices, dv)]


@register_op("Range", gradient=NO_GRADIENT, cpu_only_inputs=True, data_dependent=True)
def range_op(ctx, inputs):
    """(stop) or (start, stop[, step]) scalars -> [start, start + step, ...) of their type."""
    if not 1 <= len(inputs) <= 3:
        raise ValueError(f"operator Range takes 1 to 3 scalar inputs, got {len(inputs)}")
    values = [x.reshape(()).item() for x in inputs]
    start, stop, step = ([0] + values + [1])[:3] if len(values) == 1 else (values + [1])[:3]
    if step == 0:
        raise ValueError("operator Range: step must not be 0")
    return [torch.arange(start, stop, step, dtype=inputs[0].dtype, device=ctx.device)]


@register_op("LengthsToRanges", gradient=NO_GRADIENT)
def lengths_to_ranges(ctx, inputs):
    """(lengths [N] int32) -> ranges [N, 2] of (offset, length) per segment."""
    lengths = inputs[0]
    if lengths.dim() != 1:
        raise ValueError(f"operator LengthsToRanges: lengths must be 1-D, got shape "
                         f"{tuple(lengths.shape)}")
    offsets = torch.cumsum(lengths, 0) - lengths
    return [torch.stack([offsets, lengths], 1).to(lengths.dtype)]


# --- BooleanMask, Unique (data-dependent sizes) ----------------------------

def _boolean_mask_grad(op, g_output):
    """BooleanMaskGradient(mask, dY) -> d_data."""
    g = grad_name(op.input[0])
    return [gradient_op(op, "BooleanMaskGradient", [op.input[1], g_output[0]], [g])], [g, None]


def _check_mask(ctx, mask, rows):
    if mask.dtype != torch.bool or mask.dim() != 1 or mask.shape[0] != rows:
        raise ValueError(f"operator {ctx.op.type}: mask must be a 1-D bool tensor of the data's "
                         f"first dim {rows}, got {mask.dtype} {tuple(mask.shape)}")


@register_op("BooleanMask", gradient=_boolean_mask_grad, data_dependent=True)
def boolean_mask(ctx, inputs):
    """(data, mask) -> (masked_data[, masked_indices int64]): the rows of data where mask is true."""
    data, mask = inputs
    _check_mask(ctx, mask, data.shape[0] if data.dim() else 0)
    outputs = [data[mask]]
    if len(ctx.output_names) > 1:
        outputs.append(torch.nonzero(mask).reshape(-1))
    return outputs


@register_op("BooleanMaskGradient")
def boolean_mask_gradient(ctx, inputs):
    """(mask, dY) -> d_data: dY at the kept rows, 0 at the others."""
    mask, dy = inputs
    dx = dy.new_zeros((mask.shape[0],) + dy.shape[1:])
    dx[mask] = dy
    return [dx]


@register_op("Unique", gradient=NO_GRADIENT, data_dependent=True)
def unique(ctx, inputs):
    """(indices 1-D int) -> (unique values, sorted[, remapping: each input's position in them])."""
    x = inputs[0]
    if x.dim() != 1 or x.is_floating_point():
        raise ValueError(f"operator Unique takes a 1-D int32/int64 tensor, got {x.dtype} "
                         f"{tuple(x.shape)}")
    values, inverse = torch.unique(x, sorted=True, return_inverse=True)
    return [values, inverse.to(torch.int32)][:max(1, len(ctx.output_names))]
