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

# One line per op type. Ops without a sample are listed by test_every_traceable_op_has_a_sample.
SAMPLES = {
    "Add": Sample((2, 3), (2, 3)),
    "AveragePool": Sample((1, 2, 5, 5), kernel=2, stride=2, pad=1),
    "AveragedLoss": Sample((4,)),
    "Cast": Sample((2, 3), to=2),  # INT32
    "Concat": Sample((2, 3), (2, 2), outputs=2, axis=1),
    "ConstantFill": Sample(outputs=1, shape=[2, 3], value=1.5),
    "Conv": Sample((2, 2, 6, 6), (3, 2, 3, 3), (3,), kernel=3, pad=1, stride=2),
    "Copy": Sample((2, 3)),
    "CopyCPUToGPU": Sample((2, 3)),
    "CopyGPUToCPU": Sample((2, 3)),
    "Div": Sample((2, 3), np.full((2, 3), 2.0, np.float32)),
    "Dropout": Sample((2, 3), is_test=1, ratio=0.5),
    "FC": Sample((2, 4), (3, 4), (3,)),
    "GivenTensorBoolFill": Sample(shape=[3], values=[1, 0, 1]),
    "GivenTensorDoubleFill": Sample(shape=[2], values=[1.5, -2.0]),
    "GivenTensorFill": Sample(shape=[2, 2], values=[1.0, 2.0, 3.0, 4.0]),
    "GivenTensorInt64Fill": Sample(shape=[2], values=[7, -3]),
    "GivenTensorIntFill": Sample(shape=[2], values=[7, -3]),
    "MatMul": Sample((2, 3), (4, 3), trans_b=1),
    "MaxPool": Sample((1, 2, 5, 5), kernel=3, stride=2, legacy_pad=3),
    "Mul": Sample((2, 3), (3,), broadcast=1),
    "Relu": Sample((2, 3)),
    "Scale": Sample((2, 3), scale=2.5),
    "Sigmoid": Sample((2, 3)),
    "Softmax": Sample((2, 5)),
    "SpatialBN": Sample((2, 3, 2, 2), (3,), (3,), (3,), np.ones(3, np.float32), is_test=1),
    "Split": Sample((2, 4), outputs=2, axis=1),
    "StopGradient": Sample((2, 3)),
    "Sub": Sample((2, 3), (2, 3)),
    "Sum": Sample((2, 3), (2, 3), (2, 3)),
    "Tanh": Sample((2, 3)),
    "WeightedSum": Sample((2, 3), np.array([0.5], np.float32), (2, 3), np.array([2.0], np.float32)),
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


def test_an_untraceable_op_is_named_with_its_reason(monkeypatch):
    net, names, _ = _one_op_net("Relu", SAMPLES["Relu"])
    module = convert.NetModule(net, {}, inputs=names)
    monkeypatch.setattr(registry.get_schema("Relu"), "data_dependent", True)
    with pytest.raises(convert.ExportError, match=r"cannot export op #0 Relu \(\['in0'\] -> "
                       r"\['out0'\]\): its output sizes depend on the input values"):
        convert.export_program(module, (torch.zeros(2, 3),))


def test_an_op_that_reads_values_in_python_is_named(monkeypatch):
    """Without its NOT_TRACEABLE entry, Accuracy's label check stops torch.export: named."""
    monkeypatch.delitem(registry.NOT_TRACEABLE, "Accuracy")
    sample = Sample((4, 5), np.array([0, 1, 2, 3], I32))
    net, names, _ = _one_op_net("Accuracy", sample)
    module = convert.NetModule(net, {}, inputs=names)
    with pytest.raises(convert.ExportError, match=r"cannot export op #0 Accuracy .* reads input "
                       r"values in Python \(data-dependent\)"):
        convert.export_program(module, tuple(torch.from_numpy(v) for v in sample.inputs))
