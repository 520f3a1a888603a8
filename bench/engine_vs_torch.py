"""caffe2torch vs a hand-written PyTorch loop: the tutorial's 200-iteration LeNet training.

Both train from the same initial weights on the same MNIST batches (records 0..12799 of the
training LMDB, in order) with the tutorial's SGD (lr = -0.1 * 0.999^iter in float32 as Caffe2 computes it, param += lr * grad),
in one process, alternating. The plain loop gets its batches pre-decoded in memory (no data
cost at all); caffe2torch reads them through TensorProtosDBInput, as the tutorial does. Prints
the median wall time of each variant, the ratios caffe2torch/plain (target <= 1.10 without the
tutorial's Print/Summarize bookkeeping ops), and the largest relative difference between the two
loss curves (target <= 1e-4).

    PYTHONPATH=. .venv/bin/python bench/engine_vs_torch.py [--repeats 5] [--device cpu|cuda]
"""
import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from caffe2torch.db import open_db  # noqa: E402
from caffe2torch.proto import caffe2_pb2  # noqa: E402
from caffe2torch.python import core, model_helper, workspace  # noqa: E402
from mnist_tutorial import lenet  # noqa: E402
from mnist_tutorial.data import db_path, prepare_mnist  # noqa: E402

PARAMS = ["conv1_w", "conv1_b", "conv2_w", "conv2_b", "fc3_w", "fc3_b", "pred_w", "pred_b"]


def build_train_model(train_db, batch, device_option, bookkeeping):
    """The tutorial's training model, with or without its bookkeeping ops."""
    with core.DeviceScope(device_option):
        model = model_helper.ModelHelper(name="bench_train", arg_scope=lenet.ARG_SCOPE)
        data, label = lenet.AddInput(model, batch_size=batch, db=train_db, db_type="lmdb")
        softmax = lenet.AddLeNetModel(model, data)
        lenet.AddTrainingOperators(model, softmax, label)
        if bookkeeping:
            lenet.AddBookkeepingOperators(model)
    return model


def initial_weights(model, seed):
    """The params after the init net, seeded: the shared starting point of every run."""
    workspace.ResetWorkspace(tempfile.mkdtemp(prefix="c2t-bench-"))
    torch.manual_seed(seed)
    workspace.RunNetOnce(model.param_init_net)
    return {p: workspace.FetchBlob(p) for p in PARAMS}


def run_caffe2torch(model, weights, iters, device_option, root):
    """Train through caffe2torch; returns (seconds, losses)."""
    workspace.ResetWorkspace(root)
    workspace.RunNetOnce(model.param_init_net)
    for name, value in weights.items():
        workspace.FeedBlob(name, value, device_option)
    workspace.CreateNet(model.net, overwrite=True)
    losses = np.zeros(iters)
    start = time.perf_counter()
    for i in range(iters):
        workspace.RunNet(model.net)
        losses[i] = workspace.FetchBlob("loss")
    seconds = time.perf_counter() - start
    workspace.ResetWorkspace(root)
    return seconds, losses


def load_batches(train_db, count):
    """The first ``count`` records of the training LMDB as uint8 [N,1,28,28] and int64 [N]."""
    images = np.zeros((count, 1, 28, 28), np.uint8)
    labels = np.zeros(count, np.int64)
    with open_db("lmdb", train_db, "read") as db:
        for i, (_key, value) in enumerate(db.cursor()):
            if i == count:
                break
            protos = caffe2_pb2.TensorProtos.FromString(value)
            images[i] = np.frombuffer(protos.protos[0].byte_data, np.uint8).reshape(1, 28, 28)
            labels[i] = protos.protos[1].int32_data[0]
    return torch.from_numpy(images), torch.from_numpy(labels)


def run_plain(images, labels, weights, iters, batch, device):
    """Train with a hand-written PyTorch loop (autograd); returns (seconds, losses)."""
    w = {k: torch.tensor(v, device=device, requires_grad=True) for k, v in weights.items()}
    params = [w[p] for p in PARAMS]
    images, labels = images.to(device), labels.to(device)
    losses = np.zeros(iters)
    start = time.perf_counter()
    for i in range(iters):
        x = images[i * batch:(i + 1) * batch].float() * 0.00390625
        y = labels[i * batch:(i + 1) * batch]
        h = F.max_pool2d(F.conv2d(x, w["conv1_w"], w["conv1_b"]), 2, 2)
        h = F.max_pool2d(F.conv2d(h, w["conv2_w"], w["conv2_b"]), 2, 2)
        h = F.relu(F.linear(h.flatten(1), w["fc3_w"], w["fc3_b"]))
        softmax = F.softmax(F.linear(h, w["pred_w"], w["pred_b"]), dim=1)
        xent = -torch.log(softmax.gather(1, y[:, None]).clamp_min(1e-20))
        loss = xent.mean()
        (softmax.argmax(1) == y).float().mean()  # the tutorial's accuracy, computed each step
        grads = torch.autograd.grad(loss, params)
        # step policy, stepsize 1, Caffe2's Iter starting at 1; Caffe2 computes it in float32
        lr = float(np.float32(-0.1) * np.float32(0.999) ** np.float32(i + 1))
        with torch.no_grad():
            for p, g in zip(params, grads):
                p.add_(g, alpha=lr)
        losses[i] = loss.item()
    return time.perf_counter() - start, losses


def main():
    """Measure and print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default="data", help="where the MNIST LMDBs are (built if missing)")
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5, help="runs of each variant, alternating")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    prepare_mnist(args.data_dir, source="auto")
    train_db = str(db_path(args.data_dir, "train"))
    device = torch.device(args.device)
    option = core.DeviceOption(caffe2_pb2.CUDA, 0) if args.device == "cuda" else None
    plain_model = build_train_model(train_db, args.batch, option, bookkeeping=False)
    booked_model = build_train_model(train_db, args.batch, option, bookkeeping=True)
    weights = initial_weights(plain_model, args.seed)
    images, labels = load_batches(train_db, args.iters * args.batch)
    root = tempfile.mkdtemp(prefix="c2t-bench-")

    times = {"caffe2torch": [], "caffe2torch+bookkeeping": [], "plain PyTorch": []}
    curves = {}
    # one untimed warm-up of each, then alternate
    run_caffe2torch(plain_model, weights, 5, option, root)
    run_plain(images, labels, weights, 5, args.batch, device)
    for _ in range(args.repeats):
        for name in times:
            if name == "plain PyTorch":
                seconds, losses = run_plain(images, labels, weights, args.iters, args.batch, device)
            else:
                model = booked_model if name.endswith("bookkeeping") else plain_model
                seconds, losses = run_caffe2torch(model, weights, args.iters, option, root)
            times[name].append(seconds)
            curves[name] = losses

    print(f"LeNet, {args.iters} iterations, batch {args.batch}, device {args.device}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.repeats} runs each")
    med = {k: statistics.median(v) for k, v in times.items()}
    for name, seconds in med.items():
        print(f"  {name:26s} median {seconds:7.3f} s   runs: {', '.join(f'{t:.3f}' for t in times[name])}")
    plain = med["plain PyTorch"]
    ratio = med["caffe2torch"] / plain
    ratio_book = med["caffe2torch+bookkeeping"] / plain
    print(f"ratio caffe2torch/plain (no bookkeeping): {ratio:.3f}   (target <= 1.10: "
          f"{'met' if ratio <= 1.10 else 'NOT met'})")
    print(f"ratio caffe2torch+bookkeeping/plain:     {ratio_book:.3f}")
    ref = curves["plain PyTorch"]
    for name in ("caffe2torch", "caffe2torch+bookkeeping"):
        rel = np.max(np.abs(curves[name] - ref) / np.abs(ref))
        print(f"loss curves {name} vs plain: max relative difference {rel:.2e} over "
              f"{args.iters} iterations (target <= 1e-4: {'met' if rel <= 1e-4 else 'NOT met'})")
    print(f"final loss: caffe2torch {curves['caffe2torch'][-1]:.4f}, plain {ref[-1]:.4f}")


if __name__ == "__main__":
    main()
