"""Normalization ops (LRN, LayerNorm, GroupNorm, InstanceNorm, AffineChannel) vs PyTorch."""
import pytest
import torch
import torch.nn.functional as F

from caffe2torch.python import core

from .helpers import DEVICES, check_op, rand


pytestmark = pytest.mark.usefixtures("fresh_workspace")


def lrn_reference(size, alpha, beta, bias):
    """Caffe2's LRN written out: the window spans (size-1)//2 channels before, size//2 after."""
    def forward(x):
        sq = F.pad(x * x, (0, 0, 0, 0, (size - 1) // 2, size // 2))
        total = sum(sq[:, i:i + x.shape[1]] for i in range(size))
        scale = bias + alpha / size * total
        return x * scale.pow(-beta), scale
    return forward


@pytest.mark.parametrize("shape, args", [
    ((2, 7, 4, 3), dict(size=5, alpha=1e-2, beta=0.75, bias=1.0)),
    ((1, 4, 3, 5), dict(size=3, alpha=0.5, beta=0.5, bias=2.0)),
    ((2, 6, 3, 3), dict(size=4, alpha=0.2, beta=0.6)),  # even size: one more channel behind
    ((1, 3, 2, 2), dict(size=1, alpha=1.0, beta=1.0, bias=1.5)),
])
def test_lrn(shape, args):
    check_op("LRN", {"X": rand(*shape)}, ["Y", "scale"], args,
             lrn_reference(args["size"], args["alpha"], args["beta"], args.get("bias", 1.0)))


def test_lrn_matches_torch_local_response_norm():
    check_op("LRN", {"X": rand(2, 8, 5, 5)}, ["Y"], dict(size=5, alpha=1e-4, beta=0.75, bias=1.0),
             lambda x: F.local_response_norm(x, 5, 1e-4, 0.75, 1.0))


@pytest.mark.parametrize("device", DEVICES)
def test_lrn_nhwc(device):
    ref = lrn_reference(3, 0.3, 0.75, 1.0)
    check_op("LRN", {"X": rand(2, 3, 4, 5)}, ["Y", "scale"],
             dict(size=3, alpha=0.3, beta=0.75, order="NHWC"),
             lambda x: [t.permute(0, 2, 3, 1) for t in ref(x.permute(0, 3, 1, 2))], device=device)


def test_lrn_gradient_op_follows_caffe2():
    net = core.Net("lrn")
    net.LRN("X", ["Y", "scale"], size=3, alpha=0.1, beta=0.75)
    net.AddGradientOperators({"Y": "dY"})
    g = net.Proto().op[-1]
    assert (g.type, list(g.input), list(g.output)) == (
        "LRNGradient", ["X", "Y", "scale", "dY"], ["X_grad"])


def layer_norm_reference(axis, eps, affine=False):
    def forward(x, *params):
        x2 = x.reshape(int(torch.tensor(x.shape[:axis]).prod()), -1)
        mean = x2.mean(1, keepdim=True)
        std = (x2.var(1, unbiased=False, keepdim=True) + eps).sqrt()
        y = ((x2 - mean) / std).reshape(x.shape)
        if affine:
            y = y * params[0].reshape(x.shape[axis:]) + params[1].reshape(x.shape[axis:])
        dims = tuple(x.shape[:axis]) + (1,)
        return y, mean.reshape(dims), std.reshape(dims)
    return forward


@pytest.mark.parametrize("shape, axis, eps", [((3, 5), 1, 1e-5), ((2, 3, 4), 2, 1e-3),
                                              ((2, 3, 4), 1, 1e-5), ((2, 2, 3), 0, 1e-5)])
def test_layer_norm(shape, axis, eps):
    check_op("LayerNorm", {"X": rand(*shape)}, ["Y", "mean", "std"], dict(axis=axis, epsilon=eps),
             layer_norm_reference(axis, eps))


def test_layer_norm_negative_axis_matches_torch():
    check_op("LayerNorm", {"X": rand(2, 3, 4)}, ["Y", "mean", "std"], dict(axis=-1),
             lambda x: F.layer_norm(x, (4,), eps=1e-5))


def test_layer_norm_elementwise_affine():
    inputs = {"X": rand(2, 3, 4), "gamma": rand(3, 4, seed=1), "beta": rand(12, seed=2)}
    check_op("LayerNorm", inputs, ["Y", "mean", "std"], dict(axis=1, elementwise_affine=1),
             layer_norm_reference(1, 1e-5, affine=True))


def test_layer_norm_affine_needs_gamma_and_beta():
    with pytest.raises(Exception, match="takes 3 input"):
        check_op("LayerNorm", {"X": rand(2, 3)}, ["Y", "m", "s"], dict(elementwise_affine=1),
                 lambda x: x, grad=False)


def group_norm_reference(group, eps, nhwc=False):
    def forward(x, gamma, beta):
        xc = x.permute(0, 3, 1, 2) if nhwc else x
        n, c = xc.shape[:2]
        x3 = xc.reshape(n, group, -1)
        mean, var = x3.mean(2), x3.var(2, unbiased=False)
        y = F.group_norm(xc, group, gamma, beta, eps)
        return (y.permute(0, 2, 3, 1) if nhwc else y), mean, (var + eps).rsqrt()
    return forward


@pytest.mark.parametrize("shape, group, nhwc", [
    ((2, 6, 3, 3), 3, False), ((1, 4, 5), 2, False), ((2, 3, 2, 4), 1, True),
    ((2, 4, 2, 2, 2), 4, False)])
def test_group_norm(shape, group, nhwc):
    c = shape[-1] if nhwc else shape[1]
    args = dict(group=group, epsilon=1e-4, order="NHWC" if nhwc else "NCHW")
    check_op("GroupNorm", {"X": rand(*shape), "gamma": rand(c, seed=1), "beta": rand(c, seed=2)},
             ["Y", "mean", "inv_std"], args, group_norm_reference(group, 1e-4, nhwc))


def test_group_norm_bad_group():
    with pytest.raises(Exception, match="do not split into 4 groups"):
        check_op("GroupNorm", {"X": rand(1, 6, 2, 2), "gamma": rand(6), "beta": rand(6)},
                 ["Y", "m", "s"], dict(group=4), lambda *t: None, grad=False)


def instance_norm_reference(eps, nhwc=False):
    def forward(x, scale, bias):
        xc = x.permute(0, 3, 1, 2) if nhwc else x
        x3 = xc.reshape(xc.shape[0], xc.shape[1], -1)
        y = F.instance_norm(xc, weight=scale, bias=bias, eps=eps)
        return (y.permute(0, 2, 3, 1) if nhwc else y), x3.mean(2), \
            (x3.var(2, unbiased=False) + eps).rsqrt()
    return forward


@pytest.mark.parametrize("shape, nhwc", [((2, 3, 4, 5), False), ((1, 2, 6), False),
                                         ((2, 3, 3, 4), True)])
def test_instance_norm(shape, nhwc):
    c = shape[-1] if nhwc else shape[1]
    check_op("InstanceNorm", {"X": rand(*shape), "scale": rand(c, seed=1), "bias": rand(c, seed=2)},
             ["Y", "mean", "inv_stdev"], dict(epsilon=1e-3, order="NHWC" if nhwc else "NCHW"),
             instance_norm_reference(1e-3, nhwc))


@pytest.mark.parametrize("learnable", [0, 1])
@pytest.mark.parametrize("nhwc", [False, True])
def test_affine_channel(learnable, nhwc):
    x = rand(2, 3, 4, 3)
    shape = (1, 1, 1, 3) if nhwc else (1, 3, 1, 1)
    inputs = {"X": x, "scale": rand(3, seed=1), "bias": rand(3, seed=2)}
    check_op("AffineChannel", inputs, ["Y"],
             dict(is_learnable=learnable, order="NHWC" if nhwc else "NCHW"),
             lambda x, s, b: x * s.reshape(shape) + b.reshape(shape),
             no_grad_inputs=() if learnable else ("scale", "bias"))


@pytest.mark.parametrize("op, inputs", [("LayerNorm", ["X"]), ("GroupNorm", ["X", "g", "b"])])
def test_norm_gradient_needs_the_moments(op, inputs):
    net = core.Net("norm")
    getattr(net, op)(inputs, ["Y"])
    with pytest.raises(ValueError, match="needs its moments"):
        net.AddGradientOperators({"Y": "dY"})
