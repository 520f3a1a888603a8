"""MaxPool on the CPU pools inputs of 8+ channels in channels-last layout (2-3x faster): the
values, the argmax positions and so MaxPoolGradient stay exactly PyTorch's NCHW results, with
ties, NaN, -inf, padding, ceil rounding, 3-D inputs and NHWC order."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from caffe2torch.python import core, workspace

pytestmark = pytest.mark.usefixtures("fresh_workspace")


def data(shape, kind, seed=0):
    """float32 test data: ``ties`` (values 0..2 and constant rows), ``nan``, ``neginf``, ``randn``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 3, shape, generator=g).float()
    x[:, :, :2] = 0.5  # whole windows of equal values
    if kind == "nan":
        x = torch.where(torch.rand(shape, generator=g) < 0.15, float("nan"), x)
    elif kind == "neginf":
        x = torch.where(torch.rand(shape, generator=g) < 0.6, float("-inf"), x)
    elif kind == "randn":
        x = torch.randn(shape, generator=g)
    return x


def run_pool(x, dy, **args):
    """Y and dX of MaxPool + MaxPoolGradient run as one net (the gradient reuses the indices)."""
    net = core.Net("pool")
    net.MaxPool("X", "Y", **args)
    net.MaxPoolGradient(["X", "Y", "dY"], "dX", **args)
    workspace.FeedBlob("X", x.numpy())
    workspace.FeedBlob("dY", dy.numpy())
    workspace.RunNetOnce(net)
    return workspace.FetchBlob("Y"), workspace.FetchBlob("dX")


def reference(x, dy, pool, **kwargs):
    """PyTorch's own NCHW max-pool and its autograd gradient."""
    xt = x.clone().requires_grad_(True)
    y = pool(xt, **kwargs)
    y.backward(dy)
    return y.detach().numpy(), xt.grad.numpy()


@pytest.mark.parametrize("channels", [3, 8, 20])
@pytest.mark.parametrize("kind", ["ties", "nan", "neginf", "randn"])
@pytest.mark.parametrize("pool_args, torch_args", [
    (dict(kernel=2, stride=2), dict(kernel_size=2, stride=2)),
    (dict(kernel=3, stride=2, pad=1), dict(kernel_size=3, stride=2, padding=1)),
    (dict(kernel=3, stride=1), dict(kernel_size=3, stride=1)),
    (dict(kernel_h=2, kernel_w=3, stride_h=1, stride_w=2), dict(kernel_size=(2, 3), stride=(1, 2))),
])
def test_max_pool_2d_matches_pytorch_exactly(channels, kind, pool_args, torch_args):
    x = data((3, channels, 9, 10), kind)
    dy = torch.randn(F.max_pool2d(x, **torch_args).shape,
                     generator=torch.Generator().manual_seed(1))
    y_ref, dx_ref = reference(x, dy, F.max_pool2d, **torch_args)
    y, dx = run_pool(x, dy, **pool_args)
    np.testing.assert_array_equal(y, y_ref)  # NaN == NaN for assert_array_equal
    np.testing.assert_array_equal(dx, dx_ref)


def test_max_pool_ceil_rounding_matches_caffe2_legacy_pad():
    """legacy_pad=3 (Caffe's ceil rounding) on 8+ channels: the extra window is pooled."""
    x = data((2, 16, 7, 7), "randn")
    dy = torch.randn(2, 16, 4, 4, generator=torch.Generator().manual_seed(2))
    y_ref, dx_ref = reference(x, dy, F.max_pool2d, kernel_size=2, stride=2, ceil_mode=True)
    y, dx = run_pool(x, dy, kernel=2, stride=2, legacy_pad=3)
    np.testing.assert_array_equal(y, y_ref)
    np.testing.assert_array_equal(dx, dx_ref)


@pytest.mark.parametrize("kind", ["ties", "nan"])
def test_max_pool_3d_matches_pytorch_exactly(kind):
    x = data((2, 12, 5, 6, 4), kind)
    dy = torch.randn(2, 12, 2, 3, 2, generator=torch.Generator().manual_seed(3))
    y_ref, dx_ref = reference(x, dy, F.max_pool3d, kernel_size=2, stride=2)
    y, dx = run_pool(x, dy, kernels=[2, 2, 2], strides=[2, 2, 2])
    np.testing.assert_array_equal(y, y_ref)
    np.testing.assert_array_equal(dx, dx_ref)


def test_max_pool_nhwc_order_matches_pytorch_exactly():
    x = data((2, 10, 8, 6), "ties")  # NCHW data, fed as NHWC
    dy = torch.randn(2, 10, 4, 3, generator=torch.Generator().manual_seed(4))
    y_ref, dx_ref = reference(x, dy, F.max_pool2d, kernel_size=2, stride=2)
    nhwc = (0, 2, 3, 1)
    y, dx = run_pool(x.permute(nhwc).contiguous(), dy.permute(nhwc).contiguous(), kernel=2,
                     stride=2, order="NHWC")
    np.testing.assert_array_equal(y, y_ref.transpose(nhwc))
    np.testing.assert_array_equal(dx, dx_ref.transpose(nhwc))
    assert y.flags.c_contiguous


def test_max_pool_output_is_a_contiguous_nchw_blob():
    """Y comes back NCHW and C-contiguous, as Caffe2's blob (what FetchBlob users index into)."""
    workspace.FeedBlob("X", data((2, 20, 24, 24), "randn").numpy())
    workspace.RunOperatorOnce(core.CreateOperator("MaxPool", ["X"], ["Y"], kernel=2, stride=2))
    y = workspace.FetchBlob("Y")
    assert y.shape == (2, 20, 12, 12) and y.flags.c_contiguous


def test_compiled_net_pools_exactly_as_eager():
    """A compiled net (the pool is one opaque op in its graph) gives the eager net's bits."""
    x = data((4, 16, 12, 12), "ties")
    dy = torch.randn(4, 16, 6, 6, generator=torch.Generator().manual_seed(5))
    results = []
    for net_type in ("simple", "compiled"):
        workspace.ResetWorkspace()
        net = core.Net(f"pool_{net_type}")
        net.Proto().type = net_type
        net.MaxPool("X", "Y", kernel=2, stride=2)
        net.MaxPoolGradient(["X", "Y", "dY"], "dX", kernel=2, stride=2)
        workspace.FeedBlob("X", x.numpy())
        workspace.FeedBlob("dY", dy.numpy())
        workspace.CreateNet(net)
        for _ in range(3):  # the first run is eager, then it compiles; runs 2 and 3 are compiled
            workspace.RunNet(net.Name())
        results.append((workspace.FetchBlob("Y"), workspace.FetchBlob("dX")))
    compiled = workspace.C().nets["pool_compiled"].compiled
    assert compiled.regions == [["MaxPool", "MaxPoolGradient"]]
    assert [len(p.variants) for p in compiled.parts] == [1]  # traced and compiled once
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b)


def test_max_pool_keeps_integer_and_small_channel_inputs_on_the_nchw_kernel():
    """Integer inputs (no channels-last path there) pool as before."""
    x = torch.randint(-5, 5, (2, 9, 6, 6), dtype=torch.int32)
    workspace.FeedBlob("X", x.numpy())
    workspace.RunOperatorOnce(core.CreateOperator("MaxPool", ["X"], ["Y"], kernel=2, stride=2))
    expected = x.view(2, 9, 3, 2, 3, 2).amax(dim=(3, 5))
    np.testing.assert_array_equal(workspace.FetchBlob("Y"), expected.numpy())
