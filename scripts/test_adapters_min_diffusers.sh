#!/usr/bin/env bash
# The adapter tests against the oldest diffusers dtk supports (0.35.2), beside the newest that
# scripts/test.sh runs: 0.35.2 goes into a side folder put first on PYTHONPATH (no second venv).
source "$(dirname "$0")/env.sh"
path="$(side_path diffusers "${MIN_DIFFUSERS:-0.35.2}")"
PYTHONPATH="$path" python -m pytest tests/adapters -q -n "${PYTEST_WORKERS:-2}" "$@"
