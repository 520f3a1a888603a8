"""nn ops (Conv, pooling, FC, activations, Softmax, Dropout, SpatialBN, Concat/Split) vs PyTorch."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from caffe2torch.proto import caffe2_pb2
from caffe2torch.python import core, workspace

from .helpers import DEVICES, check_op, rand


pytestmark = pytest.mark.usefixtures("fresh_workspace")


# --- Conv ---------------------------------------------------------------------------------------

def conv_reference(pads=(0, 0, 0, 0), stride=1, dilation=1, group=1, nhwc=False):
    """Caffe2's Conv written directly with F.pad + F.conv2d; pads are (top, left, bottom, right)."""
    top, left, bottom, right = pads

    def forward(x, w, b=None):
        if nhwc:
            x, w = x.permute(0, 3, 1, 2), w.permute(0, 3, 1, 2)
        y = F.conv2d(F.pad(x, (left, right, top, bottom)), w, b, stride, 0, dilation, group)
        return y.permute(0, 2, 3, 1) if nhwc else y

    return forward


CONV_CASES = {
    "kernel3": ((2, 3, 7, 6), (4, 3, 3, 3), dict(kernel=3), conv_reference()),
    "stride2_pad1": ((2, 3, 7, 6), (4, 3, 3, 3), dict(kernel=3, stride=2, pad=1),
                     conv_reference((1, 1, 1, 1), stride=2)),
    "hw_args": ((1, 2, 8, 7), (3, 2, 3, 2), dict(kernel_h=3, kernel_w=2, stride_h=2, stride_w=1),
                conv_reference(stride=(2, 1))),
    "asymmetric_pads": ((2, 3, 6, 6), (4, 3, 3, 2),
                        dict(kernel_h=3, kernel_w=2, pad_t=1, pad_l=0, pad_b=2, pad_r=1),
                        conv_reference((1, 0, 2, 1))),
    "pads_list": ((2, 3, 6, 5), (2, 3, 3, 3), dict(kernels=[3, 3], strides=[2, 1], pads=[1, 2, 0, 1]),
                  conv_reference((1, 2, 0, 1), stride=(2, 1))),
    "dilation2": ((1, 2, 9, 9), (3, 2, 3, 3), dict(kernel=3, dilation=2, pad=2),
                  conv_reference((2, 2, 2, 2), dilation=2)),
    "group2": ((2, 4, 6, 6), (6, 2, 3, 3), dict(kernel=3, group=2, pad=1),
               conv_reference((1, 1, 1, 1), group=2)),
    "nhwc": ((2, 6, 5, 3), (4, 3, 3, 3), dict(kernel=3, order="NHWC", pad=1),
             conv_reference((1, 1, 1, 1), nhwc=True)),
    "nhwc_group_stride": ((2, 7, 7, 4), (6, 2, 2, 2), dict(kernel=2, order="NHWC", group=2, stride=2),
                          conv_reference(stride=2, group=2, nhwc=True)),
    "kernel_from_w": ((1, 2, 5, 5), (3, 2, 3, 3), dict(), conv_reference()),
    "legacy_same": ((1, 2, 8, 7), (3, 2, 3, 3), dict(kernel=3, stride=2, legacy_pad=2),
                    conv_reference((0, 1, 1, 1), stride=2)),
    "cudnn_args_ignored": ((1, 1, 6, 6), (2, 1, 5, 5),
                           dict(kernel=5, engine="CUDNN", exhaustive_search=0, use_cudnn=1,
                                cudnn_exhaustive_search=0, ws_nbytes_limit=1 << 20),
                           conv_reference()),
}


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("case", list(CONV_CASES))
def test_conv(case, bias):
    x_shape, w_shape, args, reference = CONV_CASES[case]
    inputs = {"X": rand(*x_shape), "W": rand(*w_shape, seed=1)}
    if bias:
        inputs["b"] = rand(w_shape[0], seed=2)
    check_op("Conv", inputs, ["Y"], args, reference)


@pytest.mark.parametrize("device", DEVICES)
def test_conv_on_device(device):
    inputs = {"X": rand(2, 3, 7, 6), "W": rand(4, 3, 3, 3, seed=1), "b": rand(4, seed=2)}
    check_op("Conv", inputs, ["Y"], dict(kernel=3, pad=1), conv_reference((1, 1, 1, 1)),
             device=device)


def test_conv_1d_and_3d():
    check_op("Conv", {"X": rand(2, 3, 9), "W": rand(4, 3, 3, seed=1), "b": rand(4, seed=2)},
             ["Y"], dict(kernels=[3], strides=[2], pads=[1, 0]),
             lambda x, w, b: F.conv1d(F.pad(x, (1, 0)), w, b, 2))
    check_op("Conv", {"X": rand(1, 2, 4, 5, 4), "W": rand(3, 2, 2, 2, 2, seed=1)}, ["Y"],
             dict(kernels=[2, 2, 2], pad=1), lambda x, w: F.conv3d(x, w, None, 1, 1))


def test_conv_gradient_outputs_follow_caffe2():
    """ConvGradient(X, W, dY) -> (W_grad, b_grad, X_grad); no X_grad with no_gradient_to_input."""
    net = core.Net("conv_grads")
    net.Conv(["data", "w", "b"], "y", kernel=3)
    net.Conv(["y", "w2", "b2"], "z", kernel=1)
    net.Conv(["z", "w3"], "out", kernel=1)
    net.AddGradientOperators({"out": "out_grad"})
    grads = [op for op in net.Proto().op if op.type == "ConvGradient"]
    assert [list(g.input) for g in grads] == [
        ["z", "w3", "out_grad"], ["y", "w2", "z_grad"], ["data", "w", "y_grad"]]
    assert [list(g.output) for g in grads] == [
        ["w3_grad", "z_grad"], ["w2_grad", "b2_grad", "y_grad"], ["w_grad", "b_grad", "data_grad"]]
    assert {a.name: a.i for a in grads[0].arg} == {"kernel": 1, "no_bias": 1}
    assert {a.name: a.i for a in grads[2].arg} == {"kernel": 3}

    net = core.Net("conv_grads_no_dx")
    net.Conv(["data", "w", "b"], "y", kernel=3, no_gradient_to_input=1)
    net.AddGradientOperators({"y": "y_grad"})
    assert list(net.Proto().op[-1].output) == ["w_grad", "b_grad"]


@pytest.mark.parametrize("channels", [2, 5])  # dX from PyTorch's native kernel / the fused call
@pytest.mark.parametrize("nhwc", [False, True])
def test_conv_input_gradient_read_by_a_later_op(channels, nhwc):
    """When an op reads X_grad it is computed at once (not deferred), with the same values."""
    x = rand(2, 6, 7, channels) if nhwc else rand(2, channels, 6, 7)
    w = rand(4, 3, 2, channels, seed=1) if nhwc else rand(4, channels, 3, 2, seed=1)
    args = dict(kernel_h=3, kernel_w=2, pad_t=1, pad_l=0, pad_b=2, pad_r=1, stride=2,
                order="NHWC" if nhwc else "NCHW")
    net = core.Net("conv_dx_read")
    net.Conv(["X", "W", "b"], "Y", **args)
    net.AddGradientOperators({"Y": "dY"})
    net.Scale("X_grad", "X_grad_read", scale=1.0)
    reference = conv_reference((1, 0, 2, 1), stride=2, nhwc=nhwc)
    xt, wt, bt = (torch.tensor(v, requires_grad=True) for v in (x, w, rand(4, seed=2)))
    y = reference(xt, wt, bt)
    dy = rand(*y.shape, seed=3)
    (y * torch.tensor(dy)).sum().backward()
    for name, value in {"X": x, "W": w, "b": bt.detach().numpy(), "dY": dy}.items():
        workspace.FeedBlob(name, value)
    workspace.RunNetOnce(net)
    np.testing.assert_allclose(workspace.FetchBlob("X_grad_read"), xt.grad.numpy(), rtol=1e-10)
    np.testing.assert_allclose(workspace.FetchBlob("W_grad"), wt.grad.numpy(), rtol=1e-10)


def test_conv_no_gradient_to_input():
    check_op("Conv", {"X": rand(1, 2, 5, 5), "W": rand(3, 2, 3, 3, seed=1), "b": rand(3, seed=2)},
             ["Y"], dict(kernel=3, no_gradient_to_input=1), conv_reference(),
             no_grad_inputs=("X",))


def test_conv_bad_kernel_is_a_clear_error():
    workspace.FeedBlob("X", rand(1, 1, 3, 3))
    workspace.FeedBlob("W", rand(1, 1, 5, 5))
    with pytest.raises(RuntimeError, match="does not fit"):
        workspace.RunOperatorOnce(core.CreateOperator("Conv", ["X", "W"], ["Y"], kernel=5))


# --- Pooling ------------------------------------------------------------------------------------

def caffe2_pool(mode, kernel, stride, pad_head, out, nhwc=False):
    """Caffe2's CPU pooling by definition: each window clipped to the input, then max or mean."""

    def forward(x):
        if nhwc:
            x = x.permute(0, 3, 1, 2)
        h, w = x.shape[2:]
        rows = []
        for i in range(out[0]):
            cols = []
            for j in range(out[1]):
                h0, w0 = i * stride[0] - pad_head[0], j * stride[1] - pad_head[1]
                win = x[:, :, max(h0, 0):min(h0 + kernel[0], h), max(w0, 0):min(w0 + kernel[1], w)]
                cols.append(win.amax((2, 3)) if mode == "max" else win.mean((2, 3)))
            rows.append(torch.stack(cols, -1))
        y = torch.stack(rows, -2)
        return y.permute(0, 2, 3, 1) if nhwc else y

    return forward


# (input H, W), args, kernel, stride, pad head, expected output size
POOL_CASES = {
    "k2s2": ((8, 6), dict(kernel=2, stride=2), (2, 2), (2, 2), (0, 0), (4, 3)),
    "k3s2p1": ((7, 7), dict(kernel=3, stride=2, pad=1), (3, 3), (2, 2), (1, 1), (4, 4)),
    "hw_args": ((7, 6), dict(kernel_h=3, kernel_w=2, stride_h=2, stride_w=1),
                (3, 2), (2, 1), (0, 0), (3, 5)),
    # Caffe's ceil-mode sizes (SqueezeNet): 14 -> ceil(11/2)+1 = 7 windows, the last one clipped.
    "legacy_caffe": ((14, 13), dict(kernel=3, stride=2, legacy_pad=3), (3, 3), (2, 2), (0, 0),
                     (7, 6)),
    "legacy_caffe_pad1": ((14, 14), dict(kernel=3, stride=2, pad=1, legacy_pad=3), (3, 3), (2, 2),
                          (1, 1), (8, 8)),
    # SAME with an odd padding need: 0 before, 1 after (applied by hand, not by PyTorch).
    "legacy_same": ((8, 8), dict(kernel=3, stride=2, legacy_pad=2), (3, 3), (2, 2), (0, 0), (4, 4)),
    "asymmetric": ((6, 7), dict(kernel=3, pad_t=2, pad_l=0, pad_b=0, pad_r=1), (3, 3), (1, 1),
                   (2, 0), (6, 6)),
    "pad_bigger_than_half_kernel": ((5, 5), dict(kernel=3, stride=1, pad=2), (3, 3), (1, 1), (2, 2),
                                    (7, 7)),
    "global": ((5, 4), dict(global_pooling=1, kernel=0, legacy_pad=3), (5, 4), (1, 1), (0, 0),
               (1, 1)),
}


@pytest.mark.parametrize("nhwc", [False, True])
@pytest.mark.parametrize("mode", ["max", "average"])
@pytest.mark.parametrize("case", list(POOL_CASES))
def test_pool(case, mode, nhwc):
    (h, w), args, kernel, stride, head, out = POOL_CASES[case]
    shape = (2, h, w, 3) if nhwc else (2, 3, h, w)
    args = dict(args, order="NHWC") if nhwc else args
    op_type = "MaxPool" if mode == "max" else "AveragePool"
    check_op(op_type, {"X": rand(*shape)}, ["Y"], args,
             caffe2_pool(mode, kernel, stride, head, out, nhwc))


def test_average_pool_count_include_pad():
    check_op("AveragePool", {"X": rand(2, 3, 7, 7)}, ["Y"],
             dict(kernel=3, stride=2, pad=1, count_include_pad=1),
             lambda x: F.avg_pool2d(x, 3, 2, 1, count_include_pad=True))


@pytest.mark.parametrize("op_type, reference", [
    ("MaxPool", lambda x: F.max_pool3d(x, 2, 2)), ("AveragePool", lambda x: F.avg_pool3d(x, 2, 2))])
def test_pool_3d(op_type, reference):
    check_op(op_type, {"X": rand(1, 2, 4, 6, 4)}, ["Y"], dict(kernels=[2, 2, 2], strides=[2, 2, 2]),
             reference)


@pytest.mark.parametrize("device", DEVICES)
def test_max_pool_on_device(device):
    check_op("MaxPool", {"X": rand(2, 3, 8, 8)}, ["Y"], dict(kernel=2, stride=2),
             lambda x: F.max_pool2d(x, 2, 2), device=device)


def test_max_pool_gradient_without_saved_indices():
    """MaxPoolGradient recomputes the argmax when Y did not come from this X (e.g. fed blobs)."""
    x = rand(2, 3, 6, 6)
    workspace.FeedBlob("X", x)
    workspace.RunOperatorOnce(core.CreateOperator("MaxPool", ["X"], ["Y"], kernel=2, stride=2))
    workspace.FeedBlob("Y", workspace.FetchBlob("Y"))
    dy = rand(2, 3, 3, 3, seed=3)
    workspace.FeedBlob("dY", dy)
    workspace.RunOperatorOnce(core.CreateOperator("MaxPoolGradient", ["X", "Y", "dY"], ["dX"],
                                                  kernel=2, stride=2))
    xt = torch.tensor(x, requires_grad=True)
    (F.max_pool2d(xt, 2, 2) * torch.tensor(dy)).sum().backward()
    np.testing.assert_allclose(workspace.FetchBlob("dX"), xt.grad.numpy())


# --- FC -----------------------------------------------------------------------------------------

def fc_reference(axis=1, axis_w=1):
    def forward(x, w, b=None):
        m, n = math.prod(x.shape[:axis]), math.prod(w.shape[:axis_w])
        y = x.reshape(m, -1) @ w.reshape(n, -1).t()
        y = y + b if b is not None else y
        return y.reshape(tuple(x.shape[:axis]) + (n,))
    return forward


@pytest.mark.parametrize("x_shape, w_shape, args", [
    ((4, 5), (3, 5), {}),
    ((2, 3, 4, 5), (6, 60), {}),  # NCHW flattened to K = 3*4*5 (LeNet's fc3)
    ((2, 3, 4, 5), (6, 20), dict(axis=2)),
    ((4, 20), (2, 3, 20), dict(axis_w=2)),
    ((4, 5), (3, 5), dict(use_cudnn=1, cudnn_exhaustive_search=0, order="NCHW")),
])
def test_fc(x_shape, w_shape, args):
    n = math.prod(w_shape[:args.get("axis_w", 1)])
    inputs = {"X": rand(*x_shape), "W": rand(*w_shape, seed=1), "b": rand(n, seed=2)}
    check_op("FC", inputs, ["Y"], args,
             fc_reference(args.get("axis", 1), args.get("axis_w", 1)))


def test_fc_without_bias():
    check_op("FC", {"X": rand(4, 5), "W": rand(3, 5, seed=1)}, ["Y"], {}, fc_reference())


def test_fc_shape_mismatch_is_a_clear_error():
    workspace.FeedBlob("X", rand(4, 5))
    workspace.FeedBlob("W", rand(3, 6))
    workspace.FeedBlob("b", rand(3))
    with pytest.raises(RuntimeError, match="K=5 but W"):
        workspace.RunOperatorOnce(core.CreateOperator("FC", ["X", "W", "b"], ["Y"]))


# --- Activations and Softmax --------------------------------------------------------------------

@pytest.mark.parametrize("op_type, reference", [
    ("Relu", torch.relu), ("Sigmoid", torch.sigmoid), ("Tanh", torch.tanh)])
@pytest.mark.parametrize("shape", [(5,), (3, 4), (2, 3, 4, 5)])
def test_activation(op_type, reference, shape):
    check_op(op_type, {"X": rand(*shape, low=-2, high=2)}, ["Y"], {}, reference)


def test_activation_in_place():
    check_op("Relu", {"X": rand(3, 4)}, ["X"], {}, torch.relu)
    check_op("Sigmoid", {"X": rand(3, 4)}, ["X"], {}, torch.sigmoid)


@pytest.mark.parametrize("shape, axis", [((4, 10), 1), ((2, 3, 4, 5), 1), ((2, 3, 4, 5), 2),
                                         ((2, 3, 4), -1), ((6,), 0)])
def test_softmax(shape, axis):
    def reference(x):
        a = axis % x.dim()
        return torch.softmax(x.reshape(math.prod(x.shape[:a]), -1), 1).reshape(x.shape)
    check_op("Softmax", {"X": rand(*shape, low=-3, high=3)}, ["Y"], dict(axis=axis), reference)


def test_softmax_default_axis_engine_cudnn():
    check_op("Softmax", {"X": rand(4, 10)}, ["Y"], dict(engine="CUDNN", order="NCHW"),
             lambda x: torch.softmax(x, 1))


# --- Dropout ------------------------------------------------------------------------------------

def test_dropout_is_test_is_identity():
    check_op("Dropout", {"X": rand(3, 4)}, ["Y", "mask"], dict(ratio=0.5, is_test=1), lambda x: x)


@pytest.mark.parametrize("seeded", [False, True])
def test_dropout_training(seeded):
    x = rand(200, 100, low=0.5, high=1.5)
    option = core.DeviceOption(caffe2_pb2.CPU, 0, random_seed=7) if seeded else None
    net = core.Net("dropout")
    net.Proto().op.extend([core.CreateOperator("Dropout", ["X"], ["Y", "mask"], ratio=0.25,
                                               device_option=option)])
    net.AddGradientOperators({"Y": "dY"})
    assert [op.type for op in net.Proto().op] == ["Dropout", "DropoutGradient"]
    dy = rand(200, 100, seed=4)
    workspace.FeedBlob("X", x)
    workspace.FeedBlob("dY", dy)
    workspace.RunNetOnce(net)
    y, mask, dx = (workspace.FetchBlob(n) for n in ("Y", "mask", "X_grad"))
    assert mask.dtype == np.bool_
    assert abs(mask.mean() - 0.75) < 0.02  # kept with probability 1 - ratio
    np.testing.assert_allclose(y, x * mask / 0.75, rtol=1e-12)
    np.testing.assert_allclose(dx, dy * mask / 0.75, rtol=1e-12)
    workspace.RunNetOnce(net)
    same = np.array_equal(workspace.FetchBlob("mask"), mask)
    assert same == seeded  # a seeded DeviceOption repeats the same mask per CreateNet


# --- SpatialBN ----------------------------------------------------------------------------------

def bn_inputs(c=3):
    return {"X": rand(4, c, 3, 5), "scale": rand(c, seed=1, low=0.5, high=1.5),
            "bias": rand(c, seed=2), "mean": rand(c, seed=3), "var": rand(c, seed=4, low=0.5, high=2)}


def test_spatial_bn_inference():
    check_op("SpatialBN", bn_inputs(), ["Y"], dict(is_test=1, epsilon=1e-3),
             lambda x, s, b, m, v: F.batch_norm(x, m.detach(), v.detach(), s, b, False, 0.0, 1e-3),
             grad=False)


def test_spatial_bn_inference_nhwc():
    inputs = bn_inputs()
    inputs["X"] = rand(4, 3, 5, 3)
    check_op("SpatialBN", inputs, ["Y"], dict(is_test=1, order="NHWC"),
             lambda x, s, b, m, v: F.batch_norm(x.permute(0, 3, 1, 2), m.detach(), v.detach(), s,
                                                b, False, 0.0, 1e-5).permute(0, 2, 3, 1),
             grad=False)


def test_spatial_bn_training():
    def reference(x, s, b, m, v):
        mean = x.mean((0, 2, 3))
        var = x.var((0, 2, 3), unbiased=False)
        y = F.batch_norm(x, None, None, s, b, True, 0.0, 1e-5)
        return y, m * 0.9 + mean * 0.1, v * 0.9 + var * 0.1, mean, (var + 1e-5).rsqrt()
    check_op("SpatialBN", bn_inputs(), ["Y", "mean", "var", "saved_mean", "saved_inv_var"],
             dict(is_test=0, momentum=0.9), reference, no_grad_inputs=("mean", "var"))


# --- Concat / Split -----------------------------------------------------------------------------

@pytest.mark.parametrize("args, shapes, axis", [
    ({}, [(2, 3, 4), (2, 5, 4)], 1),
    (dict(axis=2), [(2, 3, 1), (2, 3, 4), (2, 3, 2)], 2),
    (dict(order="NHWC"), [(2, 3, 4, 1), (2, 3, 4, 2)], 3),
])
def test_concat(args, shapes, axis):
    inputs = {f"X{i}": rand(*s, seed=i) for i, s in enumerate(shapes)}
    sizes = np.array([s[axis] for s in shapes], dtype=np.int32)
    check_op("Concat", inputs, ["Y", "split_info"], args,
             lambda *xs: (torch.cat(xs, axis), sizes))


def test_concat_add_axis():
    inputs = {"A": rand(2, 3), "B": rand(2, 3, seed=1)}
    check_op("Concat", inputs, ["Y", "split_info"], dict(axis=1, add_axis=1),
             lambda a, b: (torch.stack([a, b], 1), np.array([1, 1], dtype=np.int32)))


@pytest.mark.parametrize("args, sizes", [({}, [2, 2, 2]), (dict(split=[1, 2, 3]), [1, 2, 3])])
def test_split(args, sizes):
    check_op("Split", {"X": rand(2, 6, 3)}, ["A", "B", "C"], dict(args, axis=1),
             lambda x: torch.split(x, sizes, 1), grad_outputs=["A", "B", "C"])
