"""caffe2torch vs a hand-written PyTorch loop: the tutorial's 200-iteration LeNet training.

Both train from the same initial weights on the same MNIST batches (records 0..12799 of the
training LMDB, in order) with the tutorial's SGD (lr = -0.1 * 0.999^iter, computed in float32
as Caffe2 does; param += lr * grad), in one process, in lockstep: each iteration of each variant
is timed side by side, the order rotating, so a change of machine load hits all variants alike.
The plain loop gets its batches pre-decoded in memory (no data cost at all); caffe2torch reads
them through TensorProtosDBInput as the tutorial does (its prefetch thread may overlap the
other variants' steps). Prints each variant's time per run, the median over runs of the per-run
ratio caffe2torch/plain (target <= 1.10 without the tutorial's Print/Summarize bookkeeping ops;
reported with them too), and the largest relative difference between the loss curves (target
<= 1e-4).

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


class Caffe2TorchTrainer:
    """The tutorial's train net in a workspace of its own, one RunNet per step."""

    def __init__(self, name, model, weights, device_option, root):
        self.name = name
        self.net = model.net
        workspace.SwitchWorkspace(name, create_if_missing=True)
        workspace.ResetWorkspace(root)
        workspace.RunNetOnce(model.param_init_net)
        for blob, value in weights.items():
            workspace.FeedBlob(blob, value, device_option)
        workspace.CreateNet(model.net, overwrite=True)

    def step(self, i):
        """One training iteration; returns the loss (fetched, as the tutorial does)."""
        workspace.SwitchWorkspace(self.name)
        workspace.RunNet(self.net)
        return float(workspace.FetchBlob("loss"))

    def close(self):
        """Drop the workspace's nets and blobs (closes the DB reader)."""
        workspace.SwitchWorkspace(self.name)
        workspace.ResetWorkspace()


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


class PlainTrainer:
    """A hand-written PyTorch loop (autograd, functional LeNet, in-place SGD)."""

    def __init__(self, images, labels, weights, batch, device):
        self.w = {k: torch.tensor(v, device=device, requires_grad=True) for k, v in weights.items()}
        self.params = [self.w[p] for p in PARAMS]
        self.images, self.labels = images.to(device), labels.to(device)
        self.batch = batch

    def step(self, i):
        """Training iteration ``i`` (0-based); returns the loss."""
        w, b = self.w, self.batch
        x = self.images[i * b:(i + 1) * b].float() * 0.00390625
        y = self.labels[i * b:(i + 1) * b]
        h = F.max_pool2d(F.conv2d(x, w["conv1_w"], w["conv1_b"]), 2, 2)
        h = F.max_pool2d(F.conv2d(h, w["conv2_w"], w["conv2_b"]), 2, 2)
        h = F.relu(F.linear(h.flatten(1), w["fc3_w"], w["fc3_b"]))
        softmax = F.softmax(F.linear(h, w["pred_w"], w["pred_b"]), dim=1)
        loss = -torch.log(softmax.gather(1, y[:, None]).clamp_min(1e-20)).mean()
        (softmax.argmax(1) == y).float().mean()  # the tutorial's accuracy, computed each step
        grads = torch.autograd.grad(loss, self.params)
        # step policy, stepsize 1, Caffe2's Iter starting at 1; Caffe2 computes it in float32
        lr = float(np.float32(-0.1) * np.float32(0.999) ** np.float32(i + 1))
        with torch.no_grad():
            for p, g in zip(self.params, grads):
                p.add_(g, alpha=lr)
        return loss.item()

    def close(self):
        """Nothing to release."""


def run_lockstep(trainers, iters):
    """Step every trainer once per iteration, rotating the order; returns seconds and losses.

    Timing each variant's iterations side by side makes the ratio robust to a machine whose
    load changes during the run (the variants see the same conditions, a few ms apart).
    """
    names = list(trainers)
    seconds = dict.fromkeys(names, 0.0)
    losses = {n: np.zeros(iters) for n in names}
    for i in range(iters):
        for k in range(len(names)):
            name = names[(i + k) % len(names)]
            start = time.perf_counter()
            losses[name][i] = trainers[name].step(i)
            seconds[name] += time.perf_counter() - start
    return seconds, losses


def main():
    """Measure and print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default="data", help="where the MNIST LMDBs are (built if missing)")
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5, help="runs of each variant, alternating")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    prepare_mnist(args.data_dir, source="auto")
    train_db = str(db_path(args.data_dir, "train"))
    device = torch.device(args.device)
    option = core.DeviceOption(caffe2_pb2.CUDA, 0) if args.device == "cuda" else None
    plain_model = build_train_model(train_db, args.batch, option, bookkeeping=False)
    booked_model = build_train_model(train_db, args.batch, option, bookkeeping=True)
    weights = initial_weights(plain_model, args.seed)
    images, labels = load_batches(train_db, args.iters * args.batch)

    variants = ("caffe2torch", "caffe2torch+bookkeeping", "plain PyTorch")
    times = {n: [] for n in variants}
    ratios = {n: [] for n in variants[:2]}
    curves = {}
    for run in range(args.repeats + 1):  # run 0 warms up and is not counted
        trainers = {
            "caffe2torch": Caffe2TorchTrainer("bench_plain", plain_model, weights, option,
                                              tempfile.mkdtemp(prefix="c2t-bench-")),
            "caffe2torch+bookkeeping": Caffe2TorchTrainer("bench_booked", booked_model, weights,
                                                          option, tempfile.mkdtemp(prefix="c2t-bench-")),
            "plain PyTorch": PlainTrainer(images, labels, weights, args.batch, device),
        }
        seconds, losses = run_lockstep(trainers, args.iters if run else 10)
        for trainer in trainers.values():
            trainer.close()
        if run == 0:
            continue
        curves = losses
        for name in variants:
            times[name].append(seconds[name])
        for name in ratios:
            ratios[name].append(seconds[name] / seconds["plain PyTorch"])
    workspace.SwitchWorkspace("default")

    print(f"LeNet, {args.iters} iterations, batch {args.batch}, device {args.device}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.repeats} runs each")
    for name, runs in times.items():
        print(f"  {name:26s} median {statistics.median(runs):7.3f} s   runs: "
              f"{', '.join(f'{t:.3f}' for t in runs)}")
    ratio = statistics.median(ratios["caffe2torch"])
    ratio_book = statistics.median(ratios["caffe2torch+bookkeeping"])
    print("per-run ratios to plain: " + "; ".join(
        f"{n}: {', '.join(f'{r:.3f}' for r in rs)}" for n, rs in ratios.items()))
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
