"""ConvTranspose and the Conv1D/2D/3D aliases vs PyTorch."""
import pytest
import torch.nn.functional as F

from caffe2torch.python import core

from .helpers import DEVICES, check_op, rand


pytestmark = pytest.mark.usefixtures("fresh_workspace")


def transpose_reference(stride, pads, adj=(0, 0), group=1, nhwc=False):
    """F.conv_transpose2d without padding, then Caffe2's (top, left, bottom, right) pads cut off."""
    top, left, bottom, right = pads

    def forward(x, w, b=None):
        if nhwc:
            x, w = x.permute(0, 3, 1, 2), w.permute(0, 3, 1, 2)
        y = F.conv_transpose2d(x, w, b, stride, 0, adj, group)
        y = y[:, :, top:y.shape[2] - bottom, left:y.shape[3] - right]
        return y.permute(0, 2, 3, 1) if nhwc else y
    return forward


CASES = {
    "kernel3": ((2, 3, 4, 5), (3, 2, 3, 3), dict(kernel=3), transpose_reference(1, (0, 0, 0, 0))),
    "stride2_pad1": ((1, 2, 3, 3), (2, 4, 3, 3), dict(kernel=3, stride=2, pad=1),
                     transpose_reference(2, (1, 1, 1, 1))),
    "adj": ((1, 2, 3, 4), (2, 3, 4, 4), dict(kernel=4, stride=3, adj=2, pad=1),
            transpose_reference(3, (1, 1, 1, 1), (2, 2))),
    "asymmetric": ((2, 2, 4, 3), (2, 3, 3, 2), dict(kernel_h=3, kernel_w=2, stride_h=2, stride_w=1,
                                                    pad_t=1, pad_l=0, pad_b=0, pad_r=1),
                   transpose_reference((2, 1), (1, 0, 0, 1))),
    "group2": ((1, 4, 3, 3), (4, 3, 2, 2), dict(kernel=2, stride=2, group=2),
               transpose_reference(2, (0, 0, 0, 0), group=2)),
    "nhwc": ((2, 3, 4, 2), (2, 3, 3, 3), dict(kernel=3, stride=2, pad=1, order="NHWC"),
             transpose_reference(2, (1, 1, 1, 1), nhwc=True)),
}


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("case", list(CASES))
def test_conv_transpose(case, bias):
    x_shape, w_shape, args, reference = CASES[case]
    inputs = {"X": rand(*x_shape), "W": rand(*w_shape, seed=1)}
    if bias:
        c_out = w_shape[-1] if args.get("order") == "NHWC" else w_shape[1] * args.get("group", 1)
        inputs["b"] = rand(c_out, seed=2)
    check_op("ConvTranspose", inputs, ["Y"], args, reference)


@pytest.mark.parametrize("device", DEVICES)
def test_conv_transpose_1d_3d(device):
    check_op("ConvTranspose", {"X": rand(2, 3, 5), "W": rand(3, 2, 3, seed=1)}, ["Y"],
             dict(kernels=[3], strides=[2], pads=[1, 0]),
             lambda x, w: F.conv_transpose1d(x, w, None, 2)[:, :, 1:], device=device)
    check_op("ConvTranspose", {"X": rand(1, 2, 2, 3, 2), "W": rand(2, 2, 2, 2, 2, seed=1),
                               "b": rand(2, seed=3)}, ["Y"], dict(kernel=2, stride=2),
             lambda x, w, b: F.conv_transpose3d(x, w, b, 2), device=device)


def test_conv_transpose_gradient_op_follows_caffe2():
    net = core.Net("ct")
    net.ConvTranspose(["X", "W", "b"], "Y", kernel=2)
    net.AddGradientOperators({"Y": "dY"})
    g = net.Proto().op[-1]
    assert (g.type, list(g.input), list(g.output)) == (
        "ConvTransposeGradient", ["X", "W", "dY"], ["W_grad", "b_grad", "X_grad"])


def test_conv_transpose_bad_adj():
    with pytest.raises(Exception, match="adj"):
        check_op("ConvTranspose", {"X": rand(1, 1, 2, 2), "W": rand(1, 1, 2, 2)}, ["Y"],
                 dict(kernel=2, stride=1, adj=1), lambda x, w: None, grad=False)


@pytest.mark.parametrize("name, x_shape, w_shape, fn", [
    ("Conv1D", (2, 3, 7), (4, 3, 3), F.conv1d),
    ("Conv2D", (1, 2, 5, 6), (3, 2, 3, 3), F.conv2d),
    ("Conv3D", (1, 2, 4, 4, 3), (2, 2, 2, 2, 2), F.conv3d),
])
def test_conv_aliases(name, x_shape, w_shape, fn):
    kernel = dict(kernels=list(w_shape[2:]))
    inputs = {"X": rand(*x_shape), "W": rand(*w_shape, seed=1), "b": rand(w_shape[0], seed=2)}
    check_op(name, inputs, ["Y"], dict(kernel, pad=1), lambda x, w, b: fn(x, w, b, 1, 1))
    net = core.Net("alias")
    getattr(net, name)(["X", "W"], "Y", **kernel)
    net.AddGradientOperators({"Y": "dY"})
    assert net.Proto().op[-1].type == name + "Gradient"


def test_conv_alias_checks_rank():
    with pytest.raises(Exception, match="Conv1D needs an input of 1 spatial"):
        check_op("Conv1D", {"X": rand(1, 1, 3, 3), "W": rand(1, 1, 1, 1)}, ["Y"], {},
                 lambda x, w: None, grad=False)
