#!/usr/bin/env bash
# Builds the dtk wheel and smoke-tests it installed in a fresh venv, away from the source tree.
#   bash scripts/wheel_check.sh            # CPU-only wheel (DTK_WITH_CUDA=0), the CI default
#   DTK_WITH_CUDA=1 bash scripts/wheel_check.sh   # also compile the CUDA C++ kernels into it
# The wheel lands in dist/. Build python: $PYTHON, else the project venv (.venv, made by
# scripts/env.sh), else python3; it needs torch, setuptools, cmake and ninja (build isolation is off
# so the wheel is compiled against that torch).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY="$ROOT/.venv/bin/python"; else PY="$(command -v python3)"; fi
fi
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDA_HOME=/usr/local/cuda
fi
export DTK_WITH_CUDA="${DTK_WITH_CUDA:-0}"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
t0=$SECONDS

# 1. Build from a copy of the sources git knows about (tracked + untracked-not-ignored), so no
#    in-place build output (build/, python/dtk/_C*.so, __pycache__) can leak into the wheel.
bash scripts/copy_sources.sh "$tmp/src"
rm -rf dist && mkdir -p dist
echo "== wheel_check: building the wheel (DTK_WITH_CUDA=$DTK_WITH_CUDA) with $PY"
"$PY" -m pip wheel "$tmp/src" --no-build-isolation --no-deps -w dist -q
whl="$(ls dist/dtk-*.whl)"
echo "== wheel_check: built $whl in $((SECONDS - t0)) s"
"$PY" -m zipfile -l "$whl"

# 2. A fresh venv with the wheel and, from the package index (the local disk here), the torch it was
#    built against (the extension's C++ ABI is that release's: a newer torch would not load it).
t1=$SECONDS
torch_ver="$("$PY" -c 'import torch; print(torch.__version__.split("+")[0])')"
"$PY" -m venv "$tmp/venv"
"$tmp/venv/bin/python" -m pip install -q "torch==$torch_ver" numpy "$whl"
echo "== wheel_check: installed into a fresh venv in $((SECONDS - t1)) s"

# 3. The smoke test, run from an empty directory so `import dtk` can only find the installed wheel.
t2=$SECONDS
mkdir -p "$tmp/run"
(cd "$tmp/run" && "$tmp/venv/bin/python" "$ROOT/scripts/wheel_smoke.py" --wheel "$ROOT/$whl")
echo "== wheel_check: smoke test in $((SECONDS - t2)) s; wheel check total $((SECONDS - t0)) s"
