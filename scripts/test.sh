#!/usr/bin/env bash
# The test command of the README: builds dtk (C++ and, where nvcc exists, CUDA) and runs every test.
source "$(dirname "$0")/env.sh"
python -m pytest tests -q -n "${PYTEST_WORKERS:-2}" "$@"
