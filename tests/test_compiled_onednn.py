"""A compiled CPU net keeps its convolutions and max-pools in oneDNN's blocked layout: the same
bits as the "simple" net (losses, parameters, every intermediate blob), a check that falls back to
NCHW when the layout would differ, and the NetDef switch that turns it off."""
import gc
import logging
import weakref

import numpy as np
import pytest
import torch
from caffe2torch.python import core, onednn, workspace

pytestmark = pytest.mark.skipif(not onednn.available(), reason="this torch has no oneDNN")

PARAMS = ["c1_w", "c1_b", "c2_w", "c2_b", "fc_w", "fc_b"]
CHAIN = ["Conv", "MaxPool", "Conv", "MaxPool",
         "MaxPoolGradient", "ConvGradient", "MaxPoolGradient", "ConvGradient"]


def _forward(name):
    """LeNet's convolutions, pools and FC ("data" -> "pred")."""
    net = core.Net(name)
    net.Conv(["data", "c1_w", "c1_b"], "conv1", kernel=5)
    net.MaxPool("conv1", "pool1", kernel=2, stride=2)
    net.Conv(["pool1", "c2_w", "c2_b"], "conv2", kernel=3)
    net.MaxPool("conv2", "pool2", kernel=2, stride=2)
    net.FC(["pool2", "fc_w", "fc_b"], "pred")
    return net


def _lenet(name, net_type, onednn_layout=None):
    """LeNet in small: 10 and 20 channels (not multiples of oneDNN's 16-channel blocks)."""
    net = _forward(name)
    net.Softmax("pred", "softmax")
    net.LabelCrossEntropy(["softmax", "label"], "xent")
    net.AveragedLoss("xent", "loss")
    net.AddGradientOperators(["loss"])
    for param in PARAMS:
        net.WeightedSum([param, "ONE", param + "_grad", "LR"], param)
    net.Proto().type = net_type
    if onednn_layout is not None:
        net.Proto().arg.add(name="compile_onednn_layout", i=onednn_layout)
    return net


def _batch(rng, n):
    """Images whose left half is zero: conv1 is its bias there, so the pools see ties."""
    data = rng.random((n, 1, 16, 16), dtype=np.float32)
    data[:, :, :, :8] = 0
    return data, rng.integers(0, 10, n).astype(np.int32)


def _feed_params():
    rng = np.random.default_rng(3)
    shapes = {"c1_w": (10, 1, 5, 5), "c1_b": (10,), "c2_w": (20, 10, 3, 3), "c2_b": (20,),
              "fc_w": (10, 80), "fc_b": (10,)}
    for name, shape in shapes.items():
        workspace.FeedBlob(name, (0.2 * rng.standard_normal(shape)).astype(np.float32))
    workspace.FeedBlob("ONE", np.ones(1, np.float32))
    workspace.FeedBlob("LR", np.full(1, -0.1, np.float32))


BLOBS = ["loss", "conv1", "pool1", "conv2", "pool2", "conv1_grad", "pool1_grad", "conv2_grad",
         "pool2_grad", "data_grad"] + PARAMS


def _train(net_type, batches, **kw):
    """Run the net on each batch in workspace ``net_type``; per run, the fetched BLOBS."""
    workspace.SwitchWorkspace(f"onednn_{net_type}", create_if_missing=True)
    workspace.ResetWorkspace()
    _feed_params()
    net = _lenet(f"lenet_{net_type}", net_type, **kw)
    data, label = batches[0]
    workspace.FeedBlob("data", data)
    workspace.FeedBlob("label", label)
    workspace.CreateNet(net)
    runs = []
    for data, label in batches:
        workspace.FeedBlob("data", data)
        workspace.FeedBlob("label", label)
        workspace.RunNet(net.Name())
        runs.append({b: workspace.FetchBlob(b) for b in BLOBS})
    compiled = workspace.C().nets[net.Name()].compiled
    workspace.SwitchWorkspace("default")
    return runs, compiled


def _assert_same(got, want):
    for k, (g, w) in enumerate(zip(got, want)):
        for blob in BLOBS:
            np.testing.assert_array_equal(g[blob], w[blob], err_msg=f"run {k}: {blob}")


@pytest.fixture()
def batches():
    rng = np.random.default_rng(0)
    # a new batch size on the way: the chain checks itself again and resizes its buffers
    return [_batch(rng, 8) for _ in range(6)] + [_batch(rng, 5) for _ in range(3)]


def test_blocked_layout_gives_the_simple_nets_bits(batches):
    eager, _ = _train("simple", batches)
    compiled, net = _train("compiled", batches)
    assert net.onednn_steps == CHAIN
    assert all(p.enabled for p in net.parts if type(p) is onednn.Chain)
    # the blobs between the convolutions were held in the blocked layout, viewed by the pools
    held = net._onednn_values
    for blob in ("conv1", "pool1", "conv2", "pool2", "conv2_grad", "pool1_grad", "conv1_grad"):
        assert held[blob].view is not None and held[blob].block in (8, 16), blob
    assert held["pool1"].indices is not None and held["pool2"].indices is not None
    # the FC and loss ops (and the updates) are still compiled regions
    assert any("FC" in region for region in net.regions)
    _assert_same(compiled, eager)
    assert eager[-1]["loss"] < eager[0]["loss"] * 1.5  # finite, sane training
    ties = (eager[0]["conv1"][:, :, :, :4] == eager[0]["conv1"][:, :, :, :1]).mean()
    assert ties > 0.9  # the zero half does give the pools ties to break


def test_a_layout_that_would_differ_stays_on_nchw(batches, monkeypatch, caplog):
    convolution = torch.mkldnn_convolution

    def off_by_a_bit(x, w, b, *args):
        return convolution(x, w * 1.0001, b, *args)

    monkeypatch.setattr(torch, "mkldnn_convolution", off_by_a_bit)
    eager, _ = _train("simple", batches[:3])
    with caplog.at_level(logging.INFO, logger="caffe2torch"):
        compiled, net = _train("compiled", batches[:3])
    assert "stay on NCHW tensors" in caplog.text and "differs from the eager op's" in caplog.text
    chains = [p for p in net.parts if type(p) is onednn.Chain]
    assert chains and not chains[0].enabled
    _assert_same(compiled, eager)


def test_netdef_argument_turns_the_layout_off(batches):
    eager, _ = _train("simple", batches[:3])
    compiled, net = _train("compiled", batches[:3], onednn_layout=0)
    assert net.onednn_steps == []
    assert "Conv" in net.regions[0]
    _assert_same(compiled, eager)


def _compiled_in_workspace(name, seed):
    """The compiled LeNet created in a fresh workspace ``onednn_<name>``, and 4 batches of 8."""
    rng = np.random.default_rng(seed)
    batches = [_batch(rng, 8) for _ in range(4)]
    workspace.SwitchWorkspace(f"onednn_{name}", create_if_missing=True)
    workspace.ResetWorkspace()
    _feed_params()
    net = _lenet(f"lenet_{name}", "compiled")
    workspace.FeedBlob("data", batches[0][0])
    workspace.FeedBlob("label", batches[0][1])
    workspace.CreateNet(net)
    return net, batches


def test_a_stale_deferred_blob_is_refused():
    """A blob held in a reused buffer, read after the next run rewrote it, is an error."""
    net, batches = _compiled_in_workspace("stale", seed=1)
    for data, _label in batches[:3]:
        workspace.FeedBlob("data", data)
        workspace.RunNet(net.Name())
    old = workspace.C().blobs["pool1"]
    workspace.RunNet(net.Name())
    with pytest.raises(RuntimeError, match="modified in place"):
        old.resolve()
    assert workspace.FetchBlob("pool1").shape == (8, 10, 6, 6)
    workspace.ResetWorkspace()
    workspace.SwitchWorkspace("default")


def test_a_run_frees_the_previous_runs_tensors_by_reference_counting():
    """The next run's convolutions replace this run's mkldnn tensors and free them at once: a
    reference cycle would hold them (MBs per run on LeNet) until the garbage collector ran. A
    blob fetched from an earlier run still reads that run's value."""
    net, batches = _compiled_in_workspace("refs", seed=2)
    held = workspace.C().nets[net.Name()].compiled._onednn_values
    gc.collect()
    gc.disable()
    try:
        for data, _label in batches[:2]:
            workspace.FeedBlob("data", data)
            workspace.RunNet(net.Name())
        conv1 = weakref.ref(held["conv1"].mk)
        workspace.FeedBlob("data", batches[2][0])
        workspace.RunNet(net.Name())
        assert conv1() is None, "the previous run's conv1 outlived its run"
        old_blob, old_value = workspace.C().blobs["conv1"], workspace.FetchBlob("conv1")
        workspace.FeedBlob("data", batches[3][0])
        workspace.RunNet(net.Name())
        np.testing.assert_array_equal(old_blob.resolve().numpy(), old_value)
        assert not np.array_equal(workspace.FetchBlob("conv1"), old_value)
    finally:
        gc.enable()
        workspace.ResetWorkspace()
        workspace.SwitchWorkspace("default")


def test_a_lone_convolution_stays_in_its_region(fresh_workspace):
    """A Conv whose neighbours are NCHW ops (here a Relu and an FC) gains nothing from the
    blocked layout: it stays in the compiled region."""
    rng = np.random.default_rng(2)
    workspace.FeedBlob("x", rng.standard_normal((4, 3, 10, 10)).astype(np.float32))
    workspace.FeedBlob("w", rng.standard_normal((16, 3, 3, 3)).astype(np.float32))
    workspace.FeedBlob("b", rng.standard_normal(16).astype(np.float32))
    net = core.Net("lone_conv")
    net.Conv(["x", "w", "b"], "y", kernel=3)
    net.Relu("y", "r")
    net.Proto().type = "compiled"
    workspace.CreateNet(net)
    for _ in range(3):
        workspace.RunNet(net.Name())
    compiled = workspace.C().nets[net.Name()].compiled
    assert compiled.onednn_steps == [] and compiled.regions == [["Conv", "Relu"]]
    x = torch.from_numpy(workspace.FetchBlob("x"))
    want = torch.relu(torch.conv2d(x, torch.from_numpy(workspace.FetchBlob("w")),
                                   torch.from_numpy(workspace.FetchBlob("b"))))
    np.testing.assert_array_equal(workspace.FetchBlob("r"), want.numpy())


def test_the_first_run_carves_and_compiles(fresh_workspace):
    """The run that compiles the region also compiles what is left of it after the carve, so
    the second run is already compiled code (a benchmark leaving out the first run is fair)."""
    rng = np.random.default_rng(4)
    _feed_params()
    data, label = _batch(rng, 8)
    workspace.FeedBlob("data", data)
    workspace.FeedBlob("label", label)
    net = _lenet("lenet_first", "compiled")
    workspace.CreateNet(net)
    workspace.RunNet(net.Name())
    compiled = workspace.C().nets[net.Name()].compiled
    regions = [p for p in compiled.parts if hasattr(p, "variants")]
    assert len(regions) == 2 and all(len(p.variants) == 1 for p in regions)
    seconds = compiled.compile_seconds
    workspace.RunNet(net.Name())
    assert compiled.compile_seconds == seconds  # nothing compiled in the second run


def test_an_empty_batch_runs_on_nchw(fresh_workspace):
    """A batch of 0 images after verified runs: the convolutions take the eager ops' path."""
    rng = np.random.default_rng(5)
    batches = [_batch(rng, 8), _batch(rng, 8), _batch(rng, 8), _batch(rng, 0), _batch(rng, 8)]
    # ConvGradient and the loss need a batch: a predict net (no gradients) is what sees empty
    # batches, as a server between requests does
    net = _forward("lenet_predict")
    results = {}
    for net_type in ("simple", "compiled"):
        workspace.ResetWorkspace()
        _feed_params()
        workspace.FeedBlob("data", batches[0][0])
        net.Proto().type = net_type
        workspace.CreateNet(net, overwrite=True)
        results[net_type] = []
        for data, _label in batches:
            workspace.FeedBlob("data", data)
            workspace.RunNet(net.Name())
            results[net_type].append(workspace.FetchBlob("pred"))
        if net_type == "compiled":
            assert workspace.C().nets[net.Name()].compiled.onednn_steps == CHAIN[:4]
    for got, want in zip(results["compiled"], results["simple"]):
        np.testing.assert_array_equal(got, want)
    assert results["compiled"][3].shape == (0, 10)


def test_with_onednn_switched_off_nothing_is_carved(batches, monkeypatch):
    """``torch.backends.mkldnn.enabled = False`` (PyTorch's own switch) keeps the ops in the
    compiled regions: there is no oneDNN convolution to keep a layout for."""
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", False)
    eager, _ = _train("simple", batches[:3])
    compiled, net = _train("compiled", batches[:3])
    assert net.onednn_steps == []
    _assert_same(compiled, eager)


def _special_windows(rng, shape):
    """Values whose max-pool needs ATen's rule: ties, -0.0 beside 0.0, NaNs (two in a window
    too), -inf windows, and rows and columns past the last window."""
    x = rng.integers(-3, 3, shape).astype(np.float32)  # many ties
    flat = x.reshape(-1)
    for value, share in ((np.nan, 0.02), (-np.inf, 0.05), (-0.0, 0.1), (np.inf, 0.01)):
        flat[rng.random(flat.size) < share] = value
    x[0, :, :2, :2] = -np.inf  # a window of -inf only
    x[1, :, :2, :2] = np.nan  # a window of NaNs
    return torch.from_numpy(x)


def _same_bits(got, want):
    """Equal as bit patterns (so -0.0 differs from 0.0), NaN where the other is NaN."""
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(got), nan)
    assert torch.equal(got[~nan].view(torch.int32), want[~nan].view(torch.int32))


@pytest.mark.parametrize("kernel, size", [((2, 2), (9, 8)), ((3, 3), (9, 7)), ((2, 3), (6, 7))])
def test_window_max_is_atens_max_pool_bit_for_bit(kernel, size):
    """The chain's max-pool kernels (eager and inductor-compiled) give ATen's values, argmax
    routing and gradient: first maximum, last NaN, -0.0 in dY becoming 0.0, zeros past the
    last window."""
    from caffe2torch.python.compiled import compile_kernel

    rng = np.random.default_rng(7)
    x = _special_windows(rng, (3, 16) + size)
    y_ref, indices = torch.ops.aten.max_pool2d_with_indices(x, list(kernel), list(kernel))
    dy = torch.from_numpy(rng.standard_normal(tuple(y_ref.shape)).astype(np.float32))
    dy.view(-1)[::7] = -0.0
    dy.view(-1)[::11] = float("nan")
    dx_ref = torch.ops.aten.max_pool2d_with_indices_backward(
        dy, x, list(kernel), list(kernel), [0, 0], [1, 1], False, indices)

    def rows(t):  # NCHW -> the blocked memory's [M, H, W, block] with one 16-channel block
        return t.permute(0, 2, 3, 1).contiguous()

    forward, backward = onednn._window_max, onednn._window_max_gradient
    for compiled in (False, True):
        x_rows, dy_rows = rows(x), rows(dy)
        y = torch.full(rows(y_ref).shape, 5.0)
        offsets = torch.full(y.shape, -1, dtype=torch.int32)
        dx = torch.full(x_rows.shape, 5.0)
        if compiled:
            forward = compile_kernel(lambda a, b, c: onednn._window_max(a, b, c, kernel),
                                     (x_rows, y, offsets))
            backward = compile_kernel(
                lambda a, b, c: onednn._window_max_gradient(a, b, c, kernel), (dy_rows, offsets, dx))
            forward(x_rows, y, offsets)
            backward(dy_rows, offsets, dx)
        else:
            forward(x_rows, y, offsets, kernel)
            backward(dy_rows, offsets, dx, kernel)
        _same_bits(y, rows(y_ref))
        _same_bits(dx, rows(dx_ref))


def test_a_failed_warm_up_leaves_the_check_to_the_first_run(batches, monkeypatch, caplog):
    """The chains' warm-up (in the compiled net's first run) failing is no error: the chains
    check themselves at their first real run and the results are the simple net's."""
    run = onednn.Chain.run

    def failing_warm_up(chain):
        if chain.scratch is not None:
            raise RuntimeError("no warm-up today")
        return run(chain)

    monkeypatch.setattr(onednn.Chain, "run", failing_warm_up)
    eager, _ = _train("simple", batches[:3])
    with caplog.at_level(logging.INFO, logger="caffe2torch"):
        compiled, net = _train("compiled", batches[:3])
    assert "the warm-up failed (RuntimeError: no warm-up today)" in caplog.text
    assert net.onednn_steps == CHAIN
    assert all(p.enabled and p.verified for p in net.parts if type(p) is onednn.Chain)
    _assert_same(compiled, eager)
