"""NanCheck, AtomicFetchAdd, Checkpoint, the Copy variants and ATen."""
import threading

import numpy as np
import pytest
import torch

from caffe2torch.ops import registry
from caffe2torch.python import core, workspace

from .helpers import DEVICES, check_op, device_option, rand


pytestmark = pytest.mark.usefixtures("fresh_workspace")


def run(op_type, inputs, outputs, **args):
    return workspace.RunOperatorOnce(core.CreateOperator(op_type, inputs, outputs, **args))


@pytest.mark.parametrize("device", DEVICES)
def test_nan_check_passes_finite_values_and_their_gradient(device):
    check_op("NanCheck", {"X": rand(3, 4)}, ["Y"], {}, lambda x: x, device=device)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_check_raises(bad):
    x = rand(2, 3)
    x[1, 2] = bad
    workspace.FeedBlob("X", x)
    with pytest.raises(Exception, match=r"blob 'X' of shape \(2, 3\) holds NaN or Inf .*\[1, 2\]"):
        run("NanCheck", ["X"], ["X"])


def test_nan_check_gradient_checks_the_gradient():
    net = core.Net("nan")
    net.NanCheck("X", "Y")
    net.AddGradientOperators({"Y": "dY"})
    assert [op.type for op in net.Proto().op] == ["NanCheck", "NanCheck"]


def test_atomic_fetch_add():
    run("CreateMutex", [], ["mutex"])
    workspace.FeedBlob("value", np.array(5, np.int32))
    workspace.FeedBlob("step", np.array(3, np.int32))
    net = core.Net("fetch_add")
    net.AtomicFetchAdd(["mutex", "value", "step"], ["value", "fetched"])
    workspace.RunNetOnce(net)
    assert workspace.FetchBlob("value") == 8 and workspace.FetchBlob("fetched") == 5
    threads = [threading.Thread(target=workspace.RunNetOnce, args=(net,)) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert workspace.FetchBlob("value") == 8 + 8 * 3
    assert registry.get_schema("AtomicFetchAdd").side_effects


def test_atomic_fetch_add_needs_int32_and_in_place():
    run("CreateMutex", [], ["mutex"])
    workspace.FeedBlob("value", np.array(5, np.int64))
    workspace.FeedBlob("step", np.array(3, np.int32))
    with pytest.raises(Exception, match="int32 scalar"):
        run("AtomicFetchAdd", ["mutex", "value", "step"], ["value", "fetched"])
    with pytest.raises(Exception, match="first output must be its value input"):
        run("AtomicFetchAdd", ["mutex", "value", "step"], ["other", "fetched"])


def test_checkpoint_saves_every_n_iterations(fresh_workspace):
    workspace.FeedBlob("w", rand(2, 2).astype(np.float32))
    net = core.Net("ckpt")
    net.Checkpoint(["iter", "w"], [], db="ckpt_%03d.minidb", db_type="minidb", every=2)
    for it in range(1, 5):
        workspace.FeedBlob("iter", np.array([it], np.int64))
        workspace.RunNetOnce(net)
    assert sorted(p.name for p in fresh_workspace.glob("ckpt_*")) == ["ckpt_002.minidb",
                                                                     "ckpt_004.minidb"]
    run("Load", [], ["w_loaded"], db="ckpt_004.minidb", db_type="minidb", source_blob_names=["w"])
    np.testing.assert_array_equal(workspace.FetchBlob("w_loaded"), workspace.FetchBlob("w"))


def test_checkpoint_holds_the_iteration_counter_as_caffe2s(fresh_workspace):
    """Caffe2's Checkpoint is a Save of its whole OperatorDef: the counter is saved too."""
    workspace.FeedBlob("w", rand(3).astype(np.float32))
    workspace.FeedBlob("iter", np.array([6], np.int64))
    run("Checkpoint", ["iter", "w"], [], db="ckpt_%05d.minidb", db_type="minidb", every=3)
    workspace.ResetWorkspace(str(fresh_workspace))
    run("Load", [], [], db="ckpt_00006.minidb", db_type="minidb", load_all=1)
    assert sorted(workspace.Blobs()) == ["iter", "w"]
    np.testing.assert_array_equal(workspace.FetchBlob("iter"), [6])
    assert workspace.FetchBlob("iter").dtype == np.int64


@pytest.mark.parametrize("device", DEVICES)
def test_copy_variants(device):
    option = device_option(device)
    workspace.FeedBlob("X", rand(3))
    workspace.FeedBlob("dst", rand(1), device_option=option)
    workspace.RunOperatorOnce(core.CreateOperator("CopyFromCPUInput", ["X"], ["Y"],
                                                  device_option=option))
    assert workspace.FetchTorch("Y").device.type == device
    run("CopyOnDeviceLike", ["X", "dst"], ["Z"])
    assert workspace.FetchTorch("Z").device.type == device
    np.testing.assert_array_equal(workspace.FetchBlob("Z"), workspace.FetchBlob("X"))


@pytest.mark.parametrize("operator, inputs, args, reference", [
    ("add", [rand(3), rand(3, seed=1)], dict(alpha=2.0), lambda a, b: a + 2 * b),
    ("mm", [rand(2, 3), rand(3, 4, seed=1)], {}, torch.mm),
    ("sum", [rand(2, 3)], dict(dim=[1]), lambda a: a.sum(1)),
    ("max", [rand(2, 3)], dict(dim=1, overload_name="dim"), lambda a: a.max(1)),
])
def test_aten(operator, inputs, args, reference):
    names = [f"in{i}" for i in range(len(inputs))]
    for name, value in zip(names, inputs):
        workspace.FeedBlob(name, value)
    expected = reference(*[torch.from_numpy(v) for v in inputs])
    expected = list(expected) if isinstance(expected, tuple) else [expected]
    outputs = [f"out{i}" for i in range(len(expected))]
    run("ATen", names, outputs, operator=operator, **args)
    for name, value in zip(outputs, expected):
        np.testing.assert_allclose(workspace.FetchBlob(name), value.numpy())


def test_aten_unknown_operator():
    workspace.FeedBlob("X", rand(2))
    with pytest.raises(Exception, match="no aten operator 'frobnicate'"):
        run("ATen", ["X"], ["Y"], operator="frobnicate")


def test_ensure_dense_passes_the_gradient_through():
    check_op("EnsureDense", {"X": rand(2, 3)}, ["Y"], {}, lambda x: x)


def test_enforce_finite_and_assert():
    workspace.FeedBlob("X", rand(3))
    run("EnforceFinite", ["X"], [])
    workspace.FeedBlob("X", np.array([1.0, np.nan]))
    with pytest.raises(Exception, match="EnforceFinite: blob 'X' holds NaN or Inf"):
        run("EnforceFinite", ["X"], [])
    workspace.FeedBlob("ok", np.array([True, True]))
    run("Assert", ["ok"], [])
    workspace.FeedBlob("bad", np.array([1, 0], np.int32))
    with pytest.raises(Exception, match="Assert failed for blob 'bad': not all positive"):
        run("Assert", ["bad"], [], error_msg="not all positive")


def test_counters():
    run("CreateCounter", [], ["c"], init_count=2)
    run("CountDown", ["c"], ["done"])
    assert not workspace.FetchBlob("done")
    run("CountDown", ["c"], ["done"])
    assert not workspace.FetchBlob("done")
    run("CheckCounterDone", ["c"], ["is_done"])
    assert workspace.FetchBlob("is_done")
    run("CountDown", ["c"], ["done"])
    assert workspace.FetchBlob("done")
    run("ResetCounter", ["c"], ["previous"], init_count=5)
    assert workspace.FetchBlob("previous") == -1
    run("CountUp", ["c"], ["before"])
    run("RetrieveCount", ["c"], ["now"])
    assert workspace.FetchBlob("before") == 5 and workspace.FetchBlob("now") == 6
    assert workspace.FetchBlob("now").dtype == np.int64
    with pytest.raises(Exception, match="is not a counter"):
        run("CountUp", ["now"], ["x"])


def test_sum_broadcasts_and_sum_gradient_reduces_to_each_shape():
    a, b, c = rand(2, 3), rand(3, seed=1), rand(1, 3, seed=2)
    for name, value in (("A", a), ("B", b), ("C", c)):
        workspace.FeedBlob(name, value)
    run("Sum", ["A", "B", "C"], ["Y"])
    np.testing.assert_allclose(workspace.FetchBlob("Y"), a + b + c)
    run("Sum", ["B", "A"], ["Z"])  # a later input wider than the first
    np.testing.assert_allclose(workspace.FetchBlob("Z"), a + b)
    dy = rand(2, 3, seed=3)
    workspace.FeedBlob("dY", dy)
    run("SumGradient", ["dY", "A", "B", "C"], ["dA", "dB", "dC"])
    np.testing.assert_allclose(workspace.FetchBlob("dA"), dy)
    np.testing.assert_allclose(workspace.FetchBlob("dB"), dy.sum(0))
    np.testing.assert_allclose(workspace.FetchBlob("dC"), dy.sum(0, keepdims=True))
