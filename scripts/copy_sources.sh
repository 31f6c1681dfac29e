#!/usr/bin/env bash
# copy_sources.sh DEST: copies the source tree (what git tracks, plus untracked files it does not
# ignore) to DEST, so that no in-place build output (build/, python/dtk/_C*.so, __pycache__) reaches
# a wheel built from it. Without git metadata (the GPU machine gets the tree without .git) it copies
# everything but the usual build outputs and local environments.
set -euo pipefail
dest="$1"
mkdir -p "$dest"
if git rev-parse --is-inside-work-tree > /dev/null 2>&1; then
  git ls-files -z --cached --others --exclude-standard | while IFS= read -r -d '' f; do
    if [ -f "$f" ]; then printf '%s\0' "$f"; fi   # not submodule links (third_party/cutlass)
  done | tar --null -T - -cf - | tar -xf - -C "$dest"
else
  tar --exclude=./build --exclude=./dist --exclude=./.venv --exclude=./.gpu --exclude='./gpu_check_out' \
      --exclude='__pycache__' --exclude='*.so' --exclude='*.egg-info' -cf - . | tar -xf - -C "$dest"
fi
