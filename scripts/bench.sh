#!/usr/bin/env bash
# The main job of the README: the benchmark suite (CPU-sized shapes by default; pass --gpu on a GPU).
source "$(dirname "$0")/env.sh"
python -m benchmarks "$@"
