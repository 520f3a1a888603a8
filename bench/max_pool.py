"""MaxPool + MaxPoolGradient through caffe2torch vs PyTorch's own max_pool2d (NCHW) and its backward.

On the CPU, caffe2torch pools inputs of 8 or more channels in channels-last layout (see
``caffe2torch/ops/nn.py``), with the same values and argmax positions. For each shape, one
RunNet of a two-op net (MaxPool, MaxPoolGradient) and the same forward and backward in plain
PyTorch run alternately, ``--repeats`` times; prints the medians and their ratio (below 1:
caffe2torch is faster), and checks that both give the same Y and dX.

    PYTHONPATH=. python bench/max_pool.py [--threads 1] [--repeats 50]
"""
import argparse
import os
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from caffe2torch.python import core, workspace  # noqa: E402

# (name, input shape, kernel, stride, pad)
CASES = [("LeNet pool1", (64, 20, 24, 24), 2, 2, 0),
         ("LeNet pool2", (64, 50, 8, 8), 2, 2, 0),
         ("ResNet stem pool", (8, 64, 112, 112), 3, 2, 1),
         ("3 channels (NCHW kernel kept)", (64, 3, 32, 32), 2, 2, 0)]


def plain(x, dy, kernel, stride, pad):
    """PyTorch's max_pool2d and its autograd backward."""
    xt = x.detach().requires_grad_(True)
    y = F.max_pool2d(xt, kernel, stride, pad)
    y.backward(dy)
    return y.detach(), xt.grad


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.repeats} repeats")
    for name, shape, kernel, stride, pad in CASES:
        x = torch.randn(shape)
        y_shape = F.max_pool2d(x, kernel, stride, pad).shape
        dy = torch.randn(y_shape)
        workspace.ResetWorkspace()
        net = core.Net("pool_bench")
        net.MaxPool("X", "Y", kernel=kernel, stride=stride, pad=pad)
        net.MaxPoolGradient(["X", "Y", "dY"], "dX", kernel=kernel, stride=stride, pad=pad)
        workspace.FeedBlob("X", x.numpy())
        workspace.FeedBlob("dY", dy.numpy())
        workspace.CreateNet(net)
        ours, theirs = [], []
        for i in range(args.repeats + 3):
            start = time.perf_counter()
            workspace.RunNet(net.Name())
            middle = time.perf_counter()
            y_ref, dx_ref = plain(x, dy, kernel, stride, pad)
            end = time.perf_counter()
            if i >= 3:
                ours.append(middle - start)
                theirs.append(end - middle)
        same = (np.array_equal(workspace.FetchBlob("Y"), y_ref.numpy())
                and np.array_equal(workspace.FetchBlob("dX"), dx_ref.numpy()))
        a, b = statistics.median(ours), statistics.median(theirs)
        print(f"{name:30s} {str(tuple(shape)):20s} caffe2torch {a * 1e3:7.3f} ms  PyTorch "
              f"{b * 1e3:7.3f} ms  ratio {a / b:.2f}  Y and dX {'equal' if same else 'DIFFER'}")


if __name__ == "__main__":
    main()
