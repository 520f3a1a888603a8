"""Every traceable op, exported alone with torch.export, matches caffe2torch's eager run.

The ops come from the registry at collection time, so ops added to caffe2torch/ops/ are tested
here without an edit, and a traceable op without a sample fails (add its one line to SAMPLES).
"""
import numpy as np
import pytest
import torch

from caffe2torch import convert
from caffe2torch.ops import registry
from caffe2torch.python import core, workspace

pytestmark = pytest.mark.usefixtures("fresh_workspace")


class Sample:
    """A one-op net: inputs (a shape → float32 uniform(-1, 1), or an array), outputs, arguments.

    The first input is the exported program's input; the others become module parameters.
    """

    def __init__(self, *inputs, outputs=1, **args):
        rng = np.random.default_rng(0)
        self.inputs = [rng.uniform(-1, 1, x).astype(np.float32) if isinstance(x, tuple) else
                       np.asarray(x) for x in inputs]
        self.outputs = outputs
        self.args = args


I32, I64 = np.int32, np.int64
POS = np.linspace(0.1, 2.0, 6, dtype=np.float32).reshape(2, 3)  # for logs, roots, powers
UNIT = np.linspace(0.05, 0.95, 6, dtype=np.float32).reshape(2, 3)  # probabilities
BOOL = np.array([[True, False, True], [False, False, True]])
BOOL2 = np.array([[True, True, False], [False, True, True]])
INTS = np.array([[3, -7, 12], [5, 0, -2]], I32)
INTS2 = np.array([[6, 3, -5], [1, 9, 4]], I32)
ROIS = np.array([[0, 0.5, 0.5, 3.0, 3.5], [0, 1.0, 0.0, 4.5, 2.0]], np.float32)
LENGTHS = np.array([2, 0, 3], I32)  # segments of 5 rows
INDICES = np.array([3, 0, 0, 2, 1], I64)  # 5 rows of a 4-row table
ANCHOR_TARGETS = np.array([[[[1, 0], [-1, 2]], [[2, 2], [0, 1]]]], I32)  # (N, A=2, H, W)
FG_NUM = np.array([3.0], np.float32)
LOCATIONS = np.array([[0, 0, 1, 1], [0, 4, 0, 1]], I32)  # (n, c, y, x) in a (1, 8, 2, 2) map
ONES, HALVES = np.ones((2, 4), np.float32), np.full((2, 4), 0.5, np.float32)

# One line per op type. Ops without a sample are listed by test_every_traceable_op_has_a_sample.
SAMPLES = {
    "ATen": Sample((2, 3), (2, 3), operator="add", alpha=2.0),
    "Abs": Sample((2, 3)),
    "Accuracy": Sample((4, 5), np.array([0, 1, 4, 3], I32), top_k=2),
    "Acos": Sample(UNIT),
    "Add": Sample((2, 3), (2, 3)),
    "AffineChannel": Sample((2, 3, 2, 2), (3,), (3,)),
    "Alias": Sample((2, 3)),
    "And": Sample(BOOL, BOOL2),
    "ArgMax": Sample((2, 5), axis=1),
    "ArgMin": Sample((2, 5), axis=0, keepdims=0),
    "Asin": Sample(UNIT),
    "Assert": Sample(INTS2, outputs=0, error_msg="all non-zero"),
    "Atan": Sample((2, 3)),
    "AveragePool": Sample((1, 2, 5, 5), kernel=2, stride=2, pad=1),
    "AveragePool1D": Sample((1, 2, 6), kernel=2, stride=2),
    "AveragePool2D": Sample((1, 2, 4, 4), kernel=2, stride=1, pad=1, count_include_pad=1),
    "AveragePool3D": Sample((1, 1, 4, 4, 4), kernel=2, stride=2),
    "AveragedLoss": Sample((4,)),
    "BatchGather": Sample((2, 4, 3), np.array([3, 0], I64)),
    "BatchMatMul": Sample((2, 3, 4), (2, 5, 4), trans_b=1),
    "BatchPermutation": Sample((3, 2, 2), np.array([2, 0, 1], I32)),
    "BitwiseAnd": Sample(INTS, INTS2),
    "BitwiseOr": Sample(INTS, INTS2),
    "BitwiseXor": Sample(INTS, INTS2),
    "Cast": Sample((2, 3), to=2),  # INT32
    "Cbrt": Sample((2, 3)),
    "Ceil": Sample((2, 3)),
    "ChannelBackpropStats": Sample((2, 3, 2, 2), (3,), (3,), (2, 3, 2, 2), outputs=2),
    "ChannelShuffle": Sample((1, 4, 2, 2), group=2),
    "ChannelStats": Sample((2, 3, 2, 2), outputs=2),
    "Clip": Sample((2, 3), min=-0.5, max=0.5),
    "ClipTensorByScaling": Sample((2, 3), np.array([2.0], np.float32), threshold=1.0),
    "ColwiseMax": Sample((2, 3, 4)),
    "Concat": Sample((2, 3), (2, 2), outputs=2, axis=1),
    "ConstantFill": Sample(outputs=1, shape=[2, 3], value=1.5),
    "Conv": Sample((2, 2, 6, 6), (3, 2, 3, 3), (3,), kernel=3, pad=1, stride=2),
    "Conv1D": Sample((1, 2, 7), (3, 2, 3), (3,), kernel=3, stride=2),
    "Conv2D": Sample((1, 2, 5, 5), (4, 1, 3, 3), (4,), kernel=3, group=2, pad=1),
    "Conv3D": Sample((1, 2, 4, 4, 4), (2, 2, 3, 3, 3), (2,), kernel=3),
    "ConvTranspose": Sample((1, 2, 3, 3), (2, 3, 3, 3), (3,), kernel=3, stride=2, pad=1, adj=1),
    "Copy": Sample((2, 3)),
    "CopyCPUToGPU": Sample((2, 3)),
    "CopyFromCPUInput": Sample((2, 3)),
    "CopyGPUToCPU": Sample((2, 3)),
    "CopyOnDeviceLike": Sample((2, 3), (1,)),
    "Cos": Sample((2, 3)),
    "Cosh": Sample((2, 3)),
    "CosineSimilarity": Sample((2, 4), (2, 4)),
    "CrossEntropy": Sample(UNIT, np.array([[0.2, 0.3, 0.5], [1, 0, 0]], np.float32)),
    "Cube": Sample((2, 3)),
    "DiagonalFill": Sample(shape=[3, 4], value=2.5),
    "Div": Sample((2, 3), np.full((2, 3), 2.0, np.float32)),
    "DotProduct": Sample((2, 4), (2, 4)),
    "DotProductWithPadding": Sample((2, 3), (2, 5), pad_value=0.5),
    "Dropout": Sample((2, 3), is_test=1, ratio=0.5),
    "EQ": Sample(INTS, INTS2),
    "ElementwiseLinear": Sample((2, 3), (3,), (3,)),
    "Elu": Sample((2, 3), alpha=0.5),
    "EnforceFinite": Sample((2, 3), outputs=0),
    "EnsureCPUOutput": Sample((2, 3)),
    "EnsureDense": Sample((2, 3)),
    "Erf": Sample((2, 3)),
    "Exp": Sample((2, 3)),
    "ExpandDims": Sample((2, 3), dims=[0, 2]),
    "FC": Sample((2, 4), (3, 4), (3,)),
    "Float16ConstantFill": Sample(outputs=1, shape=[2, 3], value=1.5),
    "FloatToHalf": Sample((2, 3)),
    "HalfToFloat": Sample(np.linspace(-1, 1, 6, dtype=np.float16).reshape(2, 3)),
    "Lars": Sample((2, 3), (2, 3), np.array([0.01], np.float32), np.array([1.0], np.float32),
                   np.array([10.0], np.float32)),
    "LpNorm": Sample((2, 3), p=1),
    "FCTransposed": Sample((2, 4), (4, 3), (3,)),
    "Flatten": Sample((2, 3, 2), axis=2),
    "FlattenToVec": Sample((2, 3, 2)),
    "Floor": Sample((2, 3)),
    "GE": Sample((2, 3), (3,)),
    "GT": Sample((2, 3), (2, 3)),
    "Gather": Sample((4, 3), np.array([[3, 0], [1, 1]], I32)),
    "Gelu": Sample((2, 3), fast_gelu=1),
    "GivenTensorBoolFill": Sample(shape=[3], values=[1, 0, 1]),
    "GivenTensorByteStringToUInt8Fill": Sample(shape=[3], values="abc"),
    "GivenTensorDoubleFill": Sample(shape=[2], values=[1.5, -2.0]),
    "GivenTensorFill": Sample(shape=[2, 2], values=[1.0, 2.0, 3.0, 4.0]),
    "GivenTensorInt16Fill": Sample(shape=[2], values=[7, -3]),
    "GivenTensorInt64Fill": Sample(shape=[2], values=[7, -3]),
    "GivenTensorIntFill": Sample(shape=[2], values=[7, -3]),
    "GroupNorm": Sample((2, 4, 2, 2), (4,), (4,), outputs=3, group=2),
    "GroupSpatialSoftmax": Sample((1, 6, 2, 2), num_classes=3),
    "HardSigmoid": Sample((2, 3), alpha=0.3, beta=0.4),
    "InstanceNorm": Sample((2, 3, 2, 2), (3,), (3,), outputs=3),
    "L1Distance": Sample((2, 4), (2, 4)),
    "LE": Sample((2, 3), (2, 3)),
    "LRN": Sample((1, 5, 2, 2), outputs=2, size=3, alpha=0.1, beta=0.75, bias=1.0),
    "LT": Sample((2, 3), (2, 3)),
    "LabelCrossEntropy": Sample(UNIT, np.array([2, 0], I32)),
    "LayerNorm": Sample((2, 3, 4), outputs=3, axis=1, epsilon=1e-3),
    "LeakyRelu": Sample((2, 3), alpha=0.1),
    "LengthsMean": Sample((5, 2), LENGTHS),
    "LengthsSum": Sample((5, 2), LENGTHS),
    "LengthsToRanges": Sample(LENGTHS),
    "LengthsWeightedSum": Sample((5, 2), (5,), LENGTHS),
    "Log": Sample(POS),
    "Log1p": Sample(POS),
    "Logit": Sample(UNIT),
    "LpPool": Sample((1, 2, 4, 4), kernel=2, stride=2, p=3.0),
    "MakeTwoClass": Sample(UNIT),
    "MatMul": Sample((2, 3), (4, 3), trans_b=1),
    "Max": Sample((2, 3), (2, 3)),
    "MaxPool": Sample((1, 2, 5, 5), kernel=3, stride=2, legacy_pad=3),
    "MaxPool1D": Sample((1, 2, 6), kernel=2, stride=2),
    "MaxPool2D": Sample((1, 2, 5, 5), kernel=3, stride=2, pad=1),
    "MaxPool3D": Sample((1, 1, 4, 4, 4), kernel=2, stride=2),
    "Mean": Sample((2, 3), (2, 3)),
    "Min": Sample((2, 3), (2, 3)),
    "Mod": Sample(INTS, divisor=4, sign_follow_divisor=1),
    "Moments": Sample((2, 3, 4), outputs=2, axes=[0, 2]),
    "Mul": Sample((2, 3), (3,), broadcast=1),
    "NCCLAllreduce": Sample((2, 3), (2, 3), outputs=2),
    "NCCLBroadcast": Sample((2, 3), (2, 3), outputs=2, root=1),
    "NCCLReduce": Sample((2, 3), (2, 3)),
    "NCHW2NHWC": Sample((1, 2, 3, 4)),
    "NE": Sample(INTS, INTS2),
    "NHWC2NCHW": Sample((1, 3, 4, 2)),
    "NanCheck": Sample((2, 3)),
    "Negative": Sample((2, 3)),
    "Not": Sample(BOOL),
    "Or": Sample(BOOL, BOOL2),
    "PRelu": Sample((2, 3, 2, 2), (3,)),
    "PSRoIPool": Sample((1, 8, 4, 4), ROIS, outputs=2, group_size=2, output_dim=2),
    "PadImage": Sample((1, 2, 3, 3), pad_t=1, pad_l=2, pad_b=0, pad_r=1, mode="reflect"),
    "Pow": Sample(POS, exponent=1.5),
    "RangeFill": Sample(shape=[2, 3]),
    "Reciprocal": Sample(POS),
    "ReduceBackMax": Sample((2, 3, 4), num_reduce_dim=2),
    "ReduceBackMean": Sample((2, 3), np.array([3, 1], I32)),
    "ReduceBackSum": Sample((2, 3, 4)),
    "ReduceFrontMax": Sample((2, 3, 4)),
    "ReduceFrontMean": Sample((2, 3, 4), num_reduce_dim=2),
    "ReduceFrontSum": Sample((3, 2), np.array([3, 1], I32)),
    "ReduceL1": Sample((2, 3, 4), axes=[1]),
    "ReduceL2": Sample((2, 3, 4), axes=[0, 2], keepdims=0),
    "ReduceMax": Sample((2, 3, 4), axes=[2]),
    "ReduceMean": Sample((2, 3, 4), axes=[1, 2], keepdims=0),
    "ReduceMin": Sample((2, 3, 4)),
    "ReduceSum": Sample((2, 3, 4), axes=[0]),
    "Relu": Sample((2, 3)),
    "ReluN": Sample((2, 3), n=0.5),
    "Reshape": Sample((2, 3, 4), outputs=2, shape=[0, -1]),
    "ResizeLike": Sample((2, 6), (3, 4)),
    "ResizeNearest": Sample((1, 2, 2, 3), width_scale=2.0, height_scale=1.5),
    "RoIAlign": Sample((1, 2, 5, 5), ROIS, pooled_h=2, pooled_w=2, sampling_ratio=2),
    "RoIPool": Sample((1, 2, 5, 5), ROIS, outputs=2, pooled_h=2, pooled_w=2),
    "RowwiseMax": Sample((2, 3, 4)),
    "Rsqrt": Sample(POS),
    "Scale": Sample((2, 3), scale=2.5),
    "SelectSmoothL1Loss": Sample((1, 8, 2, 2), (2, 4), LOCATIONS, FG_NUM, beta=0.5),
    "Selu": Sample((2, 3)),
    "Shape": Sample((2, 3, 4), axes=[2, 0]),
    "Sigmoid": Sample((2, 3)),
    "SigmoidCrossEntropyLoss": Sample((2, 3), np.array([[1, 0, -1], [0, 1, 1]], I32)),
    "SigmoidCrossEntropyWithLogits": Sample((2, 3), UNIT),
    "SigmoidFocalLoss": Sample((1, 4, 2, 2), ANCHOR_TARGETS, FG_NUM, num_classes=2, gamma=2.0),
    "Sign": Sample((2, 3)),
    "Sin": Sample((2, 3)),
    "Sinh": Sample((2, 3)),
    "Size": Sample((2, 3, 4)),
    "Slice": Sample((3, 4), starts=[0, 1], ends=[-1, 3]),
    "SmoothL1Loss": Sample((2, 4), (2, 4), ONES, HALVES, beta=0.5),
    "Softmax": Sample((2, 5)),
    "SoftmaxFocalLoss": Sample((1, 6, 2, 2), ANCHOR_TARGETS, FG_NUM, outputs=2, num_classes=3),
    "SoftmaxWithLoss": Sample((4, 3), np.array([0, 2, 1, 1], I32), outputs=2),
    "Softplus": Sample((2, 3)),
    "Softsign": Sample((2, 3)),
    "SparseLengthsMean": Sample((4, 2), INDICES, LENGTHS),
    "SparseLengthsSum": Sample((4, 2), INDICES, LENGTHS),
    "SparseLengthsWeightedSum": Sample((4, 2), (5,), INDICES, LENGTHS),
    "SpatialBN": Sample((2, 3, 2, 2), (3,), (3,), (3,), np.ones(3, np.float32), is_test=1),
    "SpatialNarrowAs": Sample((1, 2, 4, 5), (1, 3, 2, 3)),
    "SpatialSoftmaxWithLoss": Sample((1, 3, 2, 2), np.array([[[0, 2], [-1, 1]]], I32), outputs=2),
    "Split": Sample((2, 4), outputs=2, axis=1),
    "Sqr": Sample((2, 3)),
    "Sqrt": Sample(POS),
    "SquaredL2Distance": Sample((2, 4), (2, 4)),
    "Squeeze": Sample((2, 1, 3, 1), dims=[1, 3]),
    "StopGradient": Sample((2, 3)),
    "Sub": Sample((2, 3), (2, 3)),
    "Sum": Sample((2, 3), (2, 3), (2, 3)),
    "SumElements": Sample((2, 3), average=1),
    "SumElementsInt": Sample(INTS),
    "SumReduceLike": Sample((2, 3, 4), (3,), axis=1),
    "SumSqrElements": Sample((2, 3), average=1),
    "Swish": Sample((2, 3)),
    "Tan": Sample((2, 3)),
    "Tanh": Sample((2, 3)),
    "Tile": Sample((2, 3), tiles=3, axis=1),
    "TopK": Sample((2, 5), outputs=3, k=2),
    "Transpose": Sample((2, 3, 4), axes=[1, 2, 0]),
    "UpsampleBilinear": Sample((1, 2, 2, 3), height_scale=2.0, width_scale=1.5),
    "UpsampleNearest": Sample((1, 2, 2, 3), scale=2),
    "WeightedSigmoidCrossEntropyWithLogits": Sample((2, 3), UNIT, POS),
    "WeightedSum": Sample((2, 3), np.array([0.5], np.float32), (2, 3), np.array([2.0], np.float32)),
    "Where": Sample(BOOL, (2, 3), (2, 3)),
    "Xor": Sample(BOOL, BOOL2),
}

TRACEABLE = [s.type for s in registry.all_schemas() if s.traceable]


def test_every_traceable_op_has_a_sample():
    missing = [t for t in TRACEABLE if t not in SAMPLES]
    assert missing == [], (f"traceable ops without a sample in tests/test_export_ops.py "
                           f"SAMPLES (add one line each): {missing}")
    stale = sorted(set(SAMPLES) - set(TRACEABLE))
    assert stale == [], f"SAMPLES has ops that are not registered or not traceable: {stale}"


def test_untraceable_ops_say_why():
    reasons = {s.type: s.untraceable_reason for s in registry.all_schemas() if not s.traceable}
    assert "side effects" in reasons["Save"] and "gradient op" in reasons["ReluGradient"]
    assert "random" in reasons["XavierFill"]
    assert registry.get_schema("StopGradient").traceable  # a forward op despite its name


def _one_op_net(op_type, sample):
    names = [f"in{i}" for i in range(len(sample.inputs))]
    outputs = [f"out{i}" for i in range(sample.outputs)]
    op = core.CreateOperator(op_type, names, outputs, **sample.args)
    net = core.Net(f"one_{op_type}").Proto()
    net.op.append(op)
    net.external_input.extend(names)
    # A check without outputs (Assert, EnforceFinite): the net returns its input.
    outputs = outputs or names[:1]
    net.external_output.extend(outputs)
    return net, names, outputs


@pytest.mark.parametrize("op_type", TRACEABLE)
def test_exported_op_matches_eager(op_type):
    if op_type not in SAMPLES:
        pytest.fail(f"{op_type} is traceable but has no sample: add one line to SAMPLES")
    sample = SAMPLES[op_type]
    net, names, outputs = _one_op_net(op_type, sample)
    for name, value in zip(names, sample.inputs):
        workspace.FeedBlob(name, value)
    workspace.RunNetOnce(net)
    eager = [workspace.FetchBlob(n) for n in outputs]

    params = {n: torch.from_numpy(v) for n, v in zip(names[1:], sample.inputs[1:])}
    module = convert.NetModule(net, params, inputs=names[:1])
    example = tuple(torch.from_numpy(v) for v in sample.inputs[:1])
    program = convert.export_program(module, example)
    got = program.module()(*example)
    got = [got] if isinstance(got, torch.Tensor) else list(got)
    assert len(got) == len(eager)
    for name, g, e in zip(outputs, got, eager):
        g = g.numpy()
        assert g.shape == e.shape and g.dtype == e.dtype, f"{op_type} {name}"
        np.testing.assert_allclose(g, e, rtol=1e-6, atol=1e-7, err_msg=f"{op_type} {name}")


def _eager(net, names, outputs, inputs):
    for name, value in zip(names, inputs):
        workspace.FeedBlob(name, value)
    workspace.RunNetOnce(net)
    return [workspace.FetchBlob(n) for n in outputs]


# Ops of one input, which is the program's input: its first dim can be a dynamic batch.
DYNAMIC = [t for t in TRACEABLE if t in SAMPLES and len(SAMPLES[t].inputs) == 1
           and SAMPLES[t].inputs[0].ndim > 0]


@pytest.mark.parametrize("op_type", DYNAMIC)
def test_exported_op_keeps_a_dynamic_batch(op_type):
    """Exported with a dynamic dim 0, the op runs at another batch size as eager does."""
    sample = SAMPLES[op_type]
    net, names, outputs = _one_op_net(op_type, sample)
    module = convert.NetModule(net, {}, inputs=names)
    x = sample.inputs[0]
    program = convert.export_program(module, (torch.from_numpy(x),), dynamic_batch=True)
    bigger = np.concatenate([x, x[:1]])  # one more row than the example
    got = program.module()(torch.from_numpy(bigger))
    got = [got] if isinstance(got, torch.Tensor) else list(got)
    for name, g, e in zip(outputs, got, _eager(net, names, outputs, [bigger])):
        assert g.shape == e.shape, f"{op_type} {name}"
        np.testing.assert_allclose(g.numpy(), e, rtol=1e-6, atol=1e-7, err_msg=f"{op_type} {name}")


def test_an_untraceable_op_is_named_with_its_reason(monkeypatch):
    net, names, _ = _one_op_net("Relu", SAMPLES["Relu"])
    module = convert.NetModule(net, {}, inputs=names)
    monkeypatch.setattr(registry.get_schema("Relu"), "data_dependent", True)
    with pytest.raises(convert.ExportError, match=r"cannot export op #0 Relu \(\['in0'\] -> "
                       r"\['out0'\]\): its output sizes depend on the input values"):
        convert.export_program(module, (torch.zeros(2, 3),))


def test_an_op_that_reads_values_in_python_is_named(monkeypatch):
    """Without its NOT_TRACEABLE entry, LearningRate's read of the counter stops torch.export."""
    monkeypatch.delitem(registry.NOT_TRACEABLE, "LearningRate")
    sample = Sample(np.array([5], I64), base_lr=0.1, policy="fixed")
    net, names, _ = _one_op_net("LearningRate", sample)
    module = convert.NetModule(net, {}, inputs=names)
    with pytest.raises(convert.ExportError, match=r"cannot export op #0 LearningRate .* reads "
                       r"input values in Python \(data-dependent\)"):
        convert.export_program(module, tuple(torch.from_numpy(v) for v in sample.inputs))


def test_an_exported_nan_check_still_checks():
    """NanCheck traces as an assert node: the .pt2 program refuses NaN like RunNetOnce does."""
    net, names, _ = _one_op_net("NanCheck", SAMPLES["NanCheck"])
    module = convert.NetModule(net, {}, inputs=names)
    program = convert.export_program(module, (torch.zeros(2, 3),), dynamic_batch=True)
    assert program.module()(torch.ones(4, 3)).shape == (4, 3)
    with pytest.raises(RuntimeError, match="NanCheck: blob 'in0' holds NaN or Inf"):
        program.module()(torch.tensor([[1.0, float("nan"), 0.0]]))


@pytest.mark.parametrize("op_type, sample, reason", [
    ("Reshape", Sample((2, 6), np.array([3, 4], I64), outputs=2), r"comes from input new_shape"),
    ("RoIAlign", Sample((1, 2, 5, 5), ROIS, pooled_h=2, pooled_w=2, sampling_ratio=0),
     r"adaptive sampling_ratio \(<= 0\)"),
])
def test_arguments_that_read_values_are_named(op_type, sample, reason):
    """Traceable op types whose arguments make this op read values: ExportError names op and why."""
    net, names, _ = _one_op_net(op_type, sample)
    params = {n: torch.from_numpy(v) for n, v in zip(names[1:], sample.inputs[1:])}
    module = convert.NetModule(net, params, inputs=names[:1])
    with pytest.raises(convert.ExportError, match=rf"cannot export op #0 {op_type} .*{reason}"):
        convert.export_program(module, (torch.from_numpy(sample.inputs[0]),))
