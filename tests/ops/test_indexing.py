"""Indexing ops (Gather, BatchGather, BooleanMask, TopK, Unique, Range, ...) vs PyTorch."""
import numpy as np
import pytest
import torch

from caffe2torch.python import core, workspace

from .helpers import DEVICES, check_op, rand

pytestmark = pytest.mark.usefixtures("fresh_workspace")


@pytest.mark.parametrize("data_shape, indices, axis", [
    ((5, 3), [[0, 2], [4, 2]], 0),       # repeated indices: gradients add up
    ((5,), [3, 3, 1], 0),
    ((2, 5, 3), [4, 0], 1),
    ((2, 3, 4), [[3], [1]], 2),
])
@pytest.mark.parametrize("device", DEVICES)
def test_gather(data_shape, indices, axis, device):
    idx = np.array(indices, np.int64)
    args = {} if axis == 0 else dict(axis=axis)
    check_op("Gather", {"DATA": rand(*data_shape), "INDICES": idx}, ["Y"], args,
             lambda d, i: d.index_select(axis, i.reshape(-1)).reshape(
                 d.shape[:axis] + i.shape + d.shape[axis + 1:]), device=device)


def test_batch_gather():
    idx = np.array([2, 0, 2], np.int32)
    check_op("BatchGather", {"DATA": rand(3, 4, 2), "INDICES": idx}, ["Y"], {},
             lambda d, i: d[:, i.long()])


def test_gather_gradient_is_sparse_on_axis_0_as_caffe2():
    net = core.Net("gather")
    net.Gather(["D", "I"], "Y")
    grads = net.AddGradientOperators({"Y": "dY"})
    assert isinstance(grads["D"], core.GradientSlice) and len(net.Proto().op) == 1
    assert (str(grads["D"].indices), str(grads["D"].values)) == ("I", "dY")


def test_gather_dense_gradient_is_batch_gather_gradient():
    net = core.Net("gather_dense")
    net.Gather(["D", "I"], "Y", dense_gradient=1)
    net.AddGradientOperators({"Y": "dY"})
    grad = net.Proto().op[-1]
    assert (grad.type, list(grad.input), list(grad.output)) == (
        "BatchGatherGradient", ["D", "I", "dY"], ["D_grad"])
    assert ("axis", 0) in [(a.name, a.i) for a in grad.arg]


def test_sparse_gradients_summed_with_dense_ones_become_dense():
    net = core.Net("gather_twice")
    net.Gather(["D", "I"], "Y")
    net.Scale("D", "Z", scale=2.0)
    net.Sum(["Y", "Z"], "S")
    grads = net.AddGradientOperators(["S"])
    assert "SparseToDense" in [op.type for op in net.Proto().op]
    workspace.FeedBlob("D", rand(3, 2))
    workspace.FeedBlob("I", np.array([1, 1, 0, 2, 1, 0], np.int64).reshape(3, 2)[:, 0])
    workspace.RunNetOnce(net)
    np.testing.assert_allclose(workspace.FetchBlob(grads["D"]), [[3, 3], [4, 4], [2, 2]])


def test_gather_out_of_range_and_wrap_indices():
    check_op("Gather", {"D": rand(4, 2), "I": np.array([-1, 0], np.int64)}, ["Y"],
             dict(wrap_indices=1), lambda d, i: d[[3, 0]])
    workspace.FeedBlob("D", rand(4, 2))
    workspace.FeedBlob("I", np.array([4], np.int64))
    with pytest.raises(RuntimeError, match=r"out of range \[0, 4\)"):
        workspace.RunOperatorOnce(core.CreateOperator("Gather", ["D", "I"], ["Y"]))


@pytest.mark.parametrize("shape, k, axis", [((3, 5), 2, -1), ((4, 3), 4, 0), ((2, 3, 4), 1, 1)])
def test_top_k(shape, k, axis):
    def reference(x):
        values, indices = torch.sort(x, dim=axis, descending=True, stable=True)
        return values.narrow(axis, 0, k), indices.narrow(axis, 0, k)
    check_op("TopK", {"X": rand(*shape)}, ["V", "I", "F"], dict(k=k, axis=axis), reference)
    x = torch.from_numpy(rand(*shape))
    flat = workspace.FetchBlob("F")
    np.testing.assert_array_equal(x.reshape(-1)[torch.from_numpy(flat)].numpy(),
                                  workspace.FetchBlob("V").reshape(-1))


def test_top_k_ties_take_the_smaller_index_first():
    workspace.FeedBlob("X", np.array([[1.0, 3.0, 2.0, 3.0]]))
    workspace.RunOperatorOnce(core.CreateOperator("TopK", ["X"], ["V", "I"], k=3))
    assert workspace.FetchBlob("I").tolist() == [[1, 3, 2]]


@pytest.mark.parametrize("values, expected", [
    ([np.int32(5)], [0, 1, 2, 3, 4]), ([np.int64(2), np.int64(8), np.int64(3)], [2, 5]),
    ([np.float32(1.0), np.float32(0.0), np.float32(-0.25)], [1.0, 0.75, 0.5, 0.25])])
def test_range(values, expected):
    names = [f"v{i}" for i in range(len(values))]
    for name, value in zip(names, values):
        workspace.FeedBlob(name, np.array(value))
    workspace.RunOperatorOnce(core.CreateOperator("Range", names, ["Y"]))
    out = workspace.FetchBlob("Y")
    assert out.dtype == np.asarray(values[0]).dtype and out.tolist() == expected


@pytest.mark.parametrize("shape", [(5,), (5, 3)])
@pytest.mark.parametrize("device", DEVICES)
def test_boolean_mask(shape, device):
    mask = np.array([True, False, True, True, False])
    check_op("BooleanMask", {"X": rand(*shape), "M": mask}, ["Y", "I"], {},
             lambda x, m: (x[m], torch.tensor([0, 2, 3])), device=device)
    assert workspace.FetchBlob("I").dtype == np.int64


def test_unique_and_segment_ids_to_lengths():
    workspace.FeedBlob("X", np.array([5, 2, 5, 7, 2], np.int64))
    workspace.FeedBlob("S", np.array([0, 0, 2, 2, 2], np.int32))
    workspace.FeedBlob("D", np.zeros((4, 2)))
    workspace.RunOperatorsOnce([
        core.CreateOperator("Unique", ["X"], ["U", "R"]),
        core.CreateOperator("SegmentIdsToLengths", ["S"], ["lens"]),
        core.CreateOperator("SegmentIdsToLengths", ["S", "D"], ["lens4"])])
    unique, remap = workspace.FetchBlob("U"), workspace.FetchBlob("R")
    assert unique.tolist() == [2, 5, 7] and (unique[remap] == [5, 2, 5, 7, 2]).all()
    assert workspace.FetchBlob("lens").tolist() == [2, 0, 3]
    assert workspace.FetchBlob("lens4").tolist() == [2, 0, 3, 0]
