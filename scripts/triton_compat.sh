#!/usr/bin/env bash
# The Triton kernels also compile with the oldest supported Triton (3.6: the lent GPU machine's),
# not only with the venv's: the AOT compile tests (sm_80 / sm_90a, shared memory, ptxas wgmma
# serialisation and spills; tests/triton_aot.py) rerun with that Triton first on the path. No GPU
# needed. TRITON_COMPAT_VERSION picks another version.
source "$(dirname "$0")/env.sh"
VER="${TRITON_COMPAT_VERSION:-3.6.0}"
dir="$ROOT/.venv/triton-$VER"
if [ ! -f "$dir/triton/__init__.py" ]; then
  python -m pip install -q --no-deps --target "$dir" "triton==$VER"
fi
PYTHONPATH="$dir${PYTHONPATH:+:$PYTHONPATH}" python - <<PY
import triton
assert triton.__version__ == "$VER", f"expected Triton $VER first on the path, got {triton.__version__} ({triton.__file__})"
print(f"Triton {triton.__version__} from {triton.__file__}")
PY
PYTHONPATH="$dir${PYTHONPATH:+:$PYTHONPATH}" python -m pytest tests/ops/*/test_triton_compile.py -q \
  -n "${PYTEST_WORKERS:-2}" -p no:cacheprovider "$@"
