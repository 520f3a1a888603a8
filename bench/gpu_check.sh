#!/usr/bin/env bash
# The GPU check, in one go: the engine's tests on CUDA (the op tests parametrize over "cuda" when
# torch sees a GPU; the LeNet and executor tests include CUDA cases), then the engine benchmark on
# CUDA. Run it on a machine with an NVIDIA GPU and a CUDA build of torch:
#
#   bash bench/gpu_check.sh [PYTHON]        # PYTHON defaults to .venv/bin/python
#
# Prints the test summary and the benchmark's figures; exits non-zero if either fails.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-.venv/bin/python}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
"$PY" - <<'PYCHECK'
import sys, torch
if not torch.cuda.is_available():
    sys.exit("gpu_check: torch sees no CUDA GPU (torch %s); install a CUDA build of torch" % torch.__version__)
print("torch", torch.__version__, "on", torch.cuda.get_device_name(0))
PYCHECK
"$PY" -m pytest -q -p no:cacheprovider tests/ops tests/test_executor.py tests/test_lenet.py \
    tests/test_predictor_exporter.py tests/test_core_api.py
"$PY" bench/engine_vs_torch.py --device cuda --repeats 3
