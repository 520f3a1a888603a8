"""Fillers: shapes, dtypes, value statistics, seeding, GivenTensor*Fill."""
import math

import numpy as np
import pytest

from caffe2torch.proto import caffe2_pb2
from caffe2torch.python import core, workspace

from .helpers import rand


pytestmark = pytest.mark.usefixtures("fresh_workspace")


def fill(op_type, inputs=(), seed=None, **args):
    option = core.DeviceOption(caffe2_pb2.CPU, 0, random_seed=seed) if seed is not None else None
    workspace.RunOperatorOnce(core.CreateOperator(op_type, list(inputs), ["Y"],
                                                  device_option=option, **args))
    return workspace.FetchBlob("Y")


@pytest.mark.parametrize("args, dtype, value", [
    (dict(value=1.5), np.float32, 1.5),                       # float value -> FLOAT
    (dict(value=3), np.int64, 3),                             # int value -> INT64 (Caffe2)
    (dict(), np.float32, 0.0),                                # defaults: 0.0, FLOAT
    (dict(value=3, dtype=core.DataType.INT32), np.int32, 3),
    (dict(value=2.0, dtype=core.DataType.DOUBLE), np.float64, 2.0),
    (dict(value=1, dtype=core.DataType.BOOL), np.bool_, True),
    (dict(value=7, dtype=core.DataType.UINT8), np.uint8, 7),
    (dict(value=0, dtype=core.DataType.INT64), np.int64, 0),  # brew.iter's counter
])
def test_constant_fill_dtype(args, dtype, value):
    out = fill("ConstantFill", shape=[2, 3], **args)
    assert out.dtype == dtype and out.shape == (2, 3)
    assert (out == value).all()


def test_constant_fill_shape_from_input():
    workspace.FeedBlob("X", rand(4, 2))
    assert fill("ConstantFill", ["X"], value=1.0).shape == (4, 2)
    assert fill("ConstantFill", ["X"], value=1.0, extra_shape=[3]).shape == (4, 2, 3)
    workspace.FeedBlob("loss", np.array(2.5, dtype=np.float32))
    out = fill("ConstantFill", ["loss"], value=1.0)  # AddGradientOperators' start
    assert out.shape == () and out == 1.0


def test_constant_fill_input_as_shape():
    workspace.FeedBlob("dims", np.array([2, 5], dtype=np.int64))
    assert fill("ConstantFill", ["dims"], input_as_shape=1, value=4.0).shape == (2, 5)


def test_constant_fill_string():
    out = fill("ConstantFill", shape=[2], value="ab", dtype=core.DataType.STRING)
    assert out.dtype == object and list(out) == [b"ab", b"ab"]


@pytest.mark.parametrize("args, match", [
    (dict(shape=5), r"scalar .* a list is expected"),
    (dict(value=1.0, extra_shape=[2]), "need an input"),
    (dict(value=1.0, shape=[1], dtype=0), "UNDEFINED"),
    (dict(value=1.0, shape=[1], dtype=99), "not a Caffe2 DataType number"),
])
def test_constant_fill_bad_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        fill("ConstantFill", **args)


def test_constant_fill_shape_and_input_together_is_an_error():
    workspace.FeedBlob("X", rand(2))
    with pytest.raises(ValueError, match="cannot set argument 'shape' and pass an input"):
        fill("ConstantFill", ["X"], shape=[3])


@pytest.mark.parametrize("shape", [[20, 1, 5, 5], [500, 800]])
def test_xavier_fill(shape):
    out = fill("XavierFill", shape=shape)
    bound = math.sqrt(3.0 / (np.prod(shape) / shape[0]))  # conv1_w: sqrt(3/25); fc3_w: sqrt(3/800)
    assert out.dtype == np.float32 and list(out.shape) == shape
    assert np.abs(out).max() <= bound
    assert np.abs(out).max() > 0.9 * bound
    assert abs(out.std() - bound / math.sqrt(3)) < 0.1 * bound / math.sqrt(3)


def test_msra_fill():
    out = fill("MSRAFill", shape=[64, 50, 4, 4])
    std = math.sqrt(2.0 / (64 * 4 * 4))  # fan_out = numel / shape[1]
    assert abs(out.std() - std) < 0.03 * std
    assert abs(out.mean()) < 0.03 * std


def test_gaussian_and_uniform_fill():
    out = fill("GaussianFill", shape=[200, 200], mean=2.0, std=0.5)
    assert abs(out.mean() - 2.0) < 0.01 and abs(out.std() - 0.5) < 0.01
    out = fill("UniformFill", shape=[200, 200], min=-3.0, max=-1.0)
    assert out.min() >= -3.0 and out.max() <= -1.0 and abs(out.mean() + 2.0) < 0.01


@pytest.mark.parametrize("op_type", ["XavierFill", "MSRAFill", "GaussianFill", "UniformFill"])
def test_random_fills_follow_the_device_option_seed(op_type):
    first = fill(op_type, shape=[3, 4], seed=123)
    assert np.array_equal(first, fill(op_type, shape=[3, 4], seed=123))
    assert not np.array_equal(first, fill(op_type, shape=[3, 4], seed=124))
    assert not np.array_equal(fill(op_type, shape=[3, 4]), fill(op_type, shape=[3, 4]))


def test_random_fill_shape_from_input():
    workspace.FeedBlob("X", rand(3, 7))
    assert fill("XavierFill", ["X"]).shape == (3, 7)


@pytest.mark.parametrize("op_type, values, dtype", [
    ("GivenTensorFill", [1.5, -2.0, 3.25, 0.0, 1.0, 2.0], np.float32),
    # Argument.floats is a float32 field, so doubles arrive float32-rounded (as in Caffe2).
    ("GivenTensorDoubleFill", [0.5, 0.25, -1.125, 3.0, 1e3, 2.0 ** -20], np.float64),
    ("GivenTensorIntFill", [1, -2, 3, 4, 5, 6], np.int32),
    ("GivenTensorInt64Fill", [1, 2, 3, 2 ** 40, 5, 6], np.int64),
    ("GivenTensorBoolFill", [1, 0, 1, 1, 0, 0], np.bool_),
])
def test_given_tensor_fill(op_type, values, dtype):
    out = fill(op_type, shape=[2, 3], values=values)
    assert out.dtype == dtype
    np.testing.assert_array_equal(out, np.array(values, dtype=dtype).reshape(2, 3))


def test_given_tensor_string_fill_gives_bytes():
    out = fill("GivenTensorStringFill", shape=[2], values=["a", "bc"])
    assert out.dtype == object and list(out) == [b"a", b"bc"]


def test_given_tensor_fill_runs_give_fresh_tensors():
    net = core.Net("given")
    net.GivenTensorFill([], "Y", shape=[2], values=[1.0, 2.0])
    workspace.CreateNet(net)
    workspace.RunNet(net.Name())
    first = workspace.FetchTorch("Y")
    first.mul_(10)  # e.g. an in-place WeightedSum on the filled parameter
    workspace.RunNet(net.Name())
    np.testing.assert_array_equal(workspace.FetchBlob("Y"), [1.0, 2.0])


def test_given_tensor_fill_size_mismatch_is_a_clear_error():
    with pytest.raises(RuntimeError, match=r"\[2, 2\] holds 4 values but argument 'values' has 3"):
        fill("GivenTensorFill", shape=[2, 2], values=[1.0, 2.0, 3.0])


def test_fillers_have_no_gradient():
    net = core.Net("fills")
    net.ConstantFill("X", "Y", value=1.0)
    net.AveragedLoss("Y", "loss")
    grads = net.AddGradientOperators(["loss"])
    assert "X" not in grads


# --- fills added with the operators issue -------------------------------------------------------

@pytest.mark.parametrize("shape, value, dtype", [
    ([3, 3], 2.5, np.float32), ([2, 4], 1.0, np.float32), ([3, 3, 3], 7, np.int64)])
def test_diagonal_fill(shape, value, dtype):
    out = fill("DiagonalFill", shape=shape, value=value)
    expected = np.zeros(shape, dtype)
    for i in range(min(shape)):
        expected[(i,) * len(shape)] = value
    assert out.dtype == dtype
    np.testing.assert_array_equal(out, expected)


def test_diagonal_fill_bad_shape():
    with pytest.raises(Exception, match="all dimensions equal"):
        fill("DiagonalFill", shape=[2, 3, 3], value=1.0)


def test_diagonal_fill_dtype_and_shape_from_input():
    workspace.FeedBlob("X", rand(4, 4))
    out = fill("DiagonalFill", ["X"], value=1, dtype=core.DataType.INT32)
    np.testing.assert_array_equal(out, np.eye(4, dtype=np.int32))


@pytest.mark.parametrize("lengths", [[2, 0, 3], [1], []])
def test_lengths_range_fill(lengths):
    workspace.FeedBlob("L", np.array(lengths, np.int32))
    out = fill("LengthsRangeFill", ["L"])
    expected = np.concatenate([np.arange(n) for n in lengths] or [np.zeros(0)]).astype(np.int32)
    assert out.dtype == np.int32
    np.testing.assert_array_equal(out, expected)


def test_uniform_int_fill():
    out = fill("UniformIntFill", shape=[2000], min=-2, max=3, seed=5)
    assert out.dtype == np.int32 and set(np.unique(out)) == set(range(-2, 4))
    np.testing.assert_array_equal(out, fill("UniformIntFill", shape=[2000], min=-2, max=3, seed=5))


@pytest.mark.parametrize("op", ["UniformFill", "UniformIntFill"])
def test_uniform_fills_take_shape_min_max_inputs(op):
    workspace.FeedBlob("shape", np.array([3, 500], np.int64))
    workspace.FeedBlob("lo", np.array([10], np.float32 if op == "UniformFill" else np.int32))
    workspace.FeedBlob("hi", np.array([12], np.float32 if op == "UniformFill" else np.int32))
    out = fill(op, ["shape", "lo", "hi"], input_as_shape=1)
    assert out.shape == (3, 500) and out.min() >= 10 and out.max() <= 12 and out.max() > 11


def test_gaussian_fill_input_as_shape():
    workspace.FeedBlob("shape", np.array([4, 1000], np.int64))
    out = fill("GaussianFill", ["shape"], input_as_shape=1, mean=3.0, std=0.5)
    assert out.shape == (4, 1000) and abs(out.mean() - 3.0) < 0.05 and abs(out.std() - 0.5) < 0.05


def test_range_fill():
    np.testing.assert_array_equal(fill("RangeFill", shape=[2, 3]),
                                  np.arange(6, dtype=np.float32).reshape(2, 3))


def test_given_tensor_int16_and_byte_string_fills():
    out = fill("GivenTensorInt16Fill", shape=[2, 2], values=[1, -2, 300, 4])
    assert out.dtype == np.int16
    np.testing.assert_array_equal(out, [[1, -2], [300, 4]])
    out = fill("GivenTensorByteStringToUInt8Fill", shape=[4], values=[b"\x00\xff\x10a"])
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, [0, 255, 16, 97])
