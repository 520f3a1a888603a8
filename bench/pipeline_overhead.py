"""What the notebook pipeline costs over plain Python: run_all.py vs the same notebooks' code in one
process.

Both sides start from a fresh process with the MNIST databases already prepared and do the same
work with the same parameters (default: params/default.yaml, i.e. the notebooks' defaults):
- pipeline: ``python run_all.py -f PARAMS`` (5 kernels, papermill, HTML, run.json, history);
- plain: one ``python`` that execs each notebook's code cells in order, in a fresh namespace per
  notebook, with the parameters injected after its parameters cell (as papermill does), in the
  run folder (papermill's cwd); matplotlib draws with Agg.
A third side, ``run_all.py --fresh-kernels`` (every kernel a new Python process instead of a
fork of the kernel fork server), shows what the fork provisioner saves. They run alternately,
``--repeats`` times each; the best time of each side is compared (the least disturbed on a
shared machine). Target: pipeline / plain <= 1.3. The CPU seconds of each side (its whole process
tree: every process is waited for by its parent) are printed too: on a busy machine they say
more than wall time.

Usage: python bench/pipeline_overhead.py [-f params/default.yaml] [--repeats 3]
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TARGET = 1.3

PLAIN = """
import os, sys, nbformat
os.environ.setdefault("MPLBACKEND", "Agg")
from pipeline import params
run_dir = os.path.abspath(sys.argv[2])
values = params.resolve([("in " + sys.argv[1], params.load_file(sys.argv[1])),
                         ("bench", {"device": "cpu"})])
os.makedirs(run_dir, exist_ok=True)
os.chdir(run_dir)
for step in params.STEPS:
    nb = nbformat.read(str(params.notebook_path(step)), as_version=4)
    namespace = {"__name__": "__main__"}
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        # IPython magics (%matplotlib inline) are the kernel's; plain Python draws with Agg
        source = chr(10).join(line for line in cell.source.splitlines()
                              if not line.lstrip().startswith("%"))
        exec(compile(source, f"{step}:cell", "exec"), namespace)
        if "parameters" in cell.metadata.get("tags", []):
            namespace.update(params.for_step(step, values), run_dir=run_dir)
"""


def timed(cmd, env):
    """(wall seconds, CPU seconds of its process tree) of a command (it must succeed)."""
    before, start = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    seconds, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_CHILDREN)
    if result.returncode != 0:
        sys.exit(f"{' '.join(cmd[:3])} ... failed:\n{result.stdout[-2000:]}{result.stderr[-2000:]}")
    return seconds, after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime


def kernel_start(kernel_name, fork):
    """(wall s until a kernel has imported what the notebooks import, that kernel's CPU s)."""
    from jupyter_client import KernelManager
    os.environ["CAFFE2TORCH_FORK_KERNELS"] = "1" if fork else "0"
    start = time.perf_counter()
    km = KernelManager(kernel_name=kernel_name)
    km.start_kernel()
    kc = km.client()
    kc.start_channels()
    out = []
    try:
        kc.wait_for_ready(120)
        kc.execute_interactive(
            "import time, torch, matplotlib.pyplot, caffe2torch.ops; print(time.process_time())",
            timeout=300, output_hook=lambda m: out.append(m["content"].get("text", ""))
            if m["msg_type"] == "stream" else None)
        return time.perf_counter() - start, float("".join(out))
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
        del os.environ["CAFFE2TORCH_FORK_KERNELS"]


def main():
    """Prepare the data, time the sides alternately, print the ratios."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-f", "--params-file", default="params/default.yaml")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    from jupyter_client.kernelspec import KernelSpecManager

    from pipeline import execute, kernelfork
    spec_name = execute.kernel_spec("download")[0]
    spec = KernelSpecManager().get_kernel_spec(spec_name)
    forks = kernelfork._config(spec) is not None
    kernelfork.warm(spec)
    starts = {True: [], False: []}
    for _ in range(args.repeats):
        for fork in (True, False):
            starts[fork].append(kernel_start(spec_name, fork))
    kernelfork.close_all()
    env = dict(os.environ, MPLBACKEND="Agg")
    run_all = [sys.executable, "run_all.py", "-f", args.params_file, "-p", "device=cpu", "-q"]
    times = {"pipeline": [], "plain": [], "fresh": []}
    with tempfile.TemporaryDirectory(prefix="pipeline-bench-") as tmp:
        timed([*run_all, "--only", "download", "--outputs", f"{tmp}/warm"], env)  # the data
        for i in range(args.repeats):
            times["pipeline"].append(timed(
                [*run_all, "--outputs", f"{tmp}/outputs", "--run-id", f"bench{i}"], env))
            times["plain"].append(timed(
                [sys.executable, "-c", PLAIN, args.params_file, f"{tmp}/plain{i}"], env))
            times["fresh"].append(timed(
                [*run_all, "--outputs", f"{tmp}/fresh", "--run-id", f"fresh{i}",
                 "--fresh-kernels"], env))
            print(f"repeat {i} (wall s, CPU s): " + ", ".join(
                f"{side} {times[side][-1][0]:.1f}, {times[side][-1][1]:.1f}" for side in times),
                flush=True)
        run = json.loads(Path(f"{tmp}/outputs/bench{args.repeats - 1}/run.json").read_text())
    best = {side: min(w for w, _ in values) for side, values in times.items()}
    cpu = {side: min(c for _, c in values) for side, values in times.items()}
    ratio = best["pipeline"] / best["plain"]
    steps = ", ".join(f"{s['name']} {s['seconds']:.1f} ({s.get('kernel')})" for s in run["steps"])
    print(f"params: {args.params_file}; cpus: {os.cpu_count()}; load average "
          f"{os.getloadavg()[0]:.1f}; kernelspec names the fork provisioner: {forks}")
    print(f"pipeline steps (last run, s): {steps}; test accuracy "
          f"{run['metrics'].get('test_accuracy', float('nan')):.4f}")
    print(f"run_all.py (best of {args.repeats}): {best['pipeline']:.1f} s")
    print(f"plain Python (best of {args.repeats}): {best['plain']:.1f} s")
    print(f"run_all.py --fresh-kernels (best of {args.repeats}): {best['fresh']:.1f} s; "
          f"ratio {best['fresh'] / best['plain']:.2f} (no fork server)")
    print(f"CPU seconds (best of {args.repeats}): pipeline {cpu['pipeline']:.1f}, plain "
          f"{cpu['plain']:.1f}, --fresh-kernels {cpu['fresh']:.1f}; ratios "
          f"{cpu['pipeline'] / cpu['plain']:.2f} and {cpu['fresh'] / cpu['plain']:.2f}")
    for fork, name in ((True, "forked"), (False, "new process")):
        print(f"one kernel, {name} (best of {args.repeats}): "
              f"{min(w for w, _ in starts[fork]):.2f} s until it has imported torch, matplotlib "
              f"and caffe2torch.ops, {min(c for _, c in starts[fork]):.2f} CPU s in the kernel")
    paired = sorted(a[0] / b[0] for a, b in zip(times["pipeline"], times["plain"]))
    print(f"ratio pipeline / plain: {ratio:.2f} (target <= {TARGET}: "
          f"{'met' if ratio <= TARGET else 'NOT met'}); median of the paired ratios "
          f"{paired[len(paired) // 2]:.2f}")


if __name__ == "__main__":
    main()
