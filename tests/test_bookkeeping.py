"""Print/Summarize to_file=1: lines buffered during a run, complete when RunNet returns, when the
workspace is reset and when the process ends; the values are those of the moment the op ran."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from caffe2torch.ops import utility
from caffe2torch.python import core, workspace

pytestmark = pytest.mark.usefixtures("fresh_workspace")


def _counter_printer():
    """Iter, Print(iter), Iter: the printed value is 1 of 2, 3 of 4, ... (a snapshot)."""
    net = core.Net("counter_printer")
    net.Iter("iter", "iter")
    net.Print("iter", [], to_file=1)
    net.Iter("iter", "iter")
    return net


def test_print_writes_the_value_when_the_op_ran_not_when_flushed(fresh_workspace):
    workspace.FeedBlob("iter", np.zeros(1, np.int64))
    net = _counter_printer()
    workspace.CreateNet(net)
    workspace.RunNet(net.Name(), 3)
    assert (fresh_workspace / "iter.log").read_text().splitlines() == [
        f"Tensor iter of type long. Dims: (1,): {v}" for v in (1, 3, 5)]


def test_lines_are_buffered_during_a_run_and_written_when_it_returns(fresh_workspace):
    workspace.FeedBlob("w", np.arange(6, dtype=np.float32))
    net = core.Net("summaries")
    net.Summarize("w", [], to_file=1)
    workspace.CreateNet(net)
    output = workspace.C().nets[net.Name()].steps[0].ctx.state["file"]
    # inside a run the op only queues its line (on the CPU its four numbers; no file write)
    utility.summarize(workspace.C().nets[net.Name()].steps[0].ctx, [workspace.FetchTorch("w")])
    assert len(output.pending) == 1
    assert (fresh_workspace / "w.summary").read_text() == ""
    workspace.RunNet(net.Name(), 2)
    assert output.pending == []
    assert (fresh_workspace / "w.summary").read_text().splitlines() == ["0 5 2.5 1.87083"] * 3


def test_long_runs_write_early(fresh_workspace, monkeypatch):
    monkeypatch.setattr(utility._LineFile, "LIMIT", 4)
    workspace.FeedBlob("loss", np.array(0.5, np.float32))
    net = core.Net("printer")
    net.Print("loss", [], to_file=1)
    workspace.CreateNet(net)
    step = workspace.C().nets[net.Name()].steps[0]
    for _ in range(5):  # five lines queued inside one (simulated) run
        step.fn(step.ctx, [workspace.FetchTorch("loss")])
    assert len((fresh_workspace / "loss.log").read_text().splitlines()) == 4
    assert len(step.ctx.state["file"].pending) == 1
    workspace.RunNet(net.Name())
    assert len((fresh_workspace / "loss.log").read_text().splitlines()) == 6


def test_files_are_complete_after_reset_workspace(fresh_workspace):
    workspace.FeedBlob("loss", np.array(0.25, np.float32))
    net = core.Net("printer")
    net.Print("loss", [], to_file=1)
    workspace.CreateNet(net)
    workspace.RunNet(net.Name(), 2)
    workspace.ResetWorkspace()
    assert (fresh_workspace / "loss.log").read_text() == \
        "Tensor loss of type float. Dims: (): 0.25\n" * 2


def test_files_are_complete_when_the_process_ends(tmp_path):
    # The op queues a line outside any RunNet (as an op of a net stopped halfway would): the
    # interpreter's exit writes it.
    script = f"""
import numpy as np
from caffe2torch.python import core, workspace
workspace.ResetWorkspace({str(tmp_path)!r})
workspace.FeedBlob("x", np.array([1.5, 2.5], np.float32))
net = core.Net("p")
net.Print("x", [], to_file=1)
workspace.CreateNet(net)
workspace.RunNet(net.Name())
step = workspace.C().nets[net.Name()].steps[0]
step.fn(step.ctx, [workspace.FetchTorch("x")])
"""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    subprocess.run([sys.executable, "-c", script], check=True, env=env, timeout=120)
    assert (tmp_path / "x.log").read_text() == "Tensor x of type float. Dims: (2,): 1.5,2.5\n" * 2


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int32])
def test_summary_stats_match_numpy_in_double(dtype):
    rng = np.random.default_rng(3)
    x = (rng.standard_normal(1001) * 50 + 7).astype(dtype)
    stats = utility.summary_stats(torch.from_numpy(x))
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(stats, [x64.min(), x64.max(), x64.mean(), x64.std(ddof=1)],
                               rtol=1e-6)


def _numpy_summary(x):
    """Caffe2's Summarize in numpy: min, max, mean, two-pass std (N-1) in double."""
    x64 = np.asarray(x, np.float64).reshape(-1)
    std = 0.0 if x64.size == 1 else float(np.sqrt(((x64 - x64.mean()) ** 2).sum() / (x64.size - 1)))
    return [x64.min(), x64.max(), x64.mean(), std]


@pytest.mark.parametrize("case", ["weights", "large_mean", "constant", "one", "int"])
def test_summarize_lines_match_caffe2s_definition_in_numpy(fresh_workspace, case):
    rng = np.random.default_rng(5)
    x = {"weights": (rng.standard_normal((50, 40)) * 0.01 + 0.001).astype(np.float32),
         # mean/std = 1e6: the one-pass formula would lose the std; the two passes run
         "large_mean": (1000 + rng.standard_normal(999) * 1e-3).astype(np.float32),
         "constant": np.full(7, 0.1, np.float32),
         "one": np.array([2.5], np.float32),
         "int": rng.integers(-9, 9, 100).astype(np.int32)}[case]
    workspace.FeedBlob("x", x)
    net = core.Net("summarize_" + case)
    net.Summarize("x", ["stats"], to_file=1)
    workspace.CreateNet(net)
    workspace.RunNet(net.Name(), 2)
    want = _numpy_summary(x)
    lines = (fresh_workspace / "x.summary").read_text().splitlines()
    assert lines == [" ".join("%g" % v for v in want)] * 2
    np.testing.assert_allclose(workspace.FetchBlob("stats"), np.array(want, np.float32),
                               rtol=1e-6, atol=1e-12)
    if case == "constant":
        assert lines[0].split()[3] == "0"  # exactly, not a rounding residue


def test_cpu_and_device_statistics_agree():
    rng = np.random.default_rng(9)
    for x in (rng.standard_normal(10001).astype(np.float32) * 3 - 1,
              (500 + rng.standard_normal(300) * 1e-4).astype(np.float32)):
        t = torch.from_numpy(x)
        np.testing.assert_allclose(utility._stats_on_cpu(t), utility._stats_tensor(t).tolist(),
                                   rtol=1e-9)
        np.testing.assert_allclose(utility._stats_on_cpu(t), _numpy_summary(x), rtol=1e-9)


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64])
def test_summary_stats_of_a_blob_larger_than_the_double_buffer(dtype, monkeypatch):
    """Inputs past the per-thread double buffer are summed piece by piece: the same figures as
    Caffe2's definition in numpy (and a second, smaller blob reuses the buffer)."""
    monkeypatch.setattr(utility, "_CHUNK", 1000)
    rng = np.random.default_rng(11)
    for size in (4321, 999, 1000):
        x = (rng.standard_normal(size) * 0.02 - 0.003).astype(dtype)
        np.testing.assert_allclose(utility._stats_on_cpu(torch.from_numpy(x)), _numpy_summary(x),
                                   rtol=1e-9)
