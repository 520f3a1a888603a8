"""caffe2torch vs a hand-written PyTorch loop: the tutorial's 200-iteration LeNet training.

The nets are the tutorial's own, as the build step wrote them: ``train_init_net.pb`` and
``train_net.pb`` from a run's ``workspace/`` folder (``--nets DIR``), or, without ``--nets``,
from a fresh run of ``notebooks/01_download`` and ``02_build`` (papermill) in a temporary folder.
Variants, all from the same initial weights on the same MNIST batches (records 0..12799 of the
training LMDB, in order), with the tutorial's SGD (lr = -0.1 * 0.999^iter, float32 as Caffe2):

- ``plain PyTorch``: autograd, functional LeNet, in-place SGD, batches pre-decoded in memory;
- ``eager``: ``train_net.pb`` without its Print/Summarize ops, NetDef type "simple";
- ``eager+bookkeeping``: ``train_net.pb`` as the tutorial runs it (Print/Summarize to files);
- ``compiled``: ``train_net.pb`` without Print/Summarize, ``NetDef.type = "compiled"``;
- with ``--compare-layouts``, also ``compiled NCHW``: the same with ``compile_onednn_layout=0``
  (the convolutions and pools in the compiled regions, on NCHW tensors: what oneDNN's blocked
  layout between them saves).

Two measurements, printed in one run:

- One process, lockstep: each iteration of each variant is timed side by side, in an order
  shuffled every iteration (seeded), so that a change of machine load hits all variants alike
  and no variant always runs right after the same other one; iteration 0 (the compiled net
  compiles there) is left out of every variant's time. Prints each variant's seconds per run,
  the median and spread over runs of the per-run ratio to plain PyTorch, the compile time of
  each run (the first may fill inductor's cache, later ones hit it), and the loss curves'
  largest relative differences (eager vs plain: <= 1e-4; compiled vs eager: <= 1e-5).
- One process per variant (``--isolated-runs``, default 3 rounds): each variant alone, as a
  user's training process runs it, one after another in an order shuffled every round; per
  round, each variant's time over plain PyTorch's. The variants of the lockstep share a heap:
  glibc hands one variant's freed memory to another, and the plain loop, whose autograd
  temporaries fault in fresh pages every iteration when alone (~2,000 page faults an iteration
  here), faults far less there, while the nets, whose blobs live across iterations, fault more.
  So the two differ; this one is what a training process sees, the lockstep the one least
  moved by a machine whose load changes.

Targets (both measurements): eager <= 1.05, eager+bookkeeping <= 1.10, compiled <= 0.90 on CPU.

    PYTHONPATH=. python bench/engine_vs_torch.py [--nets RUN/workspace] [--repeats 3]
        [--device cpu|cuda] [--threads N] [--data-dir data] [--isolated-runs 3]
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from caffe2torch.db import open_db  # noqa: E402
from caffe2torch.proto import caffe2_pb2  # noqa: E402
from caffe2torch.python import workspace  # noqa: E402
from tutorial_nets import build_nets, load_net  # noqa: E402

PARAMS = ["conv1_w", "conv1_b", "conv2_w", "conv2_b", "fc3_w", "fc3_b", "pred_w", "pred_b"]
BOOKKEEPING = ("Print", "Summarize")


def variant(train_net, net_type, bookkeeping, onednn_layout=True):
    """A copy of ``train_net`` with the given NetDef type, with or without Print/Summarize."""
    net = caffe2_pb2.NetDef()
    net.CopyFrom(train_net)
    if not bookkeeping:
        del net.op[:]
        net.op.extend(op for op in train_net.op if op.type not in BOOKKEEPING)
    net.type = net_type
    if not onednn_layout:
        net.arg.add(name="compile_onednn_layout", i=0)
    return net


def initial_weights(init_net, seed):
    """The params after the init net, seeded: the shared starting point of every run."""
    workspace.ResetWorkspace(tempfile.mkdtemp(prefix="c2t-bench-"))
    torch.manual_seed(seed)
    workspace.RunNetOnce(init_net)
    return {p: workspace.FetchBlob(p) for p in PARAMS}


def device_option_of(net):
    """The net's DeviceOption, or None."""
    return net.device_option if net.HasField("device_option") else None


class Caffe2TorchTrainer:
    """A train NetDef in a workspace of its own, one RunNet per step."""

    def __init__(self, name, init_net, train_net, weights, root):
        self.name = name
        workspace.SwitchWorkspace(name, create_if_missing=True)
        workspace.ResetWorkspace(root)
        workspace.RunNetOnce(init_net)
        option = device_option_of(train_net)
        for blob, value in weights.items():
            workspace.FeedBlob(blob, value, option)
        workspace.CreateNet(train_net, overwrite=True)
        self.net_name = train_net.name

    def step(self, i):
        """One training iteration; returns the loss (fetched, as the tutorial does)."""
        workspace.SwitchWorkspace(self.name)
        workspace.RunNet(self.net_name)
        return float(workspace.FetchBlob("loss"))

    @property
    def compile_seconds(self):
        """Seconds the net spent in torch.compile."""
        workspace.SwitchWorkspace(self.name)
        return workspace.C().nets[self.net_name].compile_seconds

    def close(self):
        """Drop the workspace's nets and blobs (closes the DB reader, flushes the files)."""
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


def run_lockstep(trainers, iters, seed=0):
    """Step every trainer once per iteration, in a shuffled order; returns seconds and losses.

    Timing each variant's iterations side by side makes the ratio robust to a machine whose
    load changes during the run (the variants see the same conditions, a few ms apart). The
    order is drawn anew each iteration: with a fixed rotation each variant would always follow
    the same other one and inherit what that one leaves running (its DB prefetch thread).
    """
    names = list(trainers)
    rng = np.random.default_rng(seed)
    seconds = dict.fromkeys(names, 0.0)
    losses = {n: np.zeros(iters) for n in names}
    for i in range(iters):
        for k in rng.permutation(len(names)):
            name = names[k]
            start = time.perf_counter()
            losses[name][i] = trainers[name].step(i)
            if i:  # iteration 0 compiles the compiled net: no variant counts it
                seconds[name] += time.perf_counter() - start
    return seconds, losses


def main():
    """Measure and print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nets", help="a run's workspace/ folder with train_init_net.pb and "
                        "train_net.pb (default: run notebooks 01 and 02 into a temporary folder)")
    parser.add_argument("--data-dir", default="data", help="01_download's data_dir (without --nets)")
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each variant, in lockstep")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--skip-compiled", action="store_true", help="leave the compiled net out")
    parser.add_argument("--compare-layouts", action="store_true",
                        help="also run the compiled net with compile_onednn_layout=0")
    parser.add_argument("--isolated-runs", type=int, default=3,
                        help="rounds of one process per variant, one after another (0: none)")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: a child of --isolated-runs
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    nets_dir = args.nets or build_nets(os.path.abspath(args.data_dir), args.device)
    init_net, train_net = load_net(nets_dir, "train_init_net"), load_net(nets_dir, "train_net")
    db_op = next(op for op in train_net.op if op.type == "TensorProtosDBInput")
    batch = next(a.i for a in db_op.arg if a.name == "batch_size")
    # ModelHelper puts the reader in the init net: CreateDB(db=..., db_type=...)
    create_db = next(op for op in init_net.op if op.type == "CreateDB")
    train_db = next(a.s.decode() for a in create_db.arg if a.name == "db")
    device = torch.device(args.device)
    weights = initial_weights(init_net, args.seed)
    images, labels = load_batches(train_db, args.iters * batch)
    nets = {"eager": variant(train_net, "simple", False),
            "eager+bookkeeping": variant(train_net, "simple", True)}
    if not args.skip_compiled:
        nets["compiled"] = variant(train_net, "compiled", False)
        if args.compare_layouts:
            nets["compiled NCHW"] = variant(train_net, "compiled", False, onednn_layout=False)

    def make_trainer(name, run):
        if name == "plain PyTorch":
            return PlainTrainer(images, labels, weights, batch, device)
        return Caffe2TorchTrainer(f"bench_{list(nets).index(name)}_{run}", init_net, nets[name],
                                  weights, tempfile.mkdtemp(prefix="c2t-bench-"))

    if args.one:
        return run_alone(args.one, make_trainer, args.iters)
    names = list(nets) + ["plain PyTorch"]
    times = {n: [] for n in names}
    ratios = {n: [] for n in nets}
    compile_seconds = []
    curves = {}
    for run in range(args.repeats + 1):  # run 0 warms up and is not counted
        trainers = {name: make_trainer(name, 0) for name in names}
        seconds, losses = run_lockstep(trainers, args.iters if run else 10, args.seed + run)
        if "compiled" in trainers:
            compile_seconds.append(trainers["compiled"].compile_seconds)
        for trainer in trainers.values():
            trainer.close()
        if run == 0:
            continue
        curves = losses
        for name in names:
            times[name].append(seconds[name])
        for name in ratios:
            ratios[name].append(seconds[name] / seconds["plain PyTorch"])
    workspace.SwitchWorkspace("default")

    print(f"LeNet from {nets_dir}: {args.iters} iterations (1..{args.iters - 1} timed), batch "
          f"{batch}, device {args.device}, torch {torch.__version__}, {torch.get_num_threads()} "
          f"threads, {args.repeats} runs each, lockstep")
    for name, runs in times.items():
        print(f"  {name:18s} median {statistics.median(runs):7.3f} s   runs: "
              f"{', '.join(f'{t:.3f}' for t in runs)}")
    targets = {"eager": 1.05, "eager+bookkeeping": 1.10, "compiled": 0.90 if args.device == "cpu" else 0.5}
    print_ratios("ratio", ratios, targets)
    if compile_seconds:
        print(f"compile time of the compiled net: {compile_seconds[0]:.1f} s in the first run "
              f"(cold or warm inductor cache), then {', '.join(f'{c:.1f}' for c in compile_seconds[1:])} s "
              "(a new CreateNet each run: traced again, inductor's FX graph cache hits)")
    ref = curves["plain PyTorch"]
    for name, base, target in (("eager", "plain PyTorch", 1e-4),
                               ("eager+bookkeeping", "plain PyTorch", 1e-4),
                               ("compiled", "eager", 1e-5),
                               ("compiled NCHW", "eager", 1e-5)):
        if name not in curves:
            continue
        rel = np.abs(curves[name] - curves[base]) / np.abs(curves[base])
        worst = float(np.max(rel))
        within = int(np.argmax(rel > target)) if worst > target else len(rel)
        print(f"loss curves {name} vs {base}: max relative difference {worst:.2e} over "
              f"{args.iters} iterations (target <= {target:g}: {'met' if worst <= target else 'NOT met'}"
              f"; within it for the first {within} iterations)")
    print("final loss: " + ", ".join(f"{n} {c[-1]:.4f}" for n, c in curves.items()))
    print(f"reference: {ref[0]:.4f} at iteration 0")
    if args.isolated_runs:
        run_isolated(names, nets_dir, args, targets)


def run_alone(name, make_trainer, iters):
    """The child of --isolated-runs: variant ``name`` alone in this process, warmed up by a
    10-iteration run as the lockstep's run 0; prints the timed run's figures as one JSON line."""
    warm = make_trainer(name, 0)
    for i in range(10):
        warm.step(i)
    warm.close()
    timed = make_trainer(name, 1)
    loss = timed.step(0)  # the compiled net compiles here: not timed, as in the lockstep
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    start = time.perf_counter()
    for i in range(1, iters):
        loss = timed.step(i)
    seconds = time.perf_counter() - start
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / (iters - 1)
    compile_seconds = timed.compile_seconds if name.startswith("compiled") else None
    timed.close()
    print(json.dumps({"seconds": seconds, "final_loss": loss, "compile_seconds": compile_seconds,
                      "faults": faults}))


def run_isolated(names, nets_dir, args, targets):
    """Each variant in a process of its own, as a user runs one net, one after another in an
    order shuffled every round; per round, each variant's time over plain PyTorch's.

    In the lockstep all variants share one heap: the plain loop's page faults drop (its
    autograd temporaries land in memory the nets' blobs freed) and the nets' rise, so the two
    measurements differ; this one is what a training process sees, the lockstep the one robust
    to a changing machine load."""
    rng = np.random.default_rng(args.seed + 1000)
    seconds = {n: [] for n in names}
    faults = {n: [] for n in names}
    ratios = {n: [] for n in names if n != "plain PyTorch"}
    for _ in range(args.isolated_runs):
        this_round = {}
        for k in rng.permutation(len(names)):
            cmd = [sys.executable, os.path.abspath(__file__), "--nets", nets_dir, "--iters",
                   str(args.iters), "--device", args.device, "--seed", str(args.seed),
                   "--threads", str(args.threads), "--one", names[k]]
            if args.compare_layouts:
                cmd.append("--compare-layouts")
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            result = json.loads(out.strip().splitlines()[-1])
            this_round[names[k]] = result["seconds"]
            faults[names[k]].append(result["faults"])
        for name, sec in this_round.items():
            seconds[name].append(sec)
            if name in ratios:
                ratios[name].append(sec / this_round["plain PyTorch"])
    print(f"one process per variant, {args.isolated_runs} rounds (iterations 1..{args.iters - 1} "
          "timed, after a 10-iteration warm-up run in the same process):")
    for name, runs in seconds.items():
        print(f"  {name:18s} median {statistics.median(runs):7.3f} s   runs: "
              f"{', '.join(f'{t:.3f}' for t in runs)}   page faults an iteration: median "
              f"{statistics.median(faults[name]):.0f}")
    print_ratios("isolated ratio", ratios, targets)


def print_ratios(label, ratios, targets):
    """One line per variant: the median of its per-run ratios to plain PyTorch, the runs', and
    whether the target holds."""
    for name, rs in ratios.items():
        ratio = statistics.median(rs)
        target = (f"target <= {targets[name]}: {'met' if ratio <= targets[name] else 'NOT met'}"
                  if name in targets else "no target")
        print(f"{label} {name}/plain: median {ratio:.3f} (runs {', '.join(f'{r:.3f}' for r in rs)}; "
              f"{target})")


if __name__ == "__main__":
    main()
