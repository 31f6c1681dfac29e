#!/usr/bin/env bash
# Prepared check for the lent GPU machine: does a CPU-only wheel (DTK_WITH_CUDA=0, no CUDA C++)
# run the ops on the GPU? Builds the wheel there against the machine's own torch (a wheel runs
# only against the torch it was compiled with), installs it with --target (no network, no venv:
# the machine's torch is used) and runs scripts/wheel_smoke.py from an empty directory; the smoke
# test's GPU section runs every op on CUDA tensors (Triton kernels, tile_reorder's torch fallback).
#   run from the repo root:  bash scripts/gpu_check_wheel.sh      (~2 min: the CPU build, then the smoke test)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
PY="${PYTHON:-$(command -v python3 || command -v python)}"
OUT="${OUT:-$ROOT/gpu_check_out}"
mkdir -p "$OUT"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/src" "$tmp/site" "$tmp/run" "$tmp/dist"
bash scripts/copy_sources.sh "$tmp/src"
DTK_WITH_CUDA=0 MAX_JOBS="${MAX_JOBS:-16}" "$PY" -m pip wheel "$tmp/src" --no-build-isolation --no-deps --no-index \
  -w "$tmp/dist" -q > "$OUT/wheel_build.log" 2>&1 || { tail -n 40 "$OUT/wheel_build.log"; exit 1; }
"$PY" -m pip install -q --no-index --no-deps --target "$tmp/site" "$tmp"/dist/dtk-*.whl
cd "$tmp/run"
DTK_SMOKE_SITE="$tmp/site" PYTHONPATH="$tmp/site" "$PY" "$ROOT/scripts/wheel_smoke.py" --wheel "$(ls "$tmp"/dist/dtk-*.whl)" \
  2>&1 | tee "$OUT/wheel_smoke.log"
exit "${PIPESTATUS[0]}"
