#!/usr/bin/env bash
# The prepared check for the lent GPU machine (H100/H200, torch 2.11, Triton 3.6, nvcc, no network).
# Builds dtk in place, runs the test suite, then the GPU benchmarks, then the CPU-only wheel check;
# everything lands in $OUT, at most 8 files (what the device tool brings back): env.txt tests.log
# bench.log bench.json bench.png RESULTS.md wheel_smoke.log, sweep.json with SWEEP_S > 0 (its log
# goes to bench.log, as does the linear sweep's with LSWEEP_S > 0), build.log only when the build fails.
# Whole run sized to ~9 minutes: each step gets what is left of TOTAL_S.
#   run from the repo root:  bash scripts/gpu_check.sh
# The machine gets the tree without .git: pass DTK_GIT_COMMIT=<short hash> for the results' header.
# Offline machine: the pure-Python wheels it lacks are carried in .gpu/whl (git-ignored) and
# installed below, e.g. the fla benchmark peer (fla-core and its one dependency, einops):
#   pip download --no-deps --only-binary=:all: --python-version 3.12 fla-core==0.6.0 einops -d .gpu/whl
# (NATTEN is not carried: building its CUDA library takes far longer than the device time, and
# without it NATTEN only wraps Flex Attention, which the flex rows time; natten rows say "natten
# not installed" there.)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_check_out}"
mkdir -p "$OUT"
TOTAL_S="${TOTAL_S:-540}"
export PYTHONUNBUFFERED=1
left() { echo $(( TOTAL_S - SECONDS )); }

# the GPU image's torch python is python3 (a plain `python` may be missing there)
PY="${PYTHON:-$(command -v python3 || command -v python)}"

# CUDA toolkit: /usr/local/cuda if it has nvcc, else the root above the real nvcc
if [ -x /usr/local/cuda/bin/nvcc ]; then
  CUDA_HOME=/usr/local/cuda
elif command -v nvcc > /dev/null; then
  CUDA_HOME="$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")"
else
  CUDA_HOME=""; echo "warning: no nvcc found, the CUDA C++ sources will not be built"
fi
export CUDA_HOME
# CUTLASS headers: the machine has no network and may lack nvidia-cutlass; the session carries
# them as .gpu/cutlass-include.tar.gz (made from the nvidia-cutlass package) when needed
if [ -f .gpu/cutlass-include.tar.gz ] && [ ! -d third_party/cutlass/include/cutlass ]; then
  mkdir -p /tmp/dtk-cutlass && tar xzf .gpu/cutlass-include.tar.gz -C /tmp/dtk-cutlass
  export DTK_CUTLASS_INCLUDE=/tmp/dtk-cutlass/include
fi

{
  echo "== $(date -u '+%F %T UTC')"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,temperature.gpu,utilization.gpu --format=csv || true
  echo "CUDA_HOME=$CUDA_HOME"; [ -n "$CUDA_HOME" ] && "$CUDA_HOME/bin/nvcc" --version | tail -n 2 || true
  "$PY" -c "import torch, triton, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version(), 'triton', triton.__version__)"
  echo "nproc $(nproc)"
} 2>&1 | tee "$OUT/env.txt"

# Python packages the offline machine lacks (diffusers for the adapter benchmarks), carried as
# wheels in .gpu/whl when the session has them
if compgen -G ".gpu/whl/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/dtk-site .gpu/whl/*.whl \
    && export PYTHONPATH="/tmp/dtk-site${PYTHONPATH:+:$PYTHONPATH}" || echo "warning: carried wheels not installed"
fi

echo "== build ($(left) s left)"
# a CMake cache configured here without CUDA (DTK_WITH_CUDA=0 builds) would keep CUDA off: drop it
for c in build/temp*/dtk._C/CMakeCache.txt; do
  if [ -f "$c" ] && grep -q '^DTK_WITH_CUDA:BOOL=OFF' "$c"; then rm -f "$c"; fi
done
TORCH_CUDA_ARCH_LIST=9.0a MAX_JOBS=16 timeout "$(left)" "$PY" setup.py build_ext --inplace > "$OUT/build.log" 2>&1 \
  || { echo "BUILD FAILED"; tail -n 40 "$OUT/build.log"; exit 1; }
tail -n 3 "$OUT/build.log" && rm -f "$OUT/build.log"   # kept only when the build fails
echo "build done at ${SECONDS} s"
export PYTHONPATH="$PWD/python:$PWD${PYTHONPATH:+:$PYTHONPATH}"

# tests, never blocking the benchmarks: first the GPU-marked tests (all of them, <= 150 s; 8 workers:
# compiling Triton kernels is what takes the time, and the machine has 16 cores; stop 11 with 4 workers
# ran ~175 of ~190 in 150 s), then the
# rest with -x while time allows (CI runs those on CPUs anyway)
# RUN_TESTS=0 skips them (a second run on the same warm machine, e.g. BENCH_OPS=e2e only)
T_TESTS=$(( $(left) / 3 < 150 ? $(left) / 3 : 150 ))
[ "${RUN_TESTS:-1}" = 0 ] && T_TESTS=0
echo "== GPU tests (timeout ${T_TESTS} s)"
rc_tests=0
# tests use each kernel's default launch configuration: autotuning every head dim would only add
# compile time; the benchmarks below autotune
if [ "$T_TESTS" -gt 0 ]; then
  # SIGINT at the timeout: pytest stops and still prints its summary; the failures log (conftest)
  # names each failed test with its traceback as it fails
  rm -f /tmp/dtk-test-failures.log
  DTK_TEST_FAILURES=/tmp/dtk-test-failures.log DTK_TRITON_AUTOTUNE=0 timeout -s INT -k 20 "$T_TESTS" \
    "$PY" -m pytest tests -q -rfE -m "gpu or triton_engine" -n "${TEST_WORKERS:-8}" -p no:cacheprovider --durations=15 \
    2>&1 | tee "$OUT/tests.log" || rc_tests=$?
  echo "GPU tests rc=$rc_tests at ${SECONDS} s" | tee -a "$OUT/tests.log"
  if [ -s /tmp/dtk-test-failures.log ]; then
    { echo "== failures as they happened"; cat /tmp/dtk-test-failures.log; } >> "$OUT/tests.log"
    grep '^FAILED' /tmp/dtk-test-failures.log
  fi
fi
if [ "$T_TESTS" -gt 0 ] && [ $(( $(left) - 60 )) -ge 390 ]; then
  echo "== other tests (timeout 60 s)" | tee -a "$OUT/tests.log"
  rc_rest=0
  DTK_TRITON_AUTOTUNE=0 timeout 60 "$PY" -m pytest tests -q -x -m "not gpu and not triton_engine" -p no:cacheprovider 2>&1 | tee -a "$OUT/tests.log" || rc_rest=$?
  echo "other tests rc=$rc_rest at ${SECONDS} s" | tee -a "$OUT/tests.log"
  [ "$rc_tests" -eq 0 ] && rc_tests=$rc_rest
fi

# optional block/launch-config sweep of the window engine (benchmarks/window_sweep.py), SWEEP_S
# seconds before the suite (0, the default, skips it); SWEEP_ARGS e.g. "--shape dense-* --shape na2d-*"
SWEEP_S="${SWEEP_S:-0}"
if [ "$SWEEP_S" -gt 0 ]; then
  echo "== window sweep (timeout ${SWEEP_S} s)"
  # shellcheck disable=SC2086
  timeout "$SWEEP_S" "$PY" -m benchmarks.window_sweep --json "$OUT/sweep.json" ${SWEEP_ARGS:-} 2>&1 \
    | tee "$OUT/bench.log" || echo "sweep cut or failed at ${SECONDS} s"
fi

# optional launch-config sweep of the linear-attention forward (benchmarks/linear_sweep.py; its
# table goes to bench.log), LSWEEP_S seconds (0, the default, skips it); LSWEEP_ARGS e.g. "--shape flux4k-*"
LSWEEP_S="${LSWEEP_S:-0}"
if [ "$LSWEEP_S" -gt 0 ]; then
  echo "== linear sweep (timeout ${LSWEEP_S} s)"
  # shellcheck disable=SC2086
  timeout "$LSWEEP_S" "$PY" -m benchmarks.linear_sweep ${LSWEEP_ARGS:-} 2>&1 | tee -a "$OUT/bench.log" \
    || echo "linear sweep cut or failed at ${SECONDS} s"
fi

# optional host-overhead profile (benchmarks/host_profile.py; its tables go to bench.log), e.g.
# HOSTPROF_ARGS="--op linear --shape sd15-512-64x64-d40" (unset, the default, skips it)
if [ -n "${HOSTPROF_ARGS:-}" ]; then
  echo "== host profile (timeout 60 s)"
  # shellcheck disable=SC2086
  timeout 60 "$PY" -m benchmarks.host_profile ${HOSTPROF_ARGS} 2>&1 | tee -a "$OUT/bench.log" | grep "ms host per call" \
    || echo "host profile cut or failed at ${SECONDS} s"
fi

# benchmarks: anchors stop at the budget; dtk rows always run; JSON is rewritten after every case.
# WHEEL_S seconds are kept for the CPU-only wheel check at the end (0 skips it).
WHEEL_S="${WHEEL_S:-150}"
T_BENCH=$(( $(left) - 15 - WHEEL_S ))
BUDGET=$(( T_BENCH - 120 < 300 ? T_BENCH - 120 : 300 ))
[ "$BUDGET" -lt 30 ] && BUDGET=30
echo "== benchmarks (timeout ${T_BENCH} s, --budget-s ${BUDGET})"
rc_bench=0
# shellcheck disable=SC2086  # BENCH_ARGS: extra CLI flags, e.g. "--shape na2d-* --skip-anchor sdpa-math"
# families in order of importance (BENCH_OPS), so a run cut short keeps the headline results
ops_args=""; for op in ${BENCH_OPS:-window sparse linear rotary layout window-bwd sparse-bwd e2e}; do ops_args="$ops_args --op $op"; done
timeout "$T_BENCH" "$PY" -m benchmarks --gpu --json "$OUT/bench.json" \
  --budget-s "$BUDGET" $ops_args ${BENCH_ARGS:-} 2>&1 | tee -a "$OUT/bench.log" || rc_bench=$?
echo "bench rc=$rc_bench at ${SECONDS} s"

# the page and the plot come from the JSON, so a run cut short still gets both
if [ -f "$OUT/bench.json" ]; then
  "$PY" -m benchmarks.results_md "$OUT/bench.json" -o "$OUT/RESULTS.md" --plot "$OUT/bench.png" \
    || echo "results_md failed"
fi

# does a CPU-only wheel (no CUDA C++) serve CUDA tensors through its Triton kernels?
rc_wheel=0
if [ "$WHEEL_S" -gt 0 ] && [ "$(left)" -gt 30 ]; then
  echo "== CPU-only wheel on the GPU (timeout $(( $(left) < WHEEL_S ? $(left) : WHEEL_S )) s)"
  timeout "$(( $(left) < WHEEL_S ? $(left) : WHEEL_S ))" bash scripts/gpu_check_wheel.sh > /dev/null 2>&1 || rc_wheel=$?
  grep -E "^(ok|FAIL)|wheel_smoke:" "$OUT/wheel_smoke.log" 2>/dev/null | tail -n 20
  [ "$rc_wheel" -eq 0 ] && rm -f "$OUT/wheel_build.log"   # keep $OUT within 8 files
  echo "wheel check rc=$rc_wheel"
fi
echo "== done in ${SECONDS} s (tests rc=$rc_tests, bench rc=$rc_bench, wheel rc=$rc_wheel)"
exit $(( rc_tests != 0 || rc_bench != 0 || rc_wheel != 0 ))
