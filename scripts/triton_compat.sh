#!/usr/bin/env bash
# The Triton kernels also compile with the oldest supported Triton (3.6: the lent GPU machine's),
# not only with the venv's: the AOT compile tests (sm_80 / sm_90a, shared memory, ptxas wgmma
# serialisation and spills; tests/triton_aot.py) rerun with that Triton first on the path. No GPU
# needed. TRITON_COMPAT_VERSION picks another version.
source "$(dirname "$0")/env.sh"
path="$(side_path triton "${TRITON_COMPAT_VERSION:-3.6.0}")"
PYTHONPATH="$path" python -c "import triton; print(f'Triton {triton.__version__} from {triton.__file__}')"
PYTHONPATH="$path" python -m pytest tests/ops/*/test_triton_compile.py -q -n "${PYTEST_WORKERS:-2}" \
  -p no:cacheprovider "$@"
