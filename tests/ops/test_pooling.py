"""LpPool and the MaxPool1D/2D/3D, AveragePool1D/2D/3D aliases vs PyTorch."""
import pytest
import torch
import torch.nn.functional as F

from caffe2torch.python import core

from .helpers import check_op, rand


pytestmark = pytest.mark.usefixtures("fresh_workspace")


def lp_reference(p, kernel, stride, pad=0, nd=2):
    pool = {1: F.avg_pool1d, 2: F.avg_pool2d}[nd]

    def forward(x):
        s = pool(F.pad(x.abs() ** p, (pad,) * (2 * nd)), kernel, stride) * kernel ** nd
        return s ** (1.0 / p)
    return forward


@pytest.mark.parametrize("p, kernel, stride, pad, shape", [
    (2.0, 2, 2, 0, (2, 3, 4, 4)), (3.0, 3, 1, 1, (1, 2, 5, 4)), (1.5, 2, 1, 0, (1, 1, 3, 3)),
    (2.0, 3, 2, 1, (2, 2, 7))])
def test_lp_pool(p, kernel, stride, pad, shape):
    x = rand(*shape, low=0.1, high=1.0) * torch.tensor([1.0, -1.0]).repeat(shape[-1])[:shape[-1]] \
        .numpy()
    check_op("LpPool", {"X": x}, ["Y"], dict(p=p, kernel=kernel, stride=stride, pad=pad),
             lp_reference(p, kernel, stride, pad, len(shape) - 2))


def test_lp_pool_global_nhwc():
    x = rand(2, 3, 4, 2, low=0.2)
    check_op("LpPool", {"X": x}, ["Y"], dict(p=2.0, global_pooling=1, order="NHWC"),
             lambda x: (x ** 2).sum((1, 2), keepdim=True).sqrt())


@pytest.mark.parametrize("kind, nd, fn", [
    ("MaxPool", 1, lambda x: F.max_pool1d(x, 3, 2, 1)),
    ("MaxPool", 2, lambda x: F.max_pool2d(x, 3, 2, 1)),
    ("MaxPool", 3, lambda x: F.max_pool3d(x, 3, 2, 1)),
    ("AveragePool", 1, lambda x: F.avg_pool1d(x, 3, 2, 1, count_include_pad=False)),
    ("AveragePool", 2, lambda x: F.avg_pool2d(x, 3, 2, 1, count_include_pad=False)),
    ("AveragePool", 3, lambda x: F.avg_pool3d(x, 3, 2, 1, count_include_pad=False)),
])
def test_pool_aliases(kind, nd, fn):
    shape = (2, 3) + (7, 6, 5)[:nd]
    name = f"{kind}{nd}D"
    check_op(name, {"X": rand(*shape)}, ["Y"], dict(kernel=3, stride=2, pad=1), fn)
    net = core.Net("alias")
    getattr(net, name)("X", "Y", kernel=3)
    net.AddGradientOperators({"Y": "dY"})
    assert net.Proto().op[-1].type == name + "Gradient"


def test_pool_1d_nhwc_and_asymmetric_pads():
    check_op("MaxPool1D", {"X": rand(2, 7, 3)}, ["Y"], dict(kernels=[2], strides=[2], pads=[0, 1],
                                                            order="NHWC"),
             lambda x: F.max_pool1d(F.pad(x.permute(0, 2, 1), (0, 1), value=-1e9), 2, 2)
             .permute(0, 2, 1))


def test_pool_alias_checks_rank():
    with pytest.raises(Exception, match="MaxPool2D needs an input of 2 spatial"):
        check_op("MaxPool2D", {"X": rand(1, 1, 3)}, ["Y"], dict(kernel=2), lambda x: None,
                 grad=False)
