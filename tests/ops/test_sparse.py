"""Segment reductions (Lengths*, SortedSegment*, SparseLengths*) vs loops written here."""
import numpy as np
import pytest
import torch

from caffe2torch.python import core, workspace

from .helpers import check_op, rand


pytestmark = pytest.mark.usefixtures("fresh_workspace")

LENGTHS = [[2, 0, 3], [1, 1], [4]]


def segments(lengths):
    starts = np.cumsum([0] + lengths)
    return [(int(a), int(b)) for a, b in zip(starts[:-1], starts[1:])]


@pytest.mark.parametrize("lengths", LENGTHS)
@pytest.mark.parametrize("trailing", [(), (3,), (2, 2)])
def test_lengths_sum_and_mean(lengths, trailing):
    data = rand(sum(lengths), *trailing)
    lens = np.array(lengths, np.int32)

    def summed(d, _l):
        return torch.stack([d[a:b].sum(0) for a, b in segments(lengths)])

    def mean(d, _l):
        return torch.stack([d[a:b].sum(0) / max(b - a, 1) for a, b in segments(lengths)])
    check_op("LengthsSum", {"D": data, "L": lens}, ["Y"], {}, summed)
    check_op("LengthsMean", {"D": data, "L": lens}, ["Y"], {}, mean)


def test_lengths_weighted_sum():
    lengths = [2, 0, 3]
    data, w = rand(5, 2), rand(5, seed=1)
    check_op("LengthsWeightedSum", {"D": data, "W": w, "L": np.array(lengths, np.int32)}, ["Y"], {},
             lambda d, w, _l: torch.stack([(d[a:b] * w[a:b, None]).sum(0)
                                           for a, b in segments(lengths)]),
             no_grad_inputs=("W",))


def test_lengths_must_cover_data():
    with pytest.raises(Exception, match="lengths add up to 3 but DATA has 4 rows"):
        check_op("LengthsSum", {"D": rand(4), "L": np.array([1, 2], np.int32)}, ["Y"], {},
                 lambda d, lens: d, grad=False)


@pytest.mark.parametrize("ids", [[0, 0, 1, 3, 3], [2, 2, 2], [0, 1, 2, 3, 4]])
def test_sorted_and_unsorted_segments(ids):
    data = rand(len(ids), 3)
    n = max(ids) + 1

    def summed(d, _i):
        return torch.stack([d[[k for k, s in enumerate(ids) if s == j]].sum(0) for j in range(n)])

    def mean(d, _i):
        return torch.stack([d[[k for k, s in enumerate(ids) if s == j]].sum(0)
                            / max(ids.count(j), 1) for j in range(n)])
    seg = np.array(ids, np.int32)
    check_op("SortedSegmentSum", {"D": data, "S": seg}, ["Y"], {}, summed)
    check_op("SortedSegmentMean", {"D": data, "S": seg}, ["Y"], {}, mean)
    perm = np.random.default_rng(0).permutation(len(ids))
    shuffled = [ids[p] for p in perm]
    check_op("UnsortedSegmentSum", {"D": data[perm], "S": seg[perm]}, ["Y"], {},
             lambda d, _i: torch.stack([d[[k for k, s in enumerate(shuffled) if s == j]].sum(0)
                                        for j in range(n)]))


def test_sorted_segment_sum_rejects_unsorted_ids():
    with pytest.raises(Exception, match="must be sorted"):
        check_op("SortedSegmentSum", {"D": rand(3), "S": np.array([1, 0, 1], np.int32)}, ["Y"],
                 {}, lambda d, s: d, grad=False)


@pytest.mark.parametrize("op", ["SparseLengthsSum", "SparseLengthsMean",
                                "SparseLengthsWeightedSum"])
def test_sparse_lengths(op):
    data = rand(6, 2)
    indices = np.array([4, 0, 4, 2, 5], np.int64)
    lengths = [2, 3, 0]
    weights = rand(5, seed=3)
    inputs = {"D": data}
    if op == "SparseLengthsWeightedSum":
        inputs["W"] = weights
    inputs.update({"I": indices, "L": np.array(lengths, np.int32)})

    def reference(d, *rest):
        rows = d[torch.tensor(indices)]
        if op == "SparseLengthsWeightedSum":
            rows = rows * rest[0][:, None]
        out = [rows[a:b].sum(0) / (max(b - a, 1) if op == "SparseLengthsMean" else 1)
               for a, b in segments(lengths)]
        return torch.stack(out)
    check_op(op, inputs, ["Y"], {}, reference, no_grad_inputs=("W",))


def test_sparse_lengths_sum_gradient_ops():
    net = core.Net("sls")
    net.SparseLengthsSum(["emb", "idx", "len"], "pooled")
    net.AddGradientOperators({"pooled": "dY"})
    types = [op.type for op in net.Proto().op[1:]]
    assert types == ["LengthsSumGradient", "SparseToDense"]


def test_lengths_to_segment_ids_and_sparse_to_dense():
    workspace.FeedBlob("L", np.array([2, 0, 3], np.int32))
    workspace.RunOperatorOnce(core.CreateOperator("LengthsToSegmentIds", ["L"], ["ids"]))
    np.testing.assert_array_equal(workspace.FetchBlob("ids"), [0, 0, 2, 2, 2])
    workspace.FeedBlob("I", np.array([3, 1, 3], np.int64))
    workspace.FeedBlob("V", np.array([[1.0], [2.0], [4.0]], np.float32))
    workspace.FeedBlob("like", np.zeros((5, 1), np.float32))
    workspace.RunOperatorOnce(core.CreateOperator("SparseToDense", ["I", "V", "like"], ["Y"]))
    np.testing.assert_array_equal(workspace.FetchBlob("Y").ravel(), [0, 2, 0, 5, 0])
    workspace.RunOperatorOnce(core.CreateOperator("SparseToDense", ["I", "V"], ["Y"]))
    assert workspace.FetchBlob("Y").shape == (4, 1)


@pytest.mark.parametrize("lengths", [[2, 0, 3], [1, 1, 1]])
def test_lengths_tile(lengths):
    data = rand(3, 2)
    check_op("LengthsTile", {"D": data, "L": np.array(lengths, np.int32)}, ["Y"], {},
             lambda d, _l: torch.repeat_interleave(d, torch.tensor(lengths), 0))


def test_segment_ids_to_lengths():
    workspace.FeedBlob("S", np.array([0, 0, 2, 2, 2], np.int32))
    workspace.RunOperatorOnce(core.CreateOperator("SegmentIdsToLengths", ["S"], ["L"]))
    np.testing.assert_array_equal(workspace.FetchBlob("L"), [2, 0, 3])
    workspace.FeedBlob("like", np.zeros(5))
    workspace.RunOperatorOnce(core.CreateOperator("SegmentIdsToLengths", ["S", "like"], ["L"]))
    np.testing.assert_array_equal(workspace.FetchBlob("L"), [2, 0, 3, 0, 0])
