"""Segment reductions of sparse models: Lengths*, SortedSegment*, UnsortedSegmentSum,
SparseLengths*, LengthsToSegmentIds and SparseToDense.

A ``LENGTHS`` input splits DATA's first dimension into consecutive segments; ``SEGMENT_IDS`` names
each row's segment. SparseLengths* first gather DATA rows by ``INDICES``; their gradient is
dense here: the per-row gradient scattered into DATA's shape with SparseToDense (Caffe2 returns
it as a GradientSlice, which caffe2torch's gradient builder does not have).
"""
import torch

from caffe2torch.ops._helpers import tracing
from caffe2torch.ops.registry import NO_GRADIENT, gradient_op, grad_name, register_op


def _lengths(ctx, lengths, rows):
    lengths = lengths.reshape(-1).long()
    if tracing():  # the checks read values; the segment ids below are sized by DATA's rows
        return lengths
    if lengths.numel() and int(lengths.min()) < 0:
        raise ValueError(f"operator {ctx.op.type}: lengths must not be negative")
    total = int(lengths.sum()) if lengths.numel() else 0
    if total != rows:
        raise ValueError(f"operator {ctx.op.type}: lengths add up to {total} but DATA has {rows} "
                         "rows (segments must cover it exactly)")
    return lengths


def _segment_ids(lengths, rows=None):
    """Each row's segment; ``rows`` (the lengths' sum, when known) keeps the size traceable."""
    return torch.repeat_interleave(torch.arange(lengths.numel(), device=lengths.device), lengths,
                                   output_size=rows)


def _segment_sum(data, ids, segments):
    out = data.new_zeros((segments,) + tuple(data.shape[1:]))
    return out.index_add_(0, ids, data)


def _counts(ids, segments, dtype):
    return torch.bincount(ids, minlength=segments).to(dtype).clamp(min=1)


def _per_row(values, data):
    """A per-row factor shaped to broadcast over DATA's trailing dims."""
    return values.reshape((-1,) + (1,) * (data.dim() - 1))


def _lengths_grad(grad_type, n_original=0):
    """A maker emitting grad_type(dY, <original inputs>, LENGTHS) -> dDATA."""
    def maker(op, g_output):
        ins = [g_output[0]] + list(op.input[1:1 + n_original]) + [op.input[-1]]
        return [gradient_op(op, grad_type, ins, [grad_name(op.input[0])])], \
            [grad_name(op.input[0])] + [None] * (len(op.input) - 1)
    maker.__doc__ = f"{grad_type}(dY, {'SCALARS, ' if n_original else ''}LENGTHS) -> dDATA."
    return maker


# --- LengthsSum / LengthsMean / LengthsWeightedSum ----------------------------------------------

@register_op("LengthsSum", gradient=_lengths_grad("LengthsSumGradient"), cpu_only_inputs=True)
def lengths_sum(ctx, inputs):
    """(DATA, LENGTHS) -> OUTPUT[i] = Σ of segment i's rows (len(LENGTHS) rows)."""
    data, lengths = inputs[0].to(ctx.device), inputs[1]
    lengths = _lengths(ctx, lengths, data.shape[0]).to(data.device)
    return [_segment_sum(data, _segment_ids(lengths, data.shape[0]), lengths.numel())]


@register_op("LengthsSumGradient", cpu_only_inputs=True)
def lengths_sum_gradient(ctx, inputs):
    """(dY, LENGTHS) -> dDATA: each row gets its segment's gradient."""
    dy = inputs[0].to(ctx.device)
    return [torch.repeat_interleave(dy, inputs[1].reshape(-1).long().to(dy.device), 0)]


@register_op("LengthsMean", gradient=_lengths_grad("LengthsMeanGradient"), cpu_only_inputs=True)
def lengths_mean(ctx, inputs):
    """(DATA, LENGTHS) -> OUTPUT[i] = mean of segment i's rows (0 for an empty segment)."""
    data, lengths = inputs[0].to(ctx.device), inputs[1]
    lengths = _lengths(ctx, lengths, data.shape[0]).to(data.device)
    total = _segment_sum(data, _segment_ids(lengths, data.shape[0]), lengths.numel())
    return [total / _per_row(lengths.clamp(min=1).to(data.dtype), total)]


@register_op("LengthsMeanGradient", cpu_only_inputs=True)
def lengths_mean_gradient(ctx, inputs):
    """(dY, LENGTHS) -> dDATA = dY of the row's segment / its length."""
    dy = inputs[0].to(ctx.device)
    lengths = inputs[1].reshape(-1).long().to(dy.device)
    scaled = dy / _per_row(lengths.clamp(min=1).to(dy.dtype), dy)
    return [torch.repeat_interleave(scaled, lengths, 0)]


@register_op("LengthsWeightedSum", gradient=_lengths_grad("LengthsWeightedSumGradient", 1),
             cpu_only_inputs=True)
def lengths_weighted_sum(ctx, inputs):
    """(DATA, SCALARS, LENGTHS) -> OUTPUT[i] = Σ SCALARS[r]·DATA[r] over segment i's rows r."""
    data, scalars = inputs[0].to(ctx.device), inputs[1].to(ctx.device)
    lengths = _lengths(ctx, inputs[2], data.shape[0]).to(data.device)
    return [_segment_sum(data * _per_row(scalars, data), _segment_ids(lengths, data.shape[0]),
                         lengths.numel())]


@register_op("LengthsWeightedSumGradient", cpu_only_inputs=True)
def lengths_weighted_sum_gradient(ctx, inputs):
    """(dY, SCALARS, LENGTHS) -> dDATA = SCALARS[r]·dY of row r's segment."""
    dy, scalars = inputs[0].to(ctx.device), inputs[1].to(ctx.device)
    rows = torch.repeat_interleave(dy, inputs[2].reshape(-1).long().to(dy.device), 0)
    return [rows * _per_row(scalars, rows)]


# --- SortedSegmentSum / SortedSegmentMean / UnsortedSegmentSum ----------------------------------

def _ids(ctx, ids, rows, sorted_ids):
    ids = ids.reshape(-1).long()
    if ids.numel() != rows:
        raise ValueError(f"operator {ctx.op.type}: {ids.numel()} segment ids for {rows} rows")
    if ids.numel() and int(ids.min()) < 0:
        raise ValueError(f"operator {ctx.op.type}: segment ids must not be negative")
    if sorted_ids and ids.numel() > 1 and bool((ids[1:] < ids[:-1]).any()):
        raise ValueError(f"operator {ctx.op.type}: SEGMENT_IDS must be sorted; use "
                         "UnsortedSegmentSum for unsorted ids")
    return ids


def _segments_grad(grad_type):
    def maker(op, g_output):
        return [gradient_op(op, grad_type, [g_output[0], op.input[1]],
                            [grad_name(op.input[0])])], [grad_name(op.input[0]), None]
    maker.__doc__ = f"{grad_type}(dY, SEGMENT_IDS) -> dDATA."
    return maker


@register_op("SortedSegmentSum", gradient=_segments_grad("SortedSegmentSumGradient"),
             cpu_only_inputs=True, data_dependent=True)
def sorted_segment_sum(ctx, inputs):
    """(DATA, sorted SEGMENT_IDS) -> OUTPUT[s] = Σ rows of segment s (last id + 1 rows)."""
    data = inputs[0].to(ctx.device)
    ids = _ids(ctx, inputs[1], data.shape[0], True).to(data.device)
    segments = int(ids[-1]) + 1 if ids.numel() else 0
    return [_segment_sum(data, ids, segments)]


@register_op("SortedSegmentSumGradient", cpu_only_inputs=True)
def sorted_segment_sum_gradient(ctx, inputs):
    """(dY, SEGMENT_IDS) -> dDATA[r] = dY[SEGMENT_IDS[r]]."""
    dy = inputs[0].to(ctx.device)
    return [dy[inputs[1].reshape(-1).long().to(dy.device)]]


@register_op("SortedSegmentMean", gradient=_segments_grad("SortedSegmentMeanGradient"),
             cpu_only_inputs=True, data_dependent=True)
def sorted_segment_mean(ctx, inputs):
    """(DATA, sorted SEGMENT_IDS) -> OUTPUT[s] = mean of the rows of segment s."""
    data = inputs[0].to(ctx.device)
    ids = _ids(ctx, inputs[1], data.shape[0], True).to(data.device)
    segments = int(ids[-1]) + 1 if ids.numel() else 0
    total = _segment_sum(data, ids, segments)
    return [total / _per_row(_counts(ids, segments, data.dtype), total)]


@register_op("SortedSegmentMeanGradient", cpu_only_inputs=True)
def sorted_segment_mean_gradient(ctx, inputs):
    """(dY, SEGMENT_IDS) -> dDATA[r] = dY[s] / |segment s| for s = SEGMENT_IDS[r]."""
    dy = inputs[0].to(ctx.device)
    ids = inputs[1].reshape(-1).long().to(dy.device)
    counts = _counts(ids, dy.shape[0], dy.dtype)
    return [dy[ids] / _per_row(counts[ids], dy)]


@register_op("UnsortedSegmentSum", gradient=_segments_grad("UnsortedSegmentSumGradient"),
             cpu_only_inputs=True, data_dependent=True)
def unsorted_segment_sum(ctx, inputs):
    """(DATA, SEGMENT_IDS) -> OUTPUT[s] = Σ rows with id s (num_segments, else max id + 1 rows)."""
    data = inputs[0].to(ctx.device)
    ids = _ids(ctx, inputs[1], data.shape[0], False).to(data.device)
    segments = int(ctx.arg("num_segments", 0)) or (int(ids.max()) + 1 if ids.numel() else 0)
    if ids.numel() and int(ids.max()) >= segments:
        raise ValueError(f"operator UnsortedSegmentSum: segment id {int(ids.max())} does not fit "
                         f"num_segments={segments}")
    return [_segment_sum(data, ids, segments)]


@register_op("UnsortedSegmentSumGradient", cpu_only_inputs=True)
def unsorted_segment_sum_gradient(ctx, inputs):
    """(dY, SEGMENT_IDS) -> dDATA[r] = dY[SEGMENT_IDS[r]]."""
    return sorted_segment_sum_gradient(ctx, inputs)


# --- SparseLengthsSum / SparseLengthsMean / SparseLengthsWeightedSum ----------------------------

def _gather(ctx, data, indices):
    indices = indices.reshape(-1).long().to(data.device)
    if tracing():  # the range check reads values; indexing checks them in the exported program
        return data[indices]
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= data.shape[0]):
        raise ValueError(f"operator {ctx.op.type}: INDICES must lie in [0, {data.shape[0]}), got "
                         f"{int(indices.min())}..{int(indices.max())}")
    return data[indices]


def _sparse_grad(grad_type, weighted=False):
    def maker(op, g_output):
        data, indices, lengths = op.input[0], op.input[-2], op.input[-1]
        rows = f"_{grad_name(data)}_rows"
        ins = [g_output[0]] + ([op.input[1]] if weighted else []) + [lengths]
        return [gradient_op(op, grad_type, ins, [rows], copy_args=False),
                gradient_op(op, "SparseToDense", [indices, rows, data], [grad_name(data)],
                            copy_args=False)], \
            [grad_name(data)] + [None] * (len(op.input) - 1)
    maker.__doc__ = f"{grad_type}(dY, {'WEIGHTS, ' if weighted else ''}LENGTHS) -> rows, then " \
        "SparseToDense(INDICES, rows, DATA) -> dDATA (dense)."
    return maker


@register_op("SparseLengthsSum", gradient=_sparse_grad("LengthsSumGradient"),
             cpu_only_inputs=True)
def sparse_lengths_sum(ctx, inputs):
    """(DATA, INDICES, LENGTHS) -> LengthsSum(DATA[INDICES], LENGTHS)."""
    data = inputs[0].to(ctx.device)
    return lengths_sum(ctx, [_gather(ctx, data, inputs[1]), inputs[2]])


@register_op("SparseLengthsMean", gradient=_sparse_grad("LengthsMeanGradient"),
             cpu_only_inputs=True)
def sparse_lengths_mean(ctx, inputs):
    """(DATA, INDICES, LENGTHS) -> LengthsMean(DATA[INDICES], LENGTHS)."""
    data = inputs[0].to(ctx.device)
    return lengths_mean(ctx, [_gather(ctx, data, inputs[1]), inputs[2]])


@register_op("SparseLengthsWeightedSum", gradient=_sparse_grad("LengthsWeightedSumGradient", True),
             cpu_only_inputs=True)
def sparse_lengths_weighted_sum(ctx, inputs):
    """(DATA, WEIGHTS, INDICES, LENGTHS) -> LengthsWeightedSum(DATA[INDICES], WEIGHTS, LENGTHS)."""
    data = inputs[0].to(ctx.device)
    return lengths_weighted_sum(ctx, [_gather(ctx, data, inputs[2]), inputs[1], inputs[3]])


# --- LengthsToSegmentIds, SparseToDense ---------------------------------------------------------

@register_op("LengthsToSegmentIds", gradient=NO_GRADIENT, cpu_only_inputs=True,
             data_dependent=True)
def lengths_to_segment_ids(ctx, inputs):
    """[2, 0, 3] -> [0, 0, 2, 2, 2] (int32)."""
    lengths = inputs[0].reshape(-1).long()
    if lengths.numel() and int(lengths.min()) < 0:
        raise ValueError("operator LengthsToSegmentIds: lengths must not be negative")
    return [_segment_ids(lengths).int().to(ctx.device)]


@register_op("SparseToDense", gradient=NO_GRADIENT, cpu_only_inputs=True, data_dependent=True)
def sparse_to_dense(ctx, inputs):
    """(INDICES, VALUES[, DATA_TO_INFER_DIM]) -> dense rows, duplicates summed; first dim from
    DATA_TO_INFER_DIM, else max index + 1."""
    indices = inputs[0].reshape(-1).long().to(ctx.device)
    values = inputs[1].to(ctx.device)
    if values.shape[0] != indices.numel():
        raise ValueError(f"operator SparseToDense: {indices.numel()} indices for {values.shape[0]} "
                         "value rows")
    rows = inputs[2].shape[0] if len(inputs) > 2 else (int(indices.max()) + 1 if indices.numel()
                                                        else 0)
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= rows):
        raise ValueError(f"operator SparseToDense: indices must lie in [0, {rows})")
    return [_segment_sum(values, indices, rows)]


# --- LengthsTile, SegmentIdsToLengths -----------------------------------------------------------

def _lengths_tile_grad(op, g_output):
    """LengthsSum(dY, LENGTHS) -> dDATA (Caffe2's GetLengthsTileGradient)."""
    return [gradient_op(op, "LengthsSum", [g_output[0], op.input[1]], [grad_name(op.input[0])],
                        copy_args=False)], [grad_name(op.input[0]), None]


@register_op("LengthsTile", gradient=_lengths_tile_grad, cpu_only_inputs=True,
             data_dependent=True)
def lengths_tile(ctx, inputs):
    """(DATA, LENGTHS) -> row i of DATA repeated LENGTHS[i] times."""
    data = inputs[0].to(ctx.device)
    lengths = inputs[1].reshape(-1).long()
    if lengths.numel() != data.shape[0]:
        raise ValueError(f"operator LengthsTile: {lengths.numel()} lengths for {data.shape[0]} "
                         "rows of DATA")
    if lengths.numel() and int(lengths.min()) < 0:
        raise ValueError("operator LengthsTile: lengths must not be negative")
    return [torch.repeat_interleave(data, lengths.to(data.device), 0)]


@register_op("SegmentIdsToLengths", gradient=NO_GRADIENT, cpu_only_inputs=True,
             data_dependent=True)
def segment_ids_to_lengths(ctx, inputs):
    """Sorted segment ids [0, 0, 2] -> lengths [2, 0, 1] (int32); an optional second input's
    first dimension gives the number of segments."""
    ids = _ids(ctx, inputs[0], inputs[0].numel(), True)
    segments = inputs[1].shape[0] if len(inputs) > 1 else (int(ids[-1]) + 1 if ids.numel() else 0)
    if ids.numel() and int(ids[-1]) >= segments:
        raise ValueError(f"operator SegmentIdsToLengths: segment id {int(ids[-1])} does not fit "
                         f"{segments} segments")
    return [torch.bincount(ids, minlength=segments).int().to(ctx.device)]
