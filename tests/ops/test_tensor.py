"""Shape and tensor ops (Reshape, Flatten, Transpose, Slice, Tile, Expand, ...) vs PyTorch."""
import numpy as np
import pytest
import torch

from caffe2torch.python import core, workspace

from .helpers import DEVICES, check_op, device_option, rand

pytestmark = pytest.mark.usefixtures("fresh_workspace")


@pytest.mark.parametrize("x_shape, shape, expected", [
    ((2, 3, 4), [-1, 4], (6, 4)),
    ((2, 3, 4), [0, -1], (2, 12)),        # 0 keeps the input's dim
    ((2, 3, 4), [4, 0, 2], (4, 3, 2)),
    ((6,), [1, 2, 3], (1, 2, 3)),
])
@pytest.mark.parametrize("device", DEVICES)
def test_reshape(x_shape, shape, expected, device):
    def reference(x):
        return x.reshape(expected), torch.tensor(x_shape, dtype=torch.int64)
    grads = check_op("Reshape", {"X": rand(*x_shape)}, ["Y", "old_shape"], dict(shape=shape),
                     reference, device=device)
    assert workspace.FetchBlob("old_shape").dtype == np.int64
    assert str(grads["X"]) == "X_grad"


def test_reshape_from_a_shape_input_and_errors():
    check_op("Reshape", {"X": rand(2, 6), "new_shape": np.array([3, -1], np.int64)},
             ["Y", "old"], {}, lambda x, s: x.reshape(3, 4))
    workspace.FeedBlob("X", rand(2, 6))
    with pytest.raises(RuntimeError, match="cannot reshape"):
        workspace.RunOperatorOnce(core.CreateOperator("Reshape", ["X"], ["Y", "o"], shape=[5, -1]))
    with pytest.raises(RuntimeError, match="more than one -1"):
        workspace.RunOperatorOnce(core.CreateOperator("Reshape", ["X"], ["Y", "o"], shape=[-1, -1]))


def test_reshape_output_does_not_share_storage_unless_in_place():
    workspace.FeedBlob("X", rand(2, 6))
    workspace.RunOperatorOnce(core.CreateOperator("Reshape", ["X"], ["Y", "o"], shape=[12]))
    workspace.FetchTorch("X").add_(1.0)
    np.testing.assert_array_equal(workspace.FetchBlob("Y"), rand(2, 6).reshape(12))


@pytest.mark.parametrize("op_type, args, shape", [
    ("Flatten", {}, (2, 3, 4)), ("Flatten", dict(axis=2), (2, 3, 4)),
    ("Flatten", dict(axis=0), (2, 3)), ("FlattenToVec", {}, (2, 3, 4)),
])
def test_flatten(op_type, args, shape):
    axis = args.get("axis", 1)
    if op_type == "Flatten":
        def reference(x):
            return x.reshape(int(np.prod(shape[:axis])), -1)
    else:
        def reference(x):
            return x.reshape(-1)
    grads = check_op(op_type, {"X": rand(*shape)}, ["Y"], args, reference)
    assert grads["X"] == "X_grad"


def test_resize_like():
    check_op("ResizeLike", {"X": rand(2, 6), "like": rand(3, 4, seed=1)}, ["Y"], {},
             lambda x, like: x.reshape(3, 4), no_grad_inputs=("like",))


@pytest.mark.parametrize("shape, axes", [((2, 3, 4), None), ((2, 3, 4), [1, 0, 2]),
                                         ((2, 3, 4, 5), [0, 2, 3, 1]), ((3,), [0])])
@pytest.mark.parametrize("device", DEVICES)
def test_transpose(shape, axes, device):
    args = {} if axes is None else dict(axes=axes)
    perm = list(reversed(range(len(shape)))) if axes is None else axes
    check_op("Transpose", {"X": rand(*shape)}, ["Y"], args, lambda x: x.permute(perm),
             device=device)


@pytest.mark.parametrize("shape, dims, squeezed", [
    ((1, 3, 1, 4), [0], (3, 1, 4)), ((1, 3, 1, 4), [2, 0], (3, 4)), ((2, 1), [1], (2,))])
def test_squeeze_and_expand_dims(shape, dims, squeezed):
    check_op("Squeeze", {"X": rand(*shape)}, ["Y"], dict(dims=dims),
             lambda x: x.reshape(squeezed))
    check_op("ExpandDims", {"X": rand(*squeezed)}, ["Y"], dict(dims=dims),
             lambda x: x.reshape(shape))


def test_squeeze_of_a_dim_larger_than_one_is_a_clear_error():
    workspace.FeedBlob("X", rand(2, 3))
    with pytest.raises(RuntimeError, match="not all of size 1"):
        workspace.RunOperatorOnce(core.CreateOperator("Squeeze", ["X"], ["Y"], dims=[1]))


@pytest.mark.parametrize("device", DEVICES)
def test_shape_size_and_lengths_to_ranges(device):
    option = device_option(device)
    workspace.FeedBlob("X", rand(2, 3, 4), device_option=option)
    workspace.FeedBlob("L", np.array([2, 0, 3, 1], np.int32), device_option=option)
    workspace.RunOperatorsOnce([
        core.CreateOperator("Shape", ["X"], ["s"], device_option=option),
        core.CreateOperator("Shape", ["X"], ["s2"], axes=[2, 0], device_option=option),
        core.CreateOperator("Size", ["X"], ["n"], device_option=option),
        core.CreateOperator("LengthsToRanges", ["L"], ["r"], device_option=option)])
    assert workspace.FetchBlob("s").tolist() == [2, 3, 4]
    assert workspace.FetchBlob("s").dtype == np.int64
    assert workspace.FetchBlob("s2").tolist() == [4, 2]
    assert workspace.FetchBlob("n").shape == () and int(workspace.FetchBlob("n")) == 24
    ranges = workspace.FetchBlob("r")
    assert ranges.dtype == np.int32 and ranges.tolist() == [[0, 2], [2, 0], [2, 3], [5, 1]]


def test_alias_shares_storage_and_ensure_cpu_output_copies():
    workspace.FeedBlob("X", rand(3))
    workspace.RunOperatorsOnce([core.CreateOperator("Alias", ["X"], ["A"]),
                                core.CreateOperator("EnsureCPUOutput", ["X"], ["C"])])
    workspace.FetchTorch("X").add_(1.0)
    np.testing.assert_array_equal(workspace.FetchBlob("A"), rand(3) + 1.0)
    np.testing.assert_array_equal(workspace.FetchBlob("C"), rand(3))
    assert workspace.FetchTorch("C").device.type == "cpu"


@pytest.mark.parametrize("shape, starts, ends", [
    ((5, 4), [1, 0], [3, -1]),           # -1 as an end: to the end
    ((5, 4, 3), [0, 1], [-1, 3]),
    ((5, 4), [-3, 0], [-1, -2]),         # negatives count from dim + 1
    ((6,), [2], [10]),                    # ends past the dim are clamped
])
@pytest.mark.parametrize("as_inputs", [False, True])
def test_slice(shape, starts, ends, as_inputs):
    index = []
    for n, s, e in zip(shape, starts, ends):
        s = n + 1 + s if s < 0 else s
        e = n + 1 + e if e < 0 else e
        index.append(slice(min(s, n), min(e, n)))
    inputs = {"X": rand(*shape)}
    args = dict(starts=starts, ends=ends)
    if as_inputs:
        inputs.update(starts=np.array(starts, np.int64), ends=np.array(ends, np.int64))
        args = {}
    check_op("Slice", inputs, ["Y"], args, lambda x, *_: x[tuple(index)])


@pytest.mark.parametrize("shape, tiles, axis", [((2, 3), 3, 0), ((2, 3), 2, 1), ((2, 3, 2), 2, -1)])
@pytest.mark.parametrize("as_inputs", [False, True])
def test_tile(shape, tiles, axis, as_inputs):
    reps = [1] * len(shape)
    reps[axis] = tiles
    inputs = {"X": rand(*shape)}
    args = dict(tiles=tiles, axis=axis)
    if as_inputs:
        inputs.update(tiles=np.array([tiles], np.int32), axis=np.array([axis], np.int32))
        args = {}
    check_op("Tile", inputs, ["Y"], args, lambda x, *_: x.repeat(reps))


@pytest.mark.parametrize("broadcast_on_rows", [0, 1])
def test_where(broadcast_on_rows):
    x, y = rand(4, 3), rand(4, 3, seed=1)
    c = rand(4, seed=2) > 0 if broadcast_on_rows else rand(4, 3, seed=2) > 0
    expected = np.where(c[:, None] if broadcast_on_rows else c, x, y)
    workspace.FeedBlob("C", c)
    workspace.FeedBlob("X", x)
    workspace.FeedBlob("Y", y)
    workspace.RunOperatorOnce(core.CreateOperator("Where", ["C", "X", "Y"], ["Z"],
                                                  broadcast_on_rows=broadcast_on_rows))
    np.testing.assert_array_equal(workspace.FetchBlob("Z"), expected)


@pytest.mark.parametrize("args", [dict(min=-0.3, max=0.5), dict(min=0.0), dict(max=0.2), {}])
@pytest.mark.parametrize("device", DEVICES)
def test_clip(args, device):
    check_op("Clip", {"X": rand(4, 5)}, ["Y"], args,
             lambda x: torch.clamp(x, args.get("min"), args.get("max")) if args else x * 1.0,
             device=device)


@pytest.mark.parametrize("x_shape, shape, out", [
    ((3, 1), [3, 4], (3, 4)), ((3, 1), [2, 1, 4], (2, 3, 4)), ((1, 4), [-1, 4], (1, 4)),
    ((2, 3), [3], (2, 3))])
def test_expand(x_shape, shape, out):
    check_op("Expand", {"X": rand(*x_shape), "shape": np.array(shape, np.int64)}, ["Y"], {},
             lambda x, s: x.expand(out) * 1.0)


@pytest.mark.parametrize("shape", [(2, 3, 4), (2, 3, 4, 5), (1, 2, 3, 4, 2)])
def test_order_switch(shape):
    nd = len(shape)
    check_op("NCHW2NHWC", {"X": rand(*shape)}, ["Y"], {},
             lambda x: x.permute(0, *range(2, nd), 1))
    check_op("NHWC2NCHW", {"X": rand(*shape)}, ["Y"], {},
             lambda x: x.permute(0, nd - 1, *range(1, nd - 1)))
