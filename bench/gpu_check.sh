#!/usr/bin/env bash
# The GPU check, in one go: the engine's tests on CUDA (the op tests parametrize over "cuda" when
# torch sees a GPU; the LeNet and executor tests include CUDA cases; the compiled-net tests), then
# the benchmarks on CUDA: the LeNet training (eager, eager+bookkeeping, compiled with CUDA graphs,
# "reduce-overhead") and the HEMT per-op overhead net. Run it on a machine with an NVIDIA GPU and
# a CUDA build of torch:
#
#   bash bench/gpu_check.sh [PYTHON] [NETS_DIR]   # PYTHON defaults to .venv/bin/python
#
# NETS_DIR: a run's workspace/ folder written by notebooks/02_build.ipynb with device=cuda; without
# it the LeNet bench runs notebooks 01 and 02 itself (02 with device=cuda). Prints the test summary
# and the benchmarks' figures; exits non-zero if a test or a benchmark fails.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-.venv/bin/python}
NETS=${2:-}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
"$PY" - <<'PYCHECK'
import sys, torch
if not torch.cuda.is_available():
    sys.exit("gpu_check: torch sees no CUDA GPU (torch %s); install a CUDA build of torch" % torch.__version__)
print("torch", torch.__version__, "on", torch.cuda.get_device_name(0))
PYCHECK
"$PY" -m pytest -q -p no:cacheprovider tests/ops tests/test_executor.py tests/test_lenet.py \
    tests/test_predictor_exporter.py tests/test_core_api.py tests/test_compiled_net.py \
    tests/test_bookkeeping.py tests/test_data_parallel_model.py
"$PY" bench/engine_vs_torch.py --device cuda --repeats 3 ${NETS:+--nets "$NETS"}
"$PY" bench/op_overhead.py --device cuda --blocks 9 --runs 300
