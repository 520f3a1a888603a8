"""What the notebook pipeline costs over plain Python: run_all.py vs the same steps in one process.

Both sides start from a fresh process with the MNIST databases already prepared and do the same
work with the same parameters (default: params/default.yaml, 200 iterations, 100 test batches):
- pipeline: ``python run_all.py -f PARAMS`` (5 kernels, papermill, HTML, run.json, history);
- plain: ``python -c`` calling mnist_tutorial.steps' ``*_step`` functions in order.
They run alternately, ``--repeats`` times each; the best time of each side is compared (the least
disturbed on a shared machine). Target: pipeline / plain <= 1.5.
A third side, ``run_all.py --fresh-kernels`` (every kernel a new Python process instead of a fork
of the kernel fork server), shows what the fork server saves.

Usage: PYTHONPATH=. python bench/pipeline_overhead.py [-f params/default.yaml] [--repeats 3]
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TARGET = 1.5

PLAIN = """
import inspect, sys
from mnist_tutorial import runner, steps
params = runner.resolve_params([sys.argv[1]], sys.argv[3:])
run_dir = sys.argv[2]
# each step function gets the parameters its signature names (the notebooks declare the same)
pick = lambda fn: {k: params[k] for k in inspect.signature(fn).parameters if k in params}
steps.download_step(run_dir, **pick(steps.download_step))
steps.build_step(run_dir, **pick(steps.build_models))
steps.train_step(run_dir, **pick(steps.train_step))
steps.test_step(run_dir, **pick(steps.test_step))
steps.export_step(run_dir)
"""


def timed(cmd, env):
    """Wall seconds of a command (it must succeed)."""
    start = time.perf_counter()
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        sys.exit(f"{' '.join(cmd[:3])} ... failed:\n{result.stdout[-2000:]}{result.stderr[-2000:]}")
    return seconds


def main():
    """Prepare the data, time both sides alternately, print the ratio."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-f", "--params-file", default="params/default.yaml")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    from mnist_tutorial import runner
    from mnist_tutorial.data import prepare_mnist
    params = runner.resolve_params([args.params_file], ["device=cpu"])
    prepare_mnist(REPO / params["data_dir"] if not Path(params["data_dir"]).is_absolute()
                  else params["data_dir"], source=params["data_source"], progress=False)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    overrides = ["-p", "device=cpu"]
    pipeline_times, fresh_times, plain_times = [], [], []
    with tempfile.TemporaryDirectory(prefix="pipeline-bench-") as tmp:
        for i in range(args.repeats):
            pipeline_times.append(timed(
                [sys.executable, "run_all.py", "-f", args.params_file, *overrides,
                 "--outputs", f"{tmp}/outputs", "--run-id", f"bench{i}"], env))
            plain_times.append(timed(
                [sys.executable, "-c", PLAIN, args.params_file, f"{tmp}/plain{i}", "device=cpu"],
                env))
            fresh_times.append(timed(
                [sys.executable, "run_all.py", "-f", args.params_file, *overrides,
                 "--outputs", f"{tmp}/fresh", "--run-id", f"fresh{i}", "--fresh-kernels"], env))
            print(f"repeat {i}: pipeline {pipeline_times[-1]:.1f} s, plain {plain_times[-1]:.1f} s, "
                  f"pipeline --fresh-kernels {fresh_times[-1]:.1f} s", flush=True)
        run = json.loads(Path(f"{tmp}/outputs/bench{args.repeats - 1}/run.json").read_text())
    steps = ", ".join(f"{s['name']} {s['seconds']:.1f}" for s in run["steps"])
    best_pipeline, best_plain = min(pipeline_times), min(plain_times)
    ratio = best_pipeline / best_plain
    print(f"params: {args.params_file}; cpus: {os.cpu_count()}; "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    print(f"pipeline steps (last run, s): {steps}; test accuracy "
          f"{run['metrics'].get('test_accuracy', float('nan')):.4f}")
    print(f"run_all.py (best of {args.repeats}): {best_pipeline:.1f} s")
    print(f"plain Python (best of {args.repeats}): {best_plain:.1f} s")
    print(f"run_all.py --fresh-kernels (best of {args.repeats}): {min(fresh_times):.1f} s; "
          f"ratio {min(fresh_times) / best_plain:.2f} (no fork server)")
    paired = sorted(a / b for a, b in zip(pipeline_times, plain_times))
    print(f"ratio pipeline / plain: {ratio:.2f} (target <= {TARGET}: "
          f"{'met' if ratio <= TARGET else 'NOT met'}); median of the paired ratios "
          f"{paired[len(paired) // 2]:.2f}")


if __name__ == "__main__":
    main()
