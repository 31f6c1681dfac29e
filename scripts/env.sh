# Sourced by scripts/test.sh and scripts/bench.sh: a project venv (.venv) with dtk built in place.
# Works on a fresh CPU-only machine; compiles the CUDA sources too when nvcc is present.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
stamp=".venv/.dtk-deps-$(sha1sum pyproject.toml | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  python -m pip install -q --upgrade pip
  python -m pip install -q "torch>=2.11" numpy "setuptools>=77" wheel "cmake>=3.24" ninja nvidia-cutlass \
    pytest pytest-xdist matplotlib tqdm "diffusers>=0.35" transformers accelerate "fla-core>=0.6"
  # benchmark peer NATTEN: a pure-Python build (seconds) against the torch above; no visible GPU
  # keeps its setup.py from compiling libnatten (a large CUDA library: far too slow here)
  env -u NATTEN_CUDA_ARCH CUDA_VISIBLE_DEVICES= python -m pip install -q --no-build-isolation "natten>=0.20"
  touch "$stamp"
fi
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDA_HOME=/usr/local/cuda   # the toolkit root holding lib64/libcudart.so
fi
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
# The editable install (re)builds dtk._C; skipped when nothing the build reads has changed since the
# last one (the C++/CUDA sources, the build files, torch, the build switches): the Python sources
# are used in place anyway. A second script in the same run (CI) then costs no rebuild check.
build_key="$( { cat CMakeLists.txt setup.py pyproject.toml scripts/torch_cmake_info.py
                find csrc -type f | LC_ALL=C sort | xargs cat
                python -c "import torch; print(torch.__version__)"
                echo "${DTK_WITH_CUDA:-}|${TORCH_CUDA_ARCH_LIST:-}|${CUDA_HOME:-}"; } | sha1sum | cut -c1-16)"
if [ ! -f ".venv/.dtk-build-$build_key" ] || ! compgen -G "python/dtk/_C*.so" > /dev/null; then
  python -m pip install -q --no-build-isolation --no-deps -e .
  rm -f .venv/.dtk-build-*
  touch ".venv/.dtk-build-$build_key"
fi

# side_path PKG VERSION: PYTHONPATH with PKG==VERSION (installed once, no deps, into
# .venv/PKG-VERSION) first, checked to be what `import PKG` finds: an older supported version
# beside the venv's, without a second venv (scripts/test_adapters_min_diffusers.sh, triton_compat.sh).
side_path() {
  local pkg="$1" ver="$2" dir="$ROOT/.venv/$1-$2"
  if [ ! -f "$dir/$pkg/__init__.py" ]; then
    python -m pip install -q --no-deps --target "$dir" "$pkg==$ver" >&2
  fi
  local path="$dir${PYTHONPATH:+:$PYTHONPATH}"
  PYTHONPATH="$path" python -c "import $pkg as m; assert m.__version__ == '$ver', \
f'expected $pkg $ver first on the path, got {m.__version__} ({m.__file__})'" >&2 || return 1
  echo "$path"
}
