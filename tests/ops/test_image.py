"""Image ops (PadImage, ChannelShuffle, UpsampleNearest, ResizeNearest) vs PyTorch."""
import numpy as np
import pytest
import torch.nn.functional as F

from .helpers import DEVICES, check_op, rand

pytestmark = pytest.mark.usefixtures("fresh_workspace")


@pytest.mark.parametrize("args, pads, mode", [
    (dict(pad=1), [1, 1, 1, 1], "constant"),
    (dict(pad_t=1, pad_l=2, pad_b=0, pad_r=1, value=0.5), [2, 1, 1, 0], "constant"),
    (dict(pads=[1, 2, 2, 1], mode="reflect"), [2, 1, 1, 2], "reflect"),
    (dict(pad=2, mode="edge"), [2, 2, 2, 2], "replicate"),
])
@pytest.mark.parametrize("order", ["NCHW", "NHWC"])
def test_pad_image(args, pads, mode, order):
    value = args.get("value", 0.0)

    def reference(x):
        x = x.permute(0, 3, 1, 2) if order == "NHWC" else x
        y = F.pad(x, pads, mode=mode, value=value) if mode == "constant" else F.pad(x, pads, mode=mode)
        return y.permute(0, 2, 3, 1) if order == "NHWC" else y
    shape = (2, 4, 5, 3) if order == "NHWC" else (2, 3, 4, 5)
    check_op("PadImage", {"X": rand(*shape)}, ["Y"], dict(args, order=order), reference)


@pytest.mark.parametrize("shape, group, order", [((2, 6, 3, 2), 2, "NCHW"), ((2, 6, 3, 2), 3, "NCHW"),
                                                 ((2, 3, 2, 6), 3, "NHWC"), ((1, 4, 5), 4, "NCHW")])
def test_channel_shuffle(shape, group, order):
    def reference(x):
        axis = x.dim() - 1 if order == "NHWC" else 1
        c = x.shape[axis]
        split = x.shape[:axis] + (group, c // group) + x.shape[axis + 1:]
        return x.reshape(split).transpose(axis, axis + 1).reshape(x.shape)
    check_op("ChannelShuffle", {"X": rand(*shape)}, ["Y"], dict(group=group, order=order), reference)


@pytest.mark.parametrize("scale", [1, 2, 3])
@pytest.mark.parametrize("device", DEVICES)
def test_upsample_nearest(scale, device):
    check_op("UpsampleNearest", {"X": rand(2, 3, 4, 5)}, ["Y"], dict(scale=scale),
             lambda x: F.interpolate(x, scale_factor=scale, mode="nearest"), device=device)


@pytest.mark.parametrize("hs, ws", [(2.0, 2.0), (0.5, 1.0), (1.5, 3.0), (2.0, 0.75)])
@pytest.mark.parametrize("order", ["NCHW", "NHWC"])
def test_resize_nearest(hs, ws, order):
    def reference(x):
        x = x.permute(0, 3, 1, 2) if order == "NHWC" else x
        h, w = x.shape[2:]
        rows = [min(int(np.float32(y) / np.float32(hs)), h - 1) for y in range(int(h * hs))]
        cols = [min(int(np.float32(c) / np.float32(ws)), w - 1) for c in range(int(w * ws))]
        y = x[:, :, rows][:, :, :, cols]
        return y.permute(0, 2, 3, 1) if order == "NHWC" else y
    shape = (2, 4, 6, 3) if order == "NHWC" else (2, 3, 4, 6)
    check_op("ResizeNearest", {"X": rand(*shape)}, ["Y"],
             dict(height_scale=hs, width_scale=ws, order=order), reference)
    check_op("ResizeNearest", {"X": rand(*shape), "scales": np.array([hs, ws], np.float32)},
             ["Y"], dict(order=order), lambda x, s: reference(x), no_grad_inputs=("scales",))
