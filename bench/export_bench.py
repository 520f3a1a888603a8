"""Exported Caffe2 nets vs caffe2torch's RunNet: onnxruntime, the torch.export program, the
NetModule (and optionally the torch.compile'd program) on the same batches, side by side.

Nets: the tutorial's LeNet (random weights; the deploy net), the CIFAR ResNet with its real
weights (CUDA options run on the CPU) and the HEMT model, from ../shared/caffe2-artifacts. Each
timing round runs every variant once on the same batch, the order rotating, so a change of
machine load hits all variants alike. Prints the median time per batch of each variant and the
median of the per-round ratios RunNet / variant (above 1: the variant is faster), and the largest
abs difference of each variant from RunNet's outputs.

    PYTHONPATH=. /work/venv/bin/python bench/export_bench.py [--rounds 20] [--batch 64]
        [--nets lenet,cifar_resnet,hemt] [--threads N] [--compile]
"""
import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from caffe2torch import convert  # noqa: E402
from caffe2torch.proto import caffe2_pb2  # noqa: E402
from caffe2torch.python import core, workspace  # noqa: E402
from tutorial_nets import build_nets, load_net  # noqa: E402

ARTIFACTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..",
                         "shared", "caffe2-artifacts")
CPU = core.DeviceOption(caffe2_pb2.CPU)


def lenet_nets():
    """(init net, predict net, input names, input shape per sample) of the tutorial's LeNet.

    The nets are 02_build's own (tutorial_nets runs the download and build notebooks): its deploy
    net, and the ops of its train init net that make the deploy net's parameters.
    """
    nets_dir = build_nets(os.path.abspath("data"), "cpu")
    predict = load_net(nets_dir, "deploy_net")
    init = load_net(nets_dir, "train_init_net")
    params = set(predict.external_input)
    kept = [op for op in init.op if set(op.output) <= params]
    del init.op[:]
    init.op.extend(kept)
    return init, predict, ["data"], [(1, 28, 28)]


def file_nets(name, inputs, shapes):
    """The init and predict NetDefs of artifact ``name``."""
    def load(kind):
        with open(os.path.join(ARTIFACTS, f"{name}_{kind}_net.pb"), "rb") as f:
            return caffe2_pb2.NetDef.FromString(f.read())
    return load("init"), load("predict"), inputs, shapes


NETS = {
    "lenet": lenet_nets,
    "cifar_resnet": lambda: file_nets("cifar_resnet", ["data"], [(3, 32, 32)]),
    "hemt": lambda: file_nets("hemt", ["DBInput_train/tanh_input", "DBInput_train/sig_input"],
                              [(1,), (1,)]),
}


def bench_net(name, batch, rounds, compile_module, folder):
    """Time the variants of net ``name``; returns printable rows."""
    import onnxruntime

    init, predict, inputs, shapes = NETS[name]()
    torch.manual_seed(0)
    workspace.ResetWorkspace(folder)
    workspace.RunNetOnce(init, device_option=CPU)
    params = {n: workspace.FetchTorch(n) for n in workspace.Blobs()}
    module = convert.NetModule(predict, params, inputs)
    rng = np.random.default_rng(0)
    batches = [[rng.uniform(0, 1, (batch, *s)).astype(np.float32) for s in shapes]
               for _ in range(rounds + 2)]
    example = tuple(torch.from_numpy(x) for x in batches[0])
    program = convert.export_program(module, example, dynamic_batch=True)
    onnx_path = os.path.join(folder, f"{name}.onnx")
    convert.export_onnx(module, example, onnx_path, dynamic_batch=True, program=program)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()  # the same threads as torch
    session = onnxruntime.InferenceSession(onnx_path, options, providers=["CPUExecutionProvider"])
    exported = program.module()

    for n, x in zip(inputs, batches[0]):
        workspace.FeedBlob(n, x)
    workspace.CreateNet(predict, overwrite=True, device_option=CPU)
    out_name = module.output_names[0]

    def run_net(xs):
        for n, x in zip(inputs, xs):
            workspace.FeedBlob(n, x)
        workspace.RunNet(predict.name)
        return workspace.FetchBlob(out_name)

    def torch_variant(fn):
        def run(xs):
            with torch.no_grad():
                out = fn(*[torch.from_numpy(x) for x in xs])
            out = out if isinstance(out, torch.Tensor) else out[0]
            return out.numpy()
        return run

    variants = {"RunNet": run_net,
                "onnxruntime": lambda xs: session.run(None, dict(zip(inputs, xs)))[0],
                "torch.export program": torch_variant(exported),
                "NetModule (eager)": torch_variant(module)}
    if compile_module:
        # The exported program's flat graph compiles in one piece (the NetModule's per-op
        # Python caches would make dynamo recompile per op).
        variants["torch.compile(program)"] = torch_variant(torch.compile(exported, dynamic=False))
    names = list(variants)
    diffs = {v: 0.0 for v in names}
    for xs in batches[:2]:  # warm-up (and torch.compile's compilation)
        want = run_net(xs)
        for v in names:
            diffs[v] = max(diffs[v], float(np.abs(variants[v](xs) - want).max()))
    times = {v: [] for v in names}
    for r, xs in enumerate(batches[2:]):
        order = names[r % len(names):] + names[:r % len(names)]
        for v in order:
            start = time.perf_counter()
            variants[v](xs)
            times[v].append(time.perf_counter() - start)
    base = times["RunNet"]
    rows = []
    for v in names:
        ratio = statistics.median(b / t for b, t in zip(base, times[v]))
        rows.append((name, v, statistics.median(times[v]) * 1e3, ratio, diffs[v]))
    return rows


def main(argv=None):
    """Run the benchmark and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20, help="timed batches per net")
    parser.add_argument("--batch", type=int, default=64, help="batch size")
    parser.add_argument("--nets", default=",".join(NETS), help="comma-separated: " +
                        ", ".join(NETS))
    parser.add_argument("--compile", action="store_true",
                        help="also time torch.compile of the exported program (needs a C compiler; "
                        "slow start)")
    parser.add_argument("--threads", type=int, default=None,
                        help="intra-op threads of torch and onnxruntime (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, "
          f"{args.rounds} rounds")
    print(f"{'net':<13} {'variant':<26} {'ms/batch':>9} {'RunNet/variant':>15} "
          f"{'max abs diff':>13}")
    with tempfile.TemporaryDirectory(prefix="c2t-export-bench-") as folder:
        for name in args.nets.split(","):
            for net, variant, ms, ratio, diff in bench_net(name, args.batch, args.rounds,
                                                          args.compile, folder):
                print(f"{net:<13} {variant:<26} {ms:>9.3f} {ratio:>15.2f} {diff:>13.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
